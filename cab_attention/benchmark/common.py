"""What ``cab bench predictor`` and ``cab bench attention`` share: the command line, timers, inputs,
predictor implementations (torch, and the Triton kernels when present), exact tile FLOP counts, the
time budget, and the results CSV.

Timing rules:

* on CUDA every figure is a median of :func:`triton.testing.do_bench` (``return_mode="median"``,
  ``warmup``/``rep`` in milliseconds, CUDA events, L2 flushed between calls);
* on CPU (``--dry-run`` or ``--device cpu --tiny``) a host-timer median of a few calls, for testing the
  command line and its files only: the device column then says ``cpu ... host timer`` so that no CPU row
  can pass for a GPU figure.

Peak memory is ``torch.cuda.max_memory_allocated()`` during one call minus the memory allocated just
before it (the inputs and anything else alive), in MiB; empty on CPU.

The CSV has the columns of issue 4 first (``case,n,batch,heads,kv_heads,head_dim,sparsity,ms,peak_mb,
device,torch,date``) and then ``block_size,density,tflops,status``. Case names are
``<kind>:<method>[<impl>][:<stage>][@<variant>]``:

* ``predictor:cab[torch]`` everything before the attention kernel (coarsen, score, select, and the
  FlexAttention ``BlockMask``); ``predictor:cab[torch]:coarsen|score|select|mask`` its stages;
* ``attention:sdpa-flash|sdpa-cudnn|flex-dense`` dense causal baselines, ``attention:cab-sparse`` the
  FlexAttention kernel alone over CAB's mask;
* ``total:<selector>[impl]`` predictor plus attention in one call, as a user runs it;
* ``[torch]`` or ``[triton]`` names the predictor implementation that ran; ``@bs128`` selection at 128
  tokens, ``@merge128`` a 64-token selection merged into 128-token tiles (see :mod:`.attention`).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

COLUMNS = [
    "case", "n", "batch", "heads", "kv_heads", "head_dim", "sparsity", "ms", "peak_mb",
    "device", "torch", "date", "block_size", "density", "tflops", "status",
]
KEY = ("case", "n", "batch", "heads", "kv_heads", "head_dim", "sparsity")

DEFAULT_N = "1k,2k,4k,8k,16k,32k,64k,128k,256k"
TINY_N_CPU = "256,512"
TINY_N_CUDA = "1k,4k"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

NO_CUDA_MESSAGE = (
    "cab bench: CUDA is not available. These benchmarks time GPU kernels with triton's do_bench and "
    "their figures mean nothing on a CPU. Run them on a CUDA machine (scripts/gpu_check.sh does the "
    "whole set), or use --dry-run (equivalently --device cpu --tiny) for a tiny CPU grid timed with host "
    "timers, labelled as CPU, that only exercises the command line and its output files."
)


# --------------------------------------------------------------------------------------------------
# command line


def parse_sizes(text: str) -> list[int]:
    """``"1k,2k,128k"`` -> ``[1024, 2048, 131072]`` (``k`` = 1024; plain integers as they are)."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(k?)", part)
        if not m:
            raise argparse.ArgumentTypeError(f"expected sizes like 1k,2k,4096, got {part!r}")
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    if not out:
        raise argparse.ArgumentTypeError("expected at least one size")
    return out


