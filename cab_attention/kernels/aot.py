"""Compile every kernel variant ahead of time for a CUDA target, without a GPU.

``python -m cab_attention.kernels.aot [--arch 90]`` lowers each kernel (every constexpr branch the
predictor uses, in every dtype) through Triton's full pipeline to a cubin with the ``ptxas`` bundled in
the triton wheel. The CPU interpreter runs Python and accepts code that the compiler rejects; this check
catches that on a machine without a GPU. It must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time


QUICK = {  # (constexprs, signature) -> in the --quick subset: every branch of every kernel once
    "coarsen": lambda ce, sig: ce["BS"] == 64 and sig["q_ptr"] == "*bf16",
    "affinity": lambda ce, sig: ce["CAUSAL"] and ce["PREC"] != 1 and sig["qc_ptr"] == "*bf16",
    "redundancy": lambda ce, sig: ce["NEGATE"] and ce["CAUSAL"] and ce["PREC"] != 1
    and (not ce["R_IN"] or (ce["SCORE"] == 0 and ce["PREC"] == 2)),
    "two_stage": lambda ce, sig: ce["CAUSAL"] and sig["a_ptr"] == "*bf16",
    "select": lambda ce, sig: ce["BN"] == 2048 and ce["WRITE_MASK"] and ce["CAUSAL"],
    "radix_select": lambda ce, sig: ce["BN"] == 2048 and ce["WRITE_MASK"] and ce["CAUSAL"],
    "antidiagonal": lambda ce, sig: ce["CAUSAL"] and ce["PER"] == 8,
}


def _variants():
    from .coarsen import _coarsen_qk_kernel
    from .scores import _affinity_kernel, _redundancy_kernel, _two_stage_kernel
    from .topk import _select_kernel

    for dt, method, (bs, bd) in itertools.product(("bf16", "fp16", "fp32"), (0, 1, 2), ((64, 128), (16, 64), (128, 256))):
        sig = {n: "i32" for n in _coarsen_qk_kernel.arg_names}
        sig.update(q_ptr=f"*{dt}", qc_ptr=f"*{dt}", k_ptr=f"*{dt}", kc_ptr=f"*{dt}")
        ce = dict(BS=bs, BD=bd, METHOD=method)
        yield "coarsen", _coarsen_qk_kernel, sig, ce, 8 if bs * bd > 8192 else 4
    for dt, prec, causal, (wl, wa, wat, ws, wr) in itertools.product(
        ("bf16", "fp32"), (0, 1, 2), (True, False),
        ((True, False, False, False, False), (False, True, False, True, False), (True, True, True, False, True)),
    ):
        adt = "bf16" if prec == 2 else "fp32"
        sig = {n: "i32" for n in _affinity_kernel.arg_names}
        sig.update(qc_ptr=f"*{dt}", kc_ptr=f"*{dt}", l_ptr="*fp32", a_ptr=f"*{adt}", at_ptr=f"*{adt}",
                   sin_ptr="*fp32", rsum_ptr="*fp32", rmax_ptr="*fp32", scale="fp32")
        t = 32 if prec == 0 else 64
        ce = dict(CAUSAL=causal, WRITE_L=wl, WRITE_A=wa, WRITE_AT=wat, WRITE_SUMS=ws, WRITE_RMAX=wr,
                  PREC=prec, BI=t, BJ=t, BD=128)
        yield "affinity", _affinity_kernel, sig, ce, 4 if prec == 0 else 8
    for prec, causal, score, neg, r_in in itertools.product(
        (0, 1, 2), (True, False), (0, 1, 2), (True, False), (False, True)
    ):
        adt = "bf16" if prec == 2 else "fp32"
        sig = {n: "i32" for n in _redundancy_kernel.arg_names}
        sig.update(a_ptr=f"*{adt}", r_ptr=f"*{adt}", sout_ptr="*fp32", sin_ptr="*fp32", out_ptr="*fp32",
                   rmax_ptr="*fp32", lam="fp32", norm="fp32")
        ce = dict(CAUSAL=causal, SCORE=score, NEGATE=neg, PREC=prec, R_IN=r_in, BM=64, BN=64, BK=32)
        yield "redundancy", _redundancy_kernel, sig, ce, 8
    for adt, causal in itertools.product(("bf16", "fp32"), (True, False)):
        sig = {n: "i32" for n in _two_stage_kernel.arg_names}
        sig.update(a_ptr=f"*{adt}", at_ptr=f"*{adt}", cidx_ptr="*i32", cnum_ptr="*i32", out_ptr="*fp32",
                   lam="fp32", norm="fp32")
        ce = dict(CAUSAL=causal, NEGATE=True, BC=32, BK=64)
        yield "two_stage", _two_stage_kernel, sig, ce, 4
    for causal, cand, wmask, bn in itertools.product((True, False), (True, False), (True, False), (16, 2048, 4096)):
        sig = {n: "i32" for n in _select_kernel.arg_names}
        sig.update(prio_ptr="*fp32", cand_ptr="*u8", budget_ptr="*i32", mask_ptr="*u8", num_ptr="*i32", idx_ptr="*i32")
        ce = dict(CAUSAL=causal, HAS_CAND=cand, WRITE_MASK=wmask, BN=bn, LOGN=bn.bit_length() - 1)
        yield "select", _select_kernel, sig, ce, 4 if bn <= 1024 else (8 if bn <= 4096 else 16)
    yield from _new_variants()


def _new_variants():
    """The radix selection and the fused antidiagonal estimator (kernels/radix_select.py, antidiagonal.py)."""
    from .antidiagonal import _antidiagonal_kernel, _tiles
    from .radix_select import _radix_select_kernel, default_warps

    for causal, cand, wmask, per_row, bn in itertools.product(
        (True, False), (True, False), (True, False), (False, True), (16, 2048, 4096)
    ):
        sig = {n: "i32" for n in _radix_select_kernel.arg_names}
        sig.update(prio_ptr="*fp32", cand_ptr="*u8", budget_ptr="*i32", mask_ptr="*u8", num_ptr="*i32",
                   idx_ptr="*i32")
        ce = dict(CAUSAL=causal, HAS_CAND=cand, WRITE_MASK=wmask, BUDGET_PER_ROW=per_row, BN=bn)
        yield "radix_select", _radix_select_kernel, sig, ce, default_warps(bn)
    for (dt, dot), causal, (stride, per), one_pass in itertools.product(
        (("bf16", 2), ("fp16", 2), ("fp32", 0), ("fp32", 1), ("fp32", 3)), (True, False), ((8, 8), (8, 16), (16, 4), (1, 64)),
        (True, False),
    ):
        sig = {n: "i32" for n in _antidiagonal_kernel.arg_names}
        sig.update(q_ptr=f"*{dt}", k_ptr=f"*{dt}", out_ptr="*fp32", part_ptr="*fp32", mrun_ptr="*fp32", scale="fp32")
        bm, bn, bd, warps, _ = _tiles(_Cuda(), per, 128, dot)
        ce = dict(CAUSAL=causal, S=stride, PER=per, DOT=dot, ZERO_UPPER=causal, ONE_PASS=one_pass, BM=bm, BN=bn, BD=bd)
        yield "antidiagonal", _antidiagonal_kernel, sig, ce, warps


class _Cuda:
    type = "cuda"


def compile_all(arch: int = 90, verbose: bool = False, quick: bool = False) -> list[tuple[str, str]]:
    """Compile every variant; returns ``[(name and constexprs, error)]`` for the failures."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run the AOT check without TRITON_INTERPRET")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    failures = []
    n = 0
    for name, fn, sig, ce, warps in _variants():
        if quick and not QUICK[name](ce, sig):
            continue
        for c in ce:
            sig[c] = "constexpr"
        label = f"{name} {ce}"
        t0 = time.time()
        try:
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=ce), target=target,
                           options={"num_warps": warps})
            if verbose:
                print(f"ok   {label} ({time.time() - t0:.1f}s)")
        except Exception as e:  # noqa: BLE001 - report every failure
            failures.append((label, f"{type(e).__name__}: {e}"))
            print(f"FAIL {label}: {type(e).__name__}: {str(e)[:2000]}")
        n += 1
    print(f"compiled {n - len(failures)}/{n} kernel variants for sm_{arch}")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a representative subset (one per kernel branch)")
    args = ap.parse_args(argv)
    return 1 if compile_all(args.arch, args.verbose, args.quick) else 0


if __name__ == "__main__":
    sys.exit(main())
