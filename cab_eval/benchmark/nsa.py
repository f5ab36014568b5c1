"""``cab bench nsa``: forward and forward+backward time of NSA attention against dense causal SDPA.

What is measured, per sequence length ``N`` (B = 1, ``--heads``/``--kv-heads`` query/KV heads,
``--head-dim``, ``--dtype``):

* ``dense-<backend>``: causal :func:`torch.nn.functional.scaled_dot_product_attention` under one SDPA
  backend (``--dense``: cuDNN, flash, ...), with grouped heads (``enable_gqa``); where a backend refuses
  GQA, K/V are repeated per query head (the repeat is counted in the time) and the status column says so;
* ``nsa`` / ``nsa-<selection>``: :class:`cab_attention.nsa.NSAAttention` (compressed, selected and
  sliding-window branches; ``--block-size``, ``--num-selected``, ``--window``, compression
  ``l = d = block_size``) with NSA's own block choice (``nsa``) or a library selector (``cab``,
  ``antidiagonal``, ...), FlexAttention on CUDA (the first call compiles). ``--flex-blocks`` adds the
  same module with coarser FlexAttention blocks (``flex_block_size``): rows ``nsa@flex128``,
  ``nsa-cab@flex128``, ... (the plain labels are FlexAttention blocks equal to the NSA block).

Each case is timed twice per repetition: the forward alone, with autograd on (as in training; its graph
is dropped: a no-grad forward would compile a second FlexAttention graph per length), and the forward
plus the backward of a given ``dout``. The figures are medians of CUDA-event timings over ``--reps``
repetitions after ``--warmup`` ones, alternating two input sets; ``peak_gib`` is
``torch.cuda.max_memory_allocated()`` over the case (inputs included). A case that fails (out of
memory, a backend that refuses the shape, a compile error) becomes a row with ``error: ...`` in its
status and the others go on; once ``--time-budget`` seconds have passed, what has not started is
recorded as skipped (a whole length as method ``all``).

The CSV (``--out``, default ``runs/bench-nsa/<device>-<date>.csv``) is written row by row, so that an
interrupted run keeps its finished rows; the plot (``.png``) and a markdown summary (``.md``, also
printed) go beside it. ``--dry-run`` runs a tiny configuration on the CPU with host timers (the exact
dense-mask NSA path, SDPA's math backend, float32): for testing the harness only, never a result.
``scripts/gpu_nsa.py`` runs the same measurement (:func:`speed`) inside its GPU check. ``--profile``
writes, after each NSA case, a ``torch.profiler`` table of one more forward+backward (by device time
and by host time) to ``<out>-profile/<method>-<N>.txt``: where the time goes, not a timing.

Usage: ``cab bench nsa [--n 8k,16k,32k,64k] [--heads 32] [--kv-heads 8] [--head-dim 128]
[--block-size 64] [--num-selected 16] [--window 512] [--selections nsa,cab,antidiagonal]
[--flex-blocks 128,64] [--dense cudnn,flash] [--warmup 3] [--reps 10] [--dtype bf16] [--time-budget S]
[--out FILE.csv] [--profile] [--dry-run]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from cab_attention.nsa import NSA_SELECTIONS, NSAAttention

from .cli import int_at_least, names_from, parse_sizes, positive_seconds
from .io import environment
from .nsa_output import FIELDS, RowWriter, plot_speed, summary

__all__ = [  # the outputs (FIELDS, RowWriter, plot_speed, summary) are re-exported from nsa_output
    "DENSE_BACKENDS", "DTYPES", "FIELDS", "RowWriter", "SELECTION_OPTIONS", "SpeedConfig", "build_parser",
    "config_from_args", "dense_fn", "dry_run_config", "event_timer", "gpu_config", "main", "make_inputs",
    "method_name", "nsa_module", "plot_speed", "profile_case", "run", "speed", "summary", "time_case",
]

#: ``--dense`` names -> ``torch.nn.attention.SDPBackend`` members.
DENSE_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Selector options spelled out (``antidiagonal``'s default stride today), so that the figures stay
#: comparable when the library's defaults move.
SELECTION_OPTIONS: dict[str, dict[str, Any]] = {"antidiagonal": {"stride": 8}}
DEFAULT_OUT_DIR = Path("runs/bench-nsa")

Inputs = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SpeedConfig:
    """One speed sweep: lengths, the attention shape, the methods and the timing repetitions.

    ``dense_backends`` are ``SDPBackend`` member names (``"CUDNN_ATTENTION"``); ``backend`` is the NSA
    module's (``"flex"`` on CUDA, ``"reference"`` for the CPU dry run); ``flex_blocks`` the FlexAttention
    block sizes to measure each selection at, in order (``block_size`` or multiples). Invalid values raise
    ``ValueError`` naming the field (the NSA module's own checks run on the meta device)."""

    lengths: tuple[int, ...]
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    num_selected: int
    window: int
    selections: tuple[str, ...]
    dense_backends: tuple[str, ...]
    dtype: torch.dtype
    backend: str
    warmup: int
    reps: int
    flex_blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        from torch.nn.attention import SDPBackend

        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        for name in ("heads", "kv_heads", "head_dim", "reps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive ints, got {self.lengths!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        bad = [b for b in self.dense_backends if not hasattr(SDPBackend, b)]
        if bad:
            raise ValueError(f"dense_backends must be SDPBackend names such as CUDNN_ATTENTION, got {bad}")
        bad = [s for s in self.selections if s not in NSA_SELECTIONS]
        if bad:
            raise ValueError(f"selections must be among {NSA_SELECTIONS}, got {bad}")
        if not self.selections and not self.dense_backends:
            raise ValueError("selections and dense_backends are both empty: nothing to measure")
        if len(set(self.flex_blocks)) != len(self.flex_blocks):
            raise ValueError(f"flex_blocks must not repeat a size, got {self.flex_blocks!r}")
        with torch.device("meta"):  # the module's own checks (block size, budget, window, options, backend)
            for s in self.selections:
                for fb in self.flex_blocks or (None,):
                    nsa_module(s, self, torch.device("meta"), fb)
        if self.backend != "flex" and set(self.flex_blocks) - {self.block_size}:
            raise ValueError(f"flex_blocks other than block_size={self.block_size} need backend='flex' (the "
                             f"{self.backend!r} path has no FlexAttention blocks), got {self.flex_blocks!r}")

    def nsa_layouts(self) -> tuple[int, ...]:
        """The FlexAttention block sizes to measure, in order (the NSA block when none is given)."""
        return self.flex_blocks or (self.block_size,)


def gpu_config() -> SpeedConfig:
    """The GPU measurement: 8k-64k tokens, Llama-3-8B's attention shape, bf16, NSA's paper settings;
    FlexAttention at 128-token blocks first (a plain compile), then at the NSA block (a tile search)."""
    return SpeedConfig(lengths=(8192, 16384, 32768, 65536), heads=32, kv_heads=8, head_dim=128, block_size=64,
                       num_selected=16, window=512, selections=("nsa", "cab", "antidiagonal"),
                       dense_backends=("CUDNN_ATTENTION", "FLASH_ATTENTION"), dtype=torch.bfloat16, backend="flex",
                       warmup=3, reps=10, flex_blocks=(128, 64))


def dry_run_config() -> SpeedConfig:
    """A tiny CPU configuration (the exact reference path, SDPA's math backend): tests the harness only."""
    return SpeedConfig(lengths=(256, 512), heads=4, kv_heads=2, head_dim=32, block_size=32, num_selected=4, window=64,
                       selections=("nsa", "cab", "antidiagonal"), dense_backends=("MATH",), dtype=torch.float32,
                       backend="reference", warmup=1, reps=2)


def method_name(kind: str, name: str, flex_block: int | None = None, block_size: int | None = None) -> str:
    """Row label: ``dense-<sdpbackend, lower case>``, ``nsa`` or ``nsa-<selection>``, with ``@flex<size>``
    when FlexAttention's block (``flex_block``) is not the NSA block (``block_size``)."""
    if kind == "dense":
        return f"dense-{name.lower()}"
    label = "nsa" if name == "nsa" else f"nsa-{name}"
    return label if flex_block is None or flex_block == block_size else f"{label}@flex{flex_block}"


def event_timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """``run(fn) -> ms`` of one call: CUDA events on CUDA (synchronised after), a host timer elsewhere."""
    if device.type == "cuda":
        def run(fn: Callable[[], Any]) -> float:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            return s.elapsed_time(e)
    else:
        def run(fn: Callable[[], Any]) -> float:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
    return run


def time_case(make_fn: Callable[..., torch.Tensor], sets: Inputs, dev: torch.device, warmup: int, reps: int) -> tuple[float, float]:
    """Median ms of forward and of forward+backward, alternating input sets.

    ``make_fn(q, k, v) -> out`` with q ``[1, Hq, N, D]``, k, v ``[1, Hkv, N, D]``; ``sets`` are
    ``(q, k, v, dout)`` tuples (q, k, v requiring grad). The forward is timed with autograd on (as in
    training; its graph is dropped): a no-grad forward would compile a second FlexAttention graph per
    length, which the time budget cannot afford."""
    timer = event_timer(dev)
    fwd, both = [], []
    for i in range(warmup + reps):
        q, k, v, dout = sets[i % len(sets)]
        for t in (q, k, v):
            t.grad = None

        def f():
            make_fn(q, k, v)

        def fb():
            make_fn(q, k, v).backward(dout)

        a, b_ = timer(f), timer(fb)
        if i >= warmup:
            fwd.append(a)
            both.append(b_)
    return statistics.median(fwd), statistics.median(both)


def dense_fn(backend_name: str) -> tuple[Callable[..., torch.Tensor], dict[str, bool]]:
    """Causal SDPA under one backend (``SDPBackend`` member name) -> ``(fn(q, k, v), state)``.

    ``state["gqa"]`` turns ``False`` once the backend refuses grouped heads; from then on K/V are
    repeated per query head (the repeat is inside the timed call)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    state = {"gqa": True}

    def fn(q, k, v):
        with sdpa_kernel([backend]):
            if state["gqa"]:
                try:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                except RuntimeError:
                    state["gqa"] = False  # this backend refuses GQA: repeat K/V (counted in the time)
            g = q.shape[1] // k.shape[1]
            return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True)

    return fn, state


def nsa_module(selection: str, cfg: SpeedConfig, dev: torch.device, flex_block: int | None = None) -> NSAAttention:
    """The NSA attention of one selection at ``cfg``'s shape (FlexAttention block ``flex_block``, default
    the NSA block), on ``dev`` in ``cfg.dtype``."""
    m = NSAAttention(cfg.head_dim, cfg.heads, cfg.kv_heads, block_size=cfg.block_size, num_selected=cfg.num_selected,
                     window=cfg.window, selection=selection, selection_options=SELECTION_OPTIONS.get(selection),
                     backend=cfg.backend, flex_block_size=flex_block)
    return m.to(dev, cfg.dtype)


def make_inputs(cfg: SpeedConfig, n: int, dev: torch.device) -> Inputs:
    """Two ``(q, k, v, dout)`` sets at length ``n`` (seeded by ``n``), q, k, v requiring grad."""
    gen = torch.Generator(device=dev).manual_seed(n)
    hq, hkv, d, dtype = cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.dtype
    sets = []
    for _ in range(2):
        q = torch.randn(1, hq, n, d, device=dev, dtype=dtype, generator=gen).requires_grad_(True)
        k = torch.randn(1, hkv, n, d, device=dev, dtype=dtype, generator=gen).requires_grad_(True)
        v = torch.randn(1, hkv, n, d, device=dev, dtype=dtype, generator=gen).requires_grad_(True)
        sets.append((q, k, v, torch.randn(1, hq, n, d, device=dev, dtype=dtype, generator=gen)))
    return sets


def profile_case(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], dev: torch.device, path: Path) -> None:
    """One forward+backward of ``fn`` under ``torch.profiler``; writes its op table by device time (CUDA)
    and by host time to ``path``: where the time goes (profiling slows the call: not a timing)."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v, dout = inputs
    for t in (q, k, v):
        t.grad = None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn(q, k, v).backward(dout)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    table = prof.key_averages()
    parts = []
    if dev.type == "cuda":
        parts.append("# by self device time\n" + table.table(sort_by="self_device_time_total", row_limit=30))
    parts.append("# by host time (with children)\n" + table.table(sort_by="cpu_time_total", row_limit=30))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(parts) + "\n")


