"""``cab bench summary``: the benchmarks page (markdown and plots) from a results CSV of ``cab bench
predictor`` / ``cab bench attention``.

Every figure in the page comes from the CSV; the targets are marked met / not met / not measured from
the data, never assumed. The page states the command that regenerates it. Usage::

    cab bench summary [--csv results/benchmarks/<device>-<date>.csv] [--out runs/bench/benchmarks.md]
        [--plots-dir DIR] [--model-csv model.csv] [--nsa-csv nsa.csv] [--compact]

The docs page: ``cab bench summary --csv results/benchmarks/nvidia-h200-2026-12-04.csv
--out docs/benchmarks.md --plots-dir results/benchmarks --model-csv
results/benchmarks/model-nvidia-h200-2026-12-04.csv`` (the regression table compares with the H100 CSV
beside it). Without ``--csv`` it takes the newest GPU
CSV in ``runs/bench``, else in ``results/benchmarks`` (a CPU dry-run CSV only when no other exists).
``--out`` defaults to ``runs/bench/benchmarks.md`` and the plots go beside the CSV unless
``--plots-dir`` says otherwise. ``--previous`` names an earlier run's CSV for the regression table
(default: the newest other GPU CSV beside ``--csv`` with an earlier date). Rows of the Triton attention
backend add the issue-9 sections (:mod:`cab_eval.benchmark.speed_report`). ``--model-csv`` names a CSV of
``cab bench model`` (time to first token of a Llama-3-8B-shaped model) and adds its section; ``--nsa-csv`` names a CSV of ``cab bench nsa`` (NSA forward and forward+backward
against dense SDPA) and adds its section (:mod:`cab_eval.benchmark.nsa_report`). ``--compact`` prints a short plain-text table (what
``scripts/gpu_check.sh`` shows at the end) instead of writing the page.

This module is the command (:func:`main`, :func:`compact` and the choice of CSVs); the page lives beside
it and its public names are re-exported here: :mod:`.summary_targets` (figure lookup, break-even, the
targets), :mod:`.summary_page` (:func:`render`), :mod:`.model_report` (the time-to-first-token section),
:mod:`.formatting` (cells and tables).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import speed_report
from .formatting import fmt, fmt_ms, nlabel, table
from .io import read_csv
from .model_report import model_section
from .nsa_report import read_nsa_csv
from .plots import make_plots, ok_rows, pick_impl
from .summary_page import render
from .summary_targets import HEADLINE_S, TARGET_N, TARGETS, break_even, ns_of, targets, value, verdict

__all__ = [
    "HEADLINE_S", "TARGETS", "TARGET_N", "break_even", "compact", "fmt", "main", "model_section", "newest_csv",
    "ns_of", "previous_csv", "render", "table", "targets", "value", "verdict",
]


def compact(all_rows) -> str:
    """A short plain-text table for a terminal."""
    rows = ok_rows(all_rows)
    impl = pick_impl(rows) or "torch"
    lines = [f"device: {all_rows[0]['device'] if all_rows else '?'}; predictor impl [{impl}]",
             f"{'N':>6} {'cuDNN':>9} {'flexdense':>9} {'pred95':>8} {'attn95':>8} {'total95':>8} {'x cuDNN':>8}"]
    for n in ns_of(rows):
        d = value(rows, "attention:sdpa-cudnn", n)
        t = value(rows, f"total:cab[{impl}]", n, sparsity=HEADLINE_S)
        lines.append(f"{nlabel(n):>6} {fmt_ms(d):>9} {fmt_ms(value(rows, 'attention:flex-dense', n)):>9} "
                     f"{fmt_ms(value(rows, f'predictor:cab[{impl}]', n, sparsity=HEADLINE_S)):>8} "
                     f"{fmt_ms(value(rows, 'attention:cab-sparse', n, sparsity=HEADLINE_S)):>8} {fmt_ms(t):>8} "
                     f"{'-' if not (d and t) else f'{d / t:.2f}':>8}")
    lines.append("targets:")
    for a, b, c, ok in targets(rows):
        lines.append(f"  {verdict(ok).strip('*'):12s} {a} (goal {b}): {c}")
    impls = sorted({r["case"][len("predictor:cab["):-1] for r in rows
                    if r["case"].startswith("predictor:cab[") and r["case"].endswith("]")})
    for other in impls:
        if other != impl:
            lines.append(f"  [{other}]: " + "; ".join(f"{c.split(' [')[0]} ({verdict(ok).strip('*')})"
                                                    for _, _, c, ok in targets(rows, other)))
    if speed_report.has_speed_rows(rows):
        lines.append("Speed-II targets (128k, 95%):")
        for t in speed_report.targets_for([i for i in ("triton", "triton-bf16")
                                           if any(r["case"] == f"predictor:cab-default[{i}]" for r in rows)] or ["triton"]):
            text, ok = speed_report.measure_target(rows, t)
            lines.append(f"  {verdict(ok).strip('*'):12s} {t.label} (goal {speed_report.goal_text(t)}): {text}")
    bad = [r for r in all_rows if not r.get("status", "ok").startswith("ok")]
    if bad:
        lines.append(f"skipped/failed cases: {len(bad)} (see the CSV status column)")
    return "\n".join(lines)


def newest_csv(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    files = sorted(folder.glob("*.csv"), key=lambda p: p.stat().st_mtime, reverse=True)
    files = [p for p in files if not p.name.startswith(("model-", "nsa-"))]  # `cab bench model`/`nsa` CSVs: other formats
    gpu = [p for p in files if not p.name.startswith("cpu-")]
    return (gpu or files or [None])[0]


def previous_csv(csv_path: Path, rows) -> Path | None:
    """The newest CSV beside ``csv_path`` with an earlier date than its rows (GPU CSVs only, unless
    ``csv_path`` itself is a CPU dry run), for the regression table."""
    today = min((r.get("date", "") for r in rows), default="")
    cpu = csv_path.name.startswith("cpu-")
    best = None
    for p in csv_path.parent.glob("*.csv"):
        if p.resolve() == csv_path.resolve() or p.name.startswith(("model-", "nsa-")) or (p.name.startswith("cpu-") and not cpu):
            continue
        prev = read_csv(p)
        date = max((r.get("date", "") for r in prev), default="")
        if prev and date < today and (best is None or date > best[0]):
            best = (date, p)
    return None if best is None else best[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cab bench summary", description=__doc__.split("\n\n")[0].strip('"'))
    ap.add_argument("--csv", type=Path, default=None,
                    help="results CSV (default: the newest GPU CSV in runs/bench, else in results/benchmarks)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/benchmarks.md"),
                    help="the page to write (default runs/bench/benchmarks.md; the docs page is docs/benchmarks.md)")
    ap.add_argument("--plots-dir", type=Path, default=None, help="where the PNGs go (default: beside the CSV)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--compact", action="store_true", help="print a short table instead of writing the page")
    ap.add_argument("--model-csv", type=Path, default=None,
                    help="a CSV of `cab bench model` (time to first token) for its section of the page")
    ap.add_argument("--nsa-csv", type=Path, default=None,
                    help="a CSV of `cab bench nsa` (NSA forward and forward+backward) for its section of the page")
    ap.add_argument("--previous", type=Path, default=None,
                    help="an earlier run's CSV for the regression table (default: the newest other GPU CSV beside "
                         "--csv whose date is earlier; 'none' for no regression table)")
    args = ap.parse_args(argv)
    csv_path = args.csv or newest_csv(Path("runs/bench")) or newest_csv(Path("results/benchmarks"))
    if csv_path is None or not Path(csv_path).exists():
        print(f"summary: no results CSV ({csv_path or 'runs/bench/*.csv, results/benchmarks/*.csv'}); run cab bench first",
              file=sys.stderr)
        return 2
    all_rows = read_csv(Path(csv_path))
    if not all_rows:
        print(f"summary: {csv_path} has no rows", file=sys.stderr)
        return 2
    if args.compact:
        print(compact(all_rows))
        return 0
    plots = []
    if not args.no_plots:
        try:
            plots = make_plots(Path(csv_path), args.plots_dir or Path(csv_path).parent)
        except Exception as e:  # noqa: BLE001
            print(f"summary: plots failed: {type(e).__name__}: {e}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = f"cab bench summary --csv {csv_path} --out {args.out}"
    if args.plots_dir:
        command += f" --plots-dir {args.plots_dir}"
    if args.no_plots:
        command += " --no-plots"
    previous = None
    if args.previous is None:
        previous = previous_csv(Path(csv_path), all_rows)
    elif str(args.previous) != "none":
        previous = args.previous
    prev_rows = read_csv(previous) if previous else []
    if previous:
        command += f" --previous {previous}"
    section_rows = {}  # the optional sections' CSVs, read in the order the command line names them
    for flag, path, reader in (("--model-csv", args.model_csv, read_csv), ("--nsa-csv", args.nsa_csv, read_nsa_csv)):
        section_rows[flag] = []
        if path is not None:
            if not path.is_file():
                print(f"summary: {flag} {path} does not exist", file=sys.stderr)
                return 2
            section_rows[flag] = reader(path)
            command += f" {flag} {path}"
    model_rows, nsa_rows = section_rows["--model-csv"], section_rows["--nsa-csv"]
    plot_dir = None if args.no_plots else (args.plots_dir or Path(csv_path).parent)
    args.out.write_text(render(all_rows, Path(csv_path), plots, args.out, command, prev_rows, plot_dir,
                               model_rows, args.model_csv, nsa_rows, args.nsa_csv))
    print(f"summary: wrote {args.out} from {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
