"""The pre-registered ablation (``docs/results.md``, section "Pre-registered ablation"), run by
``cab eval recall --ablation``.

Methods, sparsities, unit and decision rule are the ones written down there before any run:

* unit: one (window, layer) pair, its recall averaged over query tokens and heads;
* at each sparsity the *best baseline* is the non-oracle baseline (magnitude, streaming, random,
  antidiagonal) with the highest mean recall in the same run;
* every CAB variant gets the paired difference in recall against that baseline, with a 95% cluster
  bootstrap interval that resamples windows (the layers of one window are not independent);
* the pairwise questions (keep-low vs keep-high, lambda 0 vs 0.5, Forman vs triangle, max-L2 vs mean,
  pure vs hybrid) are paired differences between the two named variants;
* a variant *beats* the baselines only if its interval lies above zero at all three sparsities; the
  recommended default is the variant with the highest mean recall at 0.95, unless its interval against
  the original formulation (label ``cab``: Forman, keep lowest, max-L2) includes zero, in which case
  the original formulation stays.

The relative output error is reported beside recall (secondary), with the same machinery.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .report import markdown_table, write_csv, write_json

ABLATION_SPARSITIES = (0.9, 0.95, 0.98)

# label@spec, in the order of the pre-registration table.
ABLATION_CONFIGS = (
    "cab@cab:score=forman,keep=lowest,coarsen=max_l2",
    "cab-high@cab:score=forman,keep=highest,coarsen=max_l2",
    "tri-low@cab:score=triangle,lam=0.5,keep=lowest,coarsen=max_l2",
    "tri-high@cab:score=triangle,lam=0.5,keep=highest,coarsen=max_l2",
    "tri-high-l0@cab:score=triangle,lam=0,keep=highest,coarsen=max_l2",
    "cab-mean@cab:score=forman,keep=lowest,coarsen=mean",
    "tri-high-mean@cab:score=triangle,lam=0.5,keep=highest,coarsen=mean",
    "cab-hybrid@cab:score=forman,keep=lowest,hybrid=0.5,coarsen=max_l2",
    "tri-high-hybrid@cab:score=triangle,lam=0.5,keep=highest,hybrid=0.5,coarsen=max_l2",
    "magnitude",
    "streaming",
    "random",
    "antidiagonal@antidiagonal:stride=8",
    "oracle",
)
# Every option is spelled out: the pre-registered variants must not move when library defaults do.
VARIANTS = ("cab", "cab-high", "tri-low", "tri-high", "tri-high-l0", "cab-mean", "tri-high-mean", "cab-hybrid",
            "tri-high-hybrid")
BASELINES = ("magnitude", "streaming", "random", "antidiagonal")
ORACLE = "oracle"
# The label of the original formulation (Forman, keep lowest, max-L2), the default the rule keeps
# unless a variant beats it.
ORIGINAL_CONFIG = "cab"
SEED_CONFIG = ORIGINAL_CONFIG  # the old name, kept for one release
DECISION_SPARSITY = 0.95

# (question, a, b): the difference reported is a - b.
PAIRWISE = (
    ("keep-lowest vs keep-highest (Forman)", "cab", "cab-high"),
    ("keep-lowest vs keep-highest (triangle)", "tri-low", "tri-high"),
    ("lambda 0 vs 0.5 (triangle, keep-highest)", "tri-high-l0", "tri-high"),
    ("Forman vs triangle (keep-lowest)", "cab", "tri-low"),
    ("Forman vs triangle (keep-highest)", "cab-high", "tri-high"),
    ("max-L2 vs mean coarsening (Forman, keep-lowest)", "cab", "cab-mean"),
    ("max-L2 vs mean coarsening (triangle, keep-highest)", "tri-high", "tri-high-mean"),
    ("pure vs hybrid 0.5 (Forman, keep-lowest)", "cab", "cab-hybrid"),
    ("pure vs hybrid 0.5 (triangle, keep-highest)", "tri-high", "tri-high-hybrid"),
)


def cluster_bootstrap(values: dict[Any, Sequence[float]], n_boot: int = 4000, seed: int = 0,
                      alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean over all units and a percentile interval from resampling whole clusters (windows).

    ``values`` maps a cluster to its units' values. The statistic of a resample is the mean over the
    units of the drawn clusters (clusters drawn twice count twice). One cluster gives a zero-width interval.
    """
    clusters = [np.asarray(v, dtype=np.float64) for v in values.values() if len(v)]
    if not clusters:
        return float("nan"), float("nan"), float("nan")
    sums = np.array([c.sum() for c in clusters])
    counts = np.array([c.size for c in clusters], dtype=np.float64)
    mean = float(sums.sum() / counts.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(clusters), size=(n_boot, len(clusters)))
    stats = sums[idx].sum(1) / counts[idx].sum(1)
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return mean, float(lo), float(hi)