def parse_floats(text: str) -> list[float]:
    try:
        vals = [float(p) for p in str(text).split(",") if p.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.9,0.95, got {text!r}") from e
    for v in vals:
        if not 0.0 <= v < 1.0:
            raise argparse.ArgumentTypeError(f"sparsities must be in [0, 1), got {v}")
    return vals


def parse_names(text: str) -> list[str]:
    return [p.strip() for p in str(text).split(",") if p.strip()]


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny grid (CI smoke test; with --device cpu, host timers)")
    p.add_argument("--dry-run", action="store_true", help="same as --device cpu --tiny: test the CLI and its files")
    p.add_argument("--n", type=parse_sizes, default=None, help=f"sequence lengths for B=1 (default {DEFAULT_N})")
    p.add_argument("--batches", type=parse_sizes, default=None, help="batch sizes of the batch sweep (default 8,32)")
    p.add_argument("--batch-n", type=parse_sizes, default=None, help="lengths of the batch sweep (default 4k,8k,16k)")
    p.add_argument("--sparsities", type=parse_floats, default=parse_floats("0.9,0.95,0.98"))
    p.add_argument("--batch-sparsities", type=parse_floats, default=parse_floats("0.95"),
                   help="sparsities measured in the batch sweep")
    p.add_argument("--block-sizes", type=parse_sizes, default=[64, 128],
                   help="selection block sizes; the first is the main one (default 64,128)")
    p.add_argument("--selectors", type=parse_names, default=["cab", "magnitude", "antidiagonal"])
    p.add_argument("--impl", type=parse_impls, default=["auto"],
                   help="predictor implementations, comma-separated: torch, triton (fp32, exact), triton-bf16, "
                        "triton-tf32; auto = torch,triton,triton-bf16 (the Triton ones where cab_attention.kernels runs)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--warmup", type=float, default=25.0, help="do_bench warmup in ms")
    p.add_argument("--rep", type=float, default=75.0, help="do_bench repetition time in ms")
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget; later (larger) cases are skipped")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--csv", type=Path, default=None, help="results CSV (default <out-dir>/<device>-<date>.csv)")
    p.add_argument("--fresh", action="store_true", help="overwrite the CSV instead of merging into it")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--max-antidiagonal-n", type=parse_sizes, default=[131072],
                   help="longest N at which the (fp32, O(N^2 D / 8)) antidiagonal predictor runs")
    p.add_argument("--seed", type=int, default=0)
    return p


@dataclass
class Config:
    device: str
    cuda: bool
    tiny: bool
    n: list[int]
    batches: list[int]
    batch_n: list[int]
    sparsities: list[float]
    batch_sparsities: list[float]
    block_sizes: list[int]
    selectors: list[str]
    impls: list[str]
    impl_notes: dict[str, str]
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    warmup: float
    rep: float
    budget: "Budget"
    csv_path: Path
    out_dir: Path
    fresh: bool
    plots: bool
    max_antidiagonal_n: int
    seed: int
    env: dict[str, str] = field(default_factory=dict)


