"""GPU check and timing of the block-sparse Triton attention kernel (``backend="triton"``).

Part 1, correctness (CUDA): every supported shape family (odd N, chunked queries aligned and not, B > 1,
GQA, shared_kv, D 64/80/128/256, blocks 16/32/64/128, causal and not) in bf16 and fp16 (one fp32 case),
at sparsity 0, 0.5 and 0.9 (random valid selections with the sink and diagonal forced), fresh random
inputs per case, the output poisoned with NaN before the launch. Rule: max error against a float64
reference (token mask from ``BlockSelection.token_mask``) at most 2x that of a same-precision PyTorch
reference (matmul, softmax, matmul in the inputs' dtype); sparsity 0 also against ``dense_attention``.

Part 2, timing (``triton.testing.do_bench`` median, inputs rotated below 32k): B=1, 32 query / 8 KV heads,
D=128, bf16, causal, at 8k/32k/128k tokens, 64- and 128-token blocks, 95% and 90% sparsity: the Triton
kernel, FlexAttention (the library's compiled flex_attention over a prebuilt BlockMask, tile as
``execute.flex_kernel_options``), and cuDNN SDPA dense (K/V repeated beforehand). Kept-tile rate =
``4 * kept_tiles * bs^2 * D`` (summed over query heads) / time. ``e2e`` times ``sparse_attention(selection=...)``
as a user calls it (BlockMask build included for flex). Selections are random (budgets as the library's
``BlockGrid.budget``), per query head unless ``shared``.

``--tune`` sweeps tile configs (block_m, block_n, heads, warps, stages) at the largest length.

Usage: ``PYTHONPATH=$PWD python3 scripts/gpu_attention.py [--out DIR] [--parts correct,time] [--tune]
[--lengths 8192,32768,131072]``. Writes ``gpu_attention.log`` and ``gpu_attention.csv`` under ``--out``
(default ``$OUT`` or ``runs/gpu_attention``). Non-zero exit when a correctness case fails.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time

import torch
import torch.nn.functional as F

import cab_attention as cab
from cab_attention.geometry import BlockGrid
from cab_attention.select import kv_layout
from cab_attention.selection import BlockSelection

LOG = []
DEV = "cuda"  # "cpu" with --smoke (Triton interpreter, tiny shapes, host timer: tests this script only)


LOG_PATH: str | None = None
T0 = time.time()
BUDGET_S = 200.0  # stop starting new timing cases past this (compile + warm-up included): < 4 min in all


def log(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)
    if LOG_PATH:  # written as it goes: a run cut by a time limit still leaves its log
        with open(LOG_PATH, "a") as f:
            f.write(msg + "\n")


def over_budget() -> bool:
    return time.time() - T0 > BUDGET_S


def random_selection(grid: BlockGrid, sparsity: float, shared_kv: bool, gen: torch.Generator) -> BlockSelection:
    """Forced blocks (sink, diagonal) plus random valid blocks, ``BlockGrid.budget`` blocks per row."""
    dev = DEV
    heads = grid.kv_heads if shared_kv else grid.q_heads
    valid, forced = grid.valid(dev), grid.forced(dev)
    shape = (grid.batch, heads, grid.num_q_blocks, grid.num_kv_blocks)
    if sparsity == 0:
        mask = valid.expand(shape).clone()
    else:
        pr = torch.rand(shape, device=dev, generator=gen)
        pr = pr.masked_fill(forced & valid, 2.0).masked_fill(~valid, -1.0)
        rank = pr.argsort(-1, descending=True).argsort(-1)
        mask = rank < grid.budget(sparsity, dev)[:, None]
        del pr, rank
    num, idx = kv_layout(mask)
    return BlockSelection(mask, num, idx, grid, "random", shared_kv)


def float64_reference(q, k, v, sel: BlockSelection, dtype=torch.float64):
    g = sel.grid.group
    allowed = sel.token_mask()
    kk, vv = (t.to(dtype).repeat_interleave(g, dim=1) for t in (k, v))
    s = (q.to(dtype) @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ vv


def plain_reference(q, k, v, sel: BlockSelection):
    """Same-precision PyTorch: matmul, softmax, matmul in the inputs' dtype."""
    g = sel.grid.group
    allowed = sel.token_mask()
    kk, vv = (t.repeat_interleave(g, dim=1) for t in (k, v))
    s = (q @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ vv


# (batch, q_heads, kv_heads, q_len, kv_len, head_dim, block_size, causal)
CORRECT_CASES = [
    (1, 8, 2, 2048, 2048, 128, 64, True),
    (1, 8, 2, 2048, 2048, 128, 128, True),
    (2, 4, 2, 1000, 1000, 64, 64, True),
    (1, 4, 1, 777, 2000, 128, 64, True),
    (1, 4, 2, 1024, 2048, 128, 128, True),
    (1, 4, 2, 1500, 1500, 256, 64, True),
    (1, 4, 2, 1100, 1100, 256, 128, True),
    (1, 4, 4, 500, 600, 64, 16, True),
    (1, 4, 2, 500, 500, 128, 32, True),
    (1, 2, 1, 1000, 1000, 80, 64, True),
    (2, 4, 2, 1000, 1100, 128, 64, False),
    (1, 4, 1, 900, 900, 128, 128, False),
]


def correctness_jobs():
    """Every (case, dtype, shared) the correctness part launches, in order."""
    for ci, case in enumerate(CORRECT_CASES):
        # bf16 everywhere; fp16 on every other case, fp32 on the first (each new dtype is a compile).
        dtypes = [torch.bfloat16] + ([torch.float16] if ci % 2 == 0 else []) + ([torch.float32] if ci == 0 else [])
        for dtype in dtypes:
            for shared in (False, True):
                if dtype != torch.bfloat16 and shared:
                    continue
                yield case, dtype, shared


def _compile_one(job) -> str:
    """Worker: launch one small problem with the same specialisation as ``job`` (fills Triton's disk cache)."""
    (b, hq, hkv, nq, nk, d, bs, causal), dtype, shared, cfg = job
    from cab_attention.kernels.attention import block_sparse_attention

    t0 = time.time()
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, hq, nq, d, device="cuda", generator=gen).to(dtype)
        k = torch.randn(b, hkv, nk, d, device="cuda", generator=gen).to(dtype)
        grid = BlockGrid.of(q, k, bs, causal)
        sel = random_selection(grid, 0.5, shared, gen)
        block_sparse_attention(q, k, k, sel.kv_num_blocks, sel.kv_indices, grid, shared_kv=shared, config=cfg)
        torch.cuda.synchronize()
        return f"ok {time.time() - t0:.1f}s"
    except Exception as e:  # noqa: BLE001 - reported by the caller's own launch too
        return f"failed {type(e).__name__}: {str(e)[:200]}"


