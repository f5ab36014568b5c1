"""The speed targets of the benchmarks page, measured from the rows of a results CSV: :func:`value` looks
up one figure, :func:`ns_of` the measured lengths, :func:`break_even` where CAB end to end overtakes
cuDNN SDPA, :func:`targets` each target (:data:`TARGETS`) as met / not met / not measured, and
:func:`verdict` says which. The figures are the CSV's, never assumed."""

from __future__ import annotations

import math

from .formatting import finite, fmt_ms, nlabel
from .io import measured
from .plots import pick_impl

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


def value(rows, case, n, *, batch=1, sparsity=None, key="ms", ok_only=False):
    """The ``key`` column of the first row of ``case`` at ``(n, batch, sparsity)`` as a finite float, or ``None``.

    ``ok_only`` skips rows that are not :func:`~.io.measured` (skipped or failed cases) and reads the first
    measured one; without it the first matching row answers whatever its status (the page's main tables
    are built from rows already filtered)."""
    for r in rows:
        if r["case"] == case and int(r["n"]) == n and int(r["batch"]) == batch and _same_s(r, sparsity) \
                and (not ok_only or measured(r)):
            return finite(r.get(key))
    return None


def ns_of(rows, batch=1):
    """The sequence lengths measured at ``batch``, ascending."""
    return sorted({int(r["n"]) for r in rows if int(r["batch"]) == batch})


def crossing(pts: list[tuple[int, float, float]]) -> tuple[int | None, float | None]:
    """Where a method overtakes dense: ``pts`` are ``(n, method_ms, dense_ms)`` by increasing ``n``.

    Returns ``(i, n_cross)``: ``i`` the index of the first point from which the method is faster at every
    later point (``None`` when it is not faster at the last one), and ``n_cross`` the log-log
    interpolation of where the time ratio crosses 1 between points ``i - 1`` and ``i`` (``None`` when
    ``i`` is 0 or ``None``)."""
    faster = [t < d for _, t, d in pts]
    if not pts or not faster[-1]:
        return None, None
    i = len(pts) - 1
    while i > 0 and faster[i - 1]:
        i -= 1
    if i == 0:
        return 0, None
    (n0, t0, d0), (n1, t1, d1) = pts[i - 1], pts[i]
    l0, l1 = math.log(t0 / d0), math.log(t1 / d1)
    x = math.log(n0) - l0 / (l1 - l0) * (math.log(n1) - math.log(n0)) if l1 != l0 else math.log(n1)
    return i, math.exp(x)


def break_even(rows, total_case, s, dense_case="attention:sdpa-cudnn"):
    """``(grid_n, interpolated_n, note)``: the smallest measured N from which ``total_case`` at sparsity
    ``s`` beats ``dense_case`` at every longer measured N (B = 1), and a log-log interpolation of where
    the ratio crosses 1 between the last slower and the first faster point (:func:`crossing`)."""
    pts = []
    for n in ns_of(rows):
        t, d = value(rows, total_case, n, sparsity=s), value(rows, dense_case, n)
        if t is not None and d is not None:
            pts.append((n, t, d))
    if not pts:
        return None, None, "not measured"
    i, x = crossing(pts)
    if i is None:
        return None, None, f"not reached up to {nlabel(pts[-1][0])}"
    n = pts[i][0]
    if x is None:
        return n, None, f"at or below {nlabel(n)} (faster at every measured N)"
    return n, x, f"{nlabel(n)} on the grid (~{x:.0f} interpolated)"


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
    """``ok`` (True / False / None) as the page prints it: **met**, **not met**, not measured."""
    return "not measured" if ok is None else ("**met**" if ok else "**not met**")