def resolve(args: argparse.Namespace, prog: str) -> Config | None:
    """Validate the arguments; ``None`` (after printing why) where the command must refuse."""
    if args.dry_run:
        args.device, args.tiny = "cpu", True
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return None
    if args.device == "cpu" and not args.tiny:
        print(f"{prog}: --device cpu needs --tiny (or use --dry-run): CPU timings are for testing the "
              "command line only, never for results.", file=sys.stderr)
        return None
    cuda = args.device == "cuda"
    for bs in args.block_sizes:
        if bs < 16 or bs & (bs - 1):
            print(f"{prog}: --block-sizes must be powers of two >= 16, got {bs}", file=sys.stderr)
            return None
    if args.heads % args.kv_heads:
        print(f"{prog}: --heads must be a multiple of --kv-heads", file=sys.stderr)
        return None
    from cab_attention import SELECTORS

    bad = [s for s in args.selectors if s not in SELECTORS]
    if bad:
        print(f"{prog}: unknown selector(s) {bad}; choose from {SELECTORS}", file=sys.stderr)
        return None
    if args.tiny:
        n = args.n or parse_sizes(TINY_N_CUDA if cuda else TINY_N_CPU)
        batches = args.batches or [2]
        batch_n = args.batch_n or n[:1]
        heads, kv_heads, head_dim = (args.heads, args.kv_heads, args.head_dim) if cuda else (4, 2, 64)
        if not cuda and args.heads != 32:
            heads, kv_heads, head_dim = args.heads, args.kv_heads, args.head_dim
    else:
        n = args.n or parse_sizes(DEFAULT_N)
        batches = args.batches or [8, 32]
        batch_n = args.batch_n or parse_sizes("4k,8k,16k")
        heads, kv_heads, head_dim = args.heads, args.kv_heads, args.head_dim
    dtype = DTYPES[args.dtype]
    if not cuda and dtype == torch.float16:
        dtype = torch.float32
    impls, notes = predictor_impls(args.impl, "cuda" if cuda else "cpu")
    impls = sorted(impls, key=lambda i: i != head_impl(impls))  # the headline implementation first
    if not impls:
        print(f"{prog}: no predictor implementation available: {notes}", file=sys.stderr)
        return None
    env = environment(cuda)
    csv_path = args.csv or args.out_dir / f"{env['slug']}-{env['date']}.csv"
    return Config(
        device=args.device, cuda=cuda, tiny=args.tiny, n=n, batches=batches, batch_n=batch_n,
        sparsities=args.sparsities, batch_sparsities=args.batch_sparsities, block_sizes=args.block_sizes,
        selectors=args.selectors, impls=impls, impl_notes=notes, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, dtype=dtype, warmup=args.warmup, rep=args.rep,
        budget=Budget(args.budget_s, args.warmup, args.rep), csv_path=csv_path, out_dir=args.out_dir, fresh=args.fresh,
        plots=not args.no_plots, max_antidiagonal_n=max(args.max_antidiagonal_n), seed=args.seed, env=env,
    )


# --------------------------------------------------------------------------------------------------
# environment


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
    return {"device": name, "slug": slug, "torch": torch.__version__, "date": _dt.date.today().isoformat()}


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


# --------------------------------------------------------------------------------------------------
# time budget


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


# --------------------------------------------------------------------------------------------------
# timers


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def bench_ms(fn: Callable[[], Any], cfg: Config) -> float:
    """Median milliseconds of ``fn()``: triton do_bench on CUDA, a host timer on CPU."""
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


def peak_mb(fn: Callable[[], Any], cfg: Config) -> float | None:
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


# --------------------------------------------------------------------------------------------------
# inputs and counts


def make_inputs(cfg: Config, n: int, batch: int):
    """Random q ``[B, Hq, N, D]``, k and v ``[B, Hkv, N, D]`` on the device, in the benchmark dtype."""
    dev = "cuda" if cfg.cuda else "cpu"
    gen = torch.Generator(device=dev).manual_seed(cfg.seed + n + 7919 * batch)
    shape_q = (batch, cfg.heads, n, cfg.head_dim)
    shape_kv = (batch, cfg.kv_heads, n, cfg.head_dim)
    q = torch.randn(shape_q, generator=gen, device=dev, dtype=cfg.dtype)
    k = torch.randn(shape_kv, generator=gen, device=dev, dtype=cfg.dtype)
    v = torch.randn(shape_kv, generator=gen, device=dev, dtype=cfg.dtype)
    return q, k, v


def tile_flops(selection) -> float:
    """FLOPs of the attention tiles a selection computes: ``4 * bs^2 * D`` per kept tile per query head
    (``QK^T`` and ``PV``, a multiply-add = 2 FLOPs), a causal diagonal tile at half. Counted exactly
    from ``kv_num_blocks`` (kept tiles) and the mask's diagonal (always kept, at most one per row)."""
    g = selection.grid
    bs = g.block_size
    kept = selection.kv_num_blocks.to(torch.int64).sum().item()
    if selection.shared_kv:
        kept *= g.group
    diag = 0
    if g.causal:
        m = selection.query_head_mask()
        d = g.diagonal(m.device)
        diag = m.gather(-1, d.view(1, 1, -1, 1).expand(m.shape[0], m.shape[1], -1, 1)).sum().item()
    return 4.0 * bs * bs * g.head_dim * (kept - 0.5 * diag)


