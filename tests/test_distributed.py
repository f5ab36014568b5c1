"""Context parallel attention (cab_attention.distributed) on CPU: gloo with 2 and 4 processes.

Four processes are spawned once: P = 4 runs over the world group and P = 2 over the pairs {0, 1} and
{2, 3} (non-default groups). Each worker loops over every selector (and the option variants that change
how heads interact: ``share_kv``, adaptive ``threshold``), compares its output shard with the matching
rows of the one-process ``sparse_attention`` on the full inputs, runs the error cases, and writes what
it saw to a JSON file that the test then checks. Comparisons are float32; the
selections are compared exactly (a selection that differed would show as a large output difference).
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cab_attention as cab
from cab_attention import distributed as cp

B, HQ, HKV, D, BS = 2, 8, 4, 16, 32
N = 256  # keys; chunked prefill uses the last NQ_CHUNK of them
NQ_CHUNK = 128
# (selector, sparsity, options): every selector at 0.7, sparsity 0 once, and the options that change how
# heads interact (share_kv: a KV group's mask; threshold: adaptive budgets).
CASES = [(sel, 0.7, {}) for sel in cab.SELECTORS] + [
    ("cab", 0.0, {}),
    ("cab", 0.7, {"share_kv": True}),
    ("cab", 0.7, {"threshold": 0.8}),
    ("random", 0.7, {"threshold": 0.8, "share_kv": True}),
]


def _name(selector, sparsity, options):
    return f"{selector}-s{sparsity}" + "".join(f"-{k}={v}" for k, v in options.items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(nq, nk, hq=HQ, hkv=HKV, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, hq, nq, D, generator=gen),
        torch.randn(B, hkv, nk, D, generator=gen),
        torch.randn(B, hkv, nk, D, generator=gen),
    )


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return ""


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One of 4 processes: P = 4 over the world group, P = 2 over the pair {0, 1} or {2, 3} (a
    non-default group), sharing the one-process reference of each case."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in order
    groups = {4: None, 2: pairs[rank // 2]}
    report: dict = {p: {"compare": {}, "errors": {}} for p in groups}
    try:
        for nq in (N, NQ_CHUNK):
            q, k, v = _inputs(nq, N)
            shards = {p: tuple(cp.shard_sequence(x, g) for x in (q, k, v)) for p, g in groups.items()}
            for p, g in groups.items():
                qs, ks, _ = shards[p]
                # The all-to-alls alone are exact inverses, and gather_sequence undoes shard_sequence.
                report[p]["compare"][f"roundtrip-nq{nq}"] = [
                    torch.equal(cp.head_to_seq(cp.seq_to_head(qs, g), g), qs),
                    torch.equal(cp.gather_sequence(ks, g), k),
                ]
            for selector, sparsity, options in CASES:
                kw = dict(selector=selector, sparsity=sparsity, block_size=BS, backend="reference", **options)
                one_process = cab.sparse_attention(q, k, v, **kw)
                for p, g in groups.items():
                    want = cp.shard_sequence(one_process, g)
                    got = cp.context_parallel_attention(*shards[p], group=g, **kw)
                    err = (got - want).abs().max().item()
                    report[p]["compare"][f"{_name(selector, sparsity, options)}-nq{nq}"] = [torch.equal(got, want), err]
        # Errors: every rank of a group raises the same ValueError, so no rank waits in a collective.
        q, k, v = _inputs(N, N, hq=6, hkv=3)  # 3 KV heads: divisible by neither 2 nor 4
        for p, g in groups.items():
            e = report[p]["errors"]
            e["heads"] = _error(lambda: cp.context_parallel_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], group=g))
            e["length"] = _error(lambda: cp.shard_sequence(torch.zeros(1, 1, N + 1, 4), g))
            n_local = 64 + (dist.get_rank(g) == 0) * BS  # the group's first rank holds a longer shard
            qu, ku, vu = _inputs(n_local, n_local)
            e["unequal"] = _error(lambda: cp.context_parallel_attention(qu, ku, vu, group=g))
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


@pytest.fixture(scope="module")
def all_reports(tmp_path_factory):
    """Spawn 4 processes once; both world sizes run inside."""
    out = tmp_path_factory.mktemp("cp")
    mp.spawn(_worker, args=(4, _free_port(), str(out)), nprocs=4, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


@pytest.fixture(params=[2, 4], ids=["P2", "P4"])
def reports(request, all_reports):
    world = request.param
    return world, [rep[str(world)] for rep in all_reports]


def test_matches_one_process_for_every_selector(reports):
    world, per_rank = reports
    for rank, rep in enumerate(per_rank):
        expected = 2 * (1 + len(CASES))  # two query lengths x (round trip + cases)
        assert len(rep["compare"]) == expected
        for name, (exact, err) in rep["compare"].items():
            if name.startswith("roundtrip"):
                assert exact and err, f"P={world} rank {rank}: {name}"
                continue
            # Bit-for-bit is what CPU gives; fp32 noise is what the contract allows.
            assert exact or err < 1e-5, f"P={world} rank {rank}: {name} differs from one process by {err:.3e}"


def test_errors(reports):
    world, per_rank = reports
    for rep in per_rank:
        e = rep["errors"]
        assert f"divisible by the world size P={world}" in e["heads"] and "ring attention" in e["heads"], e["heads"]
        assert f"N={N + 1}" in e["length"] and f"world size P={world}" in e["length"], e["length"]
        assert "equal contiguous shard" in e["unequal"], e["unequal"]


def test_needs_a_process_group():
    q, k, v = _inputs(64, 64)
    if dist.is_initialized():  # pragma: no cover - the test process never initialises one
        pytest.skip("a process group is already initialised")
    with pytest.raises(ValueError, match="initialised torch.distributed process group"):
        cp.context_parallel_attention(q, k, v)


def test_benchmark_dry_run(tmp_path):
    """``cab bench distributed --dry-run`` as one process (it starts and ends a one-rank gloo group)."""
    import csv

    from cab_eval.benchmark import distributed as bench

    path = tmp_path / "dist.csv"
    argv = ["--dry-run", "--csv", str(path), "--lengths", "128", "--sparsities", "0.9", "--warmup", "0", "--reps", "1"]
    assert bench.main(argv) == 0
    assert not dist.is_initialized()
    rows = list(csv.DictReader(open(path)))
    assert [r["case"] for r in rows] == ["a2a:qkv", "a2a:out", "attention:sdpa-dense", "total:sdpa-dense",
                                         "predictor:cab", "attention:cab", "total:cab"]
    assert all(r["status"] == "ok" and r["world_size"] == "1" and r["dist_backend"] == "gloo" for r in rows)
    assert os.environ["NCCL_NVLS_ENABLE"] == "0" and os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
