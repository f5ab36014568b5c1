"""The trials file of ``cab eval ruler``: one CSV row per (prompt, method), appended and flushed after
each batch so that a killed run keeps what it did and ``--resume`` skips it; read back with its types
restored (what :func:`cab_eval.evaluate.ruler_scoring.aggregate` and ``paired_accuracy`` take)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

TRIAL_FIELDS = [
    "method", "selector", "options", "sparsity", "task", "length", "tokens", "depth", "depth_actual", "sample",
    "uid", "answers", "score", "correct", "density", "output", "output_ids", "seconds", "batch",
]
TRIALS_CSV = "ruler_trials.csv"


def read_trials(path: Path) -> list[dict[str, Any]]:
    """Rows of a trials CSV with their types restored (``depth`` ``None`` for CWE/FWE)."""
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            rows.append({
                **r,
                "sparsity": float(r["sparsity"]), "length": int(r["length"]), "tokens": int(r["tokens"]),
                "depth": None if r["depth"] == "" else float(r["depth"]),
                "depth_actual": None if r["depth_actual"] == "" else float(r["depth_actual"]),
                "sample": int(r["sample"]), "score": float(r["score"]), "correct": r["correct"] == "True",
                "density": float(r["density"]) if r["density"] not in ("", "nan") else float("nan"),
                "seconds": float(r["seconds"]), "batch": int(r["batch"]),
            })
    return rows


class TrialWriter:
    """Appends trial rows to the CSV and flushes after each batch, so a killed run keeps what it did."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.is_file() or path.stat().st_size == 0
        self.f = path.open("a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=TRIAL_FIELDS)
        if new:
            self.w.writeheader()
            self.f.flush()

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        for r in rows:
            self.w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in TRIAL_FIELDS})
        self.f.flush()

    def close(self) -> None:
        self.f.close()