def speed(cfg: SpeedConfig, dev: torch.device, log: Callable[[str], Any], deadline: float,
          on_row: Callable[[dict[str, Any]], Any] | None = None, profile_dir: Path | None = None) -> list[dict[str, Any]]:
    """Time every method at every length of ``cfg``; one row per (length, method).

    Rows: ``N, method, fwd_ms, fwd_bwd_ms, peak_gib, wall_s, status`` (``status`` is ``ok``, ``ok (K/V
    repeated: ...)``, ``error: <type>: <message>`` with NaN times, or ``skipped (time budget)`` without
    times once ``time.time() > deadline``). ``on_row(row)`` is called after each row (the CLI writes it).
    ``profile_dir``: after each measured NSA case, :func:`profile_case` writes ``<method>-<N>.txt`` there."""
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    methods = [(method_name("dense", b), "dense", b) for b in cfg.dense_backends]
    methods += [(method_name("nsa", s, fb, cfg.block_size), "nsa", (s, fb)) for fb in cfg.nsa_layouts() for s in cfg.selections]
    for n in cfg.lengths:
        if time.time() > deadline:
            log(f"speed N={n}: skipped (time budget)")
            add({"N": n, "method": "all", "status": "skipped (time budget)"})
            continue
        sets = make_inputs(cfg, n, dev)
        for method, kind, name in methods:
            if time.time() > deadline:
                add({"N": n, "method": method, "status": "skipped (time budget)"})
                continue
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            state = None
            try:  # the module is built here, so that a failing constructor is one error row too
                if kind == "dense":
                    fn, state = dense_fn(name)
                else:
                    fn = nsa_module(name[0], cfg, dev, name[1])
                f_ms, fb_ms = time_case(fn, sets, dev, cfg.warmup, cfg.reps)
                status = "ok" if state is None or state["gqa"] else "ok (K/V repeated: backend refused GQA)"
            except Exception as e:  # record and continue: one failing backend must not hide the others
                f_ms = fb_ms = float("nan")
                status = f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
            wall = time.time() - t0
            mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
            if profile_dir is not None and kind == "nsa" and status == "ok":
                try:  # a profile is a diagnosis: its failure is logged, the timing row stands
                    profile_case(fn, sets[0], dev, profile_dir / f"{method}-{n}.txt")
                except Exception as e:  # noqa: BLE001
                    log(f"profile N={n} {method} failed: {type(e).__name__}: {e}")
            fn = None
            add({"N": n, "method": method, "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms, "peak_gib": mem,
                 "wall_s": wall, "status": status})
            log(f"speed N={n} {method}: fwd {f_ms:.2f} ms, fwd+bwd {fb_ms:.2f} ms, peak {mem:.1f} GiB, "
                f"{wall:.1f} s incl. warm-up; {status}")
        del sets
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


