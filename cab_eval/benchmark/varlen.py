"""``cab bench varlen``: a packed variable-length batch, block-sparse in one launch, against dense
variable-length attention and against padding to the longest sequence.

The batch: ``--batch`` sequences with lengths drawn uniformly from ``[--min-len, --max-len]`` (seeded),
self-attention (``Nq = Nk`` per sequence), causal, GQA, in flash-attn's packed layout
(``[total, H, D]``, int32 ``cu_seqlens``). Cases (one row each):

* ``dense:sdpa-loop`` ``F.scaled_dot_product_attention`` once per sequence (fused kernels only: cuDNN,
  flash, memory-efficient; on CPU the default), the inputs already split per sequence;
* ``dense:flash-varlen`` ``torch.ops.aten._flash_attention_forward`` with ``cu_seqlens`` (PyTorch's
  flash-attention varlen kernel: one launch), and ``dense:cudnn-varlen`` ``aten._cudnn_attention_forward``
  the same way; where a kernel refuses GQA the keys and values are repeated beforehand (status says so);
* ``dense:flex-varlen`` the library's packed FlexAttention launch over the dense causal document mask
  (``selector="dense"``): the same kernel as the sparse rows, at density 1;
* ``dense:sdpa-padded`` SDPA (fused kernels) on the batch padded at the end to the longest sequence
  ``[B, H, max, D]`` (end padding keeps the real queries' causal outputs exact);
* per selector and sparsity: ``<selector>:varlen-predictor`` (:func:`select_blocks_varlen` and the packed
  ``BlockMask``), ``<selector>:varlen-kernel`` (the one packed FlexAttention launch, mask built),
  ``<selector>:varlen-total`` (:func:`sparse_attention_varlen` as a user calls it) and
  ``<selector>:padded-total`` (:func:`cab_attention.sparse_attention` on the padded batch: selection
  over padded blocks, one launch).

CUDA figures are medians of ``triton.testing.do_bench`` (CUDA events; the inputs, ~GBs, are far larger
than L2); ``peak_mb`` is the peak allocated during one call beyond what was allocated before it.
``--dry-run`` runs a tiny batch on CPU with host timers and the ``reference`` backend, labelled as CPU:
it tests the command and its file, never a result.

Usage: ``python -m cab_eval.benchmark.varlen [--batch 32 --min-len 1k --max-len 16k] [--dry-run]``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .timing import device_refusal

COLUMNS = [
    "case", "batch", "total_tokens", "min_len", "max_len", "heads", "kv_heads", "head_dim", "dtype", "block_size",
    "selector", "sparsity", "density", "ms", "peak_mb", "device", "torch", "date", "status",
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _size(text: str) -> int:
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cab bench varlen", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None, help="sequences (default 32; dry run 4)")
    p.add_argument("--min-len", type=_size, default=None, help="shortest length (default 1k; dry run 64)")
    p.add_argument("--max-len", type=_size, default=None, help="longest length (default 16k; dry run 256)")
    p.add_argument("--heads", type=int, default=None, help="default 32; dry run 4")
    p.add_argument("--kv-heads", type=int, default=None, help="default 8; dry run 2")
    p.add_argument("--head-dim", type=int, default=None, help="default 128; dry run 32")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--selectors", default="cab,magnitude")
    p.add_argument("--sparsities", default="0.9,0.95")
    p.add_argument("--no-padded", action="store_true", help="skip the padded-batch rows")
    p.add_argument("--warmup", type=float, default=25.0, help="do_bench warmup, ms")
    p.add_argument("--rep", type=float, default=100.0, help="do_bench repetition time, ms")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dry-run", action="store_true", help="tiny CPU batch, host timers, reference backend")
    p.add_argument("--csv", type=Path, default=Path("runs/bench_varlen.csv"))
    p.add_argument("--seed", type=int, default=0)
    return p


def draw_lengths(batch: int, lo: int, hi: int, seed: int) -> list[int]:
    """``batch`` lengths uniform in ``[lo, hi]`` (seeded, in draw order)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (batch,), generator=gen).tolist()


