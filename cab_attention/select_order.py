"""The one order of every selection row and the budgets read from it (shared by the PyTorch stages,
:mod:`cab_attention.select`, and the Triton kernels' references).

Every row ranks its key blocks in one total order:

1. the forced blocks (sink block 0 and the diagonal block), then
2. the other causally valid blocks by *priority*, highest first, ties to the more recent block
   (the larger key-block index); a selector may *demote* some valid blocks behind all the others
   (``cab`` with ``edges="positive"`` demotes zero-affinity blocks), then
3. non-edges (causally invalid blocks), which no budget ever reaches because ``k_i <= v_i``.

Fixed-sparsity mode keeps the first ``k_i`` blocks of that order (:meth:`BlockGrid.budget`). Adaptive
mode keeps the shortest prefix whose share of the row's *mass* (a non-negative weight per block,
normalised over the row's valid blocks) reaches the threshold. A NaN priority ranks below every finite one.
"""

from __future__ import annotations

import torch

from .geometry import BlockGrid

__all__ = ["adaptive_budget", "group_reduce", "keep_first", "masked_softmax", "rank_order", "rank_rows", "row_rank01"]


def rank_order(
    priority: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor, demote: torch.Tensor | None = None
) -> torch.Tensor:
    """The total order of each row, as key-block indices.

    Args:
        priority: ``[B, H, Mq, Mk]`` float, higher is kept first.
        valid, forced: ``[Mq, Mk]`` bool (or broadcastable to ``priority``).
        demote: optional ``[B, H, Mq, Mk]`` bool: valid, non-forced blocks that rank after every other
            valid block (still before non-edges, so budgets stay exact).

    Returns:
        ``[B, H, Mq, Mk]`` int64: ``order[..., r]`` is the key block ranked ``r``-th.
    """
    mk = priority.shape[-1]
    pr = torch.nan_to_num(priority.float(), nan=float("-inf"))
    tier = 2 * valid.to(torch.int8) + forced.to(torch.int8)  # forced 3, valid 2, non-edge 0
    if demote is not None:
        tier = tier - (demote & valid & ~forced).to(torch.int8)  # demoted 1
    # Reverse the columns so that a stable sort breaks ties toward the larger original index.
    pr_rev = pr.flip(-1)
    tier_rev = tier.flip(-1).expand_as(pr_rev)
    by_priority = torch.sort(pr_rev, dim=-1, descending=True, stable=True).indices
    by_tier = torch.sort(tier_rev.gather(-1, by_priority), dim=-1, descending=True, stable=True).indices
    return (mk - 1) - by_priority.gather(-1, by_tier)


def keep_first(order: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mask of the first ``k`` blocks of each row's order.

    Args: order ``[B, H, Mq, Mk]`` int64; k broadcastable to ``[B, H, Mq]``. Returns ``[B, H, Mq, Mk]`` bool.
    """
    mk = order.shape[-1]
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(mk, device=order.device).expand_as(order))
    return ranks < k[..., None]


def adaptive_budget(
    order: torch.Tensor, mass: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Fewest blocks, in rank order, whose share of the row's mass reaches ``threshold``.

    Args:
        order: ``[B, H, Mq, Mk]`` from :func:`rank_order`; mass: ``[B, H, Mq, Mk]`` non-negative;
        valid, forced: ``[Mq, Mk]`` bool.

    Returns:
        ``[B, H, Mq]`` int64, at least the number of forced blocks and at most the valid ones.
    """
    w = torch.where(valid, mass.float().clamp_min(0.0), torch.zeros((), device=mass.device))
    total = w.sum(-1, keepdim=True)
    share = w / total.clamp_min(1e-30)
    cum = share.gather(-1, order).cumsum(-1)
    # Count the prefixes still short of the threshold; the next block reaches it.
    k = (cum < threshold - 1e-6).sum(-1) + 1
    n_forced = (forced & valid).sum(-1)
    n_valid = valid.sum(-1)
    return torch.minimum(torch.maximum(k, n_forced), n_valid)


def row_rank01(p: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rank of each valid entry within its row, scaled to ``[0, 1]`` (1 = highest priority).

    Args: p ``[..., Mq, Mk]``; valid ``[Mq, Mk]`` bool. Returns float32 of ``p``'s shape (invalid entries
    get negative ranks). NaN ranks below every number, as in :func:`rank_order`.
    """
    # Invalid entries sort below everything, so a valid -inf still ranks above them.
    big = float(torch.finfo(torch.float32).max)
    p = torch.nan_to_num(p.double(), nan=-2 * big, posinf=big, neginf=-big)  # finite in float64
    key = torch.where(valid, p, torch.full_like(p, float("-inf")))
    ranks = torch.argsort(torch.argsort(key, dim=-1, stable=True), dim=-1, stable=True).float()
    n_valid = valid.sum(-1, keepdim=True).float()
    # Invalid entries sort first, so shift ranks down by their count.
    ranks = ranks - (valid.shape[-1] - n_valid)
    return ranks / (n_valid - 1).clamp_min(1)


def masked_softmax(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax of each row of ``x`` ``[B, H, Mq, Mk]`` over its ``valid`` ``[Mq, Mk]`` entries."""
    return x.masked_fill(~valid, float("-inf")).softmax(-1)


def group_reduce(x: torch.Tensor, grid: BlockGrid, how: str) -> torch.Tensor:
    """``[B, Hq, ...]`` -> ``[B, Hkv, ...]``: mean (priority, mass) or all (demotion) over each KV group."""
    y = x.reshape(grid.batch, grid.kv_heads, grid.group, *x.shape[2:])
    return y.mean(2) if how == "mean" else y.all(2)


def rank_rows(prio: torch.Tensor, grid: BlockGrid, demote: torch.Tensor | None, share_kv: bool,
              candidates: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`rank_order` of ``prio`` ``[B, Hq, Mq, Mk]`` on ``grid``'s valid and forced blocks; ``share_kv``
    first averages the priority (and ANDs ``demote``) over each KV group (``H = Hkv``); ``candidates``
    ``[B, H, Mq, Mk]`` bool narrows the valid blocks (the two-stage mode)."""
    dev = prio.device
    valid, forced = grid.valid(dev), grid.forced(dev)
    if share_kv:
        prio = group_reduce(prio, grid, "mean")
        demote = None if demote is None else group_reduce(demote, grid, "all")
    if candidates is not None:
        valid = valid & candidates
    return rank_order(prio, valid, forced, demote)