def precompile(jobs: list, workers: int) -> None:
    """Compile the kernel variants in parallel processes (Triton compiles one kernel at a time per process;
    the main process then loads them from the shared disk cache)."""
    import multiprocessing as mp

    t0 = time.time()
    try:
        with mp.get_context("spawn").Pool(workers) as pool:
            res = pool.map(_compile_one, jobs, chunksize=1)
    except Exception as e:  # noqa: BLE001 - the main process compiles what is missing, only slower
        log(f"precompile failed ({type(e).__name__}: {e}); compiling in the main process")
        return
    bad = [f"{j}: {r}" for j, r in zip(jobs, res) if not r.startswith("ok")]
    log(f"precompiled {len(jobs)} variants on {workers} processes in {time.time() - t0:.0f}s; failed: {bad or 'none'}")


def run_correctness(rows: list[dict], seed: int) -> int:
    from cab_attention.kernels.attention import block_sparse_attention

    gen = torch.Generator(device=DEV).manual_seed(seed)
    failures = 0
    for (b, hq, hkv, nq, nk, d, bs, causal), dtype, shared in correctness_jobs():
        for sparsity in (0.0, 0.5, 0.9):
            if dtype != torch.bfloat16 and sparsity == 0.5:
                continue
            q = torch.randn(b, hq, nq, d, device=DEV, generator=gen).to(dtype)
            k = torch.randn(b, hkv, nk, d, device=DEV, generator=gen).to(dtype)
            v = torch.randn(b, hkv, nk, d, device=DEV, generator=gen).to(dtype)
            grid = BlockGrid.of(q, k, bs, causal)
            sel = random_selection(grid, sparsity, shared, gen)
            out = torch.full_like(q, float("nan"))
            t0 = time.perf_counter()
            block_sparse_attention(q, k, v, sel.kv_num_blocks, sel.kv_indices, grid, shared_kv=shared, out=out)
            if DEV == "cuda":
                torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            exact = float64_reference(q, k, v, sel)
            plain = plain_reference(q, k, v, sel)
            err = (out.double() - exact).abs().max().item()
            err_t = (plain.double() - exact).abs().max().item()
            finite = bool(torch.isfinite(out).all())
            floor = 1e-6 if dtype == torch.float32 else 0.0
            ok = finite and err <= max(2 * err_t, floor)
            dense_err = ""
            if sparsity == 0:
                dense = cab.dense_attention(q, k, v, causal=causal)
                dense_err = (out.double() - dense.double()).abs().max().item()
            # The library path (dispatch in execute.py) must give the same bits as the direct launch.
            via = cab.sparse_attention(q, k, v, selection=sel, causal=causal, backend="triton")
            same = bool(torch.equal(via, out))
            ok = ok and same
            failures += not ok
            name = f"B{b} H{hq}/{hkv} Nq{nq} Nk{nk} D{d} bs{bs} {'causal' if causal else 'full'} {str(dtype)[6:]} {'shared' if shared else 'perhead'} s={sparsity}"
            log(f"{'PASS' if ok else 'FAIL'} {name}: err {err:.3g} torch {err_t:.3g} dense-diff {dense_err if dense_err == '' else f'{dense_err:.3g}'} finite={finite} dispatch-same={same} first-call {first_s:.2f}s")
            rows.append(dict(part="correct", case=name, err=err, torch_err=err_t, ok=ok))
    return failures


