"""The command line of ``cab bench predictor|attention`` and the driver they share (:func:`run_cli`).

:func:`run_cli` parses the arguments (:func:`build_parser`, checked by :func:`resolve`), plans the
``(N, B)`` groups (:func:`plan`: B = 1 up to 128k first, then the batch sweep, then longer N), runs each
group through the command's ``run_group``, writes the CSV after every case (a run cut short keeps
what it measured) and draws the plots at the end. Results go to ``runs/bench/`` unless ``--out-dir``
or ``--csv`` say otherwise.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

import torch

from .implementations import attention_unavailable, check_impls, head_impl, predictor_impls
from .io import CaseRecorder, environment, write_results
from .timing import Budget, free_memory, setup_torch


DEFAULT_N = "1k,2k,4k,8k,16k,32k,64k,128k,256k"
TINY_N_CPU = "256,512"
TINY_N_CUDA = "1k,4k"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_OUT_DIR = Path("runs/bench")

NO_CUDA_MESSAGE = (
    "cab bench: CUDA is not available. These benchmarks time GPU kernels with triton's do_bench and "
    "their figures mean nothing on a CPU. Run them on a CUDA machine (scripts/gpu_check.sh does the "
    "whole set), or use --dry-run (equivalently --device cpu --tiny) for a tiny CPU grid timed with host "
    "timers, labelled as CPU, that only exercises the command line and its output files."
)


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


def int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``; ``expected`` names the form in the error."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v

    return parse


def names_from(allowed: Collection[str]) -> Callable[[str], list[str]]:
    """argparse type: a comma list of names (:func:`parse_names`), each one of ``allowed``."""

    def parse(text: str) -> list[str]:
        names = parse_names(text)
        bad = [s for s in names if s not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(allowed)}; unknown {bad}")
        return names

    return parse


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}") from None
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return v


def parse_impls(text: str) -> list[str]:
    """argparse type of ``--impl``: comma-separated implementation names (see :data:`.implementations.IMPL_OPTIONS`)."""
    try:
        return check_impls(parse_names(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=f"folder of the CSV and plots (default {DEFAULT_OUT_DIR})")
    p.add_argument("--csv", type=Path, default=None, help="results CSV (default <out-dir>/<device>-<date>.csv)")
    p.add_argument("--fresh", action="store_true", help="overwrite the CSV instead of merging into it")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--max-antidiagonal-n", type=parse_sizes, default=[131072],
                   help="longest N at which the (fp32, O(N^2 D / 8)) antidiagonal predictor runs")
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")
    p.add_argument("--attention-backends", type=parse_names, default=["flex", "triton"],
                   help="sparse attention backends timed by `cab bench attention` (default flex,triton; the CPU "
                        "dry run times reference, and triton only under TRITON_INTERPRET=1)")
    p.add_argument("--graph-max-n", type=parse_sizes, default=[16384],
                   help="longest N at which `cab bench predictor` times the CUDA-graph predictor (default 16k)")
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
    attention_backends: list[str] = field(default_factory=list)
    graph_max_n: int = 16384


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

    from .implementations import BENCH_ALIASES

    bad = [s for s in args.selectors if s not in SELECTORS and s not in BENCH_ALIASES]
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
    bad = [b for b in args.attention_backends if b not in ("flex", "triton")]
    if bad:
        print(f"{prog}: --attention-backends takes flex and/or triton, got {bad}", file=sys.stderr)
        return None
    attention_backends = []
    for b in args.attention_backends:
        why = attention_unavailable(b, "cuda" if cuda else "cpu")
        if b == "flex" or why is None:  # flex stands for the reference backend in the CPU dry run
            attention_backends.append(b)
        else:
            print(f"{prog}: attention backend {b} not run: {why}", file=sys.stderr)
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
        attention_backends=attention_backends, graph_max_n=max(args.graph_max_n),
    )


def header(cfg: Config, what: str) -> str:
    impls = ", ".join(f"{k}: {v}" for k, v in cfg.impl_notes.items())
    timer = "triton do_bench median (CUDA events)" if cfg.cuda else "HOST TIMER on CPU (not a result)"
    return (f"cab bench {what}: {cfg.env['device']}, torch {cfg.env['torch']}, triton {cfg.env.get('triton', '?')}, "
            f"{cfg.env['date']}\n"
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


def checkpoint(cfg: Config, rec: CaseRecorder) -> Path:
    """Write the rows so far (after every group, so that a run cut short keeps what it measured):
    the first write honours ``--fresh``, later ones merge."""
    path = write_results(cfg.csv_path, rec.rows, fresh=cfg.fresh and not rec.written)
    rec.written = True
    return path


def finish(cfg: Config, rec: CaseRecorder, what: str) -> int:
    path = checkpoint(cfg, rec)
    print(f"cab bench {what}: {len(rec.rows)} rows -> {path} ({cfg.budget.elapsed():.0f} s)")
    if cfg.plots:
        try:
            from .plots import make_plots  # matplotlib only when plotting

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
        rec = CaseRecorder(cfg, log=lambda s: print(s, flush=True))
        rec.on_row = lambda: checkpoint(cfg, rec)
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
