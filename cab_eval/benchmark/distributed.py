"""``cab bench distributed``: one context-parallel attention layer (Ulysses, :mod:`cab_attention.distributed`),
the all-to-all time against the attention time.

Run on ``P`` GPUs of one host::

    torchrun --nproc-per-node P -m cab_eval.benchmark.distributed --lengths 32k,128k --sparsities 0.9,0.95

or as a plain process for ``P = 1`` (it then starts a one-rank group itself), or ``--dry-run`` for a tiny
CPU run over gloo (host timers, labelled as CPU: it tests the command and its file, nothing else).

Per full sequence length ``N`` every rank holds a contiguous shard ``[B, H, N / P, D]`` of random q, k, v
and times, with one CUDA event pair per call, ``--reps`` calls after ``--warmup`` calls (the same count on
every rank, each call after a barrier, because every call is a collective), the median per rank:

* ``a2a:qkv`` the three all-to-alls to the head-sharded layout, ``a2a:out`` the one back;
* ``predictor:<selector>`` selection of the rank's heads on the full sequence (``select_heads``), with the
  FlexAttention ``BlockMask``; ``attention:<selector>`` the sparse kernel alone on that selection;
* ``total:<selector>`` the whole layer (``context_parallel_attention``, shards unchecked);
* ``attention:sdpa-dense`` and ``total:sdpa-dense`` dense causal SDPA on the head-sharded layout, and the
  dense Ulysses layer around it, for reference.

The CSV (rank 0 writes it) records the slowest rank's median (``ms``) and the fastest (``ms_min_rank``):
a layer waits for its slowest rank. Multi-GPU hosts of this workplace need NVLink multicast off, so the
process sets ``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and ``NVSHMEM_DISABLE_NVLS=1``
before the process group starts.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

# Set before torch.distributed starts NCCL (multi-GPU hosts here refuse NVLink multicast).
_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

COLUMNS = [
    "case", "world_size", "n", "batch", "heads", "kv_heads", "head_dim", "dtype", "block_size", "selector",
    "sparsity", "density", "ms", "ms_min_rank", "device", "dist_backend", "torch", "date", "status",
]
DTYPES = ("bf16", "fp16", "fp32")


def _sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part:
            out.append(int(part[:-1]) * 1024 if part.endswith("k") else int(part))
    return out


def _floats(text: str) -> list[float]:
    return [float(p) for p in text.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cab bench distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=_sizes, default=None,
                   help="full sequence lengths N (default 32k,128k; dry run 256,512); not --n, which torchrun would take as its own")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="query heads (default 32; dry run 4)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default 8; dry run 2)")
    p.add_argument("--head-dim", type=int, default=None, help="default 128; dry run 32")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--selector", default="cab")
    p.add_argument("--sparsities", type=_floats, default=[0.9, 0.95])
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per case (compile, autotune)")
    p.add_argument("--reps", type=int, default=10, help="timed calls per case (the same on every rank)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense SDPA rows")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dry-run", action="store_true", help="tiny CPU run over gloo with host timers (tests the command)")
    p.add_argument("--csv", type=Path, default=Path("runs/bench_distributed.csv"))
    p.add_argument("--seed", type=int, default=0)
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(cuda: bool):
    """Join torchrun's group, or start a one-rank group; returns (dist, created_here, device)."""
    for name, value in _NCCL_ENV.items():
        os.environ[name] = value
    import torch
    import torch.distributed as dist

    backend = "nccl" if cuda else "gloo"
    created = False
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)
        else:
            if cuda:
                torch.cuda.set_device(0)
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        created = True
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist, created, dev


