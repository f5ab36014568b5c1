"""Apply the pre-registered selector-search rule (docs/results.md) to the recall and retrieval runs.

    python scripts/selector_search_decision.py \
        --recall gemma3:16384=results/gpu-2026-12-04-evening/recall-gemma3/16384/recall.csv \
        --recall gemma3:32768=results/gpu-2026-12-04-evening/recall-gemma3/32768/recall.csv \
        --recall smollm2:8192=results/gpu-2026-12-04-evening/recall-smollm2/8192/recall.csv \
        --ruler gemma3=results/gpu-2026-12-04-evening/ruler-gemma3/ruler_trials_rescored.csv \
        --ruler smollm2=results/gpu-2026-12-04-evening/ruler-smollm2/ruler_trials_rescored.csv

The primary cells are every (recall file, sparsity) given; each is paired with the retrieval trials of
its model at that sparsity (Gemma: all its retrieval lengths pooled, as the suite's unit is the prompt).
Rule 1: a candidate beats antidiagonal if in every primary cell both 95% intervals (recall, paired by
(window, layer) and bootstrapped over windows; accuracy, paired by prompt and bootstrapped over
prompts) lie above zero; it meets the goal if its mean recall difference is also >= half the oracle's.
Rule 2: the best two non-oracle per-row candidates by mean recall over the primary cells, and their
head/layer variants against antidiagonal and against their own row variant. Prints markdown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cab_eval.evaluate.ablation import method_means, paired  # noqa: E402
from cab_eval.evaluate.recall import TEXT_FIELDS  # noqa: E402
from cab_eval.evaluate.report import RowsFile  # noqa: E402
from cab_eval.evaluate.ruler import paired_accuracy  # noqa: E402
from cab_eval.evaluate.ruler_trials import read_trials  # noqa: E402

REFERENCE = "antidiagonal"
ORACLE = "oracle"
ALLOCATIONS = ("-head", "-layer")


def _pair(spec: str, what: str) -> tuple[str, str]:
    if "=" not in spec:
        raise SystemExit(f"--{what} {spec!r}: expected LABEL=PATH")
    label, path = spec.split("=", 1)
    if not Path(path).is_file():
        raise SystemExit(f"--{what} {spec!r}: no file {path}")
    return label, path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recall", action="append", required=True, help="MODEL:LENGTH=recall.csv (a primary cell's rows)")
    ap.add_argument("--ruler", action="append", default=[], help="MODEL=ruler trials CSV")
    args = ap.parse_args(argv)
    recall = {label: RowsFile(Path(p), TEXT_FIELDS).read() for label, p in (_pair(s, "recall") for s in args.recall)}
    trials = {label: read_trials(Path(p)) for label, p in (_pair(s, "ruler") for s in args.ruler)}

    cells = []  # (model, length, sparsity, rows)
    for label, rows in recall.items():
        model, length = label.split(":")
        for s in sorted({float(r["sparsity"]) for r in rows}):
            cells.append((model, length, s, rows))
    methods = [m for m in dict.fromkeys(r["method"] for rows in recall.values() for r in rows) if m != REFERENCE]

    acc = {}  # (model, sparsity, selector) -> paired accuracy row, all lengths pooled
    for model, ts in trials.items():
        for r in paired_accuracy(ts, REFERENCE, ("sparsity", "length")):
            if r["length"] == "all":
                acc[(model, r["sparsity"], r["selector"])] = r

    print("| candidate | " + " | ".join(f"{m} {n} s={s:g}" for m, n, s, _ in cells) + " | beats antidiagonal |")
    print("|---|" + "---|" * (len(cells) + 1))
    verdict = {}
    for m in methods:
        parts, wins = [], True
        for model, length, s, rows in cells:
            d = paired(rows, m, REFERENCE, s)
            base = m.split("-")[0] if m.endswith(ALLOCATIONS) else m
            a = acc.get((model, s, {"graph2hop": "cab_graph"}.get(base, base)))
            text = f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"
            ok = d["lo"] > 0
            if m.endswith(ALLOCATIONS) or m.startswith(("graph2hop-ad", "graph-l0")):
                text += "; acc. not run"  # retrieval ran the per-row selectors only
                ok = False
            elif a is None:
                text += "; acc. missing"
                ok = False
            else:
                text += f"; acc. {a['diff']:+.3f} [{a['lo']:+.3f}, {a['hi']:+.3f}] (n={a['prompts']})"
                ok = ok and a["lo"] > 0
            wins = wins and ok
            parts.append(text)
        verdict[m] = wins
        print(f"| `{m}` | " + " | ".join(parts) + f" | {'yes' if wins else 'no'} |")

    row_candidates = [m for m in methods if m != ORACLE and not m.endswith(ALLOCATIONS)]
    mean_recall = {m: sum(method_means(rows, m, s, "recall")[0] for _, _, s, rows in cells) / len(cells)
                   for m in row_candidates + [REFERENCE]}
    best_two = sorted(mean_recall, key=mean_recall.get, reverse=True)[:2]
    print("\nMean recall over the primary cells (per-row candidates): "
          + ", ".join(f"`{m}` {v:.4f}" for m, v in sorted(mean_recall.items(), key=lambda kv: -kv[1])))
    print(f"Best two (rule 2): {', '.join(f'`{m}`' for m in best_two)}")
    for m in best_two:
        for alloc in ALLOCATIONS:
            v = m + alloc
            if v not in methods:
                continue
            diffs = [paired(rows, v, m, s) for _, _, s, rows in cells]
            print(f"- `{v}` against `{m}`: " + "; ".join(f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" for d in diffs))
    winners = [m for m, w in verdict.items() if w and m != ORACLE]
    print(f"\nRule 1 winners: {', '.join(winners) if winners else 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
