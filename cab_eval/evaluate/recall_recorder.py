"""The recording attention function of ``cab eval recall`` and the rows it records.

:class:`RecallRecorder`, registered through ``transformers.AttentionInterface`` (:func:`register`), computes
each layer's ordinary dense (SDPA) attention for the forward pass and, on the side, measures every
selector configuration at every sparsity on that layer's post-RoPE q, k, v (:mod:`.recall_masks`,
:mod:`.recall_metrics`); nothing is stored but one row per (window, layer, configuration, sparsity) and one
per head. Which layers are measured follows from each layer's real mask (:func:`is_plain_causal`; sliding
layers against their windowed softmax when asked for). :func:`record` runs a model over token windows with
it; :data:`TEXT_FIELDS` and :func:`complete_windows` are how ``recall.csv`` / ``recall_heads.csv`` are read
back and resumed.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from .recall_masks import config_masks
from .recall_metrics import layer_metrics
from .selector_specs import Config

ATTN_NAME = "cab_eval_record"
# Columns of recall.csv and recall_heads.csv that hold text, read back as strings.
TEXT_FIELDS = ("method", "selector")


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
