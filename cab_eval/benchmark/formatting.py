"""Cell values and tables of the benchmark pages: a CSV string as a finite number, milliseconds, other
numbers and sequence lengths as the tables print them, and the markdown table. One home for the page
modules (summary, speed_report, nsa_report)."""

from __future__ import annotations

import math
from typing import Any


def finite(x: Any) -> float | None:
    """``x`` as a float when it parses and is finite; ``None`` otherwise (empty cells, ``nan``, ``inf``)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt_ms(x: float | None) -> str:
    """Milliseconds with 3 decimals below 10, 1 below 1000, none above; ``-`` for ``None``."""
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def nlabel(n: int) -> str:
    """A sequence length as ``8k`` when a multiple of 1024, else the number."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def fmt(x: float | None, spec: str = ".1f") -> str:
    """``x`` formatted by ``spec``; ``-`` for ``None`` (not measured)."""
    return "-" if x is None else format(x, spec)


def table(header, body) -> str:
    """A markdown table: ``header`` the column names, ``body`` the rows (cells printed with ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return "\n".join(lines) + "\n"