def cu_seqlens(lens: list[int], device) -> torch.Tensor:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def _timer(cuda: bool, warmup: float, rep: float) -> Callable[[Callable[[], Any]], float]:
    if cuda:
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def host(fn):
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000.0)
        return float(statistics.median(times))

    return host


def _peak_mb(fn: Callable[[], Any], cuda: bool) -> str:
    if not cuda:
        return ""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return f"{peak / 2**20:.1f}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
    cuda = args.device == "cuda"
    refusal = device_refusal("cab bench varlen", cuda, args.dry_run,
                             "--dry-run runs a tiny CPU batch (tests the command only)")
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    tiny = not cuda
    batch = args.batch or (4 if tiny else 32)
    lo, hi = args.min_len or (64 if tiny else 1024), args.max_len or (256 if tiny else 16384)
    hq, hkv, d = args.heads or (4 if tiny else 32), args.kv_heads or (2 if tiny else 8), args.head_dim or (32 if tiny else 128)
    dtype = DTYPES[args.dtype] if cuda else torch.float32
    bs = args.block_size if cuda else min(args.block_size, 32)
    selectors = [s for s in args.selectors.split(",") if s]
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    if not (0 < lo <= hi) or batch < 1 or hq % hkv:
        print("cab bench varlen: need 0 < --min-len <= --max-len, --batch >= 1 and --heads a multiple of --kv-heads", file=sys.stderr)
        return 2

    from cab_attention import select_blocks, sparse_attention
    from cab_attention.varlen import packed_flex_attention, select_blocks_varlen, sparse_attention_varlen

    dev = torch.device("cuda" if cuda else "cpu")
    lens = draw_lengths(batch, lo, hi, args.seed)
    total, longest = sum(lens), max(lens)
    cu = cu_seqlens(lens, dev)
    gen = torch.Generator(device=dev).manual_seed(args.seed + 1)
    q = torch.randn(total, hq, d, generator=gen, device=dev, dtype=dtype)
    k = torch.randn(total, hkv, d, generator=gen, device=dev, dtype=dtype)
    v = torch.randn(total, hkv, d, generator=gen, device=dev, dtype=dtype)
    varlen_args = (cu, cu, longest, longest)
    backend = "flex" if cuda else "reference"
    timer = _timer(cuda, args.warmup, args.rep)
    if cuda:  # as the other benchmarks: every static-shape compile must stay compiled, never fall back
        import torch._dynamo.config as dc

        for name, value in (("recompile_limit", 4096), ("accumulated_recompile_limit", 8192)):
            if hasattr(dc, name):
                setattr(dc, name, value)
    env = dict(
        batch=batch, total_tokens=total, min_len=min(lens), max_len=longest, heads=hq, kv_heads=hkv, head_dim=d,
        dtype=str(dtype).replace("torch.", ""), block_size=bs,
        device=torch.cuda.get_device_name(0) if cuda else "cpu host timer",
        torch=torch.__version__, date=_dt.date.today().isoformat(),
    )
    rows: list[dict] = []

    def record(case: str, fn: Callable[[], Any], status: str = "ok", **extra) -> float:
        try:
            ms = timer(fn)
            peak = _peak_mb(fn, cuda)
        except Exception as e:  # noqa: BLE001 - a failed case is a row, not a crash
            ms, peak = float("nan"), ""
            status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        rows.append(dict(env, case=case, ms=f"{ms:.4f}", peak_mb=peak, status=status,
                         selector=extra.get("selector", ""), sparsity=extra.get("sparsity", ""),
                         density=extra.get("density", "")))
        print(f"{case:32s} s={extra.get('sparsity', '-')!s:5s} {ms:10.3f} ms  peak {peak or '-':>9s} MiB  {status}", flush=True)
        if cuda:
            torch.cuda.empty_cache()
        return ms

    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    only_fused = (lambda: sdpa_kernel(fused)) if cuda else contextlib.nullcontext
    print(f"batch {batch}, lengths {min(lens)}..{longest} (total {total}), Hq={hq} Hkv={hkv} D={d} {env['dtype']} "
          f"bs={bs} on {env['device']}", flush=True)

    # dense: per-sequence SDPA
    per_seq = []
    c = cu.tolist()
    for b in range(batch):
        per_seq.append(tuple(x[c[b] : c[b + 1]].transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v)))

    def sdpa_loop():
        with only_fused():
            return [F.scaled_dot_product_attention(a, b_, c_, is_causal=True, enable_gqa=hq != hkv) for a, b_, c_ in per_seq]

    record("dense:sdpa-loop", sdpa_loop)
    del per_seq

    # dense: PyTorch's own varlen kernels (one launch)
    if cuda:
        for name, op in (("flash", "_flash_attention_forward"), ("cudnn", "_cudnn_attention_forward")):
            fn_op = getattr(torch.ops.aten, op, None)
            if fn_op is None:
                rows.append(dict(env, case=f"dense:{name}-varlen", ms="nan", peak_mb="", status=f"missing: aten.{op}",
                                 selector="", sparsity="", density=""))
                continue

            def call(kk, vv, fn_op=fn_op, name=name):
                if name == "flash":
                    return fn_op(q, kk, vv, cu, cu, longest, longest, 0.0, True, False)[0]
                return fn_op(q, kk, vv, None, cu, cu, longest, longest, False, 0.0, True, False)[0]

            status = "ok"
            kk, vv = k, v
            try:
                call(kk, vv)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - GQA refused: repeat K/V outside the timing
                kk, vv = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
                status = f"ok (K/V repeated: {str(e).splitlines()[0][:80]})"
            record(f"dense:{name}-varlen", lambda: call(kk, vv), status=status)
            del kk, vv

    # dense: the library's packed FlexAttention at density 1 (the same kernel as the sparse rows)
    dense_sel = select_blocks_varlen(q, k, *varlen_args, selector="dense", block_size=bs)
    if cuda:
        dense_mask = dense_sel.to_block_mask()
        record("dense:flex-varlen", lambda: packed_flex_attention(q, k, v, dense_sel, block_mask=dense_mask), density="1.0")
        del dense_mask
    del dense_sel

    # padded batch
    padded = None
    if not args.no_padded:
        padded = []
        for x, h in ((q, hq), (k, hkv), (v, hkv)):
            t = x.new_zeros(batch, h, longest, d)
            for b in range(batch):
                t[b, :, : lens[b]] = x[c[b] : c[b + 1]].transpose(0, 1)
            padded.append(t)
        qp, kp, vp = padded

        def sdpa_padded():
            with only_fused():
                return F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=hq != hkv)

        record("dense:sdpa-padded", sdpa_padded)

    for selector in selectors:
        for s in sparsities:
            kw = dict(selector=selector, sparsity=s, block_size=bs)
            sel = select_blocks_varlen(q, k, *varlen_args, **kw)
            tag = dict(selector=selector, sparsity=s, density=f"{sel.density:.4f}")

            def predict():
                out = select_blocks_varlen(q, k, *varlen_args, **kw)
                return out.to_block_mask() if cuda else out

            record(f"{selector}:varlen-predictor", predict, **tag)
            if cuda:
                mask = sel.to_block_mask()
                record(f"{selector}:varlen-kernel", lambda: packed_flex_attention(q, k, v, sel, block_mask=mask), **tag)
                del mask
            record(f"{selector}:varlen-total", lambda: sparse_attention_varlen(q, k, v, *varlen_args, backend=backend, **kw), **tag)
            del sel
            if padded is not None:
                psel = select_blocks(qp, kp, **kw)
                ptag = dict(tag, density=f"{psel.density:.4f}")
                del psel
                record(f"{selector}:padded-total", lambda: sparse_attention(qp, kp, vp, backend="flex" if cuda else "reference", **kw), **ptag)

    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.csv} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