def dense_causal_flops(batch: int, heads: int, n: int, head_dim: int) -> float:
    """FLOPs of dense causal attention counted per token pair: ``4 D`` per pair ``j <= i``."""
    return 4.0 * head_dim * batch * heads * n * (n + 1) / 2


# --------------------------------------------------------------------------------------------------
# predictor implementations


def _kernels_module():
    import importlib

    return importlib.import_module("cab_attention.kernels")


# Predictor implementations: ``torch`` is :func:`cab_attention.select_blocks`; the others are
# :func:`cab_attention.kernels.predict` with these keyword arguments (``precision="fp32"`` equals the
# torch path to float32 rounding; ``"bf16"`` is the kernels' fast, approximate tensor-core path).
IMPL_OPTIONS: dict[str, dict[str, Any] | None] = {
    "torch": None,
    "triton": {},
    "triton-bf16": {"precision": "bf16"},
    "triton-tf32": {"precision": "tf32"},
}
AUTO_IMPLS = ("torch", "triton", "triton-bf16")


def parse_impls(text: str) -> list[str]:
    names = parse_names(text)
    for n in names:
        if n not in ("auto", "both") and n not in IMPL_OPTIONS:
            raise argparse.ArgumentTypeError(f"--impl takes auto or names from {tuple(IMPL_OPTIONS)}, got {n!r}")
    return names


def triton_unavailable(device: str) -> str | None:
    """Why the Triton predictor cannot run here, or ``None``."""
    if device != "cuda":
        return "the benchmarks run the Triton predictor on CUDA only"
    try:
        mod = _kernels_module()
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"cab_attention.kernels does not import: {type(e).__name__}: {e}"
    if not callable(getattr(mod, "predict", None)):
        return "cab_attention.kernels has no predict()"
    why = getattr(mod, "unavailable_reason", lambda *a: None)("cuda")
    if why:
        return why
    if not getattr(mod, "HAS_TRITON", True):
        return f"triton failed to import: {getattr(mod, 'IMPORT_ERROR', '?')}"
    return None


def predictor_impls(choice, device: str) -> tuple[list[str], dict[str, str]]:
    """Which predictor implementations run, and a note per implementation (why one did not run)."""
    names = parse_impls(choice) if isinstance(choice, str) else list(choice)
    if "auto" in names:
        names = list(AUTO_IMPLS)
    elif "both" in names:
        names = ["torch", "triton"]
    why = triton_unavailable(device)
    notes = {"torch": "cab_attention.select_blocks (PyTorch ops)"}
    out = []
    for n in dict.fromkeys(names):
        if n == "torch":
            out.append(n)
        elif why is None:
            out.append(n)
            notes[n] = f"cab_attention.kernels.predict(**{IMPL_OPTIONS[n]})"
        else:
            notes[n] = f"not run: {why}"
    if "torch" not in names:
        notes.pop("torch")
    return out, notes


def bench_options(selector: str) -> dict[str, Any]:
    """Selector options every benchmark case uses: the seed's CAB configuration (augmented Forman, keep
    lowest, max-L2), spelled out so that the recorded figures stay comparable when library defaults
    move. The default triangle proxy needs the same ``A @ A`` and costs the same within noise."""
    from cab_attention.selectors import SEED_CAB_OPTIONS

    return dict(SEED_CAB_OPTIONS) if selector == "cab" else {}


def predict_fn(impl: str, selector: str, q, k, *, sparsity: float, block_size: int) -> Callable[[], Any] | None:
    """A zero-argument callable returning a ``BlockSelection``, or ``None`` when this implementation
    does not cover ``selector``."""
    from cab_attention import select_blocks

    opts = bench_options(selector)
    if impl == "torch":
        return lambda: select_blocks(q, k, selector=selector, sparsity=sparsity, block_size=block_size, causal=True, **opts)
    mod = _kernels_module()
    if selector not in getattr(mod, "SUPPORTED_SELECTORS", ("cab",)):
        return None
    kw = dict(IMPL_OPTIONS[impl] or {})
    return lambda: mod.predict(q, k, selector=selector, sparsity=sparsity, block_size=block_size, causal=True,
                               **opts, **kw)


