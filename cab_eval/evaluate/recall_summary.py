"""Summaries of recall rows: per (method, sparsity) and per layer, means with bootstrap 95% CIs over
windows, and which methods' values coincide (their plot lines overlap; the tables say so)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .report import bootstrap_ci


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, sparsity): mean over layers of each window, then mean and bootstrap 95% CI over windows."""
    keys = sorted({(r["method"], r["sparsity"]) for r in rows}, key=lambda x: (x[1], x[0]))
    order = list(dict.fromkeys(r["method"] for r in rows))
    keys.sort(key=lambda x: (x[1], order.index(x[0])))
    out = []
    for method, s in keys:
        sub = [r for r in rows if r["method"] == method and r["sparsity"] == s]
        wins = sorted({r["window"] for r in sub})
        rec_w = [np.mean([r["recall"] for r in sub if r["window"] == w]) for w in wins]
        err_w = [np.mean([r["rel_err"] for r in sub if r["window"] == w]) for w in wins]
        rm, rlo, rhi = bootstrap_ci(rec_w)
        em, elo, ehi = bootstrap_ci(err_w)
        kept = sum(r["kept_blocks"] for r in sub)
        budget = sum(r["budget_blocks"] for r in sub)
        valid = sum(r["valid_blocks"] for r in sub)
        free = sum(r["free_blocks"] for r in sub)
        out.append({
            "method": method, "sparsity": s, "recall": rm, "recall_lo": rlo, "recall_hi": rhi,
            "rel_err": em, "rel_err_lo": elo, "rel_err_hi": ehi, "density": kept / valid,
            "kept_blocks": kept, "budget_blocks": budget, "exact_budget": kept == budget, "windows": len(wins),
            "free_blocks": free,
        })
    return out


def per_layer(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, sparsity, layer): mean and bootstrap CI over windows."""
    keys = sorted({(r["method"], r["sparsity"], r["layer"]) for r in rows}, key=lambda x: (x[1], x[0], x[2]))
    out = []
    for method, s, layer in keys:
        sub = [r for r in rows if r["method"] == method and r["sparsity"] == s and r["layer"] == layer]
        rm, rlo, rhi = bootstrap_ci([r["recall"] for r in sub])
        em, elo, ehi = bootstrap_ci([r["rel_err"] for r in sub])
        out.append({"method": method, "sparsity": s, "layer": layer, "recall": rm, "recall_lo": rlo,
                    "recall_hi": rhi, "rel_err": em, "rel_err_lo": elo, "rel_err_hi": ehi})
    return out


def same_values(summary: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Methods whose recall and error equal an earlier method's at every sparsity (see
    :func:`cab_eval.plotting.coincidences`): such lines overlap in the plots, and the tables say so."""
    from ..plotting import coincidences

    methods = list(dict.fromkeys(r["method"] for r in summary))
    vals = {}
    for m in methods:
        sub = sorted((r for r in summary if r["method"] == m), key=lambda r: r["sparsity"])
        vals[m] = [r["recall"] for r in sub] + [r["rel_err"] for r in sub]
    return coincidences(vals)
