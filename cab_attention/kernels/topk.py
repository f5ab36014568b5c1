"""Triton kernel, stage 3: exact per-row selection in FlexAttention's layout.

One program per query-block row. The row's priorities are loaded once (``BN = next_pow2(Mk)`` lanes)
and the row keeps, exactly as :func:`cab_attention.select.rank_order` + ``keep_first`` do:

1. the forced blocks (sink 0 and the diagonal ``min(i + lo, Mk - 1)``), then
2. the ``r = k_i - #forced`` best *candidates* (valid, not forced, and inside the optional candidate
   mask) by priority descending, ties to the larger key-block index; NaN ranks as ``-inf``, and
   ``-0.0`` equals ``+0.0``.

The tie-break is made exact by one unique integer key per candidate,
``key = (ordered_bits(priority) << LOGN) | j`` (``ordered_bits`` maps float32 onto uint32 preserving
order), so "priority descending, then index descending" is "key descending". The ``r``-th largest key is
found by building it bit by bit from the top (``32 + LOGN`` steps, each a count over the row), and the
kept set is ``key >= threshold``: no sort, no ties, no drift in the budget.

Outputs: the bool mask row (optional), ``kv_num_blocks`` and ``kv_indices`` (kept blocks ascending,
then zeros: the layout of :func:`cab_attention.select.kv_layout`); with a narrower
``index_width`` W only the first W positions are written (W >= the largest budget keeps every kept one).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .radix_select import radix_select_rows, row_prologue, store_kept


@triton.jit
def _select_kernel(
    prio_ptr, cand_ptr, budget_ptr, mask_ptr, num_ptr, idx_ptr,
    Mq, Mk, lo, W,
    CAUSAL: tl.constexpr, HAS_CAND: tl.constexpr, WRITE_MASK: tl.constexpr,
    BN: tl.constexpr, LOGN: tl.constexpr,
):
    row = tl.program_id(0)
    i, j, inb, forced, cand, row_off, okey = row_prologue(prio_ptr, cand_ptr, row, Mq, Mk, lo, CAUSAL, HAS_CAND, BN)
    k = tl.load(budget_ptr + i).to(tl.int32)
    r = k - tl.sum(forced.to(tl.int32), axis=0)
    ukey = okey.to(tl.int64) + 2147483648  # [0, 2^32)
    key = (ukey << LOGN) | j.to(tl.int64)
    key = tl.where(cand, key, -1)
    thr = tl.zeros([], dtype=tl.int64)
    for step in range(32 + LOGN):
        trial = thr | (tl.full([], 1, tl.int64) << (32 + LOGN - 1 - step))
        cnt = tl.sum((key >= trial).to(tl.int32), axis=0)
        thr = tl.where(cnt >= r, trial, thr)
    keep = forced | (cand & (key >= thr) & (r > 0))
    store_kept(keep, mask_ptr, num_ptr, idx_ptr, row, row_off, j, inb, W, WRITE_MASK)


def select_rows(
    priority: torch.Tensor,
    budget: torch.Tensor,
    lo: int,
    causal: bool,
    *,
    candidates: torch.Tensor | None = None,
    write_mask: bool = True,
    index_width: int | None = None,
    method: str = "radix",
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Keep exactly ``budget[i]`` blocks per row (forced first, then by priority, ties to larger index).

    Args:
        priority: ``[B, H, Mq, Mk]`` float (contiguous; entries off the edge set are ignored).
        budget: ``[Mq]`` integer, ``k_i`` with ``#forced_i <= k_i <= v_i``.
        lo: ``BlockGrid.block_offset``; causal: causal edge set.
        candidates: optional ``[B, H, Mq, Mk]`` bool/uint8; non-forced blocks outside it are never kept.
        write_mask: also write the bool mask.
        index_width: columns of ``kv_indices`` to write (default ``Mk``, the full layout).
        method: ``"radix"`` (default: :mod:`cab_attention.kernels.radix_select`, 32-bit keys) or
            ``"bits64"`` (this module's 64-bit key search); the same outputs bit for bit.

    Returns:
        ``(mask or None, kv_num_blocks [B, H, Mq] int32, kv_indices [B, H, Mq, W] int32)``.
    """
    if method == "radix":
        return radix_select_rows(priority, budget, lo, causal, candidates=candidates, write_mask=write_mask,
                                 index_width=index_width)
    if method != "bits64":
        raise ValueError(f"method must be 'radix' or 'bits64', got {method!r}")
    priority = priority.contiguous()
    b, h, mq, mk = priority.shape
    dev = priority.device
    w = mk if index_width is None else int(index_width)
    bn = triton.next_power_of_2(mk)
    mask = torch.empty(b, h, mq, mk, device=dev, dtype=torch.uint8) if write_mask else None
    num = torch.empty(b, h, mq, device=dev, dtype=torch.int32)
    idx = torch.empty(b, h, mq, w, device=dev, dtype=torch.int32)
    cand = None
    if candidates is not None:
        cand = candidates.contiguous()
        if cand.dtype == torch.bool:
            cand = cand.view(torch.uint8)
    budget = budget.to(device=dev, dtype=torch.int32).contiguous()
    warps = 4 if bn <= 1024 else (8 if bn <= 4096 else 16)
    _select_kernel[(b * h * mq,)](
        priority, cand if cand is not None else num, budget, mask if mask is not None else num, num, idx,
        mq, mk, lo, w,
        CAUSAL=bool(causal), HAS_CAND=cand is not None, WRITE_MASK=write_mask,
        BN=bn, LOGN=max(bn.bit_length() - 1, 0), num_warps=warps,
    )
    return (mask.view(torch.bool) if mask is not None else None), num, idx
