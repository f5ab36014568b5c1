"""The two figures of ``cab eval recall``: recall and error against sparsity (with bootstrap CIs), and
recall per layer at each sparsity; coinciding methods are marked in the legends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .recall_summary import same_values


def plot_recall(out: Path, summary: list[dict[str, Any]], layers: list[dict[str, Any]], prefix: str = "recall") -> list[str]:
    """Write ``<prefix>_vs_sparsity.png`` (``summary``: rows of :func:`.recall_summary.aggregate`) and
    ``<prefix>_per_layer.png`` (``layers``: rows of :func:`.recall_summary.per_layer`) into ``out``; returns
    the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import coincidences, legend_label, line_style

    methods = list(dict.fromkeys(r["method"] for r in summary))
    sps = sorted({r["sparsity"] for r in summary})
    same = same_values(summary)
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, m in enumerate(methods):
        sub = sorted((r for r in summary if r["method"] == m), key=lambda r: r["sparsity"])
        x = [r["sparsity"] for r in sub]
        for ax, key in zip(axes, ("recall", "rel_err")):
            y = [r[key] for r in sub]
            err = [[r[key] - r[f"{key}_lo"] for r in sub], [r[f"{key}_hi"] - r[key] for r in sub]]
            ax.errorbar(x, y, yerr=err, capsize=3, label=legend_label(m, same), **line_style(i))
    axes[0].set_ylabel("attention recall (mean over tokens, heads, layers)")
    axes[1].set_ylabel("relative output error ||O_s - O|| / ||O||")
    for ax in axes:
        ax.set_xlabel("sparsity")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Recall and error vs sparsity (95% bootstrap CI over windows; '(= x)': same values as x)")
    fig.tight_layout()
    p = out / f"{prefix}_vs_sparsity.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    files.append(p.name)

    fig, axes = plt.subplots(1, len(sps), figsize=(5.5 * len(sps), 4.2), squeeze=False)
    for ax, s in zip(axes[0], sps):
        curves = {m: sorted((r for r in layers if r["method"] == m and r["sparsity"] == s), key=lambda r: r["layer"])
                  for m in methods}
        same_s = coincidences({m: [r["recall"] for r in c] for m, c in curves.items()})
        for i, m in enumerate(methods):
            sub = curves[m]
            ax.plot([r["layer"] for r in sub], [r["recall"] for r in sub], label=legend_label(m, same_s),
                    **{**line_style(i), "ms": 4})
        ax.set_title(f"sparsity {s:g}")
        ax.set_xlabel("layer")
        ax.set_ylabel("recall")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    p = out / f"{prefix}_per_layer.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    files.append(p.name)
    return files