def build_mask_fn(impl: str) -> Callable[[Any], Any]:
    """The implementation's BlockMask builder: the kernels' own (``kernels.block_mask``) for Triton
    implementations, :meth:`BlockSelection.to_block_mask` for torch."""
    if impl != "torch":
        fn = getattr(_kernels_module(), "block_mask", None)
        if callable(fn):
            return fn
    return lambda sel: sel.to_block_mask()


def stage_fns(impl: str, q, k, *, sparsity: float, block_size: int, selector: str = "cab") -> dict[str, Callable]:
    """The predictor's stages as chained callables ``coarsen() -> score(c) -> select(s) -> mask(sel)``.

    torch: the library's own stage functions, in the order :func:`cab_attention.select_blocks` runs
    them for :func:`bench_options` (cab: augmented Forman, keep lowest, max-L2). Triton:
    ``kernels.coarsen_stage``, ``score_stage``, ``select_stage`` (the row budget included) and
    ``block_mask``.
    """
    from cab_attention.geometry import BlockGrid
    from cab_attention.selection import BlockSelection

    grid = BlockGrid.of(q, k, block_size, True)
    dev = q.device
    if impl != "torch":
        mod = _kernels_module()
        kw = dict(IMPL_OPTIONS[impl] or {})

        def t_select(sc):
            mask, num, idx = mod.select_stage(sc, grid, mod.budget_for(grid, sparsity, dev))
            return BlockSelection(mask, num, idx, grid, selector)

        return {
            "coarsen": lambda: mod.coarsen_stage(q, k, grid, "max_l2"),
            "score": lambda c: mod.score_stage(c[0], c[1], grid, selector=selector, score="forman", keep="lowest", **kw),
            "select": t_select,
            "mask": mod.block_mask,
        }

    from cab_attention import score as S
    from cab_attention.coarsen import coarsen
    from cab_attention.select import keep_first, kv_layout, rank_order

    scale = grid.head_dim**-0.5

    def do_coarsen():
        return coarsen(q, block_size, "max_l2", pad_front=grid.q_pad_front), coarsen(k, block_size, "max_l2")

    def do_score(c):
        qc, kc = c
        logits = S.coarse_logits(qc, kc, scale)
        if selector == "magnitude":
            return logits
        a = S.affinity(logits, grid.valid(dev))
        return -S.augmented_forman(a, S.redundancy(a, grid))

    def do_select(prio):
        order = rank_order(prio, grid.valid(dev), grid.forced(dev))
        mask = keep_first(order, grid.budget(sparsity, dev))
        num, idx = kv_layout(mask)
        return BlockSelection(mask, num, idx, grid, selector)

    return {"coarsen": do_coarsen, "score": do_score, "select": do_select, "mask": lambda sel: sel.to_block_mask()}


def total_fn(impl: str, selector: str, q, k, v, *, sparsity: float, block_size: int, backend: str = "flex"):
    """Predictor + BlockMask + attention in one call. torch: the public
    :func:`cab_attention.sparse_attention`, exactly what a user runs. Triton: ``kernels.predict``, then
    ``kernels.block_mask`` and the library's compiled FlexAttention (what the kernels make possible;
    :func:`cab_attention.sparse_attention` with a given selection would rebuild the mask the torch way).
    ``None`` when the implementation does not cover the selector."""
    from cab_attention import sparse_attention

    if impl == "torch":
        return lambda: sparse_attention(q, k, v, selector=selector, sparsity=sparsity, block_size=block_size,
                                        causal=True, backend=backend)
    pf = predict_fn(impl, selector, q, k, sparsity=sparsity, block_size=block_size)
    if pf is None:
        return None
    build = build_mask_fn(impl)
    from cab_attention import execute as E

    n = q.shape[2]
    if n % block_size or n != k.shape[2]:
        return lambda: sparse_attention(q, k, v, selection=pf(), block_size=block_size, causal=True, backend=backend)
    opts = E.flex_kernel_options(block_size, q.device.type)
    gqa = q.shape[1] != k.shape[1]
    flex = E._compiled_flex()
    return lambda: flex(q, k, v, block_mask=build(pf()), enable_gqa=gqa, kernel_options=opts)


