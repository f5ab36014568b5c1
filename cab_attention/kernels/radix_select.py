"""Triton kernel: exact per-row selection by a 32-bit radix (bitwise) select, then ties by index.

The same contract as :mod:`cab_attention.kernels.topk` (and its PyTorch twin
:func:`cab_attention.select.rank_order` + ``keep_first`` + ``kv_layout``): row ``i`` keeps its forced
blocks (sink 0, diagonal ``min(i + lo, Mk - 1)``) and the ``r = k_i - #forced`` best candidates by
priority descending, ties to the larger key-block index, NaN as ``-inf``, ``+-inf`` as ``+-FLT_MAX``,
``-0.0 == +0.0``.

How, in two phases instead of the 64-bit key search of ``topk`` (``32 + log2 Mk`` counts over emulated
64-bit integers):

1. ``key = ordered_bits(priority)``, a ``uint32`` whose unsigned order is the float order. The ``r``-th
   largest key ``T`` (with multiplicity) is built bit by bit from the top: 32 counts of
   ``key >= trial`` over the row, in native 32-bit integers.
2. Keep every candidate with ``key > T``; of the ``e`` candidates with ``key == T`` keep the
   ``r - #(key > T)`` with the largest indices: an inclusive prefix count ``c_j`` of the ties gives
   "ties after ``j``" as ``e - c_j``, and a tie is kept iff that is below the number still needed.

The result is the same set as ``topk``'s, hence the same outputs bit for bit. One program per row with
few warps (the counts are warp-shuffle reductions, mostly without shared-memory barriers).
``budget`` is one value per query-block row (``[Mq]``) or one per row of every head (``[B, H, Mq]``,
adaptive budgets).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def row_prologue(prio_ptr, cand_ptr, row, Mq, Mk, lo, CAUSAL: tl.constexpr, HAS_CAND: tl.constexpr, BN: tl.constexpr):
    """One selection row's edge set and keys, shared by the per-row selection kernels (this one and
    :mod:`.topk`'s): ``(i, j, inb, forced, cand, row_off, okey)`` with ``forced`` the sink and diagonal,
    ``cand`` the other valid (and, with ``HAS_CAND``, allowed) blocks, and ``okey`` the priority as an
    int32 whose signed order is the float order of ``torch.nan_to_num(p, nan=-inf)``."""
    i = row % Mq
    j = tl.arange(0, BN)
    inb = j < Mk
    diag = tl.minimum(i + lo, Mk - 1)
    if CAUSAL:
        valid = inb & (j <= diag)
    else:
        valid = inb
    forced = valid & ((j == 0) | (j == diag))
    cand = valid & (forced == 0)
    row_off = row.to(tl.int64) * Mk
    if HAS_CAND:
        cm = tl.load(cand_ptr + row_off + j, mask=valid, other=0)
        cand = cand & (cm != 0)
    p = tl.load(prio_ptr + row_off + j, mask=valid, other=0.0).to(tl.float32)  # non-edges: never read
    # torch.nan_to_num(p, nan=-inf), as rank_order does: +-inf -> +-FLT_MAX, then NaN -> -inf (so NaN
    # ranks below -inf, and +-inf tie with +-FLT_MAX).
    p = tl.where(p == float("inf"), 3.4028234663852886e38, p)
    p = tl.where(p == float("-inf"), -3.4028234663852886e38, p)
    p = tl.where(p != p, float("-inf"), p)
    p = tl.where(p == 0.0, 0.0, p)  # -0.0 ties with +0.0
    bits = p.to(tl.int32, bitcast=True)
    okey = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed int32 order == float order
    return i, j, inb, forced, cand, row_off, okey


@triton.jit
def store_kept(keep, mask_ptr, num_ptr, idx_ptr, row, row_off, j, inb, W, WRITE_MASK: tl.constexpr):
    """Write one row's kept blocks: the count, the mask (``WRITE_MASK``) and FlexAttention's index layout
    (kept blocks ascending, then the others, cut at ``W`` columns)."""
    kept = keep.to(tl.int32)
    nkeep = tl.sum(kept, axis=0)
    tl.store(num_ptr + row, nkeep)
    if WRITE_MASK:
        tl.store(mask_ptr + row_off + j, kept.to(tl.int8), mask=inb)
    csum = tl.cumsum(kept, axis=0)
    pos = tl.where(keep, csum - 1, nkeep + j - csum)
    tl.store(idx_ptr + row.to(tl.int64) * W + pos, tl.where(keep, j, 0), mask=inb & (pos < W))


@triton.jit
def _radix_select_kernel(
    prio_ptr, cand_ptr, budget_ptr, mask_ptr, num_ptr, idx_ptr,
    Mq, Mk, lo, W,
    CAUSAL: tl.constexpr, HAS_CAND: tl.constexpr, WRITE_MASK: tl.constexpr, BUDGET_PER_ROW: tl.constexpr,
    BN: tl.constexpr,
):
    row = tl.program_id(0)
    i, j, inb, forced, cand, row_off, okey = row_prologue(prio_ptr, cand_ptr, row, Mq, Mk, lo, CAUSAL, HAS_CAND, BN)
    if BUDGET_PER_ROW:
        k = tl.load(budget_ptr + row).to(tl.int32)
    else:
        k = tl.load(budget_ptr + i).to(tl.int32)
    r = k - tl.sum(forced.to(tl.int32), axis=0)
    key = (okey ^ -2147483648).to(tl.uint32, bitcast=True)  # flip the sign bit: unsigned order
    # Phase 1: the r-th largest candidate key T (largest T with #(cand & key >= T) >= r).
    thr = tl.zeros([], dtype=tl.uint32)
    for step in range(32):
        trial = thr | (tl.full([], 1, tl.uint32) << (31 - step))
        cnt = tl.sum((cand & (key >= trial)).to(tl.int32), axis=0)
        thr = tl.where(cnt >= r, trial, thr)
    # Phase 2: all keys above T, and the ties at T with the largest indices.
    gt = cand & (key > thr)
    eq = cand & (key == thr)
    eq_i = eq.to(tl.int32)
    need = r - tl.sum(gt.to(tl.int32), axis=0)
    after = tl.sum(eq_i, axis=0) - tl.cumsum(eq_i, axis=0)  # ties at larger indices than j
    keep = forced | ((gt | (eq & (after < need))) & (r > 0))
    store_kept(keep, mask_ptr, num_ptr, idx_ptr, row, row_off, j, inb, W, WRITE_MASK)


def default_warps(bn: int) -> int:
    """Warps per row program: one warp per 512 lanes (16 keys per thread), 1 to 8."""
    return max(1, min(8, bn // 512))


def radix_select_rows(
    priority: torch.Tensor,
    budget: torch.Tensor,
    lo: int,
    causal: bool,
    *,
    candidates: torch.Tensor | None = None,
    write_mask: bool = True,
    index_width: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Keep exactly ``budget`` blocks per row (forced first, then by priority, ties to larger index).

    Args:
        priority: ``[B, H, Mq, Mk]`` float (entries off the edge set are ignored).
        budget: ``[Mq]`` (one per query-block row) or ``[B, H, Mq]`` (one per row) integers, with
            ``#forced <= budget <= #valid`` in each row.
        lo: ``BlockGrid.block_offset``; causal: causal edge set.
        candidates: optional ``[B, H, Mq, Mk]`` bool/uint8; non-forced blocks outside it are never kept.
        write_mask: also write the bool mask; index_width: columns of ``kv_indices`` (default ``Mk``).
        num_warps: per row program (default :func:`default_warps`).

    Returns:
        ``(mask or None, kv_num_blocks [B, H, Mq] int32, kv_indices [B, H, Mq, W] int32)``, kept blocks
        ascending then zeros (FlexAttention's layout).
    """
    priority = priority.contiguous()
    b, h, mq, mk = priority.shape
    dev = priority.device
    w = mk if index_width is None else int(index_width)
    bn = triton.next_power_of_2(mk)
    per_row = budget.dim() == 3
    if per_row and tuple(budget.shape) != (b, h, mq):
        raise ValueError(f"budget must be [Mq]={mq} or [B, H, Mq]={(b, h, mq)}, got {tuple(budget.shape)}")
    if not per_row and tuple(budget.shape) != (mq,):
        raise ValueError(f"budget must be [Mq]={mq} or [B, H, Mq]={(b, h, mq)}, got {tuple(budget.shape)}")
    mask = torch.empty(b, h, mq, mk, device=dev, dtype=torch.uint8) if write_mask else None
    num = torch.empty(b, h, mq, device=dev, dtype=torch.int32)
    idx = torch.empty(b, h, mq, w, device=dev, dtype=torch.int32)
    cand = None
    if candidates is not None:
        cand = candidates.contiguous()
        if cand.dtype == torch.bool:
            cand = cand.view(torch.uint8)
    budget = budget.to(device=dev, dtype=torch.int32).contiguous()
    _radix_select_kernel[(b * h * mq,)](
        priority, cand if cand is not None else num, budget, mask if mask is not None else num, num, idx,
        mq, mk, lo, w,
        CAUSAL=bool(causal), HAS_CAND=cand is not None, WRITE_MASK=write_mask, BUDGET_PER_ROW=per_row,
        BN=bn, num_warps=default_warps(bn) if num_warps is None else int(num_warps),
    )
    return (mask.view(torch.bool) if mask is not None else None), num, idx
