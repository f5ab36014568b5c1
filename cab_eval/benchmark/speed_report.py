"""The Speed-II sections of the benchmarks page, computed from CSV rows only.

* :func:`issue_targets`: each target of the issue (128k, 95%, B = 1) as today's measured figure, the
  same-run anchor (cuDNN, FlexAttention), the previous recorded figure, and met / not met / not measured;
* :func:`triton_breakdown`: predictor stages, mask and the attention kernel (flex and Triton) per N;
* :func:`kept_rate_table`: kept-tile TFLOP/s of FlexAttention and the Triton kernel per N, block, sparsity;
* :func:`regression_table`: every case measured today and in an earlier CSV, today / previous per length;
* :func:`kept_rate_plot`: the kept-tile rate against N (PNG).

Goals are the issue's (inputs, not results); every measured number comes from the rows passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .formatting import finite, fmt_ms, nlabel, table
from .io import measured, slugify
from .summary_targets import HEADLINE_S, TARGET_N, crossing, value, verdict

DENSE = "attention:sdpa-cudnn"
#: today / previous above this ratio is "slower" in the regression table; up to it, "within noise" (the
#: spread of repeated runs of the same launch on the H200 at 128k and 95% was < 1%, at 90% up to 10%:
#: docs/kernels.md, so a 5% band flags real regressions at the headline sparsity).
NOISE = 1.05


def measured_value(rows, case, n, *, batch=1, sparsity=None, key="ms"):
    """:func:`~.summary_targets.value` over measured rows only: these sections read raw CSV rows, where a
    skipped or failed case must not stand in for a figure."""
    return value(rows, case, n, batch=batch, sparsity=sparsity, key=key, ok_only=True)


def source(rows) -> str:
    r = rows[0] if rows else {}
    return f"{r.get('device', '?')}, {r.get('date', '?')}"


@dataclass(frozen=True)
class Target:
    """One goal of the issue: ``kind`` is ``kept`` (kept-tile TFLOP/s >= goal), ``ms`` (<= goal),
    ``mb`` (peak MiB < goal), ``speedup`` (cuDNN / case >= goal) or ``break_even`` (tokens <= goal)."""

    label: str
    kind: str
    case: str
    goal: float


def targets_for(pred_impls: list[str]) -> list[Target]:
    """The issue's targets, with ``cab`` at the library's default options (``cab-default``) and
    ``antidiagonal`` with its fused Triton estimator; predictor targets for each Triton implementation."""
    t = [Target("kept-tile rate, Triton kernel, 64-token blocks", "kept", "attention:cab-sparse[triton]", 400),
         Target("kept-tile rate, Triton kernel, 128-token blocks", "kept", "attention:cab-sparse[triton]@bs128", 470)]
    for sel, impls in (("cab-default", pred_impls), ("antidiagonal", ["triton"])):
        for im in impls:
            t.append(Target(f"predictor `{sel}[{im}]`, 64-token blocks", "ms", f"predictor:{sel}[{im}]", 1.5))
            t.append(Target(f"predictor `{sel}[{im}]`, 128-token blocks", "ms", f"predictor:{sel}[{im}]@bs128", 0.7))
            t.append(Target(f"predictor `{sel}[{im}]` memory beyond the inputs, 64-token blocks", "mb",
                            f"predictor:{sel}[{im}]", 1024))
    head = pred_impls[0] if pred_impls else "triton"
    for sel, im in (("cab-default", head), ("antidiagonal", "triton")):
        t.append(Target(f"end to end `{sel}[{im}]+triton` vs cuDNN, 64-token blocks", "speedup",
                        f"total:{sel}[{im}]+triton", 15))
        t.append(Target(f"end to end `{sel}[{im}]+triton` vs cuDNN, 128-token blocks", "speedup",
                        f"total:{sel}[{im}]+triton@bs128", 20))
        t.append(Target(f"break-even of `{sel}[{im}]+triton` against cuDNN", "break_even",
                        f"total:{sel}[{im}]+triton", 4096))
    return t


def break_even(rows, case, s=HEADLINE_S):
    """``(n, note)``: the smallest measured N from which ``case`` beats cuDNN at every longer measured N."""
    pts = []
    for n in sorted({int(r["n"]) for r in rows if int(r["batch"]) == 1}):
        t, d = measured_value(rows, case, n, sparsity=s), measured_value(rows, DENSE, n)
        if t is not None and d is not None:
            pts.append((n, t, d))
    if not pts:
        return None, "not measured"
    i, x = crossing(pts)
    if i is None:
        return None, f"not reached up to {nlabel(pts[-1][0])}"
    if x is None:
        return pts[0][0], f"at or below {nlabel(pts[0][0])} (faster at every measured N from {nlabel(pts[0][0])})"
    return x, f"~{x:.0f} tokens (slower at {nlabel(pts[i - 1][0])}, faster from {nlabel(pts[i][0])})"


def measure_target(rows, t: Target, n=TARGET_N, s=HEADLINE_S):
    """``(measured text, ok)`` of one target on ``rows`` (ok None: not measured)."""
    if t.kind == "kept":
        v = measured_value(rows, t.case, n, sparsity=s, key="kept_tflops")
        if v is None:
            return "-", None
        return f"{v:.1f} TFLOP/s ({fmt_ms(measured_value(rows, t.case, n, sparsity=s))} ms)", v >= t.goal
    if t.kind == "ms":
        v = measured_value(rows, t.case, n, sparsity=s)
        return ("-", None) if v is None else (f"{fmt_ms(v)} ms", v <= t.goal)
    if t.kind == "mb":
        v = measured_value(rows, t.case, n, sparsity=s, key="peak_mb")
        return ("-", None) if v is None else (f"{v:.0f} MiB", v < t.goal)
    if t.kind == "speedup":
        v, d = measured_value(rows, t.case, n, sparsity=s), measured_value(rows, DENSE, n)
        if v is None or d is None:
            return "-", None
        return f"{d / v:.1f}x ({fmt_ms(d)} / {fmt_ms(v)} ms)", d / v >= t.goal
    if t.kind == "break_even":
        b, note = break_even(rows, t.case, s)
        return note, (None if note == "not measured" else (b is not None and b <= t.goal))
    raise ValueError(f"unknown target kind {t.kind!r}")


def goal_text(t: Target) -> str:
    return {"kept": f">= {t.goal:g} TFLOP/s", "ms": f"<= {t.goal:g} ms", "mb": f"< {t.goal:g} MiB",
            "speedup": f">= {t.goal:g}x", "break_even": f"<= {nlabel(int(t.goal))} tokens"}[t.kind]


def anchor(rows, t: Target, n=TARGET_N, s=HEADLINE_S) -> str:
    """The same run's reference for a target: FlexAttention's kept-tile rate on the same masks, cuDNN's
    time, or the end to end with FlexAttention."""
    if t.kind == "kept":
        flex = t.case.replace("[triton]", "")
        v = measured_value(rows, flex, n, sparsity=s, key="kept_tflops")
        return "-" if v is None else f"flex {v:.1f}"
    if t.kind == "speedup":
        d = measured_value(rows, DENSE, n)
        flex = t.case.replace("+triton", "")
        v = measured_value(rows, flex, n, sparsity=s)
        parts = [] if d is None else [f"cuDNN {fmt_ms(d)} ms"]
        if v is not None and d is not None:
            parts.append(f"with flex {d / v:.1f}x")
        return ", ".join(parts) or "-"
    return "-"


def issue_targets(today, previous=None, pred_impls=None) -> str:
    """The issue's table: target, goal, today, same-run anchor, previous recorded, status."""
    pred_impls = pred_impls or [i for i in ("triton", "triton-bf16")
                                if any(r["case"] == f"predictor:cab-default[{i}]" for r in today)] or ["triton"]
    body = []
    for t in targets_for(pred_impls):
        text, ok = measure_target(today, t)
        prev = "-"
        if previous:
            ptext, _ = measure_target(previous, t)
            prev = ptext if ptext not in ("-", "not measured") else "-"
        body.append([t.label, goal_text(t), text, anchor(today, t), prev, verdict(ok)])
    head = ["target (128k, 95%, B=1)", "goal", "today", "same-run anchor",
            f"previous ({source(previous)})" if previous else "previous", "status"]
    return table(head, body)


