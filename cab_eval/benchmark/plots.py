"""PNG plots of a benchmark CSV: latency against N per method, TFLOP/s per computed tile, and the
stacked breakdown coarsen | score | select | mask | attention of CAB.

``make_plots(csv_path, out_dir)`` writes ``<stem>-latency.png`` and ``<stem>-breakdown.png`` and returns
their paths (only those it could draw)."""

from __future__ import annotations

from pathlib import Path

from ..plotting import MARKERS, coincidences, legend_label, line_style
from .io import measured, read_csv

STAGES = ("coarsen", "score", "select", "mask")


def ok_rows(rows):
    """The rows of ``rows`` that hold a measurement (:func:`~.io.measured`)."""
    return [r for r in rows if measured(r)]


def _f(x, default=None):
    try:
        return float(x)
    except (TypeError, ValueError):
        return default


def _sp(r) -> float | None:
    return _f(r.get("sparsity"))


def pick_impl(rows, prefix: str = "predictor:cab") -> str | None:
    """The predictor implementation to headline: triton where it has results, else torch."""
    names = {r["case"] for r in rows}
    for impl in ("triton", "torch"):
        if f"{prefix}[{impl}]" in names:
            return impl
    return None


def series(rows, case: str, *, batch: int = 1, sparsity: float | None = None, key: str = "ms"):
    """``[(n, value)]`` sorted by n for one case."""
    pts = {}
    for r in rows:
        if r["case"] != case or int(r["batch"]) != batch:
            continue
        if sparsity is not None and (_sp(r) is None or abs(_sp(r) - sparsity) > 1e-9):
            continue
        v = _f(r.get(key))
        if v is not None:
            pts[int(r["n"])] = v
    return sorted(pts.items())


def make_plots(csv_path: Path, out_dir: Path, sparsity: float = 0.95) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ok_rows(read_csv(Path(csv_path)))
    if not rows:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(csv_path).stem
    device = rows[0].get("device", "")
    impl = pick_impl(rows) or "torch"
    written = []

    # 1. latency and tile throughput against N (B = 1)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    lines = [
        ("attention:sdpa-flash", None, "SDPA flash", "-"),
        ("attention:sdpa-cudnn", None, "SDPA cuDNN", "-"),
        ("attention:sdpa-cpu", None, "SDPA (CPU)", "-"),
        ("attention:flex-dense", None, "Flex dense", "-"),
        ("attention:cab-sparse", sparsity, f"Flex sparse {sparsity:.0%} (kernel only)", "--"),
        ("attention:cab-sparse[reference]", sparsity, f"reference sparse {sparsity:.0%}", "--"),
        (f"predictor:cab[{impl}]", sparsity, f"CAB predictor [{impl}]", ":"),
        (f"total:cab[{impl}]", sparsity, f"CAB total {sparsity:.0%} [{impl}]", "-"),
        (f"total:magnitude[{impl}]", sparsity, f"magnitude total {sparsity:.0%} [{impl}]", "-."),
        ("total:antidiagonal[torch]", sparsity, f"antidiagonal total {sparsity:.0%}", "-."),
    ]
    drawn = {label: series(rows, case, sparsity=s) for case, s, label, _ in lines}
    same = coincidences({k: [v for _, v in pts] for k, pts in drawn.items() if pts})
    for i, (case, s, label, style) in enumerate(lines):
        pts = drawn[label]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=MARKERS[i % len(MARKERS)], ms=4, mfc="none",
                    label=legend_label(label, same))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N (B = 1)")
    ax.set_ylabel("median ms")
    ax.set_title("latency")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    for case, s, label in (
        ("attention:sdpa-cudnn", None, "SDPA cuDNN (causal pairs)"),
        ("attention:flex-dense", None, "Flex dense (128 blocks)"),
        ("attention:cab-sparse", sparsity, f"sparse {sparsity:.0%}, block 64, tile 64x64"),
        ("attention:cab-sparse@bs128", sparsity, f"sparse {sparsity:.0%}, selected at 128"),
        ("attention:cab-sparse@merge128", sparsity, f"sparse {sparsity:.0%}, 64 merged to 128 tiles"),
    ):
        pts = series(rows, case, sparsity=s, key="tflops")
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **{**line_style(len(ax2.lines)), "ms": 4})
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("sequence length N (B = 1)")
    ax2.set_ylabel("TFLOP/s on computed tiles")
    ax2.set_title("attention throughput")
    ax2.grid(True, which="both", alpha=0.3)
    if ax2.lines:
        ax2.legend(fontsize=7)
    fig.suptitle(f"{device} - {stem}", fontsize=9)
    fig.tight_layout()
    p = out_dir / f"{stem}-latency.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    # 2. stacked breakdown (B = 1, one panel per predictor implementation)
    impls = sorted({r["case"][len("predictor:cab["):-len("]:coarsen")] for r in rows
                    if r["case"].startswith("predictor:cab[") and r["case"].endswith("]:coarsen")}, key=lambda i: (i != "torch", i))
    if impls:
        fig, axes = plt.subplots(1, len(impls), figsize=(6.5 * len(impls), 5), squeeze=False)
        att_case = "attention:cab-sparse" if any(r["case"] == "attention:cab-sparse" for r in rows) else "attention:cab-sparse[reference]"
        for ax, im in zip(axes[0], impls):
            parts = {}
            for st in STAGES:
                s = None if st in ("coarsen", "score") else sparsity
                parts[st] = dict(series(rows, f"predictor:cab[{im}]:{st}", sparsity=s))
            parts["attention"] = dict(series(rows, att_case, sparsity=sparsity))
            ns = sorted(set().union(*[set(v) for v in parts.values()]))
            if not ns:
                continue
            xs = list(range(len(ns)))
            sums = [sum(vals.get(n, 0.0) for vals in parts.values()) or 1.0 for n in ns]
            bottom = [0.0] * len(ns)
            for st, vals in parts.items():
                h = [vals.get(n, 0.0) / t for n, t in zip(ns, sums)]
                ax.bar(xs, h, bottom=bottom, label=st)
                bottom = [b + x for b, x in zip(bottom, h)]
            tot = dict(series(rows, f"total:cab[{im}]", sparsity=sparsity))
            for x, n, t in zip(xs, ns, sums):
                label = f"{t:.3g}"
                if n in tot:
                    label += f"\n({tot[n]:.3g})"
                ax.text(x, 1.01, label, ha="center", va="bottom", fontsize=6)
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{n // 1024}k" if n >= 1024 else str(n) for n in ns])
            ax.set_ylim(0, 1.15)
            ax.set_xlabel("N (B = 1); above: sum of stages ms (measured end-to-end total ms)")
            ax.set_ylabel("share of the summed stage times")
            ax.set_title(f"CAB at {sparsity:.0%} sparsity, predictor [{im}]")
            ax.legend(fontsize=7, loc="lower left")
        fig.suptitle(f"{device} - {stem}", fontsize=9)
        fig.tight_layout()
        p = out_dir / f"{stem}-breakdown.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written
