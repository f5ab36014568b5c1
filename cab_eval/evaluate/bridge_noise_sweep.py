"""The bridge experiment's noise sweep (:mod:`.bridge`).

**Noise sweep.** For each noise level ``n`` (0, 5, 20, 100) and seed (SBM seed, numpy weight seed and
the noise placement all from one seed; seed 42 with ``n = 0`` is the experiment above), ``n`` distinct
cross-community pairs other than the bridge get weight 0.001 (both directions). Reported: the bridge's
rank in ascending ``F`` over all ``N^2`` entries (1 = lowest), and per method and sparsity the share of
seeds that retrieve the bridge, with 95% Wilson intervals.

"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import numpy as np

from .bridge_block_level import SWEEP_BLOCK_METHODS, block_level
from .bridge_token_level import BRIDGE, bridge_rank, forman_scores, sbm_weights, sparsity_key, token_level
from .report import bootstrap_ci, wilson


def noise_sweep(
    noise_levels: Sequence[int],
    seeds: Sequence[int],
    sparsities: Sequence[float],
    block_size: int,
    progress: bool = True,
    device: str = "cpu",
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Bridge rank and retrieval per noise level and seed; ``on_row`` gets each seed's row as it is done
    (``cab eval bridge`` appends it to ``bridge_noise_sweep.csv``, so an interrupted sweep keeps it)."""
    from tqdm.auto import tqdm

    per_seed: list[dict[str, Any]] = []
    jobs = [(n, s) for n in noise_levels for s in seeds]
    for n, seed in tqdm(jobs, desc="bridge noise sweep", disable=not progress, file=sys.stderr):
        a = sbm_weights(seed, noise_edges=int(n))
        f = forman_scores(a)
        row: dict[str, Any] = {"noise_edges": int(n), "seed": int(seed), "bridge_rank": bridge_rank(f),
                               "bridge_curvature": float(f[BRIDGE])}
        tl = token_level(a, sparsities)
        bl = block_level(a, sparsities, block_size, SWEEP_BLOCK_METHODS, device=device)
        for s in sparsities:
            key = sparsity_key(s)
            row[f"h2o@{key}"] = tl["retrieved"]["h2o"][key]
            row[f"cab@{key}"] = tl["retrieved"]["cab"][key]
            for m in SWEEP_BLOCK_METHODS:
                row[f"block-{m}@{key}"] = bl["retrieved"][m][key]
        per_seed.append(row)
        if on_row is not None:
            on_row(row)
    methods = ["h2o", "cab"] + [f"block-{m}" for m in SWEEP_BLOCK_METHODS]
    summary = []
    for n in noise_levels:
        rows = [r for r in per_seed if r["noise_edges"] == n]
        ranks = [r["bridge_rank"] for r in rows]
        mean, lo, hi = bootstrap_ci(ranks)
        entry: dict[str, Any] = {
            "noise_edges": int(n),
            "seeds": len(rows),
            "rank_mean": mean,
            "rank_ci": [lo, hi],
            "rank_median": float(np.median(ranks)),
            "rank_min": int(min(ranks)),
            "rank_max": int(max(ranks)),
            "retrieval": {},
        }
        for m in methods:
            for s in sparsities:
                key = sparsity_key(s)
                c = sum(bool(r[f"{m}@{key}"]) for r in rows)
                lo_w, hi_w = wilson(c, len(rows))
                entry["retrieval"].setdefault(m, {})[key] = {"rate": c / len(rows), "ci": [lo_w, hi_w], "retrieved": c, "total": len(rows)}
        summary.append(entry)
    return {"seeds": list(map(int, seeds)), "per_seed": per_seed, "summary": summary, "methods": methods}