def bench(fn, rep_ms: int = 200) -> float:
    if DEV == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def timing(rows: list[dict], lengths: list[int], sparsities: list[float], tune: bool, seed: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cab_attention.execute import compiled_flex_attention as _compiled_flex, flex_kernel_options
    from cab_attention.kernels.attention import TileConfig, block_sparse_attention, default_config, kept_tile_flops

    gen = torch.Generator(device=DEV).manual_seed(seed)
    b, hq, hkv, d, dtype = 1, 32, 8, 128, torch.bfloat16
    if DEV == "cpu":
        hq, hkv = 4, 1
    for n in lengths:
        sets = 4 if n < 32768 else 1  # rotate inputs larger than L2 below 32k
        qkv = [
            tuple(torch.randn(b, h, n, d, device=DEV, generator=gen, dtype=dtype) for h in (hq, hkv, hkv))
            for _ in range(sets)
        ]
        it = [0]

        def pick():
            it[0] = (it[0] + 1) % sets
            return qkv[it[0]]

        kr = [(k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)) for _, k, v in qkv]
        dense_flops = 4.0 * b * hq * d * n * (n + 1) / 2

        def cudnn():
            i = (it[0] + 1) % sets
            it[0] = i
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qkv[i][0], kr[i][0], kr[i][1], is_causal=True)

        try:
            if DEV == "cpu":
                raise RuntimeError("no cuDNN in --smoke")
            ms_dense = bench(cudnn)
            log(f"N={n:6d} cuDNN SDPA dense: {ms_dense:8.3f} ms  {dense_flops / ms_dense / 1e9:6.1f} TFLOP/s")
        except Exception as e:  # noqa: BLE001 - log and go on: the sparse numbers still stand
            ms_dense = float("nan")
            log(f"N={n:6d} cuDNN SDPA dense: failed {type(e).__name__}: {e}")
        rows.append(dict(part="time", case="cudnn-dense", n=n, ms=ms_dense, tflops=dense_flops / ms_dense / 1e9))
        del kr
        for bs in (64, 128):
            for s in sparsities:
                for shared in (False, True):
                    if over_budget():
                        log(f"N={n} bs={bs} s={s} shared={shared}: skipped (time budget {BUDGET_S:.0f}s spent)")
                        continue
                    grid = BlockGrid(b, hq, hkv, n, n, d, bs, True)
                    sel = random_selection(grid, s, shared, gen)
                    flops = kept_tile_flops(sel.kv_num_blocks, grid, shared)
                    tag = f"N={n:6d} bs={bs:3d} s={s:.2f} {'shared ' if shared else 'perhead'}"

                    def run_triton(cfg=None):
                        q, k, v = pick()
                        return block_sparse_attention(q, k, v, sel.kv_num_blocks, sel.kv_indices, grid, shared_kv=shared, config=cfg)

                    # correctness at full size against flex (both bf16 kernels; a gross-error guard only)
                    cfg0 = default_config(d, bs, hq // hkv, shared, dtype)
                    ms_t = bench(run_triton)
                    ms_e2e = bench(lambda: cab.sparse_attention(*pick(), selection=sel, backend="triton"))
                    rec = dict(part="time", case="triton", n=n, bs=bs, sparsity=s, shared=shared, ms=ms_t,
                               tflops=flops / ms_t / 1e9, e2e_ms=ms_e2e, speedup=ms_dense / ms_e2e, config=str(cfg0))
                    rows.append(rec)
                    c = cfg0
                    tag += f" [{c.block_m}x{c.block_n} h{c.heads} w{c.num_warps} s{c.num_stages}]"
                    line = f"{tag} triton {ms_t:8.3f} ms {flops / ms_t / 1e9:6.1f} TFLOP/s e2e {ms_e2e:8.3f} ms ({ms_dense / ms_e2e:5.1f}x cuDNN)"
                    if not shared and DEV == "cuda":
                        bm = sel.to_block_mask()
                        opts = flex_kernel_options(bs, "cuda")

                        def run_flex():
                            q, k, v = pick()
                            return _compiled_flex()(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts)

                        try:
                            q, k, v = qkv[0]
                            ref = _compiled_flex()(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts)
                            mine = block_sparse_attention(q, k, v, sel.kv_num_blocks, sel.kv_indices, grid)
                            diff = (ref.float() - mine.float()).abs().max().item()
                            ms_f = bench(run_flex)
                            rows.append(dict(part="time", case="flex", n=n, bs=bs, sparsity=s, shared=False, ms=ms_f,
                                             tflops=flops / ms_f / 1e9, diff_vs_triton=diff))
                            line += f" | flex {ms_f:8.3f} ms {flops / ms_f / 1e9:6.1f} TFLOP/s (max|flex-triton| {diff:.3g})"
                            del ref, mine
                        except Exception as e:  # noqa: BLE001
                            line += f" | flex failed {type(e).__name__}: {str(e)[:200]}"
                        del bm
                    log(line)
                    if tune and n == max(lengths) and s == sparsities[0]:
                        q0, k0, v0 = qkv[0]
                        base = block_sparse_attention(q0, k0, v0, sel.kv_num_blocks, sel.kv_indices, grid, shared_kv=shared)
                        for cfg in tune_configs(bs, shared, hq // hkv):
                            if over_budget():
                                log(f"  tune {cfg}: skipped (time budget)")
                                continue
                            try:
                                alt = block_sparse_attention(q0, k0, v0, sel.kv_num_blocks, sel.kv_indices, grid,
                                                             shared_kv=shared, config=cfg)
                                diff = (alt.float() - base.float()).abs().max().item()  # a wrong config shows here
                                del alt
                                ms_c = bench(lambda: run_triton(cfg), rep_ms=100)
                                log(f"  tune {cfg}: {ms_c:8.3f} ms {flops / ms_c / 1e9:6.1f} TFLOP/s (max|diff| vs default {diff:.3g})")
                                rows.append(dict(part="tune", case="triton", n=n, bs=bs, sparsity=s, shared=shared,
                                                 ms=ms_c, tflops=flops / ms_c / 1e9, config=str(cfg), diff_vs_default=diff))
                            except Exception as e:  # noqa: BLE001 - a config that does not fit is a result too
                                log(f"  tune {cfg}: failed {type(e).__name__}: {str(e)[:200]}")
                    del sel
        del qkv
        if DEV == "cuda":
            torch.cuda.empty_cache()


def timing_jobs(tune: bool):
    """The timing part's kernel variants, at a small length with the same specialisation (N % 16 == 0)."""
    from cab_attention.kernels.attention import default_config

    for bs in (64, 128):
        for shared in (False, True):
            shape = (1, 32, 8, 1024, 1024, 128, bs, True)
            yield shape, torch.bfloat16, shared, default_config(128, bs, 4, shared, torch.bfloat16)
            if tune:
                for cfg in tune_configs(bs, shared, 4):
                    yield shape, torch.bfloat16, shared, cfg


def tune_configs(bs: int, shared: bool, group: int):
    """Candidates around the defaults (the first sweep, docs/kernels.md, pruned the rest)."""
    from cab_attention.kernels.attention import TileConfig

    if bs == 64 and not shared:
        return [TileConfig(64, 64, 1, 4, 2), TileConfig(64, 64, 1, 4, 4), TileConfig(64, 32, 1, 4, 4)]
    if bs == 64:
        return [TileConfig(64, 64, 4, 8, 3), TileConfig(64, 128, 2, 8, 2), TileConfig(64, 64, 2, 8, 2)]
    if shared:
        return []  # same tiles as per head at 128-token blocks
    return [TileConfig(128, 128, 1, 8, 2), TileConfig(128, 64, 1, 8, 2), TileConfig(128, 64, 1, 8, 3)]


def main(argv=None) -> int:
    global LOG_PATH, BUDGET_S, DEV, CORRECT_CASES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_attention")
    ap.add_argument("--parts", default="correct,time")
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--sparsities", default="0.95,0.9")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="no new timing case starts after this")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1), help="parallel compile processes (0: none)")
    ap.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes: checks the script")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    LOG_PATH, BUDGET_S = os.path.join(args.out, "gpu_attention.log"), args.budget_s
    open(LOG_PATH, "w").close()
    if args.smoke:
        DEV = "cpu"
        CORRECT_CASES = [(1, 4, 2, 100, 100, 64, 16, True), (1, 4, 1, 70, 150, 32, 32, False)]
        args.lengths = "256"
    elif not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    import triton

    t0 = T0
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter smoke)"
    log(f"device {name} | torch {torch.__version__} | triton {triton.__version__} | "
        f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    rows: list[dict] = []
    failures = 0
    parts = args.parts.split(",")
    if args.workers > 0 and DEV == "cuda":
        jobs = []
        if "correct" in parts:
            jobs += [(c, dt, sh, None) for c, dt, sh in correctness_jobs()]
        if "time" in parts:
            jobs += list(timing_jobs(args.tune))
        precompile(jobs, args.workers)
    if "correct" in parts:
        failures = run_correctness(rows, args.seed)
        log(f"correctness: {failures} failures ({time.time() - t0:.0f}s)")
    if "time" in parts:
        timing(rows, sorted((int(x) for x in args.lengths.split(",")), reverse=True), [float(x) for x in args.sparsities.split(",")],
               args.tune, args.seed + 1)
    log(f"total {time.time() - t0:.0f}s")
    keys = sorted({k for r in rows for k in r})
    with open(os.path.join(args.out, "gpu_attention.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print("\n== summary ==")
    for r in rows:
        if r["part"] == "time":
            print(f"{r['case']:12s} N={r['n']:6d} bs={r.get('bs', '-')!s:>3} s={r.get('sparsity', '-')!s:>4} "
                  f"{'shared' if r.get('shared') else '      '} {r['ms']:8.3f} ms {r['tflops']:6.1f} TFLOP/s")
    print(f"correctness failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
