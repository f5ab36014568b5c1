"""``cab bench model``: time to first token of a Llama-3-8B-shaped decoder, dense against block-sparse.

What a user gains depends on how much of the whole prefill the attention is, so this times the model,
not the kernel: a transformers ``LlamaForCausalLM`` built from a config (Llama-3-8B's shapes: hidden
4096, 32 query / 8 KV heads, head_dim 128, MLP 14336, vocabulary 128256; ``--layers`` of them, random
weights, bf16) prefills ``--n`` tokens with ``logits_to_keep=1`` (only the first generated token's
logits, as a server computes them), once per variant:

* ``dense:sdpa-cudnn`` and ``dense:sdpa``: the model's own SDPA attention, under the cuDNN backend and
  under PyTorch's default choice;
* ``sparse:<selector>[<backend>]``: :func:`cab_attention.hf.enable` with each ``--selectors`` entry and
  each ``--backends`` entry at ``--sparsity`` and ``--block-size`` (``/<impl>`` appended for each
  ``--impls`` entry other than ``torch``: the predictor implementation, ``select_blocks(impl=...)``);
* ``none``: an attention function that returns zeros, so that ``time - none`` is the attention's share
  of the forward (projections, MLPs, norms and the embedding stay in ``none``).

Each row gives the median forward time, the attention time by that difference, its share of the
forward, the speedup over ``dense:sdpa-cudnn`` of the whole forward and of the attention alone, the
effective block density counted by :func:`cab_attention.hf.record`, and the peak memory. ``--dry-run``
runs a tiny config on the CPU (host timers, for testing the harness only).

Usage: ``cab bench model [--n 32k,64k,128k] [--layers 4] [--selectors antidiagonal,cab]
[--backends flex] [--impls torch] [--sparsity 0.95] [--block-size 64] [--out runs/bench-model] [--dry-run]``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .cli import parse_names, parse_sizes
from .io import environment

NONE_ATTN = "cab_bench_none"


def _sizes(text: str) -> list[int]:
    """``--n``: :func:`.cli.parse_sizes`, and every length positive (a prompt of 0 tokens has no first token)."""
    out = parse_sizes(text)
    if any(v <= 0 for v in out):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cab bench model", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=_sizes, default=_sizes("32k,64k,128k"), help="prompt lengths (default 32k,64k,128k)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--selectors", type=parse_names, default=["antidiagonal", "cab"], help="comma list of selectors")
    p.add_argument("--backends", type=parse_names, default=["flex"], help="comma list of cab backends (flex, triton, ...)")
    p.add_argument("--impls", type=parse_names, default=["torch"],
                   help="comma list of predictor implementations passed as select_blocks(impl=...): torch, triton")
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per variant (median reported)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-model"), help="output folder (CSV + log)")
    p.add_argument("--dry-run", action="store_true", help="tiny config on the CPU: tests the harness only")
    return p


def llama3_8b_config(layers: int, max_positions: int, dry_run: bool = False) -> Any:
    """A ``LlamaConfig`` with Llama-3-8B's shapes (or a tiny one for ``dry_run``)."""
    from transformers import LlamaConfig

    if dry_run:
        return LlamaConfig(
            hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            num_hidden_layers=layers, vocab_size=512, max_position_embeddings=max_positions,
        )
    return LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        num_hidden_layers=layers, vocab_size=128256, max_position_embeddings=max_positions,
        rope_theta=500000.0, tie_word_embeddings=False,
    )


