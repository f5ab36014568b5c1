"""The bridge experiment's graph and its token-level run (:mod:`.bridge`).

**Token level (the original experiment, reproduced exactly).** ``networkx.stochastic_block_model([50, 50],
[[0.9, 0], [0, 0.9]], seed=42)``; after ``numpy.random.seed(42)`` one draw
``clip(normal(1.0, 0.1), 0.1, 2.0)`` per edge in ``G.edges()`` order, written to ``A[u, v]`` and
``A[v, u]`` (float32); the bridge ``A[0, 99] = A[99, 0] = 0.001``; strength ``S`` = row sums;
``F = 4A - S_i - S_j + 3 A @ A`` where ``A > 0`` and 1000 elsewhere (diagonal included). With
``k = int((1 - s) N^2)``, "H2O" keeps the entries ``>=`` the k-th largest weight and CAB the entries
``<=`` the k-th smallest ``F`` (global top-k over all ``N^2`` entries, ties kept); the bridge is
retrieved when ``mask[0, 99]``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

N_NODES = 100
COMMUNITY = 50
P_IN = 0.9
BRIDGE = (0, 99)
BRIDGE_WEIGHT = 0.001
NOISE_WEIGHT = 0.001
NON_EDGE_SCORE = 1000.0


def sbm_weights(seed: int = 42, noise_edges: int = 0, noise_seed: int | None = None) -> np.ndarray:
    """The bridge experiment's weighted SBM adjacency ``[N, N]`` float32, with the bridge and ``noise_edges`` weak
    cross-community edges.

    ``seed`` drives the SBM and (through ``numpy.random.seed``) the weight draws, exactly as the original experiment did;
    the noise pairs come from ``numpy.random.default_rng(noise_seed)`` (default: ``seed``).
    """
    import networkx as nx

    if isinstance(noise_edges, bool) or not isinstance(noise_edges, int) or noise_edges < 0:
        raise ValueError(f"noise_edges must be a non-negative int, got {noise_edges!r}")
    max_noise = COMMUNITY * COMMUNITY - 1
    if noise_edges > max_noise:
        raise ValueError(f"noise_edges must be at most {max_noise} (cross-community pairs), got {noise_edges}")
    g = nx.stochastic_block_model([COMMUNITY, COMMUNITY], [[P_IN, 0.0], [0.0, P_IN]], seed=seed)
    np.random.seed(seed)
    a = np.zeros((N_NODES, N_NODES), dtype=np.float32)
    for u, v in g.edges():
        w = np.clip(np.random.normal(1.0, 0.1), 0.1, 2.0)
        a[u, v] = w
        a[v, u] = w
    a[BRIDGE] = a[BRIDGE[::-1]] = BRIDGE_WEIGHT
    if noise_edges:
        rng = np.random.default_rng(seed if noise_seed is None else noise_seed)
        pairs = [(u, v) for u in range(COMMUNITY) for v in range(COMMUNITY, N_NODES) if (u, v) != BRIDGE]
        for idx in rng.choice(len(pairs), size=noise_edges, replace=False):
            u, v = pairs[int(idx)]
            a[u, v] = a[v, u] = NOISE_WEIGHT
    return a


def forman_scores(a: np.ndarray) -> np.ndarray:
    """``F = 4A - S_i - S_j + 3 A @ A`` where ``A > 0``, ``NON_EDGE_SCORE`` elsewhere (float32)."""
    s = a.sum(1)
    f = 4 * a - s[:, None] - s[None, :] + 3 * (a @ a)
    return np.where(a > 0, f, np.float32(NON_EDGE_SCORE)).astype(np.float32)


def budget_k(sparsity: float, n: int = N_NODES) -> int:
    """``int((1 - s) N^2)``, the original experiment's global budget (Python float arithmetic, as it was computed there)."""
    return int((1 - sparsity) * n * n)


def h2o_mask(a: np.ndarray, k: int) -> np.ndarray:
    """Entries ``>=`` the k-th largest weight (ties kept)."""
    kth = np.sort(a.ravel())[::-1][k - 1]
    return a >= kth


def cab_mask(f: np.ndarray, k: int) -> np.ndarray:
    """Entries ``<=`` the k-th smallest ``F`` (ties kept)."""
    kth = np.sort(f.ravel())[k - 1]
    return f <= kth


def bridge_rank(f: np.ndarray) -> int:
    """1 + the number of entries with strictly lower ``F`` than the bridge."""
    return int((f < f[BRIDGE]).sum()) + 1


def token_level(a: np.ndarray, sparsities: Sequence[float]) -> dict[str, Any]:
    """The original experiment on the adjacency ``a`` ``[N, N]``: the bridge's curvature and rank, and per
    sparsity whether H2O and CAB (global budget :func:`budget_k`) keep the bridge."""
    f = forman_scores(a)
    out: dict[str, Any] = {
        "edges_directed": int((a > 0).sum()),
        "bridge_curvature": float(f[BRIDGE]),
        "bridge_rank": bridge_rank(f),
        "retrieved": {"h2o": {}, "cab": {}},
        "rows": [],
    }
    for s in sparsities:
        k = budget_k(s)
        if k < 1:
            raise ValueError(f"sparsities must leave at least one entry (int((1 - s) * {N_NODES ** 2}) >= 1), got {s}")
        hm, cm = h2o_mask(a, k), cab_mask(f, k)
        key = sparsity_key(s)
        out["retrieved"]["h2o"][key] = bool(hm[BRIDGE])
        out["retrieved"]["cab"][key] = bool(cm[BRIDGE])
        out["rows"].append(
            {
                "sparsity": float(s),
                "k": k,
                "h2o_kept": int(hm.sum()),
                "cab_kept": int(cm.sum()),
                "h2o_bridge": "retrieved" if hm[BRIDGE] else "lost",
                "cab_bridge": "retrieved" if cm[BRIDGE] else "lost",
            }
        )
    return out


def sparsity_key(s: float) -> str:
    """A sparsity as the result dicts key it (``0.9`` -> ``"0.9"``)."""
    return format(float(s), "g")
