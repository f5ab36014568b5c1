"""Scoring and aggregation of RULER-style trials: :func:`score_output` (the share of required answers
present in the output as whole words, RULER's ``string_match_all``; a trial is correct, an exact match,
when all are present), :func:`aggregate` (exact-match accuracy per cell with its 95% Wilson interval,
mean score, density and prompt tokens) and :func:`paired_accuracy` (each selector against a reference
on the same prompts, with a cluster-bootstrap interval). Trials are plain dicts, as a run writes them
or as read back from its CSV.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

def answer_found(answer: str, text: str) -> bool:
    """``answer`` occurs in ``text`` as a whole word (case-insensitive): "1234" is not found in "12345"."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(answer)}(?![A-Za-z0-9])", text, flags=re.IGNORECASE) is not None


def score_output(answers: Sequence[str], text: str) -> tuple[float, bool]:
    """``(share of answers found, all found)``: RULER's ``string_match_all`` and exact match."""
    if not answers:
        raise ValueError("answers must not be empty")
    found = sum(answer_found(a, text) for a in answers)
    return found / len(answers), found == len(answers)


def wilson(correct: int, total: int) -> tuple[float, float]:
    """95% Wilson interval (the report module's, one home for the formula)."""
    from cab_eval.evaluate.report import wilson as _w

    return _w(correct, total)


def aggregate(trials: Iterable[dict[str, Any]], by: Sequence[str]) -> list[dict[str, Any]]:
    """Rows grouped by ``by`` (first-seen order): exact-match ``correct``/``total``, ``accuracy`` with its
    95% Wilson interval, mean ``score`` (share of answers found), mean ``density`` and prompt tokens."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for t in trials:
        groups.setdefault(tuple(t[f] for f in by), []).append(t)
    rows = []
    for key, ts in groups.items():
        correct, total = sum(bool(t["correct"]) for t in ts), len(ts)
        lo, hi = wilson(correct, total)
        row = dict(zip(by, key))
        row.update(correct=correct, total=total, accuracy=correct / total, ci_low=lo, ci_high=hi,
                   score=sum(float(t["score"]) for t in ts) / total,
                   density=sum(float(t["density"]) for t in ts) / total,
                   tokens=round(sum(int(t["tokens"]) for t in ts) / total, 1))
        rows.append(row)
    return rows


def paired_accuracy(trials: Iterable[dict[str, Any]], reference: str = "antidiagonal",
                    by: Sequence[str] = ("sparsity", "length")) -> list[dict[str, Any]]:
    """Each selector's exact-match accuracy minus ``reference``'s on the same prompts, per ``by`` cell and
    pooled over the last ``by`` field (``"all"``): mean paired difference and its 95% percentile bootstrap
    interval with the prompt as the cluster (4000 resamples, seed 0; the pre-registered statistic).

    ``trials`` are typed as a run writes them or ``ruler_trials.read_trials`` reads them back (float
    ``sparsity``, bool ``correct``), as for :func:`aggregate`. Only prompts both selectors ran count (a run
    cut by its time limit pairs what it finished); ``a_only`` and ``ref_only`` count the prompts one got
    right and the other not. Dense (sparsity 0) is not paired.
    """
    from cab_eval.evaluate.ablation import cluster_bootstrap

    trials = [t for t in trials if t["sparsity"] > 0]
    outcome: dict[tuple, dict[str, dict[str, bool]]] = {}
    for t in trials:
        key = tuple(t[f] for f in by)
        for cell in (key, key[:-1] + ("all",)):
            outcome.setdefault(cell, {}).setdefault(t["selector"], {})[t["uid"]] = bool(t["correct"])
    rows = []
    for cell, per in outcome.items():
        ref = per.get(reference)
        if not ref:
            continue
        for sel, got in per.items():
            if sel == reference:
                continue
            common = sorted(set(got) & set(ref))
            if not common:
                continue
            diffs = {u: [float(got[u]) - float(ref[u])] for u in common}
            mean, lo, hi = cluster_bootstrap(diffs)
            rows.append({**dict(zip(by, cell)), "selector": sel, "reference": reference, "prompts": len(common),
                         "accuracy": sum(got[u] for u in common) / len(common),
                         "ref_accuracy": sum(ref[u] for u in common) / len(common),
                         "diff": mean, "lo": lo, "hi": hi,
                         "a_only": sum(got[u] and not ref[u] for u in common),
                         "ref_only": sum(ref[u] and not got[u] for u in common)})
    return rows
