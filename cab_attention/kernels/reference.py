"""PyTorch reference of the two-stage rule (no Triton), built from the core stages.

Two-stage selection (an ``O(M^2 k)`` variant of the triangle selection), per query-block row ``i`` with
budget ``k_i``, ``f_i`` forced blocks and ``r_i = k_i - f_i`` free picks:

1. candidates = the forced blocks plus the top ``min(2 r_i, free_i)`` non-forced valid blocks by coarse
   logit (the order of ``A = relu(logit)`` where ``A > 0``, refined below zero instead of tied), ties to
   the larger key-block index;
2. priority = ``-(A - lam R / norm)`` (keep lowest) or ``+(...)`` on candidates only, ``R = A @ A`` as in
   :func:`cab_attention.score.redundancy`, ``norm`` = ``Mk`` (``"blocks"``) or 1 (``"none"``);
3. keep the forced blocks and the ``r_i`` best candidates (the :mod:`cab_attention.select` order).

It is an approximation of the one-stage triangle selection: a block outside the affinity top ``2 r_i``
can never be kept, however its curvature ranks. Here ``R`` is computed in full (this is the reference);
the Triton kernel computes it for the candidates only.
"""

from __future__ import annotations

import torch

from ..coarsen import coarsen as coarsen_fn
from ..geometry import BlockGrid
from ..score import affinity, coarse_logits, redundancy
from ..select import keep_first, rank_order
from ..selection import BlockSelection, dense_selection, kv_layout


def two_stage_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 64,
    sparsity: float = 0.9,
    causal: bool = True,
    keep: str | None = None,
    lam: float = 0.5,
    norm: str = "blocks",
    scale: float | None = None,
    coarsen: str | None = None,
) -> BlockSelection:
    """The two-stage selection in plain PyTorch. Shapes as :func:`cab_attention.select_blocks`;
    ``None`` options take ``cab``'s defaults there."""
    from .predictor import selector_defaults

    _, keep, coarsen = selector_defaults("cab", "triangle", keep, coarsen)
    grid = BlockGrid.of(q, k, block_size, causal)
    dev = q.device
    valid, forced = grid.valid(dev), grid.forced(dev)
    budget = grid.budget(sparsity, dev)
    if grid.q_len < block_size:
        return dense_selection(grid, "cab", False, dev)
    scale = grid.head_dim**-0.5 if scale is None else scale
    qc = coarsen_fn(q, block_size, coarsen, pad_front=grid.q_pad_front)
    kc = coarsen_fn(k, block_size, coarsen)
    logits = coarse_logits(qc, kc, scale)
    a = affinity(logits, valid)
    nf = (valid & forced).sum(-1)
    free = valid.sum(-1) - nf
    cand_budget = nf + torch.minimum(2 * (budget - nf), free)
    cand = keep_first(rank_order(logits, valid, forced), cand_budget)
    r = redundancy(a, grid)
    div = a.shape[-1] if norm == "blocks" else 1.0
    f = a - lam * (r / div)
    prio = -f if keep == "lowest" else f
    order = rank_order(prio, valid & cand, forced)
    mask = keep_first(order, budget)
    num, idx = kv_layout(mask)
    return BlockSelection(mask, num, idx, grid, "cab")
