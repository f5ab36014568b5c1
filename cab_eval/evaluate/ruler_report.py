"""The reports of a RULER-style run (:mod:`ruler_run`): :func:`summarize` aggregates the trials per cell,
task, length and selector (with the pairing against antidiagonal), and :func:`write_outputs` writes
``ruler.json``, ``ruler_results.csv``, ``summary.md`` and, with matplotlib, one ``heatmap_<selector>.png``
per selector spec (accuracy over depth x length, one panel per task and sparsity). Trials are the dicts
of a run or of its CSV read back; nothing here loads a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from cab_eval.evaluate.report import accuracy_panel, environment, file_name_part, markdown_table, write_csv, write_json, write_summary

from .ruler_scoring import aggregate, paired_accuracy


def summarize(trials: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows per cell (selector, sparsity, task, length, depth), per (task, length), per task, per length
    and per selector and sparsity."""
    return {
        "results": aggregate(trials, ("selector", "sparsity", "task", "length", "depth")),
        "by_task_length": aggregate(trials, ("selector", "sparsity", "task", "length")),
        "by_task": aggregate(trials, ("selector", "sparsity", "task")),
        "by_length": aggregate(trials, ("selector", "sparsity", "length")),
        "summary": aggregate(trials, ("selector", "sparsity")),
        "paired": paired_accuracy(trials, "antidiagonal", ("sparsity", "length")),
    }


def plot_heatmaps(trials: list[dict[str, Any]], out: Path) -> list[Path]:
    """One PNG per selector spec: accuracy over depth (rows) x length (columns); a row of panels per
    task, a column per sparsity; each cell says correct/total."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = aggregate(trials, ("selector", "sparsity", "task", "length", "depth"))
    lengths = sorted({r["length"] for r in rows})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    paths = []
    for sel in dict.fromkeys(r["selector"] for r in rows):
        mine = [r for r in rows if r["selector"] == sel]
        levels = sorted({r["sparsity"] for r in mine})
        fig, axes = plt.subplots(len(tasks), len(levels), squeeze=False,
                                 figsize=(max(4.5, 1.6 + 1.0 * len(lengths) * len(levels)), 0.8 + 1.9 * len(tasks)))
        im = None
        for i, task in enumerate(tasks):
            depths = sorted({r["depth"] for r in mine if r["task"] == task}, key=lambda d: (d is None, d or 0))
            for j, s in enumerate(levels):
                ax = axes[i][j]
                cell = {(r["depth"], r["length"]): r for r in mine if r["sparsity"] == s and r["task"] == task}
                im = accuracy_panel(ax, cell, depths, lengths, fontsize=7)
                ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], fontsize=7)
                ax.set_yticks(range(len(depths)), ["-" if d is None else f"{d:g}" for d in depths], fontsize=7)
                dens = [r["density"] for r in cell.values()]
                ax.set_title(f"{task} s={s:g} dens {sum(dens) / max(1, len(dens)):.2f}", fontsize=7)
        fig.suptitle(f"RULER-style exact match: {sel}\n(rows: needle depth, columns: length)", fontsize=9)
        fig.tight_layout()
        if im is not None:
            fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
        path = out / f"heatmap_{file_name_part(sel)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def cell_table(rows: list[dict[str, Any]], keys: Sequence[str]) -> str:
    """Markdown table of :func:`cab_eval.evaluate.ruler.aggregate` rows: the ``keys`` columns, then exact
    matches, accuracy with its 95% interval, score and density."""
    return markdown_table([
        {**{k: ("-" if r[k] is None else (f"{r[k]:g}" if isinstance(r[k], float) else r[k])) for k in keys},
         "exact": f"{r['correct']}/{r['total']}", "accuracy": r["accuracy"],
         "95% CI": f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]", "score": r["score"], "density": r["density"]}
        for r in rows
    ])


def _paired_section(rows: list[dict[str, Any]]) -> str:
    """Markdown of :func:`cab_eval.evaluate.ruler.paired_accuracy` rows (empty without antidiagonal)."""
    if not rows:
        return ""
    lines = ["| sparsity | length | selector | prompts | accuracy | antidiagonal | difference [95% CI] | only it / only antidiagonal right |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (float(r["sparsity"]), r["length"] == "all", str(r["length"]).zfill(9), r["selector"])):
        lines.append(f"| {r['sparsity']} | {r['length']} | {r['selector']} | {r['prompts']} | {r['accuracy']:.3f} | "
                     f"{r['ref_accuracy']:.3f} | {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] | {r['a_only']} / {r['ref_only']} |")
    return ("\n## Paired against antidiagonal (same prompts; bootstrap over prompts)\n\n"
            + "\n".join(lines) + "\n")


def write_outputs(out: Path, config: dict[str, Any], trials: list[dict[str, Any]], plots: bool = True) -> dict[str, Path]:
    """``ruler.json``, ``ruler_results.csv``, ``summary.md`` and the heatmaps from all trials so far."""
    out.mkdir(parents=True, exist_ok=True)
    agg = summarize(trials)
    env = config.get("environment") or environment()
    payload = {"config": config, "environment": env, **agg}
    files = {"json": write_json(out / "ruler.json", payload),
             "csv": write_csv(out / "ruler_results.csv", agg["results"])}
    note = ""
    if plots:
        try:
            for p in plot_heatmaps(trials, out):
                files[p.stem] = p
        except ImportError as e:
            note = f"\nHeatmaps not drawn: {e} (install matplotlib; the cells are in ruler_results.csv).\n"
    chk = config.get("tokenizer_check", {})
    body = (
        f"RULER-style suite on `{config.get('model')}` ({config.get('dtype')}), {len(trials)} trials, block "
        f"{config.get('block_size')}, backend {config.get('backend')}, BOS {config.get('bos')} "
        f"({config.get('bos_reason')}). Exact match = every answer in the greedy output; score = share of "
        f"answers found; 95% Wilson intervals; density = kept over causally valid blocks of every "
        f"block-sparse prefill call (all layers and heads).\n\n"
        f"Tokenizer check ({chk.get('sentence', '')[:40]}...): build {chk.get('build_tokens')} tokens, run "
        f"{chk.get('run_tokens')} tokens, decode of the build's ids {'ok' if chk.get('decode_ok', True) else 'WRONG'}.\n"
        f"Run: {config.get('run')}\n{note}\n"
        "## By selector\n\n" + cell_table(agg["summary"], ("selector", "sparsity"))
        + "\n## By task\n\n" + cell_table(agg["by_task"], ("selector", "sparsity", "task"))
        + "\n## By length\n\n" + cell_table(agg["by_length"], ("selector", "sparsity", "length"))
        + "\n## By task and length\n\n" + cell_table(agg["by_task_length"], ("selector", "sparsity", "task", "length"))
        + _paired_section(agg["paired"])
    )
    files["summary"] = write_summary(out / "summary.md", "RULER-style retrieval", body, env)
    return files
