"""Stage 3, select: per query-block row, which key blocks to keep; and :func:`select_blocks`, the whole
PyTorch predictor (coarsen -> score -> select) with the one dispatch to the Triton kernels.

The parts live beside it, one job each, and are re-exported here:

* :mod:`cab_attention.select_order`: the one total order of each row (forced blocks, then valid blocks by
  priority, ties to the more recent block, then non-edges) and the budgets read from it (fixed
  sparsity: the first ``k_i`` blocks; adaptive: the shortest prefix reaching a share of the row's mass);
* :mod:`cab_attention.select_stages`: :func:`coarsen_stage`, :func:`score_stage` and :func:`select_stage`,
  with the names, arguments and outputs of the Triton stages in :mod:`cab_attention.kernels.predictor`,
  so a benchmark can time either side stage by stage; :func:`select_blocks` is built from the same code;
* :mod:`cab_attention.select_scorers`: each selector's priority (and optional mass) per block edge.
  Options and their defaults: :mod:`cab_attention.options`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .options import DEFAULT_SELECTOR
from .allocation import allocate
from .geometry import BlockGrid, check_block_size, check_finite, check_qkv, check_sparsity
from .options import check_stride, resolve_options
from .select_order import adaptive_budget, group_reduce, keep_first, masked_softmax, rank_order, rank_rows, row_rank01
from .select_scorers import SCORERS, ScoringContext
from .select_stages import Scores, cab_priority, coarsen_stage, score_stage, select_stage
from .selection import BlockSelection, dense_selection, kv_layout

__all__ = [
    "Scores",
    "adaptive_budget",
    "cab_priority",
    "coarsen_stage",
    "keep_first",
    "kv_layout",
    "rank_order",
    "row_rank01",
    "score_stage",
    "select_blocks",
    "select_stage",
]


def _select_triton(q, k, *, selector, sparsity, block_size, causal, opts) -> BlockSelection:
    """The one dispatch to :mod:`cab_attention.kernels`, imported here, lazily: importing it compiles
    nothing but needs Triton, and the kernels import this module."""
    from .kernels import select_blocks_triton

    return select_blocks_triton(
        q, k, selector=selector, sparsity=sparsity, block_size=block_size, causal=causal, opts=opts
    )


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    selector: str = DEFAULT_SELECTOR,
    sparsity: float = 0.9,
    block_size: int = 64,
    causal: bool = True,
    window: int | None = None,
    **options: Any,
) -> BlockSelection:
    """Choose the key blocks each query block attends to.

    Args:
        q: ``[B, Hq, Nq, D]`` queries (the last ``Nq`` positions when ``Nq < Nk``).
        k: ``[B, Hkv, Nk, D]`` keys, ``Hq % Hkv == 0``.
        selector: one of :data:`cab_attention.options.SELECTORS`.
        sparsity: in ``[0, 1)``; row ``i`` with ``v_i`` valid blocks keeps exactly
            ``min(v_i, max(2, ceil((1 - sparsity) * v_i)))`` (:meth:`BlockGrid.budget`), sink and diagonal
            included.
        block_size: a power of two; tokens per block on both axes.
        causal: causal block graph and attention.
        window: a sliding window in tokens (query ``p`` sees keys ``p - window < j <= p``; causal only):
            selection happens inside it (:class:`BlockGrid` ``window``: valid blocks, a window-local sink,
            budgets over the window's blocks); torch only.
        **options: ``coarsen`` (``"max_l2"``, ``"mean"``, ``"max"``), ``share_kv`` (one mask per KV head),
            ``threshold`` (adaptive mode: keep the fewest blocks whose estimated mass reaches it; then
            ``sparsity`` is not used), ``scale`` (default ``D**-0.5``), ``return_diagnostics``,
            ``check_finite`` (default ``True``: ``ValueError`` on NaN or inf in q or k, at the cost of a
            read of both and a host sync), ``impl`` (``"torch"``, or ``"triton"`` for the fused kernels of
            :mod:`cab_attention.kernels`: ``cab``/``magnitude``/``dense``, fixed sparsity, CUDA or
            ``TRITON_INTERPRET=1``; ``ValueError`` elsewhere), ``allocation`` (``"row"``, ``"head"``,
            ``"layer"``: the same exact total spread by estimated mass, :mod:`cab_attention.allocation`;
            fixed sparsity, torch only), and the selector's own (see
            :data:`cab_attention.options.SELECTOR_OPTIONS`).

    Returns:
        A :class:`BlockSelection`. Fewer than ``block_size`` queries give the dense selection.
    """
    check_qkv(q, k)
    check_block_size(block_size)
    check_sparsity(sparsity)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    opts = resolve_options(selector, options)
    # Checked here, not only in the scorer, so that a bad stride fails even where the dense path
    # (fewer queries than one block) never calls the scorer.
    if selector == "antidiagonal" or (selector == "cab_graph" and opts["affinity"] == "antidiagonal"):
        check_stride(opts["stride"], block_size)
    if opts["allocation"] != "row" and (opts["threshold"] is not None or opts["impl"] == "triton"):
        raise ValueError(
            f"allocation={opts['allocation']!r} needs fixed sparsity with impl='torch' "
            "(threshold=None; the Triton path allocates per row)"
        )
    if opts["check_finite"]:
        check_finite(q=q, k=k)
    if opts["impl"] == "triton" and window is not None:
        raise ValueError("impl='triton' selects over the whole causal range; use impl='torch' with window=")
    if opts["impl"] == "triton":
        return _select_triton(q, k, selector=selector, sparsity=sparsity, block_size=block_size, causal=causal,
                              opts=opts)
    grid = BlockGrid.of(q, k, block_size, causal, window)
    dev = q.device
    share_kv = opts["share_kv"]

    if selector == "dense" or grid.q_len < block_size:
        sel = dense_selection(grid, selector, share_kv, dev)
        if opts["return_diagnostics"]:
            sel.diagnostics = {"mask": sel.mask}
        return sel

    scale = float(opts["scale"]) if opts["scale"] is not None else grid.head_dim**-0.5
    ctx = ScoringContext(q, k, grid, scale, opts)
    prio, mass = SCORERS[selector](ctx)
    threshold = opts["threshold"]
    order = rank_rows(prio, grid, ctx.demote, share_kv)
    if threshold is None and opts["allocation"] == "row":
        budget = grid.budget(sparsity, dev)
    elif threshold is None:
        if mass is None:
            mass = masked_softmax(ctx.logits(), grid.valid(dev))
        if share_kv:
            mass = group_reduce(mass, grid, "mean")
        budget = allocate(opts["allocation"], mass, grid, sparsity)
    else:
        if mass is None:
            mass = masked_softmax(ctx.logits(), grid.valid(dev))
        if share_kv:
            mass = group_reduce(mass, grid, "mean")
        budget = adaptive_budget(order, mass, grid.valid(dev), grid.forced(dev), float(threshold))
    mask = keep_first(order, budget)
    num, idx = kv_layout(mask)
    diag = None
    if opts["return_diagnostics"]:
        if share_kv:
            prio = group_reduce(prio, grid, "mean")
        diag = dict(ctx.diag, priority=prio, order=order, mask=mask, budget=budget)
        if mass is not None:
            diag["mass"] = mass
    return BlockSelection(mask, num, idx, grid, selector, share_kv, diag)


# Old names kept for one release.
def __getattr__(name: str) -> Any:
    if name == "fixed_budget":
        warnings.warn("cab_attention.select.fixed_budget is deprecated; use BlockGrid.budget",
                      DeprecationWarning, stacklevel=2)
        return lambda grid, sparsity, device: grid.budget(sparsity, device)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