_positive = int_at_least(1, "a positive integer")
_non_negative = int_at_least(0, "an integer >= 0")
_selections = names_from(NSA_SELECTIONS)
_dense = names_from(DENSE_BACKENDS)


def build_parser() -> argparse.ArgumentParser:
    """Options default to the GPU measurement (:func:`gpu_config`); with ``--dry-run`` to :func:`dry_run_config`.
    Any option given overrides the preset."""
    p = argparse.ArgumentParser(prog="cab bench nsa", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=parse_sizes, default=None, help="sequence lengths (default 8k,16k,32k,64k)")
    p.add_argument("--heads", type=_positive, default=None, help="query heads (default 32)")
    p.add_argument("--kv-heads", type=_positive, default=None, help="KV heads (default 8)")
    p.add_argument("--head-dim", type=_positive, default=None, help="head dimension (default 128)")
    p.add_argument("--block-size", type=_positive, default=None,
                   help="NSA selection block = compression block and stride (default 64)")
    p.add_argument("--num-selected", type=_positive, default=None, help="selected blocks per query block (default 16)")
    p.add_argument("--window", type=_positive, default=None, help="sliding window in tokens (default 512)")
    p.add_argument("--selections", type=_selections, default=None,
                   help=f"comma list of NSA selections (default nsa,cab,antidiagonal; any of {', '.join(NSA_SELECTIONS)})")
    p.add_argument("--flex-blocks", type=parse_sizes, default=None,
                   help="FlexAttention block sizes to measure each selection at, in order: the NSA block or multiples "
                        "(default 128,64; rows at a size other than the NSA block are labelled @flex<size>)")
    p.add_argument("--dense", type=_dense, default=None,
                   help=f"comma list of dense SDPA backends (default cudnn,flash; any of {', '.join(DENSE_BACKENDS)})")
    p.add_argument("--warmup", type=_non_negative, default=None, help="untimed repetitions first (default 3)")
    p.add_argument("--reps", type=_positive, default=None, help="timed repetitions, median reported (default 10)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16")
    p.add_argument("--time-budget", type=positive_seconds, default=None,
                   help="seconds; what has not started when they are spent is skipped (and recorded as skipped)")
    p.add_argument("--out", type=Path, default=None, help=f"results CSV (default {DEFAULT_OUT_DIR}/<device>-<date>.csv)")
    p.add_argument("--profile", action="store_true",
                   help="after each NSA case, write a torch.profiler table of one forward+backward to <out>-profile/")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny config on the CPU with host timers (reference NSA path, SDPA math, fp32): tests the harness only")
    return p