def _register_none() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    def none_attention(module, query, key, value, attention_mask, **kwargs):
        # (B, L, Hq, D) zeros: the forward without attention, to time everything else.
        b, h, n, d = query.shape
        return query.new_zeros(b, n, h, d), None

    AttentionInterface.register(NONE_ATTN, none_attention)
    AttentionMaskInterface.register(NONE_ATTN, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _timer(cuda: bool, repeats: int) -> Callable[[Callable[[], Any]], tuple[float, float | None]]:
    def run(fn: Callable[[], Any]) -> tuple[float, float | None]:
        fn()  # warm-up: compiles, autotunes, allocates
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        return statistics.median(times), peak

    return run


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import LlamaForCausalLM

    from cab_attention import hf

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("cab bench model needs a CUDA GPU (or --dry-run for a tiny CPU check)")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = llama3_8b_config(args.layers, max(args.n) + 1, args.dry_run)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    _register_none()
    timer = _timer(cuda, args.repeats)
    rows: list[dict[str, Any]] = []
    env = {k: v for k, v in environment(cuda).items() if k != "slug"}

    for n in args.n:
        ids = torch.randint(0, cfg.vocab_size, (1, n), device=device)

        @torch.inference_mode()
        def forward() -> Any:
            return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

        def measure(variant: str, selector: str, backend: str, setup: Callable[[], Any]) -> dict[str, Any]:
            row = {"n": n, "variant": variant, "selector": selector, "backend": backend, "layers": args.layers,
                   "sparsity": args.sparsity if selector not in ("", "dense") else 0.0,
                   "block_size": args.block_size if selector else "", **env}
            try:
                ctx = setup()
                with ctx:
                    ms, peak = timer(forward)
                row.update(ms=round(ms, 3), peak_gib=None if peak is None else round(peak, 2), status="ok")
            except Exception as e:  # an OOM or a refused backend is a result, not a crash of the sweep
                row.update(ms=None, peak_gib=None, status=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                if cuda:
                    torch.cuda.empty_cache()
            print(f"  n={n:>7} {variant:<34} {row['ms'] if row['ms'] is not None else row['status']}", flush=True)
            return row

        group: list[dict[str, Any]] = []

        def impl(name: str) -> Callable[[], Any]:
            def setup():
                import contextlib

                if hf.settings_of(model) is not None:
                    hf.disable(model)
                model.set_attn_implementation(name)
                return contextlib.nullcontext()

            return setup

        def cudnn() -> Any:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            impl("sdpa")()
            return sdpa_kernel([SDPBackend.CUDNN_ATTENTION] if cuda else [SDPBackend.MATH])

        group.append(measure("none", "", "", impl(NONE_ATTN)))
        group.append(measure("dense:sdpa-cudnn", "dense", "sdpa-cudnn", cudnn))
        group.append(measure("dense:sdpa", "dense", "sdpa", impl("sdpa")))
        for sel in args.selectors:
            for backend in args.backends:
                for pimpl in args.impls:
                    densities: dict[str, Any] = {}

                    def sparse(sel=sel, backend=backend, densities=densities, pimpl=pimpl):
                        import contextlib

                        impl("sdpa")()
                        extra = {} if pimpl == "torch" else {"impl": pimpl}
                        hf.enable(model, selector=sel, sparsity=args.sparsity, block_size=args.block_size,
                                  backend=backend, **extra)
                        stack = contextlib.ExitStack()
                        rec = stack.enter_context(hf.record(model))
                        densities["rec"] = rec
                        return stack

                    # variant names: sparse:<selector>[<attention backend>], + "/<impl>" for a non-torch predictor
                    variant = f"sparse:{sel}[{backend}]" + ("" if pimpl == "torch" else f"/{pimpl}")
                    row = measure(variant, sel, backend, sparse)
                    row["impl"] = pimpl
                    rec = densities.get("rec")
                    row["density"] = None if rec is None or rec.density is None else round(rec.density, 4)
                    group.append(row)
        if hf.settings_of(model) is not None:
            hf.disable(model)
        none = next((r["ms"] for r in group if r["variant"] == "none"), None)
        ref = next((r["ms"] for r in group if r["variant"] == "dense:sdpa-cudnn"), None)
        for r in group:
            if r["ms"] is None or none is None or r["variant"] == "none":
                continue
            attn = r["ms"] - none
            r["attention_ms"] = round(attn, 3)
            r["attention_share"] = round(attn / r["ms"], 4) if r["ms"] else None
            if ref:
                r["speedup_forward"] = round(ref / r["ms"], 3)
                ref_attn = ref - none
                r["speedup_attention"] = round(ref_attn / attn, 3) if attn > 0 else None
        rows.extend(group)
        _write(args.out, rows)
    return rows


FIELDS = ["date", "device", "torch", "triton", "n", "layers", "variant", "selector", "backend", "impl", "sparsity",
          "block_size", "density", "ms", "attention_ms", "attention_share", "speedup_forward",
          "speedup_attention", "peak_gib", "status"]


def _write(out: Path, rows: list[dict[str, Any]]) -> Path:
    """Rewrites the CSV after every length, so an interrupted sweep keeps what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def summary(rows: list[dict[str, Any]]) -> str:
    """A markdown table: per length and variant, forward ms, attention share, speedups."""
    lines = ["| N | variant | density | forward ms | attention ms | attention share | speedup (forward) | speedup (attention) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["variant"] == "none":
            lines.append(f"| {r['n']} | none (no attention) | - | {r['ms']} | - | - | - | - |")
            continue
        lines.append(
            f"| {r['n']} | {r['variant']} | {r.get('density', '-') or '-'} | {r['ms'] if r['ms'] is not None else r['status']} | "
            f"{r.get('attention_ms', '-')} | {r.get('attention_share', '-')} | {r.get('speedup_forward', '-')} | "
            f"{r.get('speedup_attention', '-')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        raise SystemExit(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.layers < 1:
        raise SystemExit(f"--layers must be >= 1, got {args.layers}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    rows = run(args)
    table = summary(rows)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
