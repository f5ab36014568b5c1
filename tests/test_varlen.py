"""Packed variable-length batches (cab_attention.varlen) against per-sequence calls.

One batch covers the awkward cases at once: equal lengths, a sequence without queries, chunked prefill
with an unaligned offset, a sequence shorter than a block (dense path), an aligned chunk, GQA. The packed
``BlockMask`` is checked without compiling anything, by expanding its index lists and ``mask_mod`` to a
token mask over the padded packed axes and running plain float64 attention there: that is what
FlexAttention computes, so the compiled kernel is then checked once (slow) on one small case.
"""

from __future__ import annotations

import pytest
import torch

import cab_attention as cab
from cab_attention.varlen import VarlenSelection, check_varlen, select_blocks_varlen, sparse_attention_varlen
from reference import attention, causal_token_mask, masked_reference

LENS_Q = [70, 0, 33, 10, 130, 16]
LENS_K = [70, 5, 50, 10, 130, 40]
HQ, HKV, D, BS = 4, 2, 16, 16


def cu(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def packed(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(LENS_Q), HQ, D, generator=gen)
    k = torch.randn(sum(LENS_K), HKV, D, generator=gen)
    v = torch.randn(sum(LENS_K), HKV, D, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


ARGS = (cu(LENS_Q), cu(LENS_K), max(LENS_Q), max(LENS_K))


def sequences(q, k, v):
    """Per sequence ``(b, q_b, k_b, v_b)`` as ``[1, H, n, D]``, sequences with queries only."""
    cq, ck = cu(LENS_Q).tolist(), cu(LENS_K).tolist()
    for b in range(len(LENS_Q)):
        if LENS_Q[b]:
            yield b, *(x[c[b] : c[b + 1]].transpose(0, 1).unsqueeze(0) for x, c in ((q, cq), (k, ck), (v, ck)))


def per_sequence(q, k, v, fn):
    """Packed ``[total_q, Hq, D]`` from ``fn(b, q_b, k_b, v_b) -> [1, Hq, n, D]`` per sequence."""
    out = torch.full(q.shape, float("nan"), dtype=torch.float64)
    cq = cu(LENS_Q).tolist()
    for b, qb, kb, vb in sequences(q, k, v):
        out[cq[b] : cq[b + 1]] = fn(b, qb, kb, vb)[0].transpose(0, 1).double()
    return out


CASES = [(sel, {}) for sel in cab.SELECTORS] + [
    ("cab", {"share_kv": True}),
    ("cab", {"threshold": 0.8}),
    ("antidiagonal", {"stride": 4}),
]
IDS = [s + "".join(f"-{k}={v}" for k, v in o.items()) for s, o in CASES]


@pytest.mark.parametrize("selector,options", CASES, ids=IDS)
def test_reference_equals_per_sequence_calls(selector, options):
    q, k, v = packed()
    for causal in (True, False):
        got = sparse_attention_varlen(
            q, k, v, *ARGS, selector=selector, sparsity=0.7, block_size=BS, causal=causal, backend="reference", **options
        )
        assert got.shape == q.shape and got.dtype == q.dtype
        want = per_sequence(
            q, k, v,
            lambda b, qb, kb, vb: cab.sparse_attention(
                qb, kb, vb, selector=selector, sparsity=0.7, block_size=BS, causal=causal, backend="reference", **options
            ),
        )
        assert torch.equal(got, want), f"{selector} causal={causal}"


def expand_block_mask(vs: VarlenSelection, bm) -> torch.Tensor:
    """``[Hq, TQ, TK]`` bool: what FlexAttention attends to under ``bm``, by loops over its index lists
    (full blocks entirely, partial blocks through the mask_mod)."""
    tq, tk = vs.packed_lengths
    rows, cols = torch.arange(tq)[:, None], torch.arange(tk)[None, :]
    tok = bm.mask_mod(0, 0, rows, cols)
    out = torch.zeros(vs.q_heads, tq, tk, dtype=torch.bool)
    for h in range(vs.q_heads):
        for r in range(tq // BS):
            rs = slice(r * BS, r * BS + BS)
            for j in bm.full_kv_indices[0, h, r, : bm.full_kv_num_blocks[0, h, r]].tolist():
                out[h, rs, j * BS : j * BS + BS] = True
            for j in bm.kv_indices[0, h, r, : bm.kv_num_blocks[0, h, r]].tolist():
                out[h, rs, j * BS : j * BS + BS] = tok[rs, j * BS : j * BS + BS]
    return out


@pytest.mark.parametrize("selector,options", CASES[:7], ids=IDS[:7])
def test_packed_block_mask_is_the_per_sequence_selection(selector, options):
    """Attention over the packed layout (what one flex launch computes) equals the independent float64
    reference of every sequence under its own selection mask."""
    q, k, v = packed()
    for causal in (True, False):
        vs = select_blocks_varlen(q, k, *ARGS, selector=selector, sparsity=0.7, block_size=BS, causal=causal, **options)
        bm = vs.to_block_mask()
        assert bm.BLOCK_SIZE == (BS, BS)
        assert bm.seq_lengths == vs.packed_lengths
        allowed = expand_block_mask(vs, bm)
        q_rows, k_rows = vs.packed_rows("cpu")
        tq, tk = vs.packed_lengths
        qp, kp, vp = torch.zeros(tq, HQ, D, dtype=q.dtype), torch.zeros(tk, HKV, D, dtype=q.dtype), torch.zeros(tk, HKV, D, dtype=q.dtype)
        qp[q_rows], kp[k_rows], vp[k_rows] = q, k, v
        as4 = lambda x: x.transpose(0, 1).unsqueeze(0)  # noqa: E731
        got = attention(as4(qp), as4(kp), as4(vp), allowed[None])[0].transpose(0, 1)[q_rows]
        want = per_sequence(
            q, k, v,
            lambda b, qb, kb, vb: masked_reference(qb, kb, vb, vs.selections[b].mask, block_size=BS, causal=causal),
        )
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12, msg=f"{selector} causal={causal}")
        # No block of one sequence's row ever reaches another sequence's keys.
        doc_q = torch.repeat_interleave(torch.arange(len(LENS_Q)), torch.tensor(LENS_Q))
        doc_k = torch.repeat_interleave(torch.arange(len(LENS_K)), torch.tensor(LENS_K))
        reach = allowed[:, q_rows][:, :, k_rows]
        assert not (reach & (doc_q[:, None] != doc_k[None, :])).any()


def test_selection_structure():
    q, k, _ = packed()
    vs = select_blocks_varlen(q, k, *ARGS, selector="magnitude", sparsity=0.6, block_size=BS)
    assert vs.batch == len(LENS_Q) and vs.selections[1] is None
    for b, qb, kb, _ in sequences(q, k, k):
        one = cab.select_blocks(qb, kb, selector="magnitude", sparsity=0.6, block_size=BS)
        assert torch.equal(vs.selections[b].mask, one.mask) and vs.selections[b].grid == one.grid
    mq = [s.grid.num_q_blocks if s else 0 for s in vs.selections]
    mk = [s.grid.num_kv_blocks if s else -(-nk // BS) for s, nk in zip(vs.selections, LENS_K)]
    assert vs.q_block_starts == cu(mq).tolist() and vs.kv_block_starts == cu(mk).tolist()
    assert vs.packed_lengths == (sum(mq) * BS, sum(mk) * BS)
    q_rows, k_rows = vs.packed_rows("cpu")  # one packed row per token, never shared
    assert q_rows.unique().numel() == q_rows.numel() == sum(LENS_Q) and q_rows.max() < vs.packed_lengths[0]
    assert k_rows.unique().numel() == k_rows.numel() == sum(LENS_K) and k_rows.max() < vs.packed_lengths[1]
    assert 0.0 < vs.density < 1.0
    assert select_blocks_varlen(q, k, *ARGS, selector="dense", block_size=BS).density == 1.0


def test_sparsity_zero_is_dense_varlen():
    q, k, v = packed()
    for causal in (True, False):
        want = per_sequence(
            q, k, v,
            lambda b, qb, kb, vb: attention(qb, kb, vb, causal_token_mask(qb.shape[2], kb.shape[2], causal)),
        )
        for selector in cab.SELECTORS:
            got = sparse_attention_varlen(
                q, k, v, *ARGS, selector=selector, sparsity=0.0, block_size=BS, causal=causal, backend="reference"
            )
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12, msg=f"{selector} causal={causal}")


def test_given_selection():
    q, k, v = packed()
    vs = select_blocks_varlen(q, k, *ARGS, selector="streaming", sparsity=0.5, block_size=BS)
    a = sparse_attention_varlen(q, k, v, *ARGS, selection=vs, block_size=BS, backend="reference")
    b = sparse_attention_varlen(q, k, v, *ARGS, selector="streaming", sparsity=0.5, block_size=BS, backend="reference")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="selection was made for"):
        sparse_attention_varlen(q, k, v, *ARGS, selection=vs, block_size=2 * BS, backend="reference")
    with pytest.raises(ValueError, match="no effect with a given selection"):
        sparse_attention_varlen(q, k, v, *ARGS, selection=vs, block_size=BS, backend="reference", coarsen="mean")
    with pytest.raises(ValueError, match="VarlenSelection"):
        sparse_attention_varlen(q, k, v, *ARGS, selection=vs.selections[0], block_size=BS, backend="reference")


@pytest.mark.slow
def test_flex_cpu_compiled_matches_reference():
    """One compile (float32, causal): the packed launch equals the per-sequence reference, and at
    sparsity > 0 differs from dense (so the block indices were not ignored)."""
    q, k, v = packed(torch.float32, seed=3)
    dense = sparse_attention_varlen(q, k, v, *ARGS, selector="dense", block_size=BS, backend="reference")
    for selector, sparsity in (("dense", 0.0), ("cab", 0.0), ("cab", 0.7), ("magnitude", 0.6), ("oracle", 0.8)):
        vs = select_blocks_varlen(q, k, *ARGS, selector=selector, sparsity=sparsity, block_size=BS)
        got = sparse_attention_varlen(q, k, v, *ARGS, selection=vs, block_size=BS, backend="flex")
        want = sparse_attention_varlen(q, k, v, *ARGS, selection=vs, block_size=BS, backend="reference")
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5, msg=f"{selector} at {sparsity}")
        if vs.density < 1.0:
            assert not torch.allclose(got, dense, atol=1e-4), f"{selector}: flex ignored the block mask"


# --------------------------------------------------------------------------------------------------
# bad inputs


def _bad_cases():
    q, k, v = packed(torch.float32)
    cq, ck, mq, mk = ARGS
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    tq, tk = sum(LENS_Q), sum(LENS_K)
    return [
        ("q 4-D", (q[None], k, v, cq, ck, mq, mk), "q must be 3-D"),
        ("k not a tensor", (q, k.tolist(), v, cq, ck, mq, mk), "k must be a torch.Tensor"),
        ("int q", (q.long(), k, v, cq, ck, mq, mk), "q must be a floating tensor"),
        ("dtype mismatch", (q, k.double(), v, cq, ck, mq, mk), "share one dtype"),
        ("head_dim", (q, k[..., :8], v, cq, ck, mq, mk), "head_dim differs"),
        ("v heads", (q, k, v[:, :1], cq, ck, mq, mk), "k and v must have the same"),
        ("gqa", (q[:, :3], k, v, cq, ck, mq, mk), "multiple of the key/value heads"),
        ("int64 cu", (q, k, v, cq.long(), ck, mq, mk), "cu_seqlens_q must be int32"),
        ("2-D cu", (q, k, v, cq[None], ck, mq, mk), r"cu_seqlens_q must be 1-D \[B \+ 1\]"),
        ("not from 0", (q, k, v, cq, i32([1, 70, 75, 125, 135, 265, 305]), mq, mk), "cu_seqlens_k must start at 0"),
        ("decreasing", (q, k, v, i32([0, 70, 60, 103, 113, 243, 259][:6] + [tq]), ck, mq, mk), "non-decreasing"),
        ("last != total", (q, k, v, i32([0, 70, 70, 103, 113, 243, tq - 1]), ck, mq, mk), r"cu_seqlens_q\[-1\]"),
        ("batch mismatch", (q, k, v, cq, i32([0, 70, 75, 125, 135, tk]), mq, mk), "B=6 .* B=5"),
        ("max_seqlen_q small", (q, k, v, cq, ck, mq - 1, mk), "max_seqlen_q = 129 is smaller than the length of sequence 4"),
        ("max_seqlen_k float", (q, k, v, cq, ck, mq, float(mk)), "max_seqlen_k must be an int"),
        ("nq > nk", (q, k, v, cq, i32([0, 70, 75, 125, 134, 264, tk]), mq, mk), "sequence 3 has more queries than keys"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs(case):
    _, args, match = case
    with pytest.raises(ValueError, match=match):
        sparse_attention_varlen(*args, selector="magnitude", sparsity=0.5, block_size=BS, backend="reference")


def test_bad_options():
    q, k, v = packed(torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_attention_varlen(q, k, v, *ARGS, backend="cuda")
    with pytest.raises(ValueError, match="block_size must be a positive power of two"):
        sparse_attention_varlen(q, k, v, *ARGS, block_size=24)
    with pytest.raises(ValueError, match="sparsity must be"):
        sparse_attention_varlen(q, k, v, *ARGS, sparsity=1.0, block_size=BS)
    with pytest.raises(ValueError, match="unknown option"):
        select_blocks_varlen(q, k, *ARGS, selector="magnitude", block_size=BS, lam=0.5)
    with pytest.raises(ValueError, match="CPU does not support float16"):
        sparse_attention_varlen(q.half(), k.half(), v.half(), *ARGS, block_size=BS, backend="flex")
    assert check_varlen(q, k, v, *ARGS) == (LENS_Q, LENS_K)


def test_benchmark_dry_run(tmp_path):
    """``cab bench varlen --dry-run``: the command and its CSV (tiny CPU batch, host timers)."""
    import csv

    from cab_eval.benchmark import varlen as bench

    path = tmp_path / "varlen.csv"
    assert bench.main(["--dry-run", "--csv", str(path), "--selectors", "magnitude", "--sparsities", "0.9"]) == 0
    rows = list(csv.DictReader(open(path)))
    cases = [r["case"] for r in rows]
    assert cases == ["dense:sdpa-loop", "dense:sdpa-padded", "magnitude:varlen-predictor", "magnitude:varlen-total",
                     "magnitude:padded-total"]
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 and r["device"] == "cpu host timer" for r in rows)
    assert bench.main(["--device", "cpu"]) == 2  # CPU figures only as a dry run
