"""The bridge experiment at block level (:mod:`.bridge`): the same graph through the library's pipeline.

**Block level (through the library).** Every node becomes a block of ``block_size`` tokens whose
loudest (max-L2) token carries the node's vectors, built so that the library's coarse affinity
``relu(qc_i . kc_j * scale)`` *is* ``A`` (one-hot keys, queries = rows of ``A``); the other tokens of a
block are quieter scaled copies plus noise. The library's selectors then choose blocks with their
per-row budget ``k_i = min(v_i, max(2, ceil((1 - s) v_i)))`` (sink block 0 and the diagonal forced);
the bridge is retrieved when query block 0 keeps key block 99. The graph is undirected, so this runs
non-causally (``causal=False``): in causal mode the bridge would land in the always-kept sink column.
Differences from the token-level toy, which the summary reports: the library treats every causally
valid block pair as an edge (a zero-affinity pair is a zero-weight edge, not a non-edge scored 1000),
budgets are per row, and the strengths are out-strength (row) and in-strength (column).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .bridge_token_level import BRIDGE, sparsity_key
from .text import format_selector_spec

# Block-level selectors: (selector, options); a method's label is format_selector_spec of the pair.
_FORMAN_LOW = {"score": "forman", "keep": "lowest", "coarsen": "max_l2"}  # CAB's first formulation
_BLOCK_SPECS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("magnitude", {}),
    ("cab", _FORMAN_LOW),
    # edges="positive": zero-affinity block pairs rank last, as the toy's non-edges (score 1000) do.
    ("cab", {**_FORMAN_LOW, "edges": "positive"}),
    ("cab", {**_FORMAN_LOW, "keep": "highest"}),
    ("cab", {"score": "triangle", "keep": "lowest", "coarsen": "max_l2"}),
    ("cab", {"score": "triangle", "keep": "highest", "coarsen": "max_l2"}),
    ("streaming", {}),
    ("random", {"seed": 0}),
    ("antidiagonal", {}),
    ("oracle", {}),
)
BLOCK_METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = tuple(
    (format_selector_spec(name, opts), name, opts) for name, opts in _BLOCK_SPECS)
SWEEP_BLOCK_METHODS = tuple(BLOCK_METHODS[i][0] for i in (0, 1, 2, 3))  # magnitude and three Forman variants


def graph_qk(a: np.ndarray, block_size: int, head_dim: int = 128, seed: int = 0, quiet: float = 0.5):
    """Token-level q, k ``[1, 1, N * block_size, head_dim]`` float32 whose coarse (max-L2) block affinity is ``a``.

    Node ``i`` is block ``i``; its first token is the loud representative (query ``a[i] * sqrt(D)``, key
    ``e_i``), so ``qc_i . kc_j / sqrt(D) = a[i, j]``. The other tokens are ``quiet`` times the
    representative plus noise of norm about ``0.05 * quiet`` (so the representative keeps the largest norm).
    """
    n = a.shape[0]
    if head_dim < n:
        raise ValueError(f"head_dim must be at least the number of nodes ({n}), got {head_dim}")
    gen = torch.Generator().manual_seed(seed)
    qn = torch.zeros(n, head_dim)
    qn[:, :n] = torch.from_numpy(a.astype(np.float32)) * head_dim**0.5
    kn = torch.zeros(n, head_dim)
    kn[:, :n] = torch.eye(n)
    q = qn[:, None, :].repeat(1, block_size, 1)
    k = kn[:, None, :].repeat(1, block_size, 1)
    if block_size > 1:
        sd = 0.05 * quiet / head_dim**0.5
        qnorm = qn.norm(dim=-1, keepdim=True)[:, None]
        q[:, 1:] = quiet * q[:, 1:] + sd * qnorm * torch.randn(n, block_size - 1, head_dim, generator=gen)
        k[:, 1:] = quiet * k[:, 1:] + sd * torch.randn(n, block_size - 1, head_dim, generator=gen)
    return q.reshape(1, 1, n * block_size, head_dim), k.reshape(1, 1, n * block_size, head_dim)


def block_level(
    a: np.ndarray, sparsities: Sequence[float], block_size: int, methods: Sequence[str] | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Run the library's selectors on the graph; which of them keep the bridge block."""
    from cab_attention.geometry import BlockGrid
    from cab_attention import select_blocks
    from cab_attention.options import FORMAN_KEEP_LOWEST_MAXL2

    table = {m[0]: m for m in BLOCK_METHODS}
    names = list(methods) if methods is not None else list(table)
    unknown = [m for m in names if m not in table]
    if unknown:
        raise ValueError(f"methods must be among {sorted(table)}, got {unknown}")
    q, k = graph_qk(a, block_size)
    q, k = q.to(device), k.to(device)
    i, j = BRIDGE
    out: dict[str, Any] = {"block_size": block_size, "retrieved": {}, "row_budget": {}, "bridge_row_rank": {}}
    # The library's own curvature of the bridge block edge (on the coarse graph it builds).
    grid = BlockGrid.of(q, k, block_size, False)
    d = select_blocks(q, k, selector="cab", sparsity=0.9, block_size=block_size, causal=False, return_diagnostics=True,
                      **FORMAN_KEEP_LOWEST_MAXL2).diagnostics
    out["bridge_curvature_library"] = float(d["scores"][0, 0, i, j])
    out["coarse_affinity_error"] = float((d["A"][0, 0].cpu() - torch.from_numpy(a)).abs().max())
    for s in sparsities:
        key = sparsity_key(s)
        out["row_budget"][key] = int(grid.budget(s)[i])
        for name in names:
            _, selector, opts = table[name]
            if selector == "antidiagonal":
                opts = {"stride": min(8, block_size), **opts}
            sel = select_blocks(q, k, selector=selector, sparsity=s, block_size=block_size, causal=False,
                                return_diagnostics=True, **opts)
            out["retrieved"].setdefault(name, {})[key] = bool(sel.mask[0, 0, i, j])
            # Rank of the bridge among row i's unforced blocks in the library's own order (1 = first
            # pick; includes the tie-break and any demotion, e.g. edges="positive").
            order = sel.diagnostics["order"][0, 0, i].cpu()
            n_forced = int(grid.forced()[i].sum())
            out["bridge_row_rank"].setdefault(name, {})[key] = int((order == j).nonzero()[0, 0]) - n_forced + 1
            out.setdefault("density", {}).setdefault(name, {})[key] = sel.density
    return out