def triton_breakdown(rows, impl: str, s=HEADLINE_S) -> str:
    """Per N: the predictor stages of ``cab[impl]``, the mask, the attention kernel alone with flex and with
    Triton, and the measured end-to-end totals with each backend (ms)."""
    body = []
    ns = sorted({int(r["n"]) for r in rows if int(r["batch"]) == 1})
    for n in ns:
        st = [measured_value(rows, f"predictor:cab[{impl}]:{x}", n, sparsity=(s if x in ("select", "mask") else None))
              for x in ("coarsen", "score", "select", "mask")]
        cells = st + [measured_value(rows, "attention:cab-sparse", n, sparsity=s),
                      measured_value(rows, "attention:cab-sparse[triton]", n, sparsity=s),
                      measured_value(rows, f"predictor:cab[{impl}]", n, sparsity=s),
                      measured_value(rows, f"total:cab[{impl}]", n, sparsity=s),
                      measured_value(rows, f"total:cab[{impl}]+triton", n, sparsity=s)]
        if any(c is not None for c in cells):
            body.append([nlabel(n)] + [fmt_ms(c) for c in cells])
    return table(["N", "coarsen", "score", "select", "mask", "attention flex", "attention triton",
                  f"predictor `[{impl}]`", "total flex", "total triton"], body)


