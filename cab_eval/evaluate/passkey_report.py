"""The reports of a passkey run (:mod:`.passkey`): :func:`aggregate` groups trials into accuracy rows
with Wilson intervals, :func:`summary_table` the per-method table, :func:`plot_heatmaps` one accuracy
heatmap per method, and :func:`write_outputs` writes ``passkey.json``, ``passkey.csv``,
``passkey_trials.csv``, ``summary.md`` and the heatmaps. Trials are the dicts of a run or of its CSV read
back; nothing here loads a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .report import RowsFile, accuracy_panel, file_name_part, markdown_table, wilson, write_csv, write_json, write_summary

# Columns of passkey_trials.csv that hold text, read back as strings.
TEXT_FIELDS = ("method", "selector", "output")


def aggregate(trials: Sequence[dict[str, Any]], by: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of ``correct``/``total``, accuracy with its 95% Wilson interval, mean density and prompt
    tokens, grouped by the ``by`` fields (in first-seen order)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for t in trials:
        groups.setdefault(tuple(t[f] for f in by), []).append(t)
    rows = []
    for key, ts in groups.items():
        correct, total = sum(t["correct"] for t in ts), len(ts)
        lo, hi = wilson(correct, total)
        row = dict(zip(by, key))
        row.update(
            correct=correct, total=total, accuracy=correct / total, ci_low=lo, ci_high=hi,
            density=sum(t["density"] for t in ts) / total, tokens=round(sum(t["tokens"] for t in ts) / total, 1),
        )
        rows.append(row)
    return rows


def plot_heatmaps(payload: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per method: accuracy over depth (rows) x length (columns), a panel per sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["results"]
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    paths = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        levels = sorted({r["sparsity"] for r in mine})
        fig, axes = plt.subplots(1, len(levels), figsize=(1.2 + 0.9 * len(lengths) * len(levels) + 0.8, 0.6 * len(depths) + 1.6),
                                 squeeze=False)
        for ax, s in zip(axes[0], levels):
            cell = {(r["depth"], r["length"]): r for r in mine if r["sparsity"] == s}
            im = accuracy_panel(ax, cell, depths, lengths, fontsize=8)
            ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], fontsize=8)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("needle depth")
            dens = [r["density"] for r in mine if r["sparsity"] == s]
            ax.set_title(f"s={s:g}, density {sum(dens) / max(1, len(dens)):.2f}", fontsize=9)
        fig.suptitle(f"passkey accuracy: {method}", fontsize=10, y=1.04)
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
        path = out / f"heatmap_{file_name_part(method)}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def summary_table(payload: dict[str, Any]) -> str:
    """The per-method markdown table of ``payload["summary"]``: correct/total, accuracy, 95% CI, density."""
    rows = [
        {
            "method": r["method"],
            "sparsity": f"{r['sparsity']:g}",
            "correct": f"{r['correct']}/{r['total']}",
            "accuracy": r["accuracy"],
            "95% CI": f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]",
            "density": r["density"],
        }
        for r in payload["summary"]
    ]
    return markdown_table(rows, floatfmt=".3f")


def write_outputs(payload: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write every output file of ``payload`` (a :func:`~.passkey.run_passkey` result) into ``out``;
    returns them by kind."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": write_json(out / "passkey.json", payload),
        "csv": write_csv(out / "passkey.csv", payload["results"]),
    }
    trials_file = RowsFile(out / "passkey_trials.csv", TEXT_FIELDS)
    trials_file.start(resume=False)
    trials_file.append(payload["trials"])
    files["trials_csv"] = trials_file.path
    c = payload["config"]
    per_length = aggregate(payload["trials"], ("method", "sparsity", "length"))
    body = (
        f"Landmark passkey retrieval on `{c['model']}` ({c['dtype']}), lengths {c['lengths']}, depths "
        f"{c['depths']}, {c['keys']} keys per cell (random seed of the keys {c['seed']}), block {c['block_size']}, question "
        f"{'aligned to a block boundary' if c['align_question'] else 'not aligned'}, greedy decode of at most "
        f"{c['max_new_tokens']} tokens; correct when the key's digits appear. Accuracy with 95% Wilson "
        f"intervals; density = kept over causally valid blocks of every prefill attention call "
        f"(all layers and heads). {c['seconds']} s.\n\n"
        + summary_table(payload)
        + "\nBy length:\n\n"
        + markdown_table(
            [{"method": r["method"], "sparsity": f"{r['sparsity']:g}", "length": r["length"],
              "correct": f"{r['correct']}/{r['total']}", "density": r["density"]} for r in per_length]
        )
    )
    files["summary"] = write_summary(out / "summary.md", "Passkey retrieval", body, payload.get("environment"))
    for p in plot_heatmaps(payload, out):
        files[p.stem] = p
    return files