def config_from_args(args: argparse.Namespace) -> SpeedConfig:
    """The preset of ``args.dry_run`` with every given option applied; ``ValueError`` naming a bad one."""
    base = dry_run_config() if args.dry_run else gpu_config()
    given = {
        "lengths": None if args.n is None else tuple(args.n),
        "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "block_size": args.block_size,
        "num_selected": args.num_selected, "window": args.window,
        "selections": None if args.selections is None else tuple(args.selections),
        "dense_backends": None if args.dense is None else tuple(DENSE_BACKENDS[d] for d in args.dense),
        "warmup": args.warmup, "reps": args.reps, "dtype": None if args.dtype is None else DTYPES[args.dtype],
        "flex_blocks": None if args.flex_blocks is None else tuple(args.flex_blocks),
    }
    if args.flex_blocks is None and args.block_size is not None:
        # The preset's sizes were for its own block: that one becomes the given block, the coarser ones stay
        # where they still are a multiple of it.
        mapped = (args.block_size if fb == base.block_size else fb for fb in base.flex_blocks)
        given["flex_blocks"] = tuple(dict.fromkeys(fb for fb in mapped if fb >= args.block_size and fb % args.block_size == 0))
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def run(args: argparse.Namespace, cfg: SpeedConfig) -> tuple[list[dict[str, Any]], Path]:
    """Measure ``cfg`` and write the CSV row by row, then the plot; -> (rows, CSV path)."""
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("cab bench nsa needs a CUDA GPU (or --dry-run for a tiny CPU check of the harness)")
    dev = torch.device("cuda" if cuda else "cpu")
    env = environment(cuda)
    path = args.out or DEFAULT_OUT_DIR / f"{env['slug']}-{env['date']}.csv"
    dtype = str(cfg.dtype).replace("torch.", "")
    common = {**{k: v for k, v in env.items() if k != "slug"}, "dtype": dtype, "heads": cfg.heads,
              "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "block_size": cfg.block_size,
              "num_selected": cfg.num_selected, "window": cfg.window, "nsa_backend": cfg.backend,
              "warmup": cfg.warmup, "reps": cfg.reps}
    timer = "CUDA events" if cuda else "HOST TIMER on CPU (not a result)"
    print(f"cab bench nsa: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; timer: {timer}\n"
          f"  B=1 Hq={cfg.heads} Hkv={cfg.kv_heads} D={cfg.head_dim} {dtype}; N={list(cfg.lengths)}; NSA block "
          f"{cfg.block_size}, n={cfg.num_selected}, window {cfg.window}, backend {cfg.backend}, FlexAttention blocks "
          f"{list(cfg.nsa_layouts())}; selections "
          f"{list(cfg.selections)}; dense {list(cfg.dense_backends)}; warmup {cfg.warmup}, reps {cfg.reps}; "
          f"budget {'none' if args.time_budget is None else f'{args.time_budget:.0f} s'}; csv {path}", flush=True)
    deadline = time.time() + (args.time_budget if args.time_budget is not None else math.inf)
    profile_dir = path.with_name(path.stem + "-profile") if args.profile else None
    rows = speed(cfg, dev, lambda s: print(s, flush=True), deadline, on_row=RowWriter(path, common), profile_dir=profile_dir)
    try:
        plot_speed(rows, path.with_suffix(".png"), title=f"NSA vs dense SDPA, {dtype}, {env['device']}")
    except Exception as e:  # noqa: BLE001 - the plot is a convenience; the CSV is the result
        print(f"plot failed: {type(e).__name__}: {e}")
    return rows, path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    rows, path = run(args, cfg)
    dense_ref = method_name("dense", cfg.dense_backends[0]) if cfg.dense_backends else None
    table = summary(rows, dense_ref)
    if args.dry_run:
        table = "CPU dry run with host timers: tests the harness only, not a result.\n\n" + table
    path.with_suffix(".md").write_text(table + "\n")
    print(f"\n{len(rows)} rows -> {path}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