def _timer(cuda: bool, dist, warmup: int, reps: int) -> Callable[[Callable[[], Any]], float]:
    """Median ms of ``fn()`` on this rank: ``warmup`` untimed calls, then ``reps`` calls, each after a
    barrier, timed with CUDA events (host timer on CPU). Every rank makes the same calls."""
    import torch

    def run(fn: Callable[[], Any]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1000.0)
        return float(statistics.median(times))

    return run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
    cuda = args.device == "cuda"
    import torch

    from .timing import device_refusal  # torch is imported on use here, not with the module

    refusal = device_refusal("cab bench distributed", cuda, args.dry_run, "use --dry-run for a tiny CPU run over gloo")
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    tiny = not cuda
    n_list = args.lengths or ([256, 512] if tiny else [32768, 131072])
    heads = args.heads or (4 if tiny else 32)
    kv_heads = args.kv_heads or (2 if tiny else 8)
    head_dim = args.head_dim or (32 if tiny else 128)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if not cuda:
        dtype = torch.float32
        args.block_size = min(args.block_size, 32)

    import datetime as _dt

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

    from cab_attention import distributed as cp
    from cab_attention import sparse_attention

    dist, created, dev = _init(cuda)
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        if kv_heads % world:
            if rank == 0:
                print(f"cab bench distributed: --kv-heads {kv_heads} is not divisible by the world size {world} "
                      "(Ulysses splits heads; see cab_attention.distributed)", file=sys.stderr)
            return 2
        device_name = torch.cuda.get_device_name(dev) if cuda else "cpu host timer"
        common = dict(
            world_size=world, batch=args.batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=args.dtype
            if cuda else "fp32", block_size=args.block_size, device=device_name, dist_backend=dist.get_backend(),
            torch=torch.__version__, date=_dt.date.today().isoformat(),
        )
        timer = _timer(cuda, dist, args.warmup, args.reps)
        backend = "auto" if cuda else "reference"
        rows: list[dict] = []

        def record(case: str, n: int, fn: Callable[[], Any], **extra) -> None:
            status = "ok"
            try:
                ms = timer(fn)
            except Exception as e:  # noqa: BLE001 - a failed case is a row, not a crash (every rank fails alike)
                ms, status = float("nan"), f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            both = torch.tensor([ms, -ms], dtype=torch.float64, device=dev)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            rows.append(dict(common, case=case, n=n, ms=f"{both[0].item():.4f}", ms_min_rank=f"{-both[1].item():.4f}",
                             status=status, selector=extra.get("selector", ""), sparsity=extra.get("sparsity", ""),
                             density=extra.get("density", "")))
            if rank == 0:
                print(f"P={world} N={n} {case:28s} s={extra.get('sparsity', '-')!s:5s} {both[0].item():9.3f} ms  {status}", flush=True)

        bad = [n for n in n_list if n % world]
        if bad:
            if rank == 0:
                print(f"cab bench distributed: --lengths {bad} not divisible by the world size {world}", file=sys.stderr)
            return 2
        for n in n_list:
            gen = torch.Generator(device=dev).manual_seed(args.seed + 1000 * rank + n)
            q = torch.randn(args.batch, heads, n // world, head_dim, generator=gen, device=dev, dtype=dtype)
            k = torch.randn(args.batch, kv_heads, n // world, head_dim, generator=gen, device=dev, dtype=dtype)
            v = torch.randn(args.batch, kv_heads, n // world, head_dim, generator=gen, device=dev, dtype=dtype)
            record("a2a:qkv", n, lambda: [cp.seq_to_head(x) for x in (q, k, v)])
            qh, kh, vh = (cp.seq_to_head(x) for x in (q, k, v))
            out_h = torch.randn_like(qh)
            record("a2a:out", n, lambda: cp.head_to_seq(out_h))
            if not args.no_dense:
                gqa = heads != kv_heads

                def sdpa(a, b, c):
                    # Fused kernels only on CUDA: the math fallback would build N x N scores per head.
                    with sdpa_kernel(fused) if cuda else contextlib.nullcontext():
                        return F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=gqa)

                record("attention:sdpa-dense", n, lambda: sdpa(qh, kh, vh))
                record("total:sdpa-dense", n, lambda: cp.head_to_seq(sdpa(*(cp.seq_to_head(x) for x in (q, k, v)))))
            for s in args.sparsities:
                kw = dict(selector=args.selector, sparsity=s, block_size=args.block_size)
                sel = cp.select_heads(qh, kh, **kw)
                d = torch.tensor([sel.density], dtype=torch.float64, device=dev)
                dist.all_reduce(d)  # every rank's heads have the same valid blocks: the mean is the layer's
                density = f"{d.item() / world:.4f}"
                tag = dict(selector=args.selector, sparsity=s, density=density)

                def predict():
                    out = cp.select_heads(qh, kh, **kw)
                    return out.to_block_mask() if cuda else out

                record(f"predictor:{args.selector}", n, predict, **tag)
                record(f"attention:{args.selector}", n, lambda: sparse_attention(qh, kh, vh, selection=sel, backend=backend), **tag)
                record(f"total:{args.selector}", n, lambda: cp.context_parallel_attention(
                    q, k, v, backend=backend, check_shards=False, **kw), **tag)
            del q, k, v, qh, kh, vh, out_h
            if cuda:
                torch.cuda.empty_cache()
        if rank == 0:
            args.csv.parent.mkdir(parents=True, exist_ok=True)
            with open(args.csv, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=COLUMNS)
                w.writeheader()
                w.writerows(rows)
            print(f"wrote {args.csv} ({len(rows)} rows)")
        return 0
    finally:
        if created:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
