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
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from . import speed_report
from .formatting import finite, fmt_ms, nlabel
from .nsa_report import nsa_section, read_nsa_csv
from .io import read_csv
from .plots import make_plots, ok_rows, pick_impl

HEADLINE_S = 0.95
TARGET_N = 131072
TARGETS = {
    "predictor_ms": 1.5,  # predictor at 128k, H100
    "speedup": 10.0,  # CAB end to end at 95% vs cuDNN at 128k
    "break_even": 8192,  # tokens
    "predictor_mb": 1024.0,  # predictor memory beyond inputs at 128k
}


def _same_s(r, s):
    if s is None:
        return r.get("sparsity", "") in ("", None)
    v = finite(r.get("sparsity"))
    return v is not None and abs(v - s) < 1e-9


def value(rows, case, n, *, batch=1, sparsity=None, key="ms"):
    for r in rows:
        if r["case"] == case and int(r["n"]) == n and int(r["batch"]) == batch and _same_s(r, sparsity):
            return finite(r.get(key))
    return None


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def table(header, body):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def ns_of(rows, batch=1):
    return sorted({int(r["n"]) for r in rows if int(r["batch"]) == batch})


def break_even(rows, total_case, s, dense_case="attention:sdpa-cudnn"):
    """``(grid_n, interpolated_n, note)``: the smallest measured N from which ``total_case`` at sparsity
    ``s`` beats ``dense_case`` at every longer measured N (B = 1), and a log-log interpolation of where
    the ratio crosses 1 between the last slower and the first faster point."""
    pts = []
    for n in ns_of(rows):
        t, d = value(rows, total_case, n, sparsity=s), value(rows, dense_case, n)
        if t is not None and d is not None:
            pts.append((n, t, d))
    if not pts:
        return None, None, "not measured"
    faster = [t < d for _, t, d in pts]
    if not faster[-1]:
        return None, None, f"not reached up to {nlabel(pts[-1][0])}"
    i = len(pts) - 1
    while i > 0 and faster[i - 1]:
        i -= 1
    n = pts[i][0]
    if i == 0:
        return n, None, f"at or below {nlabel(n)} (faster at every measured N)"
    (n0, t0, d0), (n1, t1, d1) = pts[i - 1], pts[i]
    l0, l1 = math.log(t0 / d0), math.log(t1 / d1)
    x = math.log(n0) + (0 - l0) / (l1 - l0) * (math.log(n1) - math.log(n0)) if l1 != l0 else math.log(n1)
    return n, math.exp(x), f"{nlabel(n)} on the grid (~{math.exp(x):.0f} interpolated)"


def targets(rows, impl: str | None = None, variant: str = ""):
    """The speed targets (:data:`TARGETS`) for one predictor implementation (default: the headline one) and case
    variant (``""`` for block 64, ``"@bs128"`` for selection at 128), each as
    ``(target, goal, measured, ok)`` with ``ok`` True / False / None (not measured)."""
    impl = impl or pick_impl(rows) or "torch"
    pcase = f"predictor:cab[{impl}]{variant}"
    tcase = f"total:cab[{impl}]{variant}"
    out = []
    p = value(rows, pcase, TARGET_N, sparsity=HEADLINE_S)
    out.append(("predictor at 128k (coarsen to BlockMask, B=1, 95%)", f"<= {TARGETS['predictor_ms']} ms",
                "-" if p is None else f"{p:.3f} ms [{impl}]",
                None if p is None else p <= TARGETS["predictor_ms"]))
    t = value(rows, tcase, TARGET_N, sparsity=HEADLINE_S)
    d = value(rows, "attention:sdpa-cudnn", TARGET_N)
    sp = d / t if (t and d) else None
    out.append(("CAB end to end at 95% vs cuDNN SDPA at 128k", f">= {TARGETS['speedup']:.0f}x",
                "-" if sp is None else f"{sp:.1f}x ({fmt_ms(d)} / {fmt_ms(t)} ms) [{impl}]",
                None if sp is None else sp >= TARGETS["speedup"]))
    n, _, note = break_even(rows, tcase, HEADLINE_S)
    out.append(("break-even of CAB (95%) vs cuDNN", f"<= {nlabel(TARGETS['break_even'])} tokens", f"{note} [{impl}]",
                None if note == "not measured" else (n is not None and n <= TARGETS["break_even"])))
    m = value(rows, pcase, TARGET_N, sparsity=HEADLINE_S, key="peak_mb")
    out.append(("predictor memory at 128k beyond the inputs", f"< {TARGETS['predictor_mb']:.0f} MiB",
                "-" if m is None else f"{m:.0f} MiB [{impl}]", None if m is None else m < TARGETS["predictor_mb"]))
    return out


