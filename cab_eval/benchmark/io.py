"""The benchmarks' results: one CSV row per measured case, and the recorder that measures and keeps them.

The CSV has the columns ``case,n,batch,heads,kv_heads,head_dim,sparsity,ms,peak_mb,device,torch,date``
first and then ``block_size,density,tflops,status,triton,backend,kept_tflops`` (``triton``: its version,
``none`` without it; ``backend``: the attention backend of ``attention:``/``total:`` rows; ``kept_tflops``:
the kept-tile rate, every kept tile counted whole, where ``tflops`` counts a causal diagonal tile at half).
Case names are
``<kind>:<method>[<impl>][:<stage>][@<variant>]``:

* ``predictor:cab[torch]`` everything before the attention kernel (coarsen, score, select, and the
  FlexAttention ``BlockMask``); ``predictor:cab[torch]:coarsen|score|select|mask`` its stages;
* ``attention:sdpa-flash|sdpa-cudnn|flex-dense`` dense causal baselines, ``attention:cab-sparse`` the
  FlexAttention kernel alone over CAB's mask;
* ``total:<selector>[impl]`` predictor plus attention in one call, as a user runs it;
* ``attention:cab-sparse[triton]`` the Triton block-sparse kernel alone (``backend="triton"``);
  ``total:<selector>[impl]+triton`` predictor plus the Triton kernel (no BlockMask); plain ``total:``
  rows run FlexAttention; ``predictor:<selector>[triton-graph]`` the Triton predictor through one CUDA
  graph per shape (:func:`cab_attention.kernels.predict_graphed`); ``cab-default`` is ``cab`` with the
  library's default options (``cab`` rows use a named configuration: see ``implementations.bench_options``);
* ``[torch]`` or ``[triton]`` names the predictor implementation that ran; ``@bs128`` selection at 128
  tokens, ``@merge128`` a 64-token selection merged into 128-token tiles (see
  :mod:`cab_eval.benchmark.attention`).

A results file merges: a row replaces an older one with the same key (case, n, batch, heads,
kv_heads, head_dim, sparsity).
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .formatting import finite
from .timing import bench_ms, free_memory, is_oom, peak_mb, sync


COLUMNS = [
    "case", "n", "batch", "heads", "kv_heads", "head_dim", "sparsity", "ms", "peak_mb",
    "device", "torch", "date", "block_size", "density", "tflops", "status",
    "triton", "backend", "kept_tflops",
]
KEY = ("case", "n", "batch", "heads", "kv_heads", "head_dim", "sparsity")


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def environment(cuda: bool) -> dict[str, str]:
    """Device label (CPU rows say ``host timer``), a file-name slug, torch version and date."""
    if cuda:
        name = torch.cuda.get_device_name(0)
        slug = slugify(name)
    else:
        name = f"cpu ({platform.machine() or 'unknown'}) host timer"
        slug = "cpu-tiny"
    try:
        import triton

        triton_v = triton.__version__
    except Exception:  # noqa: BLE001 - no triton: the column says so
        triton_v = "none"
    return {"device": name, "slug": slug, "torch": torch.__version__, "triton": triton_v,
            "date": _dt.date.today().isoformat()}


def row(cfg: Any, case: str, n: int, batch: int, *, sparsity: float | None = None, ms: float | None = None,
        peak: float | None = None, block_size: int | None = None, density: float | None = None,
        tflops: float | None = None, status: str = "ok", backend: str | None = None,
        kept_tflops: float | None = None) -> dict[str, Any]:
    def f(x, nd):
        return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), nd)

    return {
        "case": case, "n": n, "batch": batch, "heads": cfg.heads, "kv_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "sparsity": "" if sparsity is None else sparsity, "ms": f(ms, 4),
        "peak_mb": f(peak, 1), "device": cfg.env["device"], "torch": cfg.env["torch"], "date": cfg.env["date"],
        "block_size": "" if block_size is None else block_size, "density": f(density, 4),
        "tflops": f(tflops, 1), "status": status, "triton": cfg.env.get("triton", ""),
        "backend": backend or "", "kept_tflops": f(kept_tflops, 1),
    }


class CaseRecorder:
    """Measures benchmark cases and records one CSV row per case (``self.rows``): a warm-up call, peak
    memory, the timing; errors and out-of-memory become a row with a status instead of ending the run;
    prints one line per case and enforces the time budget (``cfg.budget``)."""

    def __init__(self, cfg: Any, log=print):
        self.cfg = cfg
        self.rows: list[dict[str, Any]] = []
        self.log = log
        self.written = False
        # Called after every new row (the CLI writes the CSV there), so that a run killed mid-group keeps
        # every case measured before the one in flight.
        self.on_row: Callable[[], Any] | None = None

    def _added(self) -> None:
        if self.on_row is not None:
            self.on_row()

    def skip(self, case: str, n: int, batch: int, why: str, **kw) -> None:
        self.rows.append(row(self.cfg, case, n, batch, status=f"skipped: {why}", **kw))
        self._added()
        sp = kw.get("sparsity")
        self.log(f"  {case:44s} n={n:<7d} B={batch:<3d} s={'' if sp is None else f'{sp:g}':5s} skipped ({why})")

    def measure(self, case: str, n: int, batch: int, make_fn: Callable[[], Callable[[], Any] | None], *,
                sparsity: float | None = None, block_size: int | None = None, density: float | None = None,
                flops: float | Callable[[], float] | None = None, memory: bool = True,
                budget_key: str | None = None, backend: str | None = None,
                kept_flops: float | Callable[[], float | None] | None = None,
                check: Callable[[Any], str | None] | None = None) -> float | None:
        """Time ``make_fn()()``; return ms (or ``None`` on skip/failure). ``make_fn`` builds the callable
        (so that its setup errors are caught too); it may return ``None`` to mean "not applicable".
        ``flops`` gives the ``tflops`` column, ``kept_flops`` the ``kept_tflops`` column (the kept-tile
        rate); ``check(output of the warm-up call)`` returns ``None`` when the output is right, else why
        not, which becomes the row's status (the time is still recorded, but the row is not ``ok``)."""
        cfg = self.cfg
        key = budget_key or case
        kw = dict(sparsity=sparsity, block_size=block_size, backend=backend)
        if not cfg.budget.allows(key, n, batch):
            self.skip(case, n, batch, "budget", **kw)
            return None
        t0 = time.monotonic()
        warm_s = 0.0
        try:
            fn = make_fn()
            if fn is None:
                return None
            out = fn()  # warm-up: compiles, autotunes, allocates
            sync(cfg.cuda)
            bad = check(out) if check is not None else None
            del out
            warm_s = time.monotonic() - t0
            peak = peak_mb(fn, cfg) if memory else None
            ms = bench_ms(fn, cfg)
        except Exception as e:  # noqa: BLE001 - log and go on
            status = "oom" if is_oom(e) else f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            self.rows.append(row(cfg, case, n, batch, status=status, density=density, **kw))
            self._added()
            self.log(f"  {case:44s} n={n:<7d} B={batch:<3d} FAILED {status}")
            if not is_oom(e):
                traceback.print_exc(limit=3, file=sys.stdout)
            cfg.budget.record(key, n, batch, time.monotonic() - t0, 0.0)
            free_memory(cfg.cuda)
            return None
        cfg.budget.record(key, n, batch, warm_s, ms)
        fl = flops() if callable(flops) else flops
        tf = fl / (ms * 1e-3) / 1e12 if (fl and ms > 0) else None
        kfl = kept_flops() if callable(kept_flops) else kept_flops
        ktf = kfl / (ms * 1e-3) / 1e12 if (kfl and ms > 0) else None
        self.rows.append(row(cfg, case, n, batch, ms=ms, peak=peak, density=density, tflops=tf, kept_tflops=ktf,
                             status="ok" if bad is None else f"mismatch: {bad}", **kw))
        self._added()
        extra = f" peak={peak:8.1f} MiB" if peak is not None else ""
        extra += f" {tf:6.1f} TFLOP/s" if tf is not None else ""
        extra += f" kept {ktf:6.1f} TFLOP/s" if ktf is not None else ""
        extra += f" MISMATCH {bad}" if bad is not None else ""
        extra += f" density={density:.4f}" if density is not None else ""
        s = "" if sparsity is None else f"{sparsity:g}"
        self.log(f"  {case:44s} n={n:<7d} B={batch:<3d} s={s:5s} {ms:10.4f} ms{extra}  [warm {warm_s:.1f} s, "
                 f"case {time.monotonic() - t0:.1f} s]")
        return ms


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def measured(r: dict[str, Any]) -> bool:
    """Whether row ``r`` holds a measurement: its status is ``ok...`` (or absent) and its ``ms`` is finite."""
    return r.get("status", "ok").startswith("ok") and finite(r.get("ms")) is not None


def write_results(path: Path, rows: Iterable[dict[str, Any]], fresh: bool = False) -> Path:
    """Merge ``rows`` into the CSV at ``path``: a row replaces an older one with the same key
    (case, n, batch, heads, kv_heads, head_dim, sparsity); other rows are kept."""
    rows = [{c: r.get(c, "") for c in COLUMNS} for r in rows]

    def key(r):
        return tuple(str(r.get(c, "")) for c in KEY)

    new_keys = {key(r) for r in rows}
    old = [] if fresh else [r for r in read_csv(path) if key(r) not in new_keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows([{c: r.get(c, "") for c in COLUMNS} for r in old] + rows)
    os.replace(tmp, path)
    return path
