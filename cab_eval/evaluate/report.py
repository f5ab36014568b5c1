"""What every evaluation writes: JSON, CSV, a markdown summary (plots are each evaluation's own),
plus the statistics they share (Wilson intervals, bootstrap and paired differences)."""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import platform
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np


def wilson(correct: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for ``correct / total`` (``(0, 1)`` when ``total == 0``)."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    den = 1 + z * z / total
    mid = (p + z * z / (2 * total)) / den
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean and percentile bootstrap ``(1 - alpha)`` interval of ``values``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(x.mean()), float(lo), float(hi)


def paired_difference(a: Sequence[float], b: Sequence[float], **kw) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired samples with a bootstrap interval."""
    if len(a) != len(b):
        raise ValueError(f"paired samples must have equal length, got {len(a)} and {len(b)}")
    return bootstrap_ci([x - y for x, y in zip(a, b)], **kw)


def environment() -> dict[str, Any]:
    """Device, versions and date, stamped into every result file."""
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "device": dev,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": _dt.date.today().isoformat(),
        "command": " ".join(["cab"] + sys.argv[1:]) if sys.argv and sys.argv[0].endswith("cab") else " ".join(sys.argv),
    }


def file_name_part(name: str) -> str:
    """``name`` (a method or selector spec such as ``cab[triton]@0.9``) as a file-name part: every run of
    characters other than letters, digits, ``_``, ``.`` and ``-`` becomes ``_``; ``method`` if nothing is left."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "method"


def accuracy_panel(ax: Any, cell: dict[tuple[Any, Any], dict[str, Any]], depths: Sequence[Any],
                   lengths: Sequence[Any], fontsize: float) -> Any:
    """One heatmap panel of retrieval accuracy: depth (rows) x length (columns), each measured cell
    coloured by ``accuracy`` and labelled ``correct/total``, unmeasured cells blank. ``cell`` maps
    ``(depth, length)`` to a row with those keys. Returns the image (for a colour bar)."""
    grid = np.full((max(1, len(depths)), len(lengths)), np.nan)
    for a, d in enumerate(depths):
        for b, length in enumerate(lengths):
            r = cell.get((d, length))
            if r is not None:
                grid[a, b] = r["accuracy"]
                ax.text(b, a, f"{r['correct']}/{r['total']}", ha="center", va="center", fontsize=fontsize)
    return ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def write_csv(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    rows = list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".3f") -> str:
    """A GitHub markdown table of ``rows``."""
    if not rows:
        return "(no rows)\n"
    cols = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_summary(path: Path, title: str, body: str, env: dict[str, Any] | None = None) -> Path:
    env = env or environment()
    head = f"# {title}\n\nDevice: {env['device']}; torch {env['torch']}; date {env['date']}.\nCommand: `{env['command']}`\n\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + body)
    return path


def comma_floats(text: str) -> list[float]:
    """argparse type: ``"0.8,0.9"`` -> ``[0.8, 0.9]``."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def comma_ints(text: str) -> list[int]:
    """argparse type: ``"0,5,20"`` -> ``[0, 5, 20]``."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from e


class RowsFile:
    """A CSV that grows as an evaluation runs, so that an interrupted run leaves its finished work on
    disk and a rerun with ``--resume`` can skip it.

    ``append(rows)`` writes rows at once (header first, fields fixed by the first row; later fields not
    in the header are refused). Cells are JSON (``true``, ``0.5``, ``{"keep": "highest"}``) except strings,
    written as they are; ``read()`` turns them back into Python values, keeping the ``text_fields``
    (free text such as a model's output) as strings.
    """

    def __init__(self, path: Path, text_fields: Sequence[str] = ()):
        self.path = Path(path)
        self.text_fields = set(text_fields)
        self.fields: list[str] | None = None
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open(newline="") as f:
                self.fields = next(csv.reader(f), None)

    def start(self, resume: bool) -> list[dict[str, Any]]:
        """The rows already on disk when ``resume`` (the file is kept); otherwise empty the file."""
        if resume:
            return self.read()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.fields = None
        return []

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = self.fields is None
        if new:
            self.fields = list(rows[0])
        extra = {k for r in rows for k in r} - set(self.fields)
        if extra:
            raise ValueError(f"rows for {self.path} have fields {sorted(extra)} not in its header {self.fields}")
        with self.path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(self.fields)
            for r in rows:
                w.writerow([_cell(r.get(k, "")) for k in self.fields])
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists() or not self.path.stat().st_size:
            return []
        with self.path.open(newline="") as f:
            return [{k: (v if k in self.text_fields else _value(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def _cell(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=float)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
