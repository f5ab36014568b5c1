"""Budget allocation: how many key blocks each (batch, head, row) keeps, at one exactly fixed total.

Every allocation keeps exactly the total of the per-row fixed rule, ``H * sum_i k_i`` blocks per
sequence with ``k_i = min(v_i, max(2, ceil((1 - sparsity) v_i)))`` (:meth:`BlockGrid.budget`), so
methods compare at an equal, exactly counted density. Each row keeps its forced blocks (sink and
diagonal: ``f_i = min(2, v_i)``) and never more than its ``v_i`` valid blocks. The three rules:

* ``"row"``: today's per-row fixed budget, the same for every head.
* ``"head"``: per-head adaptive, top-p style (FlexPrefill, XAttention): each head's total is what it
  needs to reach one coverage level common to all heads, where a head's coverage after ``n`` extra
  blocks is the token-weighted mean row share of its forced blocks plus its ``n`` best blocks in one
  ranking of the whole head (the cumulative-mass curve of FlexPrefill's per-head top-p). Inside a head
  the rows share its total in the per-row fixed shape (the next block goes to the row with the lowest
  ``kept / k_i``).
* ``"layer"``: one global ranking of every (head, row, block) candidate: each row's blocks in order of
  estimated mass, the next block going to the row (of any head) whose kept share is lowest, i.e. a
  common per-row coverage level (XAttention's per-row threshold) tuned to hit the total exactly.

Both adaptive rules are water-filling on a coverage level, taking the ``R`` candidates of smallest
"coverage before this block" (``R`` = the total minus the forced blocks): the total is exact by
construction. With no information (uniform mass over each row's valid blocks) every rule keeps exactly
the per-row fixed budgets. Mass is an estimate of each block's share of its row's attention (any
non-negative weight; rows are renormalised over their valid blocks).
"""

from __future__ import annotations

import torch

from .geometry import BlockGrid
from .score import row_shares

ALLOCATIONS = ("row", "head", "layer")


def check_allocation(allocation: str) -> None:
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")


def row_tokens(grid: BlockGrid, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[Mq]`` float64: real queries in each query-block row (front and end padding excluded)."""
    bs = grid.block_size
    start = torch.arange(grid.num_q_blocks, device=device) * bs
    lo = start.clamp_min(grid.q_pad_front)
    hi = (start + bs).clamp_max(grid.q_pad_front + grid.q_len)
    return (hi - lo).clamp_min(0).double()


def _smallest_counts(key: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    """Per leading index, mark the ``take`` smallest entries of ``key`` (ties to the earlier entry).

    Args: key ``[B, L]`` float64 (``inf`` = not a candidate); take ``[B]`` int64. Returns ``[B, L]`` bool.
    """
    order = torch.sort(key, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order))
    return rank < take[:, None]


def _sorted_candidates(shares: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Candidate shares of each row sorted descending, non-candidates (set to -1) last. ``[..., Mk]``."""
    return torch.sort(torch.where(cand, shares, torch.full_like(shares, -1.0)), dim=-1, descending=True).values


def allocate(
    allocation: str, mass: torch.Tensor | None, grid: BlockGrid, sparsity: float, heads: int | None = None
) -> torch.Tensor:
    """Blocks to keep per (batch, head, row) under ``allocation``, summing exactly to the per-row total.

    Args:
        allocation: ``"row"``, ``"head"`` or ``"layer"``.
        mass: ``[B, H, Mq, Mk]`` non-negative estimated block mass (unused, may be None, for ``"row"``).
        grid: the block grid; sparsity: in ``[0, 1)``.
        heads: ``H`` when ``mass`` is None (default ``grid.q_heads``).

    Returns:
        ``[B, H, Mq]`` int64 with ``min(2, v_i) <= k <= v_i`` and, per batch element, a sum of exactly
        ``H * sum_i grid.budget(sparsity)[i]``.
    """
    check_allocation(allocation)
    if mass is None:
        if allocation != "row":
            raise ValueError(f"allocation={allocation!r} needs a mass estimate [B, H, Mq, Mk], got None")
        dev, b, h = "cpu", grid.batch, heads or grid.q_heads
    else:
        dev, b, h = mass.device, mass.shape[0], mass.shape[1]
        shape = (grid.num_q_blocks, grid.num_kv_blocks)
        if mass.dim() != 4 or tuple(mass.shape[2:]) != shape:
            raise ValueError(f"mass must be [B, H, {shape[0]}, {shape[1]}], got {tuple(mass.shape)}")
    fixed = grid.budget(sparsity, dev)  # [Mq]
    if allocation == "row":
        return fixed.expand(b, h, -1).clone()
    valid, forced = grid.valid(dev), grid.forced(dev)
    forced = forced & valid
    n_forced = forced.sum(-1)  # [Mq]
    n_valid = valid.sum(-1)
    cand = valid & ~forced
    extra = int((fixed - n_forced).sum()) * h  # blocks to place per batch element, beyond the forced
    take = torch.full((b,), extra, dtype=torch.int64, device=dev)
    shares = row_shares(mass.double(), valid)
    forced_share = (shares * forced).sum(-1)  # [B, H, Mq]
    mq, mk = grid.num_q_blocks, grid.num_kv_blocks
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=dev)
    if allocation == "layer":
        sv = _sorted_candidates(shares, cand)  # [B, H, Mq, Mk]
        before = forced_share[..., None] + sv.cumsum(-1) - sv  # coverage of the row before each block
        n_cand = cand.sum(-1)
        is_cand = torch.arange(mk, device=dev)[None, :] < n_cand[:, None]  # [Mq, Mk]
        key = torch.where(is_cand, before, inf).reshape(b, -1)
        picked = _smallest_counts(key, take).reshape(b, h, mq, mk)
        return n_forced + picked.sum(-1)
    # "head": each head's cumulative-mass curve over its whole (row, block) candidate set.
    w = row_tokens(grid, dev)
    w = w / w.sum()
    flat = torch.where(cand, shares * w[:, None], torch.full_like(shares, -1.0)).reshape(b, h, -1)
    sv = torch.sort(flat, dim=-1, descending=True).values
    head_forced = (forced_share * w).sum(-1, keepdim=True)  # [B, H, 1]
    before = head_forced + sv.cumsum(-1) - sv
    key = torch.where(sv >= 0, before, inf).reshape(b, -1)
    per_head = _smallest_counts(key, take).reshape(b, h, -1).sum(-1)  # [B, H] extra blocks per head
    # Inside a head: water-filling on kept / k_i, so the head's total spreads in the per-row fixed shape.
    t = torch.arange(mk, device=dev)
    n_kept = n_forced[:, None] + t[None, :]  # the t-th extra block of row i makes it the n-th kept
    row_key = torch.where(n_kept < n_valid[:, None], n_kept.double() / fixed[:, None].double(), inf)
    order = torch.sort(row_key.reshape(-1), stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=dev)
    picked = rank.view(1, 1, mq, mk) < per_head[:, :, None, None]
    return n_forced + picked.sum(-1)
