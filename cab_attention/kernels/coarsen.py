"""Triton kernel, stage 1: coarsen Q and K in one launch.

One program per block of one head of one of the two tensors: program ids ``[0, B*Hq*Mq)`` coarsen
query blocks, the rest key blocks. Each program reads its ``[block_size, D]`` tile once (front-padded
for queries, see :class:`cab_attention.geometry.BlockGrid`), reduces it, and writes one ``D``-row of the
coarse output. Nothing ``N``-sized is written.

Methods (``METHOD`` constexpr), matching :func:`cab_attention.coarsen.coarsen`:

* 0 ``max_l2``: the real token with the largest float32 ``sum(x**2)`` (``tl.argmax`` breaks ties to
  the earliest token, as ``torch.argmax`` does), copied exactly in the input dtype;
* 1 ``mean``: float32 mean over the real tokens, cast to the input dtype;
* 2 ``max``: element-wise maximum over the real tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

COARSEN_CODES = {"max_l2": 0, "mean": 1, "max": 2}


@triton.jit
def _coarsen_block(
    x_ptr, out_ptr, pid, H, N, M, PAD,
    s_b, s_h, s_n, s_d, D,
    BS: tl.constexpr, BD: tl.constexpr, METHOD: tl.constexpr,
):
    bh = pid // M
    m = pid % M
    b = bh // H
    h = bh % H
    t = tl.arange(0, BS)
    d = tl.arange(0, BD)
    tok = m * BS + t - PAD
    real = (tok >= 0) & (tok < N)
    dm = d < D
    base = x_ptr + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h
    ptrs = base + tok.to(tl.int64)[:, None] * s_n + d[None, :] * s_d
    x = tl.load(ptrs, mask=real[:, None] & dm[None, :], other=0.0).to(tl.float32)
    out_base = out_ptr + pid.to(tl.int64) * D  # out is contiguous [B, H, M, D]
    if METHOD == 0:
        nrm = tl.sum(x * x, axis=1)
        nrm = tl.where(real, nrm, float("-inf"))
        best = tl.argmax(nrm, axis=0)
        tok_b = m * BS + best - PAD
        row = tl.load(base + tok_b.to(tl.int64) * s_n + d * s_d, mask=dm, other=0.0)
        tl.store(out_base + d, row.to(out_ptr.dtype.element_ty), mask=dm)
    elif METHOD == 1:
        cnt = tl.sum(real.to(tl.float32), axis=0)
        mean = tl.sum(x, axis=0) / tl.maximum(cnt, 1.0)
        tl.store(out_base + d, mean.to(out_ptr.dtype.element_ty), mask=dm)
    else:
        mx = tl.max(tl.where(real[:, None], x, float("-inf")), axis=0)
        tl.store(out_base + d, mx.to(out_ptr.dtype.element_ty), mask=dm)


@triton.jit
def _coarsen_qk_kernel(
    q_ptr, qc_ptr, k_ptr, kc_ptr, NQP,
    Hq, Nq, Mq, PADQ, sq_b, sq_h, sq_n, sq_d,
    Hk, Nk, Mk, sk_b, sk_h, sk_n, sk_d,
    D,
    BS: tl.constexpr, BD: tl.constexpr, METHOD: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < NQP:
        _coarsen_block(q_ptr, qc_ptr, pid, Hq, Nq, Mq, PADQ, sq_b, sq_h, sq_n, sq_d, D, BS, BD, METHOD)
    else:
        _coarsen_block(k_ptr, kc_ptr, pid - NQP, Hk, Nk, Mk, 0, sk_b, sk_h, sk_n, sk_d, D, BS, BD, METHOD)


def coarsen_qk(
    q: torch.Tensor, k: torch.Tensor, block_size: int, method: str = "max_l2", q_pad_front: int = 0,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarsen queries and keys in one kernel launch.

    Args:
        q: ``[B, Hq, Nq, D]``; k: ``[B, Hkv, Nk, D]`` (any strides).
        block_size: tokens per block (a power of two).
        method: ``"max_l2"``, ``"mean"`` or ``"max"``.
        q_pad_front: virtual rows before the first query (``BlockGrid.q_pad_front``).
        out: optional ``(qc, kc)`` contiguous buffers of the output shapes and dtype to write into
            (fixed addresses, e.g. the inputs of a captured CUDA graph).

    Returns:
        ``qc`` ``[B, Hq, Mq, D]`` and ``kc`` ``[B, Hkv, Mk, D]``, contiguous, in the inputs' dtype, equal to
        :func:`cab_attention.coarsen.coarsen` (``max_l2`` and ``max`` exactly, ``mean`` within rounding).
    """
    if method not in COARSEN_CODES:
        raise ValueError(f"coarsen must be one of {tuple(COARSEN_CODES)}, got {method!r}")
    b, hq, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    mq = -(-(q_pad_front + nq) // block_size)
    mk = -(-nk // block_size)
    if out is None:
        qc = torch.empty(b, hq, mq, d, device=q.device, dtype=q.dtype)
        kc = torch.empty(b, hk, mk, d, device=k.device, dtype=k.dtype)
    else:
        qc, kc = out
        if qc.shape != (b, hq, mq, d) or kc.shape != (b, hk, mk, d) or not (qc.is_contiguous() and kc.is_contiguous()):
            raise ValueError(f"out must be contiguous [B, Hq, Mq, D]={(b, hq, mq, d)} and [B, Hkv, Mk, D]={(b, hk, mk, d)}")
    nqp = b * hq * mq
    grid = (nqp + b * hk * mk,)
    bd = triton.next_power_of_2(d)
    warps = 4 if block_size * bd <= 64 * 128 else 8
    _coarsen_qk_kernel[grid](
        q, qc, k, kc, nqp,
        hq, nq, mq, q_pad_front, *q.stride(),
        hk, nk, mk, *k.stride(),
        d,
        BS=block_size, BD=bd, METHOD=COARSEN_CODES[method], num_warps=warps,
    )
    return qc, kc
