"""GPU check of packed variable-length batches and context parallel attention,
in one go: about 2-3 minutes on one H200, most of it FlexAttention compiles.

1. Correctness of the packed FlexAttention launch (cab_attention.varlen) on CUDA: one awkward batch
   (equal lengths, a sequence without queries, chunked prefill at an unaligned offset, a sequence shorter
   than a block, GQA), every selector at sparsity 0 and 0.8, bf16 and fp32. The rule (flash-attention's):
   ``|flex - ref32| <= 2 |ref - ref32| + 1e-5`` where ``ref`` is the per-sequence reference backend in the
   same dtype and ``ref32`` the same in float32 (float64 for fp32 inputs); at sparsity > 0 the output must
   also differ from dense. The narrow ``kv_indices`` (CUDA default) must give the same output as the
   full-width mask, bit for bit.
2. Context parallel at P = 1 over NCCL (cab_attention.distributed, reference backend): equal to
   one-process ``sparse_attention`` bit for bit (the all-to-alls are copies at P = 1).
3. ``cab bench varlen`` at B = 32, lengths 1k..16k (cab and magnitude at 0.9 and 0.95).
4. ``cab bench distributed`` under torchrun with one process (N = 32k, 0.95), if time is left.

Writes under $OUT (default runs/gpu_scale): gpu_scale.log, varlen_correctness.csv, bench_varlen.csv,
bench_distributed.csv. Prints a short table last. Run from the repository root:
``PYTHONPATH=$PWD python3 scripts/gpu_scale.py``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())
T0 = time.monotonic()
OUT = Path(os.environ.get("OUT") or "runs/gpu_scale")
OUT.mkdir(parents=True, exist_ok=True)
LOG = open(OUT / "gpu_scale.log", "a")
BUDGET_S = 170.0  # skip the last (optional) part past this


def log(msg: str) -> None:
    line = f"[{time.monotonic() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    LOG.write(line + "\n")
    LOG.flush()


import torch  # noqa: E402

import cab_attention as cab  # noqa: E402
from cab_attention.varlen import packed_flex_attention, select_blocks_varlen, sparse_attention_varlen  # noqa: E402

summary: list[tuple[str, str]] = []


def correctness() -> None:
    dev = "cuda"
    lens_q = [1000, 0, 777, 40, 2048, 513]
    lens_k = [1000, 300, 1300, 40, 2048, 513]
    hq, hkv, d, bs = 8, 2, 128, 64
    cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0).tolist()), dtype=torch.int32, device=dev)  # noqa: E731
    args = (cu(lens_q), cu(lens_k), max(lens_q), max(lens_k))
    rows, fails = [], 0
    for dtype in (torch.bfloat16, torch.float32):
        gen = torch.Generator(device=dev).manual_seed(17)
        q = torch.randn(sum(lens_q), hq, d, device=dev, generator=gen).to(dtype)
        k = torch.randn(sum(lens_k), hkv, d, device=dev, generator=gen).to(dtype)
        v = torch.randn(sum(lens_k), hkv, d, device=dev, generator=gen).to(dtype)
        hi = torch.float64 if dtype == torch.float32 else torch.float32
        dense = sparse_attention_varlen(q, k, v, *args, selector="dense", block_size=bs, backend="reference")
        for selector in cab.SELECTORS:
            for sparsity, opts in ((0.0, {}), (0.8, {}), (0.8, {"share_kv": True})):
                if opts and selector != "cab":
                    continue
                vs = select_blocks_varlen(q, k, *args, selector=selector, sparsity=sparsity, block_size=bs, **opts)
                ref_hi = sparse_attention_varlen(q.to(hi), k.to(hi), v.to(hi), *args, selection=vs, block_size=bs, backend="reference")
                ref = sparse_attention_varlen(q, k, v, *args, selection=vs, block_size=bs, backend="reference")
                fl = sparse_attention_varlen(q, k, v, *args, selection=vs, block_size=bs, backend="flex")
                e_ref = (ref.to(hi) - ref_hi).abs().max().item()
                e_fl = (fl.to(hi) - ref_hi).abs().max().item()
                ok = bool(torch.isfinite(fl).all()) and e_fl <= 2 * e_ref + 1e-5
                note = ""
                if vs.density < 1.0 and torch.allclose(fl.float(), dense.float(), atol=1e-3):
                    ok, note = False, "equals dense: block mask ignored"
                if dtype == torch.bfloat16 and not opts:
                    wide = packed_flex_attention(q, k, v, vs, block_mask=vs.to_block_mask(full_width=True))
                    if not torch.equal(wide, fl):
                        ok, note = False, f"narrow != full-width mask (max {(wide.float() - fl.float()).abs().max().item():.2e})"
                fails += not ok
                name = selector + ("+share_kv" if opts else "")
                rows.append(dict(dtype=str(dtype), selector=name, sparsity=sparsity, density=f"{vs.density:.3f}",
                                 err_flex=f"{e_fl:.3e}", err_ref=f"{e_ref:.3e}", ok=ok, note=note))
                if not ok or selector == "cab":
                    log(f"{'OK ' if ok else 'BAD'} varlen {name:14s} s={sparsity} {dtype} flex_err={e_fl:.2e} ref_err={e_ref:.2e} {note}")
    with open(OUT / "varlen_correctness.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary.append(("varlen flex vs reference (CUDA)", f"{len(rows) - fails}/{len(rows)} ok"))


def context_parallel_p1() -> None:
    import socket

    import torch.distributed as dist

    from cab_attention import distributed as cp

    for name, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ[name] = value
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    ok = total = 0
    try:
        gen = torch.Generator(device="cuda").manual_seed(5)
        q = torch.randn(1, 8, 4096, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
        k = torch.randn(1, 2, 4096, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
        v = torch.randn(1, 2, 4096, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
        for selector in ("cab", "magnitude", "random", "antidiagonal"):
            # The reference backend: no compile here (the torchrun benchmark below runs flex).
            want = cab.sparse_attention(q, k, v, selector=selector, sparsity=0.9, backend="reference")
            got = cp.context_parallel_attention(q, k, v, selector=selector, sparsity=0.9, backend="reference")
            same = torch.equal(got, want)
            ok += same
            total += 1
            log(f"{'OK ' if same else 'BAD'} context parallel P=1 nccl {selector}: max diff {(got.float() - want.float()).abs().max().item():.2e}")
    finally:
        dist.destroy_process_group()
    summary.append(("context parallel P=1 (NCCL) == one process", f"{ok}/{total} bit-equal"))


def varlen_bench() -> None:
    import importlib

    bench = importlib.import_module("cab_eval.benchmark.varlen")
    path = OUT / "bench_varlen.csv"
    rc = bench.main(["--csv", str(path), "--selectors", "cab,magnitude", "--sparsities", "0.9,0.95"])
    summary.append(("cab bench varlen", f"rc={rc}"))
    if path.exists():
        rows = list(csv.DictReader(open(path)))
        base = next((float(r["ms"]) for r in rows if r["case"] == "dense:sdpa-loop"), float("nan"))
        for r in rows:
            ms = float(r["ms"])
            summary.append((f"  {r['case']} {r['sparsity']}".rstrip(),
                            f"{ms:9.2f} ms  x{base / ms:5.2f} vs sdpa-loop  {r['status'][:40]}"))


def distributed_bench() -> None:
    if time.monotonic() - T0 > BUDGET_S:
        log(f"skipped cab bench distributed (torchrun, P=1): past the {BUDGET_S:.0f} s budget")
        summary.append(("cab bench distributed P=1", "skipped (time)"))
        return
    path = OUT / "bench_distributed.csv"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "cab_eval.benchmark.distributed",
           "--lengths", "32k", "--sparsities", "0.95", "--warmup", "2", "--reps", "5", "--csv", str(path)]
    log("running " + " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    LOG.write(res.stdout + res.stderr)
    summary.append(("cab bench distributed P=1 (torchrun)", f"rc={res.returncode}"))
    if path.exists():
        for r in csv.DictReader(open(path)):
            summary.append((f"  {r['case']} N={r['n']} {r['sparsity']}".rstrip(), f"{float(r['ms']):9.2f} ms  {r['status'][:40]}"))
    else:
        log((res.stdout + res.stderr)[-2000:])


def main() -> int:
    log(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    for part in (correctness, context_parallel_p1, varlen_bench, distributed_bench):
        t = time.monotonic()
        try:
            part()
        except Exception as e:  # noqa: BLE001 - report and go on to the next part
            import traceback

            log(f"{part.__name__} FAILED: {type(e).__name__}: {e}")
            LOG.write(traceback.format_exc())
            summary.append((part.__name__, f"FAILED: {type(e).__name__}"))
        log(f"{part.__name__} took {time.monotonic() - t:.1f} s")
    print(f"\n==== gpu_scale summary ({torch.cuda.get_device_name(0)}, {time.monotonic() - T0:.0f} s) ====")
    for name, value in summary:
        print(f"{name:48s} {value}")
    LOG.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
