"""What ``cab bench nsa`` writes: the CSV row by row (:class:`RowWriter`), the forward+backward plot and
the markdown summary table. The measurement itself is :mod:`cab_eval.benchmark.nsa`."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any


def _measured(r: dict[str, Any]) -> bool:
    x = r.get("fwd_bwd_ms")
    return isinstance(x, (int, float)) and math.isfinite(x)


def plot_speed(rows: list[dict[str, Any]], path: Path, title: str = "NSA vs dense SDPA, bf16") -> None:
    """Forward+backward median ms against N (log-log), one line per method; failed and skipped rows left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = sorted({r["method"] for r in rows if _measured(r)})
    for m in methods:
        pts = sorted((r["N"], r["fwd_bwd_ms"]) for r in rows if r["method"] == m and _measured(r))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("forward + backward (ms, median)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(rows: list[dict[str, Any]], dense_ref: str | None) -> str:
    """A markdown table per length and method: forward and forward+backward ms, the forward+backward
    ratio ``dense_ref / method`` (above 1: faster than that dense baseline), peak memory, status."""
    ref_head = f"{dense_ref} / method (fwd+bwd)" if dense_ref else "ratio to dense"
    lines = [f"| N | method | fwd ms | fwd+bwd ms | {ref_head} | peak GiB | status |", "|---|---|---|---|---|---|---|"]

    def cell(x: Any, nd: int) -> str:
        return f"{x:.{nd}f}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"

    for r in rows:
        ref = next((x for x in rows if x["N"] == r["N"] and x["method"] == dense_ref and _measured(x)), None)
        ratio = ref["fwd_bwd_ms"] / r["fwd_bwd_ms"] if ref is not None and _measured(r) and r["fwd_bwd_ms"] > 0 else None
        lines.append(f"| {r['N']} | {r['method']} | {cell(r.get('fwd_ms'), 2)} | {cell(r.get('fwd_bwd_ms'), 2)} | "
                     f"{cell(ratio, 2)} | {cell(r.get('peak_gib'), 2)} | {r['status']} |")
    return "\n".join(lines)


FIELDS = ["date", "device", "torch", "triton", "dtype", "N", "heads", "kv_heads", "head_dim", "block_size",
          "num_selected", "window", "nsa_backend", "warmup", "reps", "method", "fwd_ms", "fwd_bwd_ms", "peak_gib",
          "wall_s", "status"]


class RowWriter:
    """Writes the CSV header now and each row as it comes (flushed), so that an interrupted run keeps
    every finished row. Non-finite numbers are written as empty cells."""

    def __init__(self, path: Path, common: dict[str, Any]):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.common = path, common
        with path.open("w", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS).writeheader()

    def __call__(self, row: dict[str, Any]) -> None:
        def fmt(x: Any) -> Any:
            if isinstance(x, float):
                return round(x, 4) if math.isfinite(x) else ""
            return x

        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore").writerow(
                {**self.common, **{k: fmt(v) for k, v in row.items()}})