def _units(rows: Sequence[dict[str, Any]], method: str, sparsity: float, key: str) -> dict[tuple[int, int], float]:
    return {(r["window"], r["layer"]): r[key] for r in rows if r["method"] == method and r["sparsity"] == sparsity}


def paired(rows: Sequence[dict[str, Any]], a: str, b: str, sparsity: float, key: str = "recall") -> dict[str, Any]:
    """Paired difference ``a - b`` over the (window, layer) units both have, cluster-bootstrapped over windows."""
    ua, ub = _units(rows, a, sparsity, key), _units(rows, b, sparsity, key)
    common = sorted(set(ua) & set(ub))
    if not common:
        raise ValueError(f"no paired (window, layer) units for {a!r} and {b!r} at sparsity {sparsity}")
    by_window: dict[int, list[float]] = {}
    for w, layer in common:
        by_window.setdefault(w, []).append(ua[(w, layer)] - ub[(w, layer)])
    mean, lo, hi = cluster_bootstrap(by_window)
    wins_better = sum(np.mean(v) > 0 for v in by_window.values())
    return {"a": a, "b": b, "sparsity": sparsity, "metric": key, "diff": mean, "lo": lo, "hi": hi,
            "units": len(common), "windows": len(by_window), "windows_a_better": int(wins_better)}


def method_means(rows: Sequence[dict[str, Any]], method: str, sparsity: float, key: str) -> tuple[float, float, float]:
    u = _units(rows, method, sparsity, key)
    by_window: dict[int, list[float]] = {}
    for (w, _), val in u.items():
        by_window.setdefault(w, []).append(val)
    return cluster_bootstrap(by_window)


