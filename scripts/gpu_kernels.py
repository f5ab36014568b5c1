#!/usr/bin/env python
"""GPU checks of the Triton predictor (cab_attention.kernels): correctness, then stage timings.

    python scripts/gpu_kernels.py                 # checks + timings at 8k / 32k / 128k
    python scripts/gpu_kernels.py --no-bench      # checks only (~1-2 min)
    python scripts/gpu_kernels.py --out DIR       # also write DIR/kernels-<device>-<date>.csv

Correctness (a PASS/FAIL table; exit status 1 on any FAIL): the same comparisons as
tests/test_triton_kernels.py, on CUDA, at larger shapes (N up to 32k, 32 query / 8 KV heads, D 128,
bf16 and fp32 inputs): coarsening (exact), the selection kernel on tie-heavy priorities (exact), the
float32 predictor against ``select_blocks(impl="torch")`` for every supported configuration (identical
selections; where float32 summation order flips a near-tie the row count and the kept-priority gap are
shown and must stay tiny), the bf16 fast path (kept-priority gap), ``R`` by ``torch.matmul`` vs fused,
the two-stage kernel against its PyTorch rule, the sort-free BlockMask through FlexAttention, and the
compiled forward (fullgraph, one compile per bucket, compact and full index widths).

Timings (``triton.testing.do_bench`` medians, ms; B=1, 32 q heads, 8 KV heads, D=128, bf16, block 64,
sparsity 0.95): coarsen | score | select | mask build | predictor total, for CAB (Forman fp32 / bf16,
fused and matmul ``R``; triangle; two-stage), magnitude on the same kernels, the PyTorch predictor, and a
tile sweep of the fused curvature kernel; peak memory of the predictor beyond its inputs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# --smoke: the script's own logic on CPU (Triton interpreter) at tiny shapes, to test the script itself.
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import cab_attention as cab  # noqa: E402
from cab_attention import kernels as K  # noqa: E402
from cab_attention.coarsen import coarsen as coarsen_ref  # noqa: E402
from cab_attention.geometry import BlockGrid  # noqa: E402
from cab_attention.select import keep_first, kv_layout, rank_order  # noqa: E402

DEV = "cpu" if SMOKE else "cuda"
ROWS: list[tuple[str, str, str]] = []


def record(name: str, ok: bool, detail: str = "") -> None:
    ROWS.append((name, "PASS" if ok else "FAIL", detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def guarded(name):
    def deco(fn):
        def run(*a, **kw):
            try:
                fn(*a, **kw)
            except Exception as e:  # noqa: BLE001 - a crash is a failed check, keep going
                traceback.print_exc()
                record(name, False, f"raised {type(e).__name__}: {str(e)[:300]}")
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

        return run

    return deco


def qk(b, hq, hkv, nq, nk, d, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(b, hq, nq, d, device=DEV, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, device=DEV, generator=g).to(dtype)
    return q, k


def compare(ref, got, prio=None):
    """(identical, share of rows that differ, mean relative kept-priority gap or None)."""
    same = (
        torch.equal(ref.mask, got.mask)
        and torch.equal(ref.kv_num_blocks, got.kv_num_blocks)
        and torch.equal(ref.kv_indices, got.kv_indices)
    )
    rows = (ref.mask != got.mask).any(-1).float().mean().item()
    gap = None
    if prio is not None:
        free = ref.valid & ~ref.grid.forced(ref.mask.device)
        p = torch.nan_to_num(prio.float(), nan=0.0, posinf=0.0, neginf=0.0)
        best = (p * (ref.mask & free)).sum(-1)
        kept = (p * (got.mask & free)).sum(-1)
        gap = ((best - kept) / best.abs().clamp_min(1e-6)).mean().item()
    return same, rows, gap


# ------------------------------------------------------------------------------------------ checks


@guarded("coarsen")
def check_coarsen():
    shapes = [(1, 32, 8, 1000, 1000, 128, 64), (1, 8, 2, 3001, 10000, 128, 64), (2, 4, 4, 4097, 4097, 64, 32),
              (1, 32, 8, 32768, 32768, 128, 64), (1, 4, 2, 999, 999, 256, 128), (1, 4, 2, 777, 777, 128, 16)]
    if SMOKE:
        shapes = [(1, 2, 1, 100, 150, 32, 16)]
    for dtype in (torch.bfloat16, torch.float32):
        for (b, hq, hkv, nq, nk, d, bs) in shapes:
            q, k = qk(b, hq, hkv, nq, nk, d, dtype)
            grid = BlockGrid.of(q, k, bs, True)
            for method in ("max_l2", "max", "mean"):
                qc, kc = K.coarsen_qk(q, k, bs, method, grid.q_pad_front)
                rq, rk = coarsen_ref(q, bs, method, pad_front=grid.q_pad_front), coarsen_ref(k, bs, method)
                if method == "mean":
                    tol = 1e-5 if dtype == torch.float32 else 1e-2
                    ok = torch.allclose(qc.float(), rq.float(), atol=tol, rtol=tol) and torch.allclose(
                        kc.float(), rk.float(), atol=tol, rtol=tol)
                else:
                    ok = torch.equal(qc, rq) and torch.equal(kc, rk)
                record(f"coarsen {method} {str(dtype)[6:]} {(b, hq, hkv, nq, nk, d, bs)}", ok)


@guarded("select kernel")
def check_select():
    cases = [(131072, 131072, 64, True), (3000, 70000, 64, True), (8192, 8192, 64, False)]
    for (nq, nk, bs, causal) in ([(100, 300, 16, True)] if SMOKE else cases):
        grid = BlockGrid(1, 2, 1, nq, nk, 64, bs, causal)
        mq, mk = grid.num_q_blocks, grid.num_kv_blocks
        g = torch.Generator(device=DEV).manual_seed(nq)
        p = torch.randint(-3, 4, (1, 2, mq, mk), device=DEV, generator=g).float()
        p[torch.rand(p.shape, device=DEV, generator=g) < 0.1] = float("nan")
        p[torch.rand(p.shape, device=DEV, generator=g) < 0.05] = float("-inf")
        p[torch.rand(p.shape, device=DEV, generator=g) < 0.1] = -0.0
        valid, forced = grid.valid(DEV), grid.forced(DEV)
        for s in (0.0, 0.9, 0.98):
            budget = grid.budget(s, DEV)
            want = keep_first(rank_order(p, valid, forced), budget)
            num_w, idx_w = kv_layout(want)
            mask, num, idx = K.select_rows(p, budget, grid.block_offset, causal)
            ok = torch.equal(mask, want) and torch.equal(num, num_w) and torch.equal(idx, idx_w)
            record(f"select ties Mq={mq} Mk={mk} causal={causal} s={s}", ok,
                   "" if ok else f"{(mask != want).any(-1).sum().item()} rows differ")


_SEED = {"score": "forman", "keep": "lowest", "coarsen": "max_l2"}  # the seed's configuration
CONFIGS = [
    ("magnitude", {}),
    ("cab", {}),  # the library default (triangle, keep highest, mean coarsening)
    ("cab", dict(_SEED)),
    ("cab", {**_SEED, "keep": "highest"}),
    ("cab", {"score": "triangle"}),
    ("cab", {"score": "triangle", "norm": "rowmax", "keep": "highest"}),
    ("cab", {"score": "triangle", "norm": "none", "lam": 0.1}),
    ("cab", {"hybrid": 0.25}),
    ("cab", {"share_kv": True}),
]
SHAPES = [  # (B, Hq, Hkv, Nq, Nk, D, bs)
    (1, 4, 2, 1000, 1000, 64, 64),
    (2, 8, 2, 777, 1300, 128, 64),
    (1, 4, 1, 513, 513, 128, 32),
    (1, 4, 4, 2048, 2048, 64, 128),
    (3, 4, 2, 1999, 1999, 128, 16),
    (1, 32, 8, 8192, 8192, 128, 64),
    (1, 32, 8, 32768, 32768, 128, 64),
]


@guarded("predict fp32")
def check_predict():
    for (b, hq, hkv, nq, nk, d, bs) in ([(1, 2, 1, 100, 150, 32, 16)] if SMOKE else SHAPES):
        for dtype in (torch.bfloat16, torch.float32):
            if nq >= 32768 and dtype == torch.float32:
                continue
            q, k = qk(b, hq, hkv, nq, nk, d, dtype, seed=nq)
            for causal in ((True, False) if nq <= 2048 else (True,)):
                for sel, opts in CONFIGS:
                    ref = cab.select_blocks(q, k, selector=sel, sparsity=0.9, block_size=bs, causal=causal,
                                            return_diagnostics=True, **opts)
                    got = K.predict(q, k, selector=sel, sparsity=0.9, block_size=bs, causal=causal, **opts)
                    same, rows, gap = compare(ref, got, ref.diagnostics["priority"])
                    # float32 summation order may flip exact near-ties: allow a few rows at ~zero gap.
                    ok = same or (rows < 5e-3 and abs(gap) < 1e-5 and torch.equal(ref.kv_num_blocks, got.kv_num_blocks))
                    record(f"predict {sel} {opts} {str(dtype)[6:]} causal={causal} {(b, hq, hkv, nq, nk, d, bs)}", ok,
                           "identical" if same else f"rows differ {rows:.2e}, kept-priority gap {gap:.1e}")


@guarded("bf16 fast path")
def check_fast_paths():
    for n in ((256,) if SMOKE else (8192, 32768)):
        q, k = qk(1, 4, 2, n, n, 32, torch.bfloat16, seed=1) if SMOKE else qk(1, 32, 8, n, n, 128, torch.bfloat16, seed=1)
        for opts in ({}, {"score": "triangle"}):
            ref = cab.select_blocks(q, k, selector="cab", sparsity=0.95, return_diagnostics=True, **opts)
            prio = ref.diagnostics["priority"]
            got = K.predict(q, k, sparsity=0.95, precision="bf16", **opts)
            same, rows, gap = compare(ref, got, prio)
            ok = torch.equal(ref.kv_num_blocks, got.kv_num_blocks) and gap < 1e-3
            record(f"precision=bf16 {opts} N={n}", ok, f"rows differ {rows:.3f}, kept-priority gap {gap:.1e}")
            for prec in ("fp32", "bf16"):
                mm = K.predict(q, k, sparsity=0.95, precision=prec, redundancy="matmul", **opts)
                same, rows, gap = compare(ref, mm, prio)
                ok = same or (gap < (1e-5 if prec == "fp32" else 1e-3) and rows < (5e-3 if prec == "fp32" else 1.0))
                record(f"redundancy=matmul precision={prec} {opts} N={n}", ok,
                       "identical" if same else f"rows differ {rows:.2e}, kept-priority gap {gap:.1e}")


@guarded("two-stage")
def check_two_stage():
    from cab_attention.kernels.reference import two_stage_reference

    cases = [(1, 8, 2, 4096, 4096, 128, 64), (2, 4, 2, 1500, 5000, 64, 32), (1, 32, 8, 16384, 16384, 128, 64)]
    for (b, hq, hkv, nq, nk, d, bs) in ([(1, 2, 1, 100, 150, 32, 16)] if SMOKE else cases):
        q, k = qk(b, hq, hkv, nq, nk, d, torch.float32, seed=5)
        for s, keep, norm in ((0.9, "lowest", "blocks"), (0.95, "highest", "none")):
            ref = two_stage_reference(q, k, block_size=bs, sparsity=s, keep=keep, norm=norm)
            got = K.predict(q, k, block_size=bs, sparsity=s, score="triangle", keep=keep, norm=norm, two_stage=True)
            same, rows, _ = compare(ref, got)
            record(f"two-stage {keep}/{norm} s={s} {(b, hq, hkv, nq, nk, d, bs)}", same or rows < 5e-3,
                   "identical" if same else f"rows differ {rows:.2e}")


@guarded("block mask")
def check_block_mask():
    from cab_attention.execute import flex_attention_blocks

    cases = [(1, 8, 2, 4000, 4000, 128, 64, True), (2, 4, 2, 1000, 3000, 64, 64, True),
             (1, 4, 4, 2000, 2000, 64, 64, False), (1, 32, 8, 16384, 16384, 128, 64, True)]
    for (b, hq, hkv, nq, nk, d, bs, causal) in ([(1, 2, 1, 100, 150, 32, 16, True)] if SMOKE else cases):
        q, k = qk(b, hq, hkv, nq, nk, d, torch.bfloat16, seed=9)
        v = torch.randn_like(k)
        for share, compact in ((False, True), (True, True), (False, False)):
            if SMOKE and compact:
                continue  # FlexAttention's CPU lowering needs the full index width
            sel = K.predict(q, k, sparsity=0.9, block_size=bs, causal=causal, share_kv=share)
            want = flex_attention_blocks(q, k, v, sel)
            # Same kernel, BlockMask from K.block_mask instead of to_block_mask.
            orig = type(sel).to_block_mask
            try:
                type(sel).to_block_mask = lambda self, *a, **kw: K.block_mask(self, compact=compact)
                got = flex_attention_blocks(q, k, v, sel)
            finally:
                type(sel).to_block_mask = orig
            err = (got.float() - want.float()).abs().max().item()
            record(f"block_mask share_kv={share} compact={compact} causal={causal} {(b, hq, hkv, nq, nk, d, bs)}",
                   err == 0.0, f"max |diff| {err:.1e} vs to_block_mask")


@guarded("compiled forward")
def check_compiled():
    import torch._dynamo

    from cab_attention.kernels.compiled import cab_attention_compiled

    for compact in (True, False):
        torch._dynamo.reset()
        if SMOKE and compact:
            continue  # FlexAttention's CPU lowering needs the full index width
        for i, n in enumerate((200, 250) if SMOKE else (3000, 3500, 4096)):
            dt = torch.float32 if SMOKE else torch.bfloat16
            q, k = qk(1, 4, 2, n, n, 32, dt, seed=n) if SMOKE else qk(1, 8, 2, n, n, 128, dt, seed=n)
            v = torch.randn_like(k)
            bs = 16 if SMOKE else 64
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                out = cab_attention_compiled(q, k, v, sparsity=0.9, compact=compact, block_size=bs,
                                             min_bucket=256 if SMOKE else 1024)
            sel = K.predict(q, k, sparsity=0.9, block_size=bs)
            ref32 = cab.reference_attention(q.float(), k.float(), v.float(), sel)
            ref = cab.reference_attention(q, k, v, sel)
            e = (out.float() - ref32).abs().max().item()
            e_ref = (ref.float() - ref32).abs().max().item()
            record(f"compiled compact={compact} N={n} (one bucket{', no recompile' if i else ''})",
                   e <= 2 * e_ref + 1e-5, f"err {e:.1e} (bf16 reference err {e_ref:.1e})")


# ------------------------------------------------------------------------------------------ timings


def bench(fn, rep=50):
    if SMOKE:
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def peak_mb(fn):
    if SMOKE:
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del out
    return peak


def run_benchmarks(ns, out_rows):
    s = 0.95
    dev_name = "cpu-smoke" if SMOKE else torch.cuda.get_device_name(0)
    heads, kv_heads, hd = (4, 2, 32) if SMOKE else (32, 8, 128)
    date = datetime.date.today().isoformat()

    def emit(case, n, ms, peak=float("nan")):
        out_rows.append(dict(case=case, n=n, batch=1, heads=heads, kv_heads=kv_heads, head_dim=hd, sparsity=s,
                             ms=round(ms, 4), peak_mb=round(peak, 1), device=dev_name, torch=torch.__version__,
                             date=date))
        print(f"  {case:46s} N={n:6d}  {ms:8.3f} ms" + (f"  peak {peak:7.0f} MiB" if not math.isnan(peak) else ""),
              flush=True)

    variants = [
        ("cab-forman-fp32", dict(selector="cab", **_SEED, precision="fp32")),
        ("cab-forman-tf32", dict(selector="cab", **_SEED, precision="tf32")),
        ("cab-forman-bf16", dict(selector="cab", **_SEED, precision="bf16")),
        ("cab-forman-bf16-matmulR", dict(selector="cab", **_SEED, precision="bf16", redundancy="matmul")),
        ("cab-forman-fp32-matmulR", dict(selector="cab", **_SEED, precision="fp32", redundancy="matmul")),
        ("cab-triangle-bf16", dict(selector="cab", score="triangle", precision="bf16")),
        ("cab-triangle-bf16-two-stage", dict(selector="cab", score="triangle", precision="bf16", two_stage=True)),
        ("magnitude", dict(selector="magnitude")),
        ("cab-forman-bf16-head_chunk8", dict(selector="cab", **_SEED, precision="bf16", head_chunk=8)),
    ]
    for n in ns:
        print(f"-- N={n}", flush=True)
        q, k = qk(1, heads, kv_heads, n, n, hd, torch.bfloat16, seed=0)
        grid = BlockGrid.of(q, k, 64, True)
        budget = K.budget_for(grid, s, DEV)
        qc, kc = K.coarsen_stage(q, k, grid)
        emit("predictor:stage:coarsen", n, bench(lambda: K.coarsen_stage(q, k, grid)))
        for name, v in variants:
            try:
                sk = {key: val for key, val in v.items() if key not in ("selector",)}
                sk.pop("precision", None)
                sk.pop("coarsen", None)  # the coarsening is timed as its own stage (max-L2)
                prec = v.get("precision", "bf16")
                red = sk.pop("redundancy", "fused")
                two = sk.pop("two_stage", False)
                chunk = sk.pop("head_chunk", None)

                def score():
                    return K.score_stage(qc, kc, grid, selector=v["selector"], precision=prec, redundancy=red,
                                         two_stage=two, budget=budget, **sk)

                sc = score()
                emit(f"predictor:stage:score:{name}", n, bench(score))
                emit(f"predictor:stage:select:{name}", n, bench(lambda: K.select_stage(sc, grid, budget)))
                w = int(budget.max())
                emit(f"predictor:stage:select-flex-only:{name}", n,
                     bench(lambda: K.select_stage(sc, grid, budget, write_mask=False, index_width=w)))
                kw = dict(sparsity=s, precision=prec, redundancy=red, two_stage=two, selector=v["selector"],
                          head_chunk=chunk, **sk)
                sel = K.predict(q, k, **kw)
                emit(f"predictor:stage:mask-build:{name}", n, bench(lambda: K.block_mask(sel)))
                del sc, sel
                emit(f"predictor:triton:{name}", n, bench(lambda: K.predict(q, k, **kw)), peak_mb(lambda: K.predict(q, k, **kw)))
            except Exception as e:  # noqa: BLE001
                print(f"  {name}: failed: {type(e).__name__}: {e}", flush=True)
            if not SMOKE:
                torch.cuda.empty_cache()
        for sel_name in ("cab", "magnitude"):
            try:
                f = lambda: cab.select_blocks(q, k, selector=sel_name, sparsity=s)  # noqa: E731
                emit(f"predictor:torch:{sel_name}", n, bench(f, rep=20), peak_mb(f))
                sel = f()
                emit(f"predictor:torch:mask-build(to_block_mask):{sel_name}", n, bench(lambda: sel.to_block_mask()))
                del sel
            except Exception as e:  # noqa: BLE001
                print(f"  torch {sel_name}: failed: {type(e).__name__}: {e}", flush=True)
            if not SMOKE:
                torch.cuda.empty_cache()
        if n == max(ns):
            out = K.affinity(qc, kc, grid.block_offset, True, hd**-0.5, a=True, sums=True, precision="bf16")
            for tiles in ((64, 64, 32, 8), (64, 64, 32, 4), (64, 64, 16, 4), (64, 64, 64, 8), (128, 64, 32, 8),
                          (128, 64, 64, 8), (64, 64, 32, 8, 2), (64, 64, 32, 8, 4), (128, 128, 32, 8)):
                try:
                    f = lambda: K.redundancy_scores(out["A"], grid.block_offset, True, score="forman",  # noqa: E731
                                                    s_out=out["S_out"], s_in=out["S_in"], precision="bf16", tiles=tiles)
                    emit(f"predictor:kernel:curvature-bf16-tiles{tiles}", n, bench(f))
                except Exception as e:  # noqa: BLE001
                    print(f"  tiles {tiles}: failed: {type(e).__name__}: {e}", flush=True)
            a = out["A"]
            lo, mq = grid.block_offset, grid.num_q_blocks
            emit("predictor:kernel:torch.matmul-R-bf16", n, bench(lambda: torch.matmul(a[..., lo:lo + mq], a)))
            del out, a
        del q, k, qc, kc
        if not SMOKE:
            torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description="GPU checks and timings of the Triton predictor")
    ap.add_argument("--no-bench", action="store_true", help="correctness only")
    ap.add_argument("--no-checks", action="store_true", help="timings only")
    ap.add_argument("--ns", default="8192,32768,131072", help="benchmark lengths")
    ap.add_argument("--out", default=None, help="folder for kernels-<device>-<date>.csv")
    ap.add_argument("--smoke", action="store_true", help="run the checks at tiny shapes on CPU (interpreter)")
    args = ap.parse_args()
    if SMOKE:
        args.ns = "512"
    elif not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, "
          f"{'CPU (smoke)' if SMOKE else torch.cuda.get_device_name(0)}", flush=True)
    why = K.unavailable_reason(DEV, torch.bfloat16)
    if why:
        print(f"kernels unavailable: {why}")
        return 2
    if not args.no_checks:
        for check in (check_coarsen, check_select, check_predict, check_fast_paths, check_two_stage,
                      check_block_mask, check_compiled):
            check()
    bench_rows: list[dict] = []
    if not args.no_bench:
        run_benchmarks([int(x) for x in args.ns.split(",")], bench_rows)
    if args.out and bench_rows:
        os.makedirs(args.out, exist_ok=True)
        name = bench_rows[0]["device"].replace(" ", "-")
        path = os.path.join(args.out, f"kernels-{name}-{datetime.date.today().isoformat()}.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(bench_rows[0]))
            w.writeheader()
            w.writerows(bench_rows)
        print(f"wrote {path}")
    fails = [r for r in ROWS if r[1] == "FAIL"]
    if ROWS:
        print("\n" + "=" * 100)
        print(f"{'check':80s} result")
        for name, status, detail in ROWS:
            print(f"{name[:80]:80s} {status}  {detail}")
        print(f"{len(ROWS) - len(fails)}/{len(ROWS)} checks passed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