def kept_rate_table(rows) -> str:
    """Kept-tile TFLOP/s (ms) of FlexAttention and the Triton kernel on the same masks, per N, block, sparsity."""
    body = []
    ns = sorted({int(r["n"]) for r in rows if int(r["batch"]) == 1})
    sps = sorted({finite(r["sparsity"]) for r in rows if r["case"].startswith("attention:cab-sparse[triton]")
                  and finite(r["sparsity"]) is not None}, reverse=True)
    for n in ns:
        for bs, suffix in ((64, ""), (128, "@bs128")):
            for s in sps:
                cells = []
                for case in (f"attention:cab-sparse{suffix}", f"attention:cab-sparse[triton]{suffix}"):
                    k = measured_value(rows, case, n, sparsity=s, key="kept_tflops")
                    ms = measured_value(rows, case, n, sparsity=s)
                    cells.append("-" if ms is None else f"{'-' if k is None else f'{k:.1f}'} ({fmt_ms(ms)})")
                if any(c != "-" for c in cells):
                    body.append([nlabel(n), bs, f"{s:.0%}"] + cells)
    return table(["N", "block", "sparsity", "flex kept TFLOP/s (ms)", "triton kept TFLOP/s (ms)"], body)


def memory_table(rows, s=HEADLINE_S) -> str:
    """Peak MiB beyond the inputs of the predictors and totals at the headline sparsity."""
    cases = sorted({r["case"] for r in rows if (r["case"].startswith("predictor:") and r["case"].count(":") == 1)
                    or r["case"].endswith("+triton") or r["case"] == "attention:cab-sparse[triton]"})
    ns = sorted({int(r["n"]) for r in rows if int(r["batch"]) == 1})
    body = []
    for c in cases:
        vals = [measured_value(rows, c, n, sparsity=s, key="peak_mb") for n in ns]
        if any(v is not None for v in vals):
            body.append([f"`{c}`"] + ["-" if v is None else f"{v:.0f}" for v in vals])
    return table(["case (peak MiB)"] + [nlabel(n) for n in ns], body)


def _kind_ok(case: str) -> bool:
    return case.startswith(("total:", "attention:")) or (case.startswith("predictor:") and case.count(":") == 1)


def regression_rows(today, previous):
    """``(case, n, sparsity, previous ms, today ms, ratio)`` for every B = 1 case measured in both."""
    out = []
    for r in today:
        if int(r["batch"]) != 1 or not measured(r) or not _kind_ok(r["case"]):
            continue
        s = finite(r.get("sparsity"))
        p = measured_value(previous, r["case"], int(r["n"]), sparsity=s)
        t = finite(r["ms"])
        if p is not None and p > 0:
            out.append((r["case"], int(r["n"]), s, p, t, t / p))
    return sorted(out, key=lambda x: (x[0], x[1], -(x[2] or 0)))