# --------------------------------------------------------------------------------------------------
# flex execution with a prebuilt BlockMask


def flex_runner(q, k, v, selection, build: Callable[[Any], Any] | None = None) -> Callable[[], torch.Tensor]:
    """The FlexAttention kernel alone over a prebuilt ``BlockMask`` (the library's compiled flex and its
    kernel tile options); ``build`` makes the mask (default :meth:`BlockSelection.to_block_mask`; the
    attention benchmark passes the headline implementation's builder so that the kernel-alone and the
    end-to-end cases share one compiled FlexAttention per shape). Falls back to
    :func:`cab_attention.execute.flex_attention_blocks` (mask build included) when the lengths need
    padding."""
    from cab_attention import execute as E

    g = selection.grid
    bs = g.block_size
    if g.q_len % bs or g.kv_len % bs or g.q_len != g.kv_len:
        return lambda: E.flex_attention_blocks(q, k, v, selection)
    bm = (build or (lambda sel: sel.to_block_mask()))(selection)
    opts = E.flex_kernel_options(bs, q.device.type)
    gqa = q.shape[1] != k.shape[1]
    fn = E._compiled_flex()
    return lambda: fn(q, k, v, block_mask=bm, enable_gqa=gqa, kernel_options=opts)


def merge_selection(selection, factor: int = 2):
    """A selection at ``factor`` times the block size: a coarse tile is kept when any of its sub-blocks
    is (a superset of the original: more tiles computed, nothing dropped)."""
    from cab_attention.geometry import BlockGrid
    from cab_attention.select import kv_layout
    from cab_attention.selection import BlockSelection

    g = selection.grid
    g2 = BlockGrid(g.batch, g.q_heads, g.kv_heads, g.q_len, g.kv_len, g.head_dim, g.block_size * factor, g.causal)
    m = selection.query_head_mask()
    b, h, mq, mk = m.shape
    mq2, mk2 = g2.num_q_blocks, g2.num_kv_blocks
    if g.q_pad_front or g2.q_pad_front:
        raise ValueError("merge_selection handles aligned queries only (Nq == Nk)")
    mp = torch.nn.functional.pad(m, (0, mk2 * factor - mk, 0, mq2 * factor - mq))
    m2 = mp.view(b, h, mq2, factor, mk2, factor).any(5).any(3) & g2.valid(m.device)
    num, idx = kv_layout(m2)
    return BlockSelection(m2, num, idx, g2, selection.selector + "+merged")


# --------------------------------------------------------------------------------------------------
# rows and files


def row(cfg: Config, case: str, n: int, batch: int, *, sparsity: float | None = None, ms: float | None = None,
        peak: float | None = None, block_size: int | None = None, density: float | None = None,
        tflops: float | None = None, status: str = "ok") -> dict[str, Any]:
    def f(x, nd):
        return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), nd)

    return {
        "case": case, "n": n, "batch": batch, "heads": cfg.heads, "kv_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "sparsity": "" if sparsity is None else sparsity, "ms": f(ms, 4),
        "peak_mb": f(peak, 1), "device": cfg.env["device"], "torch": cfg.env["torch"], "date": cfg.env["date"],
        "block_size": "" if block_size is None else block_size, "density": f(density, 4),
        "tflops": f(tflops, 1), "status": status,
    }


