"""Plots and tables that stay legible when two methods give the same values.

Two selectors can keep exactly the same blocks (``cab`` and ``streaming`` often do at high sparsity), and
then one line hides the other. Every line therefore gets its own marker and line style
(:func:`line_style`), and a method whose values equal another's at every point says so in the legend
and in the tables (:func:`coincidences`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "*", "h", "p")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))


def line_style(i: int) -> dict[str, Any]:
    """Keyword arguments for the ``i``-th line: a marker and a line style that differ from its neighbours'
    (hollow markers, so a marker drawn over another stays visible)."""
    return {"marker": MARKERS[i % len(MARKERS)], "ls": LINESTYLES[i % len(LINESTYLES)], "mfc": "none", "ms": 6}


def _same(a: Sequence[float], b: Sequence[float], tol: float) -> bool:
    if len(a) != len(b) or not a:
        return False
    return all(math.isclose(x, y, rel_tol=tol, abs_tol=tol) for x, y in zip(a, b))


def coincidences(values: dict[str, Sequence[float]], tol: float = 1e-9) -> dict[str, list[str]]:
    """For each method, the earlier methods (in ``values``' order) whose values equal its own at every point.

    ``values`` maps a method label to its values at the same points (e.g. recall per sparsity). Only
    later methods name earlier ones, so each pair is noted once, on the line drawn on top.
    """
    names = list(values)
    out: dict[str, list[str]] = {}
    for j, b in enumerate(names):
        same = [a for a in names[:j] if _same(values[a], values[b], tol)]
        if same:
            out[b] = same
    return out


def legend_label(label: str, same: dict[str, list[str]]) -> str:
    """``label`` with ``(= other)`` appended when its values coincide with an earlier method's (the first
    one named; the tables list them all)."""
    return label + (f"  (= {same[label][0]})" if label in same else "")