def regression_table(today, previous) -> str:
    rr = regression_rows(today, previous)
    if not rr:
        return "No case was measured both today and in the previous run.\n"
    body = [[f"`{c}`", nlabel(n), "-" if s is None else f"{s:.0%}", fmt_ms(p), fmt_ms(t), f"{x:.2f}",
             "**slower**" if x > NOISE else ("within noise" if x > 1 else "faster")] for c, n, s, p, t, x in rr]
    slower = [x for x in rr if x[5] > NOISE]
    head = (f"{len(rr)} cases measured in both; {len(slower)} slower than before by more than "
            f"{(NOISE - 1):.0%} (previous: {source(previous)}; today: {source(today)}).\n")
    return head + "\n" + table(["case", "N", "sparsity", "previous ms", "today ms", "today / previous", ""], body)


def kept_rate_plot(rows, out_path: Path, s=HEADLINE_S) -> Path | None:
    """Kept-tile TFLOP/s against N, flex and Triton at 64 and 128-token blocks; ``None`` without data."""
    lines = []
    for case, label in (("attention:cab-sparse", "flex, 64"), ("attention:cab-sparse[triton]", "triton, 64"),
                        ("attention:cab-sparse@bs128", "flex, 128"), ("attention:cab-sparse[triton]@bs128", "triton, 128")):
        pts = sorted((int(r["n"]), finite(r["kept_tflops"])) for r in rows
                     if r["case"] == case and int(r["batch"]) == 1 and measured(r) and finite(r.get("kept_tflops")) is not None
                     and finite(r.get("sparsity")) is not None and abs(finite(r["sparsity"]) - s) < 1e-9)
        if pts:
            lines.append((label, pts))
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in lines:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (tokens)")
    ax.set_ylabel("kept-tile TFLOP/s")
    ax.set_title(f"Kept-tile rate at {s:.0%} ({source(rows)})", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def has_speed_rows(rows) -> bool:
    """Whether the rows hold the Triton-backend cases this module reports on."""
    return any(r["case"].startswith("attention:cab-sparse[triton]") or "+triton" in r["case"] for r in rows)


def sections(today, previous, plot_dir: Path | None, rel) -> str:
    """All Speed-II sections as markdown (``rel`` turns a path into a link relative to the page)."""
    from .plots import pick_impl

    impl = pick_impl(today) or "torch"
    if not has_speed_rows(today):
        if not previous:
            return ""
        return "\n".join(["## Regression: today against the previous recorded run (B = 1)\n",
                          regression_table(today, previous)])
    md = ["## Issue 9 targets (Triton attention backend)\n",
          "`cab-default` is `cab` with the library's default options; `+triton` rows run the predictor and the "
          "Triton block-sparse kernel (`backend=\"triton\"`, no BlockMask). Kept-tile rate: every kept tile counted "
          "whole (`4 bs^2 D` per tile and query head) over the kernel time.\n",
          issue_targets(today, previous)]
    md += [f"## Breakdown with both attention backends, predictor `[{impl}]`, 95% (median ms, B = 1)\n",
           triton_breakdown(today, impl)]
    md += ["## Kept-tile rate of the attention kernels (B = 1, same masks)\n", kept_rate_table(today)]
    md += ["## Peak memory beyond the inputs, 95% (MiB, B = 1)\n", memory_table(today)]
    if previous:
        md += ["## Regression: today against the previous recorded run (B = 1)\n", regression_table(today, previous)]
    if plot_dir is not None:
        try:
            p = kept_rate_plot(today, plot_dir / f"{_slug(today)}-kept-rate.png")
        except Exception as e:  # noqa: BLE001 - a plot is a convenience; the tables are the result
            p = None
            md.append(f"(kept-rate plot failed: {type(e).__name__}: {e})\n")
        if p is not None:
            md.append(f"![kept-tile rate]({rel(p)})\n")
    return "\n".join(md)


def _slug(rows) -> str:
    r = rows[0] if rows else {}
    return slugify(f"{r.get('device', 'device')}-{r.get('date', '')}")