class Recorder:
    """Runs cases (warm call, peak memory, timing), catches errors and out-of-memory, keeps the rows,
    prints one line per case and enforces the budget."""

    def __init__(self, cfg: Config, log=print):
        self.cfg = cfg
        self.rows: list[dict[str, Any]] = []
        self.log = log
        self.written = False

    def skip(self, case: str, n: int, batch: int, why: str, **kw) -> None:
        self.rows.append(row(self.cfg, case, n, batch, status=f"skipped: {why}", **kw))
        sp = kw.get("sparsity")
        self.log(f"  {case:44s} n={n:<7d} B={batch:<3d} s={'' if sp is None else f'{sp:g}':5s} skipped ({why})")

    def measure(self, case: str, n: int, batch: int, make_fn: Callable[[], Callable[[], Any] | None], *,
                sparsity: float | None = None, block_size: int | None = None, density: float | None = None,
                flops: float | Callable[[], float] | None = None, memory: bool = True,
                budget_key: str | None = None) -> float | None:
        """Time ``make_fn()()``; return ms (or ``None`` on skip/failure). ``make_fn`` builds the callable
        (so that its setup errors are caught too); it may return ``None`` to mean "not applicable"."""
        cfg = self.cfg
        key = budget_key or case
        kw = dict(sparsity=sparsity, block_size=block_size)
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
            del out
            warm_s = time.monotonic() - t0
            peak = peak_mb(fn, cfg) if memory else None
            ms = bench_ms(fn, cfg)
        except Exception as e:  # noqa: BLE001 - log and go on
            status = "oom" if is_oom(e) else f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            self.rows.append(row(cfg, case, n, batch, status=status, density=density, **kw))
            self.log(f"  {case:44s} n={n:<7d} B={batch:<3d} FAILED {status}")
            if not is_oom(e):
                traceback.print_exc(limit=3, file=sys.stdout)
            cfg.budget.record(key, n, batch, time.monotonic() - t0, 0.0)
            free_memory(cfg.cuda)
            return None
        cfg.budget.record(key, n, batch, warm_s, ms)
        fl = flops() if callable(flops) else flops
        tf = fl / (ms * 1e-3) / 1e12 if (fl and ms > 0) else None
        self.rows.append(row(cfg, case, n, batch, ms=ms, peak=peak, density=density, tflops=tf, **kw))
        extra = f" peak={peak:8.1f} MiB" if peak is not None else ""
        extra += f" {tf:6.1f} TFLOP/s" if tf is not None else ""
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


def header(cfg: Config, what: str) -> str:
    impls = ", ".join(f"{k}: {v}" for k, v in cfg.impl_notes.items())
    timer = "triton do_bench median (CUDA events)" if cfg.cuda else "HOST TIMER on CPU (not a result)"
    return (f"cab bench {what}: {cfg.env['device']}, torch {cfg.env['torch']}, {cfg.env['date']}\n"
            f"  timer: {timer}; warmup {cfg.warmup} ms, rep {cfg.rep} ms; dtype {str(cfg.dtype).replace('torch.', '')}\n"
            f"  shape: Hq={cfg.heads} Hkv={cfg.kv_heads} D={cfg.head_dim}; N={cfg.n}; batch sweep B={cfg.batches} at N={cfg.batch_n}\n"
            f"  predictor implementations: {impls}\n"
            f"  budget: {'none' if cfg.budget.seconds is None else f'{cfg.budget.seconds:.0f} s'}; csv: {cfg.csv_path}")


@dataclass(frozen=True)
class Group:
    """One ``(n, batch)`` point of the grid; ``light`` groups (the batch sweep) run the main block size
    and the ``cab`` and ``magnitude`` selectors only. Sparsities come headline first, so that a group
    cut short by the budget keeps the figures the targets need."""

    n: int
    batch: int
    sparsities: tuple
    light: bool = False


