#!/usr/bin/env python3
"""Issue 2's correctness gate for the flex backend, on CUDA.

For every selector (and a few option variants), at sparsity 0 the flex output must equal dense causal
attention (SDPA), and at sparsity > 0 the `reference` backend built from the same selection. "Equal"
is the flash-attention rule: with the ground truth computed in float32 on upcast inputs, the flex
output's max abs error is at most twice the error of the same-precision PyTorch path (SDPA in the
dense case, `reference_attention` in the sparse case), plus 1e-5. Shapes cover GQA, B > 1, odd N,
chunked queries (Nq < Nk), head_dim 64 and 128, block 64 and 128, bf16 and fp16.

Prints a PASS/FAIL table, writes it to a log (``--log``, default ``${OUT:-runs/gpu}/correctness.log``),
exits 1 on any failure (2 without CUDA). Runs in well under two minutes on an H100 (one FlexAttention
compile per shape).

    python3 scripts/gpu_correctness.py [--log PATH] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import cab_attention as cab  # noqa: E402

BF16, FP16 = torch.bfloat16, torch.float16
# name, B, Hq, Hkv, Nq, Nk, D, block, dtype
SHAPES = [
    ("gqa4 odd-N d64 bs64", 1, 8, 2, 1000, 1000, 64, 64, BF16),
    ("B2 chunked gqa4 d128 bs64", 2, 8, 2, 777, 1300, 128, 64, BF16),
    ("mha d64 bs128 fp16", 1, 4, 4, 2048, 2048, 64, 128, FP16),
    ("B3 gqa4 odd-N d128 bs128", 3, 8, 2, 1537, 1537, 128, 128, BF16),
    ("chunked mqa d128 bs64 fp16", 1, 4, 1, 512, 2000, 128, 64, FP16),
    ("B2 short chunk d64 bs128", 2, 4, 2, 200, 1000, 64, 128, BF16),
]
QUICK = {0, 1}
VARIANTS = [(s, {}) for s in cab.SELECTORS] + [
    ("cab", {"share_kv": True}),
    ("cab", {"threshold": 0.9}),
    ("cab", {"score": "triangle", "keep": "highest", "hybrid": 0.5}),
]
SPARSITIES = (0.0, 0.9)


def raise_recompile_limit() -> None:
    # Every shape is a new FlexAttention compile; past dynamo's default limit (8) it would fall back to
    # eager flex_attention, which ignores the block mask. Fail loudly instead of silently.
    import torch._dynamo.config as dc

    for name, value in (("recompile_limit", 256), ("cache_size_limit", 256), ("fail_on_recompile_limit_hit", True)):
        if hasattr(dc, name):
            try:
                setattr(dc, name, value)
            except Exception:
                pass


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check(shape, selector, opts, sparsity, gen):
    name, b, hq, hkv, nq, nk, d, bs, dt = shape
    q = torch.randn(b, hq, nq, d, device="cuda", generator=gen).to(dt)
    k = torch.randn(b, hkv, nk, d, device="cuda", generator=gen).to(dt)
    v = torch.randn(b, hkv, nk, d, device="cuda", generator=gen).to(dt)
    sel = cab.select_blocks(q, k, selector=selector, sparsity=sparsity, block_size=bs, **opts)
    out = cab.sparse_attention(q, k, v, selection=sel, block_size=bs, backend="flex")
    assert out.shape == q.shape and out.dtype == q.dtype, f"output {tuple(out.shape)} {out.dtype}"
    assert torch.isfinite(out.float()).all(), "non-finite output"
    dense_case = sparsity == 0.0 and "threshold" not in opts
    if dense_case:
        assert abs(sel.density - 1.0) < 1e-12, f"sparsity 0 kept density {sel.density}"
        ref = cab.dense_attention(q.float(), k.float(), v.float())
        pt = cab.dense_attention(q, k, v)
        against = "dense SDPA"
    else:
        ref = cab.reference_attention(q.float(), k.float(), v.float(), sel)
        pt = cab.reference_attention(q, k, v, sel)
        against = "reference"
    e_flex, e_pt = err(out, ref), err(pt, ref)
    ok = e_flex <= 2 * e_pt + 1e-5
    return ok, against, e_flex, e_pt, sel.density


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", type=Path, default=Path(os.environ.get("OUT", "runs/gpu")) / "correctness.log")
    ap.add_argument("--quick", action="store_true", help="two shapes only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_correctness: CUDA is not available; this gate checks the flex backend on a GPU "
              "(the CPU test suite covers the rest).", file=sys.stderr)
        return 2
    raise_recompile_limit()
    t0 = time.time()
    lines = [f"gpu_correctness: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
             f"rule: max|flex - fp32 ref| <= 2 * max|same-precision torch - fp32 ref| + 1e-5"]
    hdr = f"{'result':6s} {'shape':28s} {'selector':44s} {'s':>4s} {'vs':10s} {'flex err':>9s} {'torch err':>9s} {'density':>7s}"
    lines.append(hdr)
    print("\n".join(lines), flush=True)
    fails = total = 0
    gen = torch.Generator(device="cuda").manual_seed(0)
    for i, shape in enumerate(SHAPES):
        if args.quick and i not in QUICK:
            continue
        for selector, opts in VARIANTS:
            label = selector + ("" if not opts else " " + ",".join(f"{k}={v}" for k, v in opts.items()))
            for s in SPARSITIES:
                if "threshold" in opts and s > 0:
                    continue  # adaptive mode ignores sparsity
                total += 1
                try:
                    ok, against, e_flex, e_pt, dens = check(shape, selector, opts, s, gen)
                    line = (f"{'PASS' if ok else 'FAIL':6s} {shape[0]:28s} {label:44s} {s:4.2f} {against:10s} "
                            f"{e_flex:9.2e} {e_pt:9.2e} {dens:7.3f}")
                except Exception as e:  # noqa: BLE001
                    ok = False
                    line = f"{'ERROR':6s} {shape[0]:28s} {label:44s} {s:4.2f} {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                    traceback.print_exc(limit=4)
                fails += not ok
                lines.append(line)
                print(line, flush=True)
        torch.cuda.empty_cache()
    # The module front end on the same backend (auto = flex on CUDA) against the reference backend.
    try:
        torch.manual_seed(0)
        m = cab.CABAttention(256, 4, num_kv_heads=2, block_size=64, sparsity=0.9, backend="auto").cuda().to(BF16)
        x = torch.randn(2, 700, 256, device="cuda", dtype=BF16)
        y, sel = m(x, return_selection=True)  # backend auto: flex on CUDA
        m.backend = "reference"
        y_ref = m(x)
        # fp32 truth through the same weights (upcast) and the same selection.
        b, n, _ = x.shape
        hd = m.head_dim
        lin = lambda t, layer: t.float() @ layer.weight.float().t() + (0 if layer.bias is None else layer.bias.float())  # noqa: E731
        q32 = lin(x, m.q_proj).view(b, n, 4, hd).transpose(1, 2)
        k32 = lin(x, m.k_proj).view(b, n, 2, hd).transpose(1, 2)
        v32 = lin(x, m.v_proj).view(b, n, 2, hd).transpose(1, 2)
        o32 = cab.reference_attention(q32, k32, v32, sel).transpose(1, 2).reshape(b, n, 4 * hd)
        y32 = lin(o32, m.o_proj)
        e_a, e_r = err(y, y32), err(y_ref, y32)
        ok = e_a <= 2 * e_r + 1e-5
        line = f"{'PASS' if ok else 'FAIL':6s} {'CABAttention module':28s} {'cab (auto=flex vs reference)':44s} {0.9:4.2f} {'reference':10s} {e_a:9.2e} {e_r:9.2e}"
    except Exception as e:  # noqa: BLE001
        ok = False
        line = f"{'ERROR':6s} {'CABAttention module':28s} {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        traceback.print_exc(limit=4)
    total += 1
    fails += not ok
    lines.append(line)
    print(line, flush=True)
    summary = f"gpu_correctness: {total - fails}/{total} passed, {fails} failed, {time.time() - t0:.0f} s"
    lines.append(summary)
    print(summary, flush=True)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text("\n".join(lines) + "\n")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
