"""Timers of the benchmarks: what one measured figure is.

* on CUDA every figure is a median of :func:`triton.testing.do_bench` (``return_mode="median"``,
  ``warmup``/``rep`` in milliseconds, CUDA events, L2 flushed between calls);
* on CPU (``--dry-run`` or ``--device cpu --tiny``) a host-timer median of a few calls, for testing the
  command line and its files only (the device column then says ``cpu ... host timer``).

Peak memory is ``torch.cuda.max_memory_allocated()`` during one call minus the memory allocated just
before it (the inputs and anything else alive), in MiB; ``None`` on CPU. :class:`Budget` predicts what
a case will cost so that a run under ``--budget-s`` skips what would not fit.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

import torch


def setup_torch(cuda: bool) -> Callable[[], None]:
    """Process settings for a benchmark run; returns a function that restores them.

    CUDA: raise dynamo's recompile limits (every (N, B, block) is a new static-shape FlexAttention; past
    the limit dynamo would fall back to eager flex_attention, which ignores the block sparsity) and make
    hitting them an error rather than a silent fallback; no TF32. CPU: one thread (the dry run only
    tests the command line, and the CI machine is shared)."""
    import torch._dynamo.config as dc

    saved: dict[str, Any] = {}
    if cuda:
        for name, value in (("recompile_limit", 4096), ("accumulated_recompile_limit", 8192),
                            ("fail_on_recompile_limit_hit", True)):
            if hasattr(dc, name):
                saved[name] = getattr(dc, name)
                setattr(dc, name, value)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)

    def restore() -> None:
        for name, value in saved.items():
            setattr(dc, name, value)
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.set_num_threads(threads)

    return restore


def device_refusal(prog: str, cuda: bool, dry_run: bool, no_cuda_hint: str) -> str | None:
    """Why a command with its own ``--dry-run`` must refuse the device it was given, or ``None``.

    ``cuda`` without CUDA gets ``"<prog>: CUDA is not available; <no_cuda_hint>"`` (each command names
    its own dry run); ``--device cpu`` outside a dry run is refused because host timings are for
    testing the command only. ``cab bench predictor|attention`` check their own ``--tiny`` rule in
    :func:`~cab_eval.benchmark.cli.resolve`."""
    if cuda and not torch.cuda.is_available():
        return f"{prog}: CUDA is not available; {no_cuda_hint}"
    if not cuda and not dry_run:
        return f"{prog}: --device cpu is for --dry-run only (host timers)"
    return None


class Budget:
    """Wall-time budget. A case's cost is predicted from the last case of the same name: its warm-up
    call (compile, autotune; not scaled) plus the timing loop, about ``10 t + warmup + rep`` with ``t``
    its median scaled quadratically in N and linearly in B (conservative for the predictor). A case
    that would not fit is skipped and logged; later, cheaper cases still run."""

    def __init__(self, seconds: float | None, warmup_ms: float = 25.0, rep_ms: float = 75.0):
        self.seconds = seconds
        self.loop_s = (warmup_ms + rep_ms) / 1000.0
        self.t0 = time.monotonic()
        self.last: dict[str, tuple[int, int, float, float]] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def estimate(self, name: str, n: int, batch: int) -> float:
        if name not in self.last:
            return 0.0
        n0, b0, warm_s, ms = self.last[name]
        t = ms / 1000.0 * max(1.0, (n / n0) ** 2 * batch / b0)
        return warm_s + 10 * t + self.loop_s + 0.2

    def allows(self, name: str, n: int, batch: int, reserve: float = 2.0) -> bool:
        if self.seconds is None:
            return True
        return self.remaining() - reserve > self.estimate(name, n, batch)

    def record(self, name: str, n: int, batch: int, warm_s: float, ms: float) -> None:
        self.last[name] = (n, batch, warm_s, ms)


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def bench_ms(fn: Callable[[], Any], cfg: Any) -> float:
    """Median milliseconds of ``fn()``: triton do_bench on CUDA, a host timer on CPU (``cfg``: a
    :class:`cab_eval.benchmark.cli.Config`; its ``cuda``, ``warmup`` and ``rep`` are read)."""
    if cfg.cuda:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=cfg.warmup, rep=cfg.rep, return_mode="median"))
    times = []
    deadline = time.perf_counter() + max(cfg.rep, 1.0) / 1000.0
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 20):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
    return float(statistics.median(times))


def peak_mb(fn: Callable[[], Any], cfg: Any) -> float | None:
    """Peak memory of one call beyond what was allocated before it, in MiB (``None`` on CPU)."""
    if not cfg.cuda:
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def free_memory(cuda: bool) -> None:
    import gc

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
