"""The block masks a recall measurement compares: one per selector configuration and sparsity, on one layer.

Selection goes through the library (:func:`cab_attention.select_blocks`). For several sparsities a
fixed-sparsity selector is scored once and the library's own rank order is cut at each sparsity's exact
budgets (per row, or from :func:`cab_attention.allocation.allocate`), so every method keeps exactly the
same, exactly counted number of blocks; on a sliding layer selection stays inside the window.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .selector_specs import Config


def config_masks(
    q: torch.Tensor, k: torch.Tensor, cfg: Config, sparsities: Sequence[float], block_size: int, scale: float | None,
    window: int | None = None,
) -> list[dict[str, Any]]:
    """One mask per sparsity for ``cfg`` on one layer: ``[{mask [Hq, Mq, Mk] bool, density, kept, budget}]``.

    Fixed-sparsity selectors are scored once and ranked per sparsity with the library's exact budgets
    (per row, or from :func:`cab_attention.allocation.allocate` on the selection's own mass estimate);
    adaptive mode (``threshold``) and ``dense`` go through :func:`select_blocks` for each sparsity.
    ``window``: a sliding layer's window (selection inside it, budgets over its blocks).
    """
    from cab_attention import select_blocks
    from cab_attention.allocation import allocate
    from cab_attention.select import keep_first

    opts = dict(cfg.options)
    if scale is not None and "scale" not in opts:
        opts["scale"] = float(scale)
    out = []
    allocation = opts.get("allocation", "row")
    reuse = cfg.selector != "dense" and opts.get("threshold") is None and q.shape[2] >= block_size
    first = None
    for s in sparsities:
        if first is None or not reuse:
            sel = select_blocks(q, k, selector=cfg.selector, sparsity=float(s), block_size=block_size, causal=True,
                                window=window, return_diagnostics=reuse, **opts)
            grid = sel.grid
            mask = sel.query_head_mask()
            if reuse:
                first = sel.diagnostics["priority"]
                # The library's own order: it includes any demotion (cab edges="positive"), which a
                # re-ranking of the priority alone would lose.
                order = sel.diagnostics["order"]
                mass = sel.diagnostics.get("mass")
                group = grid.group if sel.shared_kv else 1
                if sel.shared_kv:
                    order = order.repeat_interleave(group, dim=1)
        elif allocation == "row":
            mask = keep_first(order, grid.budget(float(s), q.device))
        else:
            budget_rows = allocate(allocation, mass, grid, float(s)).repeat_interleave(group, dim=1)
            mask = keep_first(order, budget_rows)
        valid = grid.valid(q.device)
        kept = int((mask & valid).sum())
        budget = int(grid.budget(float(s), q.device).sum()) * mask.shape[0] * mask.shape[1]
        total = int(valid.sum()) * mask.shape[0] * mask.shape[1]
        forced = int((grid.forced(q.device) & valid).sum()) * mask.shape[0] * mask.shape[1]
        out.append({"mask": mask[0], "density": kept / total, "kept": kept, "budget": budget,
                    "valid": total, "free": kept - forced})
    return out