def plan(cfg: Config) -> list[Group]:
    """Groups in priority order: B=1 up to 128k, then the batch sweep, then lengths beyond 128k (the
    budget skips what no longer fits)."""
    def order(sps):
        hs = headline(sps)
        return tuple([hs] + [s for s in sps if s != hs])

    main = [Group(n, 1, order(cfg.sparsities)) for n in cfg.n if n <= 131072]
    sweep = [Group(n, b, order(cfg.batch_sparsities), True) for n in cfg.batch_n for b in cfg.batches if b > 1]
    long = [Group(n, 1, order(cfg.sparsities)) for n in cfg.n if n > 131072]
    return main + sweep + long


def head_impl(impls) -> str:
    """The predictor implementation that headlines: ``triton`` (exact), else another Triton one, else torch."""
    if "triton" in impls:
        return "triton"
    return next((i for i in impls if i != "torch"), "torch")


def headline(sparsities) -> float:
    """The sparsity of the breakdown and the baselines: 0.95 when measured, else the middle one."""
    sps = list(sparsities)
    return 0.95 if any(abs(s - 0.95) < 1e-9 for s in sps) else sps[len(sps) // 2]


def group_view(cfg: Config, group: Group) -> Config:
    """The configuration a group runs with (fewer block sizes and selectors for light groups)."""
    if not group.light:
        return cfg
    import copy

    c = copy.copy(cfg)
    c.block_sizes = cfg.block_sizes[:1]
    c.selectors = [s for s in cfg.selectors if s in ("cab", "magnitude")]
    return c


def checkpoint(cfg: Config, rec: Recorder) -> Path:
    """Write the rows so far (after every group, so that a run cut short keeps what it measured):
    the first write honours ``--fresh``, later ones merge."""
    path = write_results(cfg.csv_path, rec.rows, fresh=cfg.fresh and not rec.written)
    rec.written = True
    return path


def finish(cfg: Config, rec: Recorder, what: str) -> int:
    path = checkpoint(cfg, rec)
    print(f"cab bench {what}: {len(rec.rows)} rows -> {path} ({cfg.budget.elapsed():.0f} s)")
    if cfg.plots:
        try:
            from .plots import make_plots

            for p in make_plots(path, cfg.out_dir):
                print(f"  plot: {p}")
        except Exception as e:  # noqa: BLE001 - plots are a convenience; the CSV is the result
            print(f"  plots failed: {type(e).__name__}: {e}")
    failed = [r for r in rec.rows if r["status"].startswith("error")]
    if failed:
        print(f"  {len(failed)} case(s) failed (status column says why)")
    return 0


def run_cli(kind: str, doc: str, run_group: Callable[..., Any], argv: list[str] | None = None) -> int:
    """The shared driver of ``cab bench predictor|attention``: parse, plan the (N, B) groups, run each
    as ``run_group(cfg_view, recorder, n, batch, sparsities, light)``, record a failing group as a
    skipped row (e.g. out of memory) and go on, checkpoint the CSV after every group, finish."""
    parser = build_parser(f"cab bench {kind}", doc)
    args = parser.parse_args(argv)
    cfg = resolve(args, f"cab bench {kind}")
    if cfg is None:
        return 2
    restore = setup_torch(cfg.cuda)
    try:
        print(header(cfg, kind), flush=True)
        rec = Recorder(cfg, log=lambda s: print(s, flush=True))
        for group in plan(cfg):
            n, batch = group.n, group.batch
            print(f"N={n} B={batch}" + (" (batch sweep: main block size, cab and magnitude)" if group.light else ""), flush=True)
            try:
                run_group(group_view(cfg, group), rec, n, batch, list(group.sparsities), group.light)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory creating the inputs
                rec.skip(f"{kind}:group", n, batch, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                free_memory(cfg.cuda)
            checkpoint(cfg, rec)
            print(f"  (group N={n} B={batch} done; {cfg.budget.elapsed():.0f} s elapsed)", flush=True)
        return finish(cfg, rec, kind)
    finally:
        restore()