def verdict(ok):
    return "not measured" if ok is None else ("**met**" if ok else "**not met**")


def model_section(model_rows, model_csv: Path, rel) -> str:
    """The ``cab bench model`` rows as markdown: per length and variant, forward ms, attention ms (forward
    minus the no-attention forward), attention share, speedups over ``dense:sdpa-cudnn``, block density,
    peak GiB. Only ``ok`` rows; the figures are the CSV's, unchanged."""
    ok = [r for r in model_rows if r.get("status", "ok").startswith("ok")]
    if not ok:
        return ""
    first = ok[0]
    md = [f"## Time to first token in a Llama-3-8B-shaped model (`cab bench model`)\n",
          f"From `{rel(model_csv)}` ({len(model_rows)} rows). Device: **{first.get('device', '?')}**; torch "
          f"{first.get('torch', '?')}; date {first.get('date', '?')}. A transformers `LlamaForCausalLM` with "
          f"Llama-3-8B's shapes, {first.get('layers', '?')} layers, random weights, bf16, prefilling N tokens "
          "with `logits_to_keep=1`. `none` replaces attention by zeros; attention ms = forward - none. "
          "`sparse:<selector>[<attention backend>]/<predictor impl>` runs `cab_attention.hf.enable` at the "
          "sparsity shown; speedups are over `dense:sdpa-cudnn` at the same N.\n"]
    body = []
    for n in sorted({int(r["n"]) for r in ok}, reverse=True):
        for r in (r for r in ok if int(r["n"]) == n):
            none = r["variant"] == "none"
            s = finite(r.get("sparsity"))
            body.append([nlabel(n), f"`{r['variant']}`", "-" if none or r["variant"].startswith("dense") or s is None else f"{s:.0%}",
                         fmt(finite(r.get("density")), ".4f"), fmt_ms(finite(r.get("ms"))), fmt_ms(finite(r.get("attention_ms"))),
                         fmt(finite(r.get("attention_share")), ".1%"), fmt(finite(r.get("speedup_forward")), ".2f"),
                         fmt(finite(r.get("speedup_attention")), ".2f"), fmt(finite(r.get("peak_gib")), ".2f")])
    md.append(table(["N", "variant", "sparsity", "density", "forward ms", "attention ms", "attention share",
                     "speedup (forward)", "speedup (attention)", "peak GiB"], body))
    bad = [r for r in model_rows if not r.get("status", "ok").startswith("ok")]
    if bad:
        md.append("Not measured: " + "; ".join(f"{r['n']} `{r['variant']}` ({r['status']})" for r in bad) + "\n")
    return "\n".join(md)


