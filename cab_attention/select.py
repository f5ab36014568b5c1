"""Stage 3, select: per query-block row, which key blocks to keep.

Every row ranks its key blocks in one total order:

1. the forced blocks (sink block 0 and the diagonal block), then
2. the other causally valid blocks by *priority*, highest first, ties to the more recent block
   (the larger key-block index); a selector may *demote* some valid blocks behind all the others
   (``cab`` with ``edges="positive"`` demotes zero-affinity blocks), then
3. non-edges (causally invalid blocks), which no budget ever reaches because ``k_i <= v_i``.

Fixed-sparsity mode keeps the first ``k_i`` blocks of that order. Adaptive mode keeps the shortest
prefix whose share of the row's *mass* (a non-negative weight per block, normalised over the row's
valid blocks) reaches the threshold. A NaN priority ranks below every finite one.
"""

from __future__ import annotations

import torch

from .geometry import BlockGrid


def rank_order(
    priority: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor, demote: torch.Tensor | None = None
) -> torch.Tensor:
    """The total order of each row, as key-block indices.

    Args:
        priority: ``[B, H, Mq, Mk]`` float, higher is kept first.
        valid, forced: ``[Mq, Mk]`` bool.
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


def fixed_budget(grid: BlockGrid, sparsity: float, device: torch.device | str) -> torch.Tensor:
    """``[Mq]`` int64 blocks per row in fixed-sparsity mode (see :meth:`BlockGrid.budget`)."""
    return grid.budget(sparsity, device)


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


def kv_layout(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's layout of a block mask.

    Args: mask ``[B, H, Mq, Mk]`` bool.

    Returns:
        ``kv_num_blocks`` ``[B, H, Mq]`` int32 and ``kv_indices`` ``[B, H, Mq, Mk]`` int32: the kept key
        blocks of each row in ascending order, then zeros (FlexAttention reads only the first
        ``kv_num_blocks`` entries).
    """
    mk = mask.shape[-1]
    num = mask.sum(-1, dtype=torch.int32)
    # A kept block goes to its rank among the kept blocks of its row; the others to a spare column that
    # is cut off. A scatter instead of a sort: O(Mk) per row.
    pos = torch.where(mask, mask.cumsum(-1) - 1, mk)
    idx = torch.zeros(*mask.shape[:-1], mk + 1, dtype=torch.int32, device=mask.device)
    src = torch.arange(mk, dtype=torch.int32, device=mask.device).expand_as(mask)
    idx.scatter_(-1, pos, src)
    return num, idx[..., :mk].contiguous()