def analyse(rows: Sequence[dict[str, Any]], head_rows: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The pre-registered comparisons on the recorder's per-(window, layer) rows."""
    methods = set(r["method"] for r in rows)
    missing = [m for m in (*VARIANTS, *BASELINES, ORACLE) if m not in methods]
    if missing:
        raise ValueError(f"the ablation needs every pre-registered method; missing {missing}")
    sparsities = sorted({float(r["sparsity"]) for r in rows})
    means = []
    for s in sparsities:
        for m in (*VARIANTS, *BASELINES, ORACLE):
            rm, rlo, rhi = method_means(rows, m, s, "recall")
            em, elo, ehi = method_means(rows, m, s, "rel_err")
            means.append({"method": m, "sparsity": s, "recall": rm, "recall_lo": rlo, "recall_hi": rhi,
                          "rel_err": em, "rel_err_lo": elo, "rel_err_hi": ehi})
    # Where no row has a free pick (budget = sink + diagonal), every method keeps the same blocks.
    degenerate = [s for s in sparsities
                  if "free_blocks" in rows[0] and not any(r["free_blocks"] for r in rows if r["sparsity"] == s)]
    best = {}
    for s in sparsities:
        cands = [r for r in means if r["sparsity"] == s and r["method"] in BASELINES]
        # Means equal to 1e-9 are ties (identical masks differ only by float summation order): the first
        # baseline in the pre-registered order wins a tie.
        best[s] = max(cands, key=lambda r: (round(r["recall"], 9), -BASELINES.index(r["method"])))["method"]
    vs_best = []
    for s in sparsities:
        for m in (*VARIANTS, ORACLE):
            d = paired(rows, m, best[s], s, "recall")
            e = paired(rows, m, best[s], s, "rel_err")
            vs_best.append({**d, "rel_err_diff": e["diff"], "rel_err_lo": e["lo"], "rel_err_hi": e["hi"],
                            "above_zero": d["lo"] > 0, "below_zero": d["hi"] < 0})
    pairwise = []
    for s in sparsities:
        for question, a, b in PAIRWISE:
            d = paired(rows, a, b, s, "recall")
            e = paired(rows, a, b, s, "rel_err")
            pairwise.append({"question": question, **d, "rel_err_diff": e["diff"], "rel_err_lo": e["lo"],
                             "rel_err_hi": e["hi"]})
    beats = {m: all(r["above_zero"] for r in vs_best if r["a"] == m) for m in VARIANTS}
    complete = all(s in sparsities for s in ABLATION_SPARSITIES)
    s_dec = DECISION_SPARSITY if DECISION_SPARSITY in sparsities else sparsities[len(sparsities) // 2]
    at_dec = [r for r in means if r["sparsity"] == s_dec and r["method"] in VARIANTS]
    top = max(at_dec, key=lambda r: (round(r["recall"], 9), -VARIANTS.index(r["method"])))["method"]
    if s_dec in degenerate:
        default, reason = ORIGINAL_CONFIG, (f"at s={s_dec:g} no row had a free pick, so every variant tied and the "
                                        "original formulation stays")
    elif top == ORIGINAL_CONFIG:
        default, reason = ORIGINAL_CONFIG, f"the original formulation has the highest mean recall at s={s_dec:g}"
    else:
        d = paired(rows, top, ORIGINAL_CONFIG, s_dec, "recall")
        if d["lo"] > 0:
            default = top
            reason = (f"{top} has the highest mean recall at s={s_dec:g} and beats the original formulation "
                      f"by {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]")
        else:
            default = ORIGINAL_CONFIG
            reason = (f"{top} has the highest mean recall at s={s_dec:g} but its difference from the original "
                      f"configuration, {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}], does not exclude zero")
    winners = [m for m, ok in beats.items() if ok]
    verdict = {
        "complete_grid": complete,
        "decision_sparsity": s_dec,
        "variants_beating_best_baseline": winners if complete else [],
        "best_baseline": {format(s, "g"): best[s] for s in sparsities},
        "recommended_default": default,
        "recommended_spec": next(c for c in ABLATION_CONFIGS if c.split("@")[0] == default).split("@", 1)[1],
        "reason": reason,
        "statement": (
            (f"{', '.join(winners)} beat{'s' if len(winners) == 1 else ''} the best baseline at every sparsity."
             if winners else
             "No CAB variant beats the best baseline at all sparsities; the best baseline was "
             + ", ".join(f"{best[s]} at s={s:g}" + (" (all tied)" if s in degenerate else "") for s in sparsities) + ".")
            + ("" if complete else " (Not the pre-registered grid: sparsities "
               + ", ".join(f"{s:g}" for s in sparsities) + "; no decision may be drawn from it.)")
            + ("" if not degenerate else " At s=" + ", ".join(f"{s:g}" for s in degenerate)
               + " every row's budget was only the forced sink and diagonal blocks, so all methods kept the same "
               "blocks and nothing can be compared there: use longer windows (the full grid).")
        ),
        "degenerate_sparsities": degenerate,
    }
    n_windows = len({r["window"] for r in rows})
    n_layers = len({r["layer"] for r in rows})
    return {"sparsities": sparsities, "windows": n_windows, "layers": n_layers, "means": means,
            "best_baseline": {format(s, "g"): best[s] for s in sparsities}, "vs_best": vs_best,
            "pairwise": pairwise, "verdict": verdict,
            "unit": "(window, layer); 95% cluster bootstrap over windows (4000 resamples)"}


def _ci(d: float, lo: float, hi: float, fmt: str = "+.4f") -> str:
    return f"{format(d, fmt)} [{format(lo, fmt)}, {format(hi, fmt)}]"


def markdown(res: dict[str, Any]) -> str:
    sps = res["sparsities"]
    lines = [f"## Pre-registered ablation\n\nUnits: {res['unit']}; {res['windows']} windows x {res['layers']} layers.\n\n"]
    lines.append("### Mean recall [95% CI] per method\n\n")
    table = []
    for m in (*VARIANTS, *BASELINES, ORACLE):
        row = {"method": m}
        for s in sps:
            r = next(x for x in res["means"] if x["method"] == m and x["sparsity"] == s)
            row[f"s={s:g}"] = f"{r['recall']:.4f} [{r['recall_lo']:.4f}, {r['recall_hi']:.4f}]"
        table.append(row)
    lines.append(markdown_table(table))
    lines.append("\n### Each CAB variant minus the best baseline (recall; paired, 95% cluster bootstrap)\n\n")
    lines.append("Best baseline: " + ", ".join(f"{b} at s={s}" for s, b in res["best_baseline"].items()) + ".\n\n")
    table = []
    for m in (*VARIANTS, ORACLE):
        row = {"variant": m}
        for s in sps:
            r = next(x for x in res["vs_best"] if x["a"] == m and x["sparsity"] == s)
            mark = " ▲" if r["above_zero"] else (" ▼" if r["below_zero"] else "")
            row[f"s={s:g}"] = _ci(r["diff"], r["lo"], r["hi"]) + mark
        table.append(row)
    lines.append(markdown_table(table))
    lines.append("\n▲ interval above zero, ▼ below zero. Oracle is the upper bound, not a competitor.\n")
    lines.append("\n### Pairwise questions (recall difference a - b; relative-error difference beside it)\n\n")
    table = []
    for q in dict.fromkeys(r["question"] for r in res["pairwise"]):
        row = {"question (a - b)": q}
        for s in sps:
            r = next(x for x in res["pairwise"] if x["question"] == q and x["sparsity"] == s)
            row[f"recall s={s:g}"] = _ci(r["diff"], r["lo"], r["hi"])
        table.append(row)
    lines.append(markdown_table(table))
    v = res["verdict"]
    lines.append(f"\n### Verdict (decision rule of the pre-registration)\n\n{v['statement']}\n\n"
                 f"Recommended default: `{v['recommended_default']}` (`{v['recommended_spec']}`): {v['reason']}.\n")
    return "".join(lines)


def _plot(out: Path, res: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sps = res["sparsities"]
    names = [*VARIANTS, ORACLE]
    fig, axes = plt.subplots(1, len(sps), figsize=(4.5 * len(sps), 0.42 * len(names) + 1.8), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], sps):
        rs = [next(x for x in res["vs_best"] if x["a"] == m and x["sparsity"] == s) for m in names]
        y = np.arange(len(names))
        d = np.array([r["diff"] for r in rs])
        err = np.array([[r["diff"] - r["lo"] for r in rs], [r["hi"] - r["diff"] for r in rs]])
        colors = ["tab:green" if r["above_zero"] else ("tab:red" if r["below_zero"] else "0.4") for r in rs]
        for yi in range(len(names)):
            ax.errorbar(d[yi], y[yi], xerr=err[:, yi : yi + 1], fmt="o", color=colors[yi], capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        tied = s in res["verdict"].get("degenerate_sparsities", [])
        ax.set_title(f"s={s:g}: minus {res['best_baseline'][format(s, 'g')]}" + (" (no free pick: all tied)" if tied else ""))
        ax.set_xlabel("recall difference (95% cluster bootstrap)")
        ax.set_yticks(y, names)
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    p = out / "ablation_differences.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p.name


def write(out: Path, res: dict[str, Any], env: dict[str, Any]) -> list[str]:
    """``ablation.json``, ``ablation.md``, ``ablation_differences.csv`` and the forest plot into ``out``."""
    out = Path(out)
    write_json(out / "ablation.json", {"environment": env, **res})
    (out / "ablation.md").write_text(
        f"Device: {env['device']}; torch {env['torch']}; date {env['date']}.\nCommand: `{env['command']}`\n\n" + markdown(res)
    )
    write_csv(out / "ablation_differences.csv",
              [{"kind": "vs_best", **r} for r in res["vs_best"]] + [{"kind": "pairwise", **r} for r in res["pairwise"]])
    return ["ablation.json", "ablation.md", "ablation_differences.csv", _plot(out, res)]