def render(all_rows, csv_path: Path, plot_paths, out_path: Path, command: str | None = None,
           previous_rows=None, plot_dir: Path | None = None, model_rows=None, model_csv: Path | None = None,
           nsa_rows=None, nsa_csv: Path | None = None) -> str:
    """The markdown page; ``command`` is the command line that regenerates it (stated in the page);
    ``previous_rows`` (an earlier run's CSV rows) feed the regression table; ``plot_dir`` receives the
    kept-tile-rate plot (none when ``None``); ``model_rows`` (read from ``model_csv``, a CSV of
    ``cab bench model``) add the time-to-first-token section; ``nsa_rows`` (read from ``nsa_csv`` by
    :func:`~cab_eval.benchmark.nsa_report.read_nsa_csv`) add the NSA forward+backward section."""
    rows = ok_rows(all_rows)
    first = all_rows[0] if all_rows else {}
    device, torch_v, date = first.get("device", "?"), first.get("torch", "?"), first.get("date", "?")
    cpu = "host timer" in device
    impl = pick_impl(rows) or "torch"
    impls = sorted({r["case"][len("predictor:cab["):-1] for r in rows
                    if r["case"].startswith("predictor:cab[") and r["case"].endswith("]")}, key=lambda i: (i != "torch", i))
    att = "attention:cab-sparse[reference]" if cpu else "attention:cab-sparse"
    heads = f"Hq={first.get('heads', '?')}, Hkv={first.get('kv_heads', '?')}, D={first.get('head_dim', '?')}"
    rel = lambda p: os.path.relpath(p, out_path.parent)  # noqa: E731
    md = ["# Benchmarks\n"]
    md.append(
        f"Generated by `{command or 'cab bench summary --csv ' + str(csv_path)}` from `{rel(csv_path)}` "
        f"({len(all_rows)} rows). Device: **{device}**; torch {torch_v}; date {date}. "
        f"Shape: {heads}, bf16, causal, block 64 unless noted. Do not edit by hand: rerun the generator.\n"
    )
    if cpu:
        md.append("> **These rows are a CPU dry run with host timers. They test the command line and say nothing "
                  "about speed.** Real figures come from `scripts/gpu_check.sh` on a GPU.\n")
    md.append(
        "How it was measured: `cab bench predictor` and `cab bench attention` (`scripts/gpu_check.sh` runs both; "
        "`scripts/gpu_speed.sh` runs the Speed-II set with the Triton attention backend and `cab bench model`). "
        "Each figure is the median of triton's `do_bench` (CUDA events, L2 flushed between calls) after a "
        "warm-up call that compiles; peak memory is `torch.cuda.max_memory_allocated()` during one call minus "
        "what was allocated before it (inputs excluded, outputs and workspace included), in MiB. `predictor:cab[impl]` covers coarsen, score, "
        "select and the FlexAttention `BlockMask`; `[torch]` is `cab_attention.select_blocks`, `[triton]` the "
        "kernels of `cab_attention.kernels` (absent from the tables when they did not run). "
        "`attention:cab-sparse` is the FlexAttention kernel alone over CAB's mask; `total:*` is predictor, mask "
        "and attention in one call, as `sparse_attention` runs it. TFLOP/s count the computed tiles exactly "
        "from `kv_num_blocks` (`4 bs^2 D` per tile and query head, causal diagonal tiles at half); dense SDPA "
        "counts causal token pairs. Every `cab` case runs `cab_attention.options.FORMAN_KEEP_LOWEST_MAXL2` (augmented "
        "Forman, keep lowest, max-L2 coarsening), spelled out so that the figures stay comparable when the library's "
        "defaults move; the default triangle proxy needs the same `A @ A`. Scale (packed variable-length batches, "
        "chunked prefill, one million tokens, context parallel) has its own GPU results in "
        "[scale.md](scale.md); NSA's in [nsa.md](nsa.md).\n"
    )
    md.append(
        "Reading the numbers: at short lengths the predictor and the end-to-end figures are bound by host-side "
        "dispatch (Python and many small kernel launches), so their medians include launch gaps and move "
        "between neighbouring rows; kernel speed shows in the long-context rows. `[triton]` is the kernels' "
        "exact float32 path (selections equal to `[torch]`), `[triton-bf16]` their approximate bf16 path. "
        "The attention-alone figures use one mask per sparsity for all predictors: the budget rule keeps "
        "exactly the same number of tiles whichever selector chose them.\n"
    )
    md.append(f"Predictor implementations measured: {', '.join(impls) or 'none'}; headline figures use `[{impl}]`.\n")

    md.append("## Targets\n")
    md.append(table(["target", "goal", "measured", "status"],
                    [(a, b, c, verdict(ok)) for a, b, c, ok in targets(rows)]))
    others = [i for i in impls if i != impl]
    if others:
        md.append("The same targets with the other predictor implementations:\n")
        per = {i: targets(rows, i) for i in others}
        md.append(table(["target"] + [f"`[{i}]`" for i in others],
                        [[t[0]] + [f"{per[i][j][2].split(' [')[0]} ({verdict(per[i][j][3]).strip('*')})" for i in others]
                         for j, t in enumerate(targets(rows))]))
    # Selecting at 128 tokens is a different (coarser) selector: its targets are shown beside, not instead.
    at128 = {i: targets(rows, i, "@bs128") for i in impls}
    at128 = {i: t for i, t in at128.items() if any(ok is not None for *_, ok in t)}
    if at128:
        md.append("\nThe same targets with selection *and* execution at 128-token blocks (`@bs128`; a coarser "
                  "selection, whose accuracy the ablation in docs/results.md did not measure):\n")
        md.append(table(["target"] + [f"`[{i}]@bs128`" for i in at128],
                        [[t[0]] + [f"{at128[i][j][2].split(' [')[0]} ({verdict(at128[i][j][3]).strip('*')})" for i in at128]
                         for j, t in enumerate(targets(rows))]))
    md.append("")

    ns = ns_of(rows)
    if ns:
        md.append("## Latency at B = 1 (median ms)\n")
        hdr = ["N", "SDPA (CPU)" if cpu else "SDPA flash", "SDPA cuDNN", "Flex dense"]
        sps = sorted({finite(r["sparsity"]) for r in rows if r["case"] == f"total:cab[{impl}]" and finite(r["sparsity"]) is not None})
        hdr += [f"CAB attn {s:.0%}" for s in sps] + [f"predictor [{impl}] 95%"]
        mag_impl = impl if any(r["case"] == f"total:magnitude[{impl}]" for r in rows) else "torch"
        mag_total = f"total:magnitude[{mag_impl}]"
        hdr += [f"CAB total {s:.0%}" for s in sps] + [f"magnitude total 95% [{mag_impl}]", "antidiag total 95%", "cuDNN / CAB 95%"]
        body = []
        for n in ns:
            d = value(rows, "attention:sdpa-cudnn", n)
            t95 = value(rows, f"total:cab[{impl}]", n, sparsity=HEADLINE_S)
            r = [nlabel(n), fmt_ms(value(rows, "attention:sdpa-flash", n)) if not cpu else fmt_ms(value(rows, "attention:sdpa-cpu", n)),
                 fmt_ms(d), fmt_ms(value(rows, "attention:flex-dense", n))]
            r += [fmt_ms(value(rows, att, n, sparsity=s)) for s in sps]
            r += [fmt_ms(value(rows, f"predictor:cab[{impl}]", n, sparsity=HEADLINE_S))]
            r += [fmt_ms(value(rows, f"total:cab[{impl}]", n, sparsity=s)) for s in sps]
            r += [fmt_ms(value(rows, mag_total, n, sparsity=HEADLINE_S)),
                  fmt_ms(value(rows, "total:antidiagonal[torch]", n, sparsity=HEADLINE_S)),
                  "-" if not (d and t95) else f"{d / t95:.2f}x"]
            body.append(r)
        md.append(table(hdr, body))
        md.append("Break-even of CAB end to end against cuDNN SDPA (B = 1):\n")
        for s in sps:
            for im in impls:
                note = break_even(rows, f"total:cab[{im}]", s)[2]
                if note != "not measured":
                    md.append(f"- {s:.0%} `[{im}]`: {note}")
        md.append("")

        pcases = [c for c in sorted({r["case"] for r in rows if r["case"].startswith("predictor:") and r["case"].count(":") == 1},
                                    key=lambda c: (not c.startswith("predictor:cab"), "@" in c, c))]
        if pcases:
            md.append("## Predictors (median ms at 95% sparsity, B = 1; peak MiB beyond the inputs below)\n")
            md.append(table(["N"] + [f"`{c.split(':', 1)[1]}`" for c in pcases],
                            [[nlabel(n)] + [fmt_ms(value(rows, c, n, sparsity=HEADLINE_S)) for c in pcases] for n in ns]))
            md.append(table(["N (peak MiB)"] + [f"`{c.split(':', 1)[1]}`" for c in pcases],
                            [[nlabel(n)] + [fmt(value(rows, c, n, sparsity=HEADLINE_S, key="peak_mb"), ".0f") for c in pcases]
                             for n in ns]))

        for im in impls:
            if not any(r["case"] == f"predictor:cab[{im}]:coarsen" for r in rows):
                continue
            md.append(f"## Breakdown of CAB at 95% sparsity, predictor `[{im}]` (median ms, B = 1)\n")
            hdr = ["N", "coarsen", "score", "select", "mask build", "attention", "sum of stages", "measured total", "predictor alone"]
            body = []
            for n in ns:
                parts = [value(rows, f"predictor:cab[{im}]:coarsen", n), value(rows, f"predictor:cab[{im}]:score", n),
                         value(rows, f"predictor:cab[{im}]:select", n, sparsity=HEADLINE_S),
                         value(rows, f"predictor:cab[{im}]:mask", n, sparsity=HEADLINE_S),
                         value(rows, att, n, sparsity=HEADLINE_S)]
                tot = None if any(p is None for p in parts) else sum(parts)
                body.append([nlabel(n)] + [fmt_ms(p) for p in parts] + [fmt_ms(tot),
                            fmt_ms(value(rows, f"total:cab[{im}]", n, sparsity=HEADLINE_S)),
                            fmt_ms(value(rows, f"predictor:cab[{im}]", n, sparsity=HEADLINE_S))])
            md.append(table(hdr, body))

        if any(r["case"].startswith("attention:cab-sparse@") for r in rows):
            md.append("## Block size and kernel tile (attention kernel alone, B = 1)\n")
            md.append("`64 / 64x64`: selection at 64 tokens, FlexAttention tile `BLOCK_M = BLOCK_N = 64`. "
                      "`sel 128`: selection at 128 tokens (tile 128 x 64). `64 merged to 128`: the 64-token selection "
                      "with every 128 x 128 tile kept that holds a chosen 64-block (a superset: more tiles computed, "
                      "nothing dropped). Cells: ms / TFLOP/s on computed tiles / density of computed tiles.\n")
            hdr = ["N", "sparsity", "64 / 64x64", "sel 128", "64 merged to 128"]
            body = []
            for n in ns:
                for s in sps:
                    cells = []
                    for case in ("attention:cab-sparse", "attention:cab-sparse@bs128", "attention:cab-sparse@merge128"):
                        ms = value(rows, case, n, sparsity=s)
                        cells.append("-" if ms is None else f"{fmt_ms(ms)} / {fmt(value(rows, case, n, sparsity=s, key='tflops'), '.0f')} / "
                                     f"{fmt(value(rows, case, n, sparsity=s, key='density'), '.3f')}")
                    if any(c != "-" for c in cells):
                        body.append([nlabel(n), f"{s:.0%}"] + cells)
            md.append(table(hdr, body))
            md.append("End to end at 128-token selection: " + ", ".join(
                f"{nlabel(n)}: {fmt_ms(value(rows, f'total:cab[{impl}]@bs128', n, sparsity=HEADLINE_S))} ms "
                f"(vs {fmt_ms(value(rows, f'total:cab[{impl}]', n, sparsity=HEADLINE_S))} at 64)"
                for n in ns if value(rows, f"total:cab[{impl}]@bs128", n, sparsity=HEADLINE_S) is not None) + "\n")

        md.append("## Peak memory beyond the inputs (MiB, B = 1, 95% where sparse)\n")
        cases = ([f"predictor:cab[{i}]" for i in impls] + ["predictor:magnitude[torch]", "predictor:antidiagonal[torch]",
                 "attention:sdpa-cudnn", "attention:flex-dense", att, f"total:cab[{impl}]"])
        body = []
        for n in ns:
            vals = []
            for c in cases:
                s = None if c in ("attention:sdpa-cudnn", "attention:flex-dense") else HEADLINE_S
                vals.append(fmt(value(rows, c, n, sparsity=s, key="peak_mb"), ".0f"))
            if any(v != "-" for v in vals):
                body.append([nlabel(n)] + vals)
        md.append(table(["N"] + [f"`{c}`" for c in cases], body))

    batches = sorted({int(r["batch"]) for r in rows if int(r["batch"]) > 1})
    if batches:
        md.append("## Batch sweep (median ms)\n")
        mag_b = f"total:magnitude[{impl}]" if any(r["case"] == f"total:magnitude[{impl}]" for r in rows) else "total:magnitude[torch]"
        hdr = ["N", "B", "SDPA flash", "SDPA cuDNN", "Flex dense", "CAB attn 95%", f"CAB total 95% [{impl}]",
               f"magnitude total 95% {mag_b[len('total:magnitude'):]}", "cuDNN / CAB"]
        body = []
        for n in sorted({int(r["n"]) for r in rows if int(r["batch"]) > 1}):
            for b in batches:
                d = value(rows, "attention:sdpa-cudnn", n, batch=b)
                t = value(rows, f"total:cab[{impl}]", n, batch=b, sparsity=HEADLINE_S)
                r = [nlabel(n), b, fmt_ms(value(rows, "attention:sdpa-flash", n, batch=b)), fmt_ms(d),
                     fmt_ms(value(rows, "attention:flex-dense", n, batch=b)),
                     fmt_ms(value(rows, att, n, batch=b, sparsity=HEADLINE_S)), fmt_ms(t),
                     fmt_ms(value(rows, mag_b, n, batch=b, sparsity=HEADLINE_S)),
                     "-" if not (d and t) else f"{d / t:.2f}x"]
                if any(c != "-" for c in r[2:]):
                    body.append(r)
        md.append(table(hdr, body))

    speed = speed_report.sections(rows, ok_rows(previous_rows or []), plot_dir,
                                  lambda p: os.path.relpath(p, out_path.parent))
    if speed:
        md.append(speed)

    if model_rows:
        md.append(model_section(model_rows, model_csv or Path("model.csv"), rel))

    if nsa_rows:
        md.append(nsa_section(nsa_rows, nsa_csv or Path("nsa.csv"), rel))

    if plot_paths:
        md.append("## Plots\n")
        for p in plot_paths:
            md.append(f"![{Path(p).stem}]({rel(p)})\n")

    bad = [r for r in all_rows if not r.get("status", "ok").startswith("ok")]
    if bad:
        md.append("## Skipped and failed cases\n")
        md.append(table(["case", "N", "B", "sparsity", "status"],
                        [(r["case"], r["n"], r["batch"], r["sparsity"] or "-", r["status"].replace("|", "/")) for r in bad]))
    return "\n".join(md) + "\n"


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
    model_rows = []
    if args.model_csv is not None:
        if not args.model_csv.is_file():
            print(f"summary: --model-csv {args.model_csv} does not exist", file=sys.stderr)
            return 2
        model_rows = read_csv(args.model_csv)
        command += f" --model-csv {args.model_csv}"
    nsa_rows = []
    if args.nsa_csv is not None:
        if not args.nsa_csv.is_file():
            print(f"summary: --nsa-csv {args.nsa_csv} does not exist", file=sys.stderr)
            return 2
        nsa_rows = read_nsa_csv(args.nsa_csv)
        command += f" --nsa-csv {args.nsa_csv}"
    plot_dir = None if args.no_plots else (args.plots_dir or Path(csv_path).parent)
    args.out.write_text(render(all_rows, Path(csv_path), plots, args.out, command, prev_rows, plot_dir,
                               model_rows, args.model_csv, nsa_rows, args.nsa_csv))
    print(f"summary: wrote {args.out} from {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
