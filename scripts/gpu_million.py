"""One attention layer at 128k -> 1M tokens on one GPU, in one go (<= 240 s on
an H200, compiles included; parts past the time budget are skipped and say so).

Layer: B=1, 32 query / 8 KV heads, D=128, bf16, 64-token blocks, 95% sparsity, causal, random inputs.

1. Correctness at 4k tokens on CUDA: :func:`select_blocks_streamed` (Triton path: fused antidiagonal
   estimator, radix select) equals :func:`cab_attention.select_blocks` (torch) for cab, magnitude and
   antidiagonal (rows that differ are counted: the fused estimator sums in another order, so exact
   near-ties may flip); :func:`sparse_attention_streamed` (Triton kernel, tile by tile) against the exact
   reference of the same selection: ``|out - ref32| <= 2 |ref_bf16 - ref32| + 1e-5`` (max norms).
2. Chunked prefill (``hf.prefill``, 8k chunks) on a small random Llama (4 layers, 1024 hidden, 8/2 heads,
   D=128) at 64k tokens against one-shot prefill (both ``logits_to_keep=1``, magnitude selector, 0.9,
   Triton backend): peak memory of each and the last logits' difference.
3. The scaling curve, default selector (cab) first, then magnitude and antidiagonal as time allows, at
   128k, 256k, 512k, 1M: predictor (``select_blocks_streamed``, whole compact index), kernel (the Triton
   block-sparse kernel on that index), total (``sparse_attention_streamed``: select and execute tile by
   tile), and the peak memory beyond q, k, v (and beyond q, k, v and the output). ``check_finite=False``
   in timed calls. Median of 3 timed calls after a warm-up (1 timed call at >= 512k).
4. Spot rows at 1M (cab): a few query rows of a few heads recomputed exactly in float32 against their kept
   blocks, compared with the kernel's output; the tile-by-tile output must equal the one-launch output.
5. Dense causal SDPA (cuDNN, else flash) at 128k and 256k; at 1M only if the time is left (one call).

Writes under $OUT (default runs/gpu_million): million.csv (one row per measurement, written as it goes),
million.log. Prints a short table last. ``--smoke``: CPU, tiny sizes, under ``TRITON_INTERPRET=1``
(checks that the script runs; its numbers mean nothing). Run from the repository root:
``PYTHONPATH=$PWD python3 scripts/gpu_million.py``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.getcwd())
T0 = time.monotonic()
ap = argparse.ArgumentParser()
ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (run under TRITON_INTERPRET=1)")
ap.add_argument("--budget", type=float, default=225.0, help="seconds; optional parts past it are skipped")
ARGS = ap.parse_args()
SMOKE = ARGS.smoke
if SMOKE and os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("--smoke needs TRITON_INTERPRET=1 (set before Python starts)")
OUT = Path(os.environ.get("OUT") or "runs/gpu_million")
OUT.mkdir(parents=True, exist_ok=True)
LOG = open(OUT / "million.log", "a")


def log(msg: str) -> None:
    line = f"[{time.monotonic() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    LOG.write(line + "\n")
    LOG.flush()


def left() -> float:
    return ARGS.budget - (time.monotonic() - T0)


import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cab_attention import select_blocks  # noqa: E402
from cab_attention.execute import reference_attention  # noqa: E402
from cab_attention.geometry import BlockGrid  # noqa: E402
from cab_attention.kernels.attention import block_sparse_attention  # noqa: E402
from cab_attention.streamed import select_blocks_streamed, sparse_attention_streamed, workspace_bytes  # noqa: E402

DEV = "cpu" if SMOKE else "cuda"
CUDA = DEV == "cuda"
if SMOKE:
    HQ, HKV, D, BS, DT, STRIDE = 4, 2, 16, 16, torch.float32, 4
    LENGTHS = [128, 256]
    ROW_TILE, COL_CHUNK = 4, 8
else:
    HQ, HKV, D, BS, DT, STRIDE = 32, 8, 128, 64, torch.bfloat16, 8
    LENGTHS = [1 << 17, 1 << 18, 1 << 19, 1 << 20]
    ROW_TILE, COL_CHUNK = 256, 2048
SPARSITY = 0.5 if SMOKE else 0.95
if CUDA:
    log(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__}")

CSV_PATH = OUT / "million.csv"
FIELDS = ["part", "selector", "n", "what", "ms", "peak_beyond_qkv_mb", "peak_beyond_qkv_out_mb", "value", "note"]
_csv_file = open(CSV_PATH, "w", newline="")
_csv = csv.DictWriter(_csv_file, fieldnames=FIELDS)
_csv.writeheader()
SUMMARY: list[dict] = []


def record(**row) -> None:
    row = {k: row.get(k, "") for k in FIELDS}
    _csv.writerow(row)
    _csv_file.flush()
    SUMMARY.append(row)
    log(" | ".join(f"{k}={v}" for k, v in row.items() if v != ""))


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, reps: int, warm: int = 1, base_bytes: int | None = None) -> tuple[float, float, object]:
    """``(median ms of reps calls after warm calls, peak MB beyond base_bytes during the timed calls, the
    last output)``: CUDA events (host clock on CPU); the peak is NaN on CPU or without ``base_bytes``."""
    out = None
    for _ in range(warm):
        out = fn()
        del out
        out = None
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    ts = []
    for i in range(reps):
        if CUDA:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            out = fn()
            ts.append((time.perf_counter() - t) * 1e3)
        if i < reps - 1:
            del out
            out = None
    peak = float("nan")
    if CUDA and base_bytes is not None:
        peak = (torch.cuda.max_memory_allocated() - base_bytes) / 1e6
    return statistics.median(ts), peak, out


def allocated() -> int:
    if CUDA:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return 0


def peak_mb(fn, base_bytes: int) -> tuple[float, object]:
    """Peak allocated MB during ``fn()`` beyond ``base_bytes`` (NaN on CPU), and its output."""
    if not CUDA:
        return float("nan"), fn()
    sync()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base_bytes) / 1e6, out


def inputs(n: int, seed: int):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(1, HQ, n, D, device=DEV, dtype=DT, generator=g)
    k = torch.randn(1, HKV, n, D, device=DEV, dtype=DT, generator=g)
    v = torch.randn(1, HKV, n, D, device=DEV, dtype=DT, generator=g)
    return q, k, v


def opts_of(selector: str) -> dict:
    return {"stride": STRIDE} if selector == "antidiagonal" else {}


# ----------------------------------------------------------------------------------- 1. correctness


def correctness() -> None:
    n = 160 if SMOKE else 4096
    q, k, v = inputs(n, 1)
    for selector in ("cab", "magnitude", "antidiagonal"):
        kw = dict(selector=selector, sparsity=SPARSITY if SMOKE else 0.9, block_size=BS, **opts_of(selector))
        ref = select_blocks(q, k, **kw)
        cs = select_blocks_streamed(q, k, impl="triton", row_tile=ROW_TILE, col_chunk=COL_CHUNK, **kw)
        w = cs.kv_indices.shape[-1]
        same_num = torch.equal(cs.kv_num_blocks, ref.kv_num_blocks)
        diff_rows = int((cs.kv_indices != ref.kv_indices[..., :w]).any(-1).sum())
        out = sparse_attention_streamed(q, k, v, backend="triton", impl="triton", row_tile=ROW_TILE,
                                        col_chunk=COL_CHUNK, **kw)
        sel = cs.to_block_selection()
        hi = torch.float32 if CUDA else torch.float64
        ref32 = reference_attention(q.to(hi), k.to(hi), v.to(hi), sel).float()
        ref_lo = reference_attention(q, k, v, sel).float()
        err, err_ref = (out.float() - ref32).abs().max().item(), (ref_lo - ref32).abs().max().item()
        ok = same_num and err <= 2 * err_ref + 1e-5 and bool(torch.isfinite(out).all())
        record(part="correctness", selector=selector, n=n, what="streamed_vs_select_blocks",
               value=f"rows_differing={diff_rows}/{cs.kv_num_blocks.numel()}; budgets_equal={same_num}; "
                     f"err={err:.2e} ref_err={err_ref:.2e}",
               note="PASS" if ok else "FAIL")


# ----------------------------------------------------------------------------------- 2. chunked prefill


def chunked_prefill() -> None:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as e:  # pragma: no cover
        record(part="chunked_prefill", what="skipped", note=f"transformers not importable: {e}")
        return
    from cab_attention import hf

    if SMOKE:
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        n, chunk, dtype = 160, 64, torch.float32
    else:
        cfg = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1 << 17)
        n, chunk, dtype = 1 << 16, 8192, torch.bfloat16
    torch.manual_seed(0)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    hf.enable(model, selector="magnitude", sparsity=0.9, block_size=BS, backend="triton", check_finite=False)
    ids = torch.randint(0, cfg.vocab_size, (1, n), device=DEV, generator=torch.Generator(device=DEV).manual_seed(0))
    base = allocated()

    def one_shot():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits[:, -1]

    hf.prefill(model, ids[:, : 2 * chunk], chunk_size=chunk)  # warm-up: compiles the kernels
    t = time.monotonic()
    with hf.record(model) as calls:
        peak_c, (cache, last_c) = peak_mb(lambda: hf.prefill(model, ids, chunk_size=chunk), base)
    paths = {p_: sum(c.path == p_ for c in calls.calls) for p_ in ("sparse", "masked", "dense")}
    max_q = max(c.q_len for c in calls.calls)
    t_c = time.monotonic() - t
    cached = cache.get_seq_length()
    cache_mb = (cfg.num_hidden_layers * 2 * cached * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
                * torch.finfo(dtype).bits / 8 / 1e6)
    del cache
    t = time.monotonic()
    peak_o, last_o = peak_mb(one_shot, base)
    t_o = time.monotonic() - t
    diff = (last_c.float() - last_o.float()).abs().max().item()
    scale = last_o.float().abs().max().item()
    record(part="chunked_prefill", selector="magnitude", n=n, what=f"chunked_{chunk}", ms=round(t_c * 1e3, 1),
           peak_beyond_qkv_mb=round(peak_c, 1), value=f"cached={cached} kv_cache_mb={cache_mb:.0f} (analytic) paths={paths} max_q_len={max_q}",
           note="peak beyond the model weights (cache included)")
    record(part="chunked_prefill", selector="magnitude", n=n, what="one_shot", ms=round(t_o * 1e3, 1),
           peak_beyond_qkv_mb=round(peak_o, 1), value=f"last_logits_max_diff={diff:.3e} (max |logit| {scale:.2f})",
           note="PASS" if diff <= 0.05 * scale + 1e-3 else "FAIL (logits differ)")
    del model


# ----------------------------------------------------------------------------------- 3-5. the curve


def spot_rows(q, k, v, cs, out_kernel, out_fused) -> None:
    n = q.shape[2]
    g = cs.grid
    rows = [0, BS - 1, BS, n // 3 + 5, n // 2, n - BS - 1, n - 1]
    heads = [0, HQ // 2 + 1, HQ - 1]
    scale = D**-0.5
    err_k = err_b = 0.0
    for h in heads:
        for t in rows:
            i = (t + g.q_pad_front) // BS
            m = int(cs.kv_num_blocks[0, h, i])
            blocks = cs.kv_indices[0, h, i, :m].long()
            cols = (blocks[:, None] * BS + torch.arange(BS, device=q.device)[None, :]).flatten()
            cols = cols[cols <= t + g.offset]
            kk, vv = k[0, h // (HQ // HKV), cols], v[0, h // (HQ // HKV), cols]
            exact = torch.softmax(q[0, h, t].double() @ kk.double().T * scale, -1) @ vv.double()
            lo = (torch.softmax((q[0, h, t] @ kk.T).float() * scale, -1).to(DT) @ vv).double()
            err_k = max(err_k, (out_kernel[0, h, t].double() - exact).abs().max().item())
            err_b = max(err_b, (lo - exact).abs().max().item())
    same = torch.equal(out_kernel, out_fused)
    ok = err_k <= 2 * err_b + 1e-5 and same
    record(part="spot_rows", selector="cab", n=n, what=f"{len(rows)}x{len(heads)} rows vs float64",
           value=f"kernel_err={err_k:.2e} bf16_torch_err={err_b:.2e} tiled==one_launch={same}",
           note="PASS" if ok else "FAIL")


def curve_point(selector: str, n: int, want_spot: bool, impl: str = "triton") -> None:
    q, k, v = inputs(n, 2)
    sync()
    qkv_bytes = sum(x.numel() * x.element_size() for x in (q, k, v))
    out_bytes = q.numel() * q.element_size()
    base = allocated()
    big = n >= (1 << 19) and not SMOKE
    reps, warm = (1, 0) if SMOKE else ((1, 1) if big else (3, 1))
    kw = dict(selector=selector, sparsity=SPARSITY, block_size=BS, row_tile=ROW_TILE, col_chunk=COL_CHUNK,
              impl=impl, check_finite=False, **opts_of(selector))
    # predictor: the whole compact index
    ms_pred, peak_pred, cs = timed(lambda: select_blocks_streamed(q, k, **kw), reps, warm, base)
    kmax = cs.kv_indices.shape[-1]
    density = float(cs.kv_num_blocks.double().sum() / ((cs.grid.diagonal(q.device) + 1).double().sum() * HQ))
    grid = BlockGrid.of(q, k, BS, True)
    ms_kern, _, out_k = timed(lambda: block_sparse_attention(q, k, v, cs.kv_num_blocks, cs.kv_indices, grid), reps, warm)
    what = "predictor" if impl == "triton" else "predictor_torch_select"
    record(part="curve", selector=selector, n=n, what=what, ms=round(ms_pred, 2),
           peak_beyond_qkv_mb=round(peak_pred, 1),
           value=f"K={kmax} density={density:.4f} compact_index_mb={cs.kv_indices.numel() * 4 / 1e6:.0f}")
    record(part="curve", selector=selector, n=n, what="kernel", ms=round(ms_kern, 2),
           note="Triton block-sparse kernel on the compact index")
    # Keep the index and the kernel's output only for the spot check (they count in no later peak).
    cs_keep, out_k_keep = (cs, out_k) if want_spot else (None, None)
    del cs, out_k
    base3 = allocated()
    extra = (base3 - base) if CUDA else 0  # what the spot check keeps alive
    fused = lambda: sparse_attention_streamed(q, k, v, backend="triton", **kw)  # noqa: E731
    ms_tot, peak_tot, out_f = timed(fused, reps, warm, base3)
    ws = workspace_bytes(n, q_heads=HQ, kv_heads=HKV, head_dim=D, block_size=BS, sparsity=SPARSITY,
                         row_tile=ROW_TILE, col_chunk=COL_CHUNK, selector=selector,
                         elem_bytes=torch.finfo(DT).bits // 8)
    record(part="curve", selector=selector, n=n, what="total_streamed", ms=round(ms_tot, 2),
           peak_beyond_qkv_mb=round(peak_tot, 1), peak_beyond_qkv_out_mb=round(peak_tot - out_bytes / 1e6, 1),
           value=f"analytic_workspace_mb={ws['total'] / 1e6:.0f} qkv_mb={qkv_bytes / 1e6:.0f}",
           note=f"base excludes {extra / 1e6:.0f} MB kept for the spot check" if want_spot else "")
    if want_spot:
        spot_rows(q, k, v, cs_keep, out_k_keep, out_f)
    del q, k, v, out_f, cs_keep, out_k_keep
    if CUDA:
        torch.cuda.empty_cache()


def dense_point(n: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = inputs(n, 3)
    k = k.repeat_interleave(HQ // HKV, 1)
    v = v.repeat_interleave(HQ // HKV, 1)
    backends = [("math", SDPBackend.MATH)] if SMOKE else [("cudnn", SDPBackend.CUDNN_ATTENTION),
                                                          ("flash", SDPBackend.FLASH_ATTENTION)]
    one_call = n > (1 << 18)
    for name, be in backends:
        try:
            with sdpa_kernel([be]):
                fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
                ms, _, _ = timed(fn, 1 if (one_call or SMOKE) else 3, 0 if (one_call or SMOKE) else 1)
            record(part="dense", selector="dense_sdpa", n=n, what=f"sdpa_{name}", ms=round(ms, 2),
                   note="one call, no warm-up" if one_call else "K/V repeated to 32 heads (not timed)")
            return
        except Exception as e:
            log(f"dense sdpa {name} at {n}: {type(e).__name__}: {str(e)[:200]}")
    del q, k, v


def main() -> None:
    steps = [("correctness", correctness), ("chunked_prefill", chunked_prefill)]
    for name, fn in steps:
        try:
            fn()
        except Exception:
            record(part=name, what="error", note="FAIL: " + traceback.format_exc().strip().splitlines()[-1][:300])
            log(traceback.format_exc())
    # Rough costs (s) at 1M on an H200 with warm-up; other lengths scale ~ (n / 1M)^2 (cab's predictor ~^3).
    est_1m = {"cab": 25.0, "magnitude": 10.0, "antidiagonal": 25.0}
    for selector in ("cab", "magnitude", "antidiagonal"):
        for n in LENGTHS:
            est = est_1m[selector] * (n / LENGTHS[-1]) ** 2 if not SMOKE else 1.0
            if not SMOKE and left() < est + 10 and selector != "cab":
                record(part="curve", selector=selector, n=n, what="skipped", note=f"time budget ({left():.0f} s left)")
                continue
            try:
                curve_point(selector, n, want_spot=selector == "cab" and n == LENGTHS[-1])
            except Exception:
                record(part="curve", selector=selector, n=n, what="error",
                       note="FAIL: " + traceback.format_exc().strip().splitlines()[-1][:300])
                log(traceback.format_exc())
                if CUDA:
                    torch.cuda.empty_cache()
                if selector == "cab" and not SMOKE:
                    # Say what the torch selection (per-tile sorts, more memory) does where the Triton one failed.
                    try:
                        curve_point(selector, n, want_spot=False, impl="torch")
                    except Exception:
                        log(traceback.format_exc())
                        if CUDA:
                            torch.cuda.empty_cache()
        if selector == "cab":
            for n in LENGTHS[:2]:
                try:
                    dense_point(n)
                except Exception:
                    log(traceback.format_exc())
    if left() > 40 or SMOKE:
        try:
            dense_point(LENGTHS[-1])
        except Exception:
            log(traceback.format_exc())
    else:
        d2 = [float(r["ms"]) for r in SUMMARY if r["part"] == "dense" and r["n"] == LENGTHS[1] and r["ms"] != ""]
        if d2:
            record(part="dense", selector="dense_sdpa", n=LENGTHS[-1], what="extrapolated",
                   ms=round(d2[0] * (LENGTHS[-1] / LENGTHS[1]) ** 2, 1),
                   note=f"EXTRAPOLATED from {LENGTHS[1]} as n^2 (not run: {left():.0f} s left)")
    log(f"done in {time.monotonic() - T0:.1f} s")
    print("\nselector      n        what              ms         peak>qkv MB  peak>qkv+out MB  value / note")
    for r in SUMMARY:
        print(f"{r['selector']:<13} {str(r['n']):<8} {r['what'][:17]:<17} {str(r['ms']):<10} "
              f"{str(r['peak_beyond_qkv_mb']):<12} {str(r['peak_beyond_qkv_out_mb']):<16} "
              f"{(str(r['value']) + ' ' + str(r['note']))[:90]}")


if __name__ == "__main__":
    main()
