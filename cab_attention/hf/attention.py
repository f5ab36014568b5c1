"""CAB attention inside transformers: the per-model settings and the registered attention function.

How it hooks in (no monkeypatching of model classes): :func:`cab_attention_forward` is registered in
transformers' ``AttentionInterface`` under :data:`ATTN_NAME`, and transformers' own SDPA mask builder is
registered for that name in ``AttentionMaskInterface``, so padded batches and sliding-window layers
hand the function the same boolean ``(B, 1, Q, K)`` mask that SDPA would get (``None`` when the mask is
plain causal without padding). The settings (selector, sparsity, ...) live on each attention module as
``module._cab_settings`` (one :class:`CABSettings` per model; :mod:`cab_attention.hf.enabling` sets them).

What each call does:

* **Prefill** (at least one block of queries): block-sparse: :func:`cab_attention.select_blocks`, then
  the backend (:data:`HF_BACKENDS`: flex on CUDA, SDPA under the selection's token mask on CPU, or the
  core's exact reference). Queries shorter than the keys are the last positions: chunked prefill works.
  With ``check_finite`` (the default) NaN or inf in the layer's q, k or v is a ``ValueError``.
* **Decode and short chunks** (fewer queries than ``block_size``): dense attention to the whole cache
  (not checked for NaN: that would read the whole cache once more per token).
* **Sparsity 0** (and the ``dense`` selector) keeps every causal block, which *is* dense attention: it
  makes the same SDPA call as transformers' default path, so its logits match the default implementation.
* **Padding**: each batch row is cut to its real tokens (the key columns its mask lets anyone see; they
  must be one contiguous span, as left or right padding gives), so the sink block is the row's first
  real block and selection never scores pad tokens. Pad query rows return zeros (their outputs only
  feed pad positions).
* **Sliding-window layers** (transformers passes ``sliding_window=`` for them: Gemma-2/3's local layers,
  Qwen2/3's sliding layers, every Mistral layer when its config has a window) run **dense** by default,
  exactly as the model's SDPA attention with its window mask would (they already cost ``O(N w)``); the
  record marks them ``"sliding-dense"`` and never counts them in the block density. With
  ``sliding="sparse"`` selection happens *inside* the window (:class:`cab_attention.BlockGrid` ``window``:
  the valid blocks are those the window reaches, the forced blocks a window-local sink, the row's first
  block in the window, and the diagonal; the budget counts the window's blocks), and execution applies
  the window token by token (SDPA under the selection's token mask, or flex's ``mask_mod``).
* **Other masks** (padding, any custom pattern): each row runs on its real span; a row whose mask is not
  the expected pattern (causal, within the window if any) has the selection intersected with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..execute import BACKENDS, dense_attention, sparse_attention
from ..geometry import check_block_size, check_finite, check_sparsity
from ..options import resolve_options
from ..select import select_blocks
from ..selection import BlockSelection

ATTN_NAME = "cab"
"""The name CAB attention is registered under in transformers' attention and mask registries."""

HF_BACKENDS = BACKENDS + ("sdpa",)
"""Execution of a selection inside a model: the core's ``reference``, ``flex`` and ``triton``, plus ``sdpa``
(exact attention under the selection's token mask through SDPA's fused kernels, chunked over queries: the
same result as ``reference``, several times faster on CPU, O(N^2) work like dense). ``auto``: the core's
auto on CUDA (the Triton kernel; flex for windowed selections), sdpa elsewhere."""


# ----------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------


SPARSE_PATHS = ("sparse", "masked")
"""The :class:`CallRecord` paths that ran block-sparse; ``"dense"`` and ``"sliding-dense"`` did not."""

SLIDING_MODES = ("dense", "sparse")
"""What :func:`cab_attention.hf.enable` does with sliding-window layers: leave them dense (default) or
select inside the window."""


@dataclass
class CallRecord:
    """One attention call of one layer.

    ``path`` is ``"sparse"`` (block-sparse prefill), ``"masked"`` (block-sparse per batch row: padding,
    or a mask of the model's own intersected with the selection), ``"dense"`` (decode, short chunk) or
    ``"sliding-dense"`` (a sliding-window layer left dense, the default of :func:`enable`).
    ``kept_blocks``/``valid_blocks`` count query-head block edges (0 for dense calls); with ``window``
    (the layer's sliding window when it ran block-sparse inside it) they count the window's blocks.
    """

    layer: int | None
    path: str
    batch: int
    q_len: int
    kv_len: int
    kept_blocks: int
    valid_blocks: int
    window: int | None = None

    @property
    def sparse(self) -> bool:
        """Whether the call ran block-sparse (its blocks count in the density)."""
        return self.path in SPARSE_PATHS

    @property
    def density(self) -> float:
        return self.kept_blocks / self.valid_blocks if self.valid_blocks else 1.0



@dataclass
class CABSettings:
    """Per-model configuration, shared by the model's attention modules (``module._cab_settings``)."""

    selector: str
    sparsity: float
    block_size: int
    backend: str
    options: dict[str, Any]
    previous: str | None = None
    sliding: str = "dense"
    # The open record() blocks (AttentionCallLog objects of cab_attention.hf.enabling) this model writes to.
    recorders: list[Any] = field(default_factory=list, repr=False)
    # The last few masks analysed (a forward passes one mask object to every layer; sliding-window
    # models alternate two), with their per-row spans, so the analysis runs once per forward.
    _mask_cache: list[tuple[torch.Tensor, int | None, Any]] = field(default_factory=list, repr=False)


def check_settings(selector: str, sparsity: float, block_size: int, backend: str, options: dict[str, Any],
                   sliding: str = "dense") -> dict:
    """Validate :func:`cab_attention.hf.enable`'s arguments (``ValueError`` names the bad one); return the
    options to store (``check_finite`` included: it applies to every prefill call)."""
    if sliding not in SLIDING_MODES:
        raise ValueError(f"sliding must be one of {SLIDING_MODES} (sliding-window layers dense, or sparse inside "
                         f"the window), got {sliding!r}")
    if "window" in options:
        raise ValueError("window must not be given to enable(): each layer's sliding window is the model's own")
    check_sparsity(sparsity)
    check_block_size(block_size)
    if backend not in HF_BACKENDS:
        raise ValueError(f"backend must be one of {HF_BACKENDS}, got {backend!r}")
    if "scale" in options:
        raise ValueError("scale must not be given to enable(): the attention scale is the model's own `scaling`")
    # Validates the selector name and its options (ValueError names the bad one).
    resolve_options(selector, options)
    return dict(options)



# ----------------------------------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------------------------------


def register(name: str = ATTN_NAME, function: Any = None) -> None:
    """Register ``function`` (default :func:`cab_attention_forward`) as transformers attention ``name``,
    with SDPA's mask builder under the same name.

    The one registration path (``cab eval recall`` registers its recording function through it): an
    attention name registered only in ``AttentionInterface`` gets ``attention_mask=None`` from
    transformers, so padded batches would lose their padding and sliding-window layers would silently
    run as full causal attention. SDPA's builder gives ``None`` for plain causal without padding, else a
    bool ``(B, 1, Q, K)`` mask with padding and sliding windows folded in.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, cab_attention_forward if function is None else function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def as_bool_mask(mask: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
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
    the model's mask over that part is exactly the expected pattern: causal, and inside the sliding
    window when one was given (else the selection is intersected with the mask)."""

    k0: int
    k1: int
    q0: int
    q1: int
    causal: bool


def analyse_mask(mask: torch.Tensor, q_len: int, kv_len: int, window: int | None = None) -> list[_RowSpan | None]:
    """Each batch row's real span of a bool ``(B, 1, Q, K)`` mask and whether the mask over it is the
    plain pattern (causal, within ``window`` tokens when given); ``None`` for a row with no real query.
    ``ValueError`` for gapped rows or a mask that lets a query see a later key."""
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
        expected = kpos[None, :] <= qpos[:, None]
        if window is not None:
            # Window positions count from the row's first real key (a left-padded row's keys start later;
            # transformers' window compares cache positions, whose differences are the same).
            expected &= kpos[None, :] > qpos[:, None] - window
        causal = bool(torch.equal(sub, expected))
        if not causal and bool((sub & (kpos[None, :] > qpos[:, None])).any()):
            raise ValueError("attention_mask lets a query attend to a later key; CAB attention is causal only")
        spans.append(_RowSpan(k0, k1, q0, q1, causal))
    return spans


def _spans(settings: CABSettings, mask: torch.Tensor, q_len: int, kv_len: int,
           window: int | None = None) -> list[_RowSpan | None]:
    for ref, w, spans in settings._mask_cache:
        if ref is mask and w == window:
            return spans
    spans = analyse_mask(mask, q_len, kv_len, window)
    settings._mask_cache.insert(0, (mask, window, spans))
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
    b, hq, nq, _ = q.shape
    chunk = max(g.block_size, budget_bytes // max(1, b * hq * g.kv_len))
    out = torch.empty_like(q) if mask is None else torch.zeros_like(q)
    for r0 in range(0, nq, chunk):
        r1 = min(nq, r0 + chunk)
        keep = sel.token_mask(r0, r1)  # [B, Hq, rows, Nk]
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
    window: int | None = None,
    dense_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, BlockSelection]:
    """Select and execute for ``q`` (at least one block), ``k``, ``v``; ``mask`` (bool ``(1, 1, Nq, Nk)``)
    is the model's own pattern to intersect with, ``None`` for plain causal (within ``window``, when
    given: selection then happens inside the sliding window). ``dense_mask``: the model's mask for the
    keep-everything case when ``mask`` is ``None`` but a window applies (the SDPA call the model makes)."""
    bs = settings.block_size
    options = dict(settings.options)
    # One finite check of q, k and v together (select_blocks and sparse_attention then skip theirs).
    if options.pop("check_finite", True):
        check_finite(q=q, k=k, v=v)
    # Sparsity 0 keeps every causally valid block for every selector (k_i = v_i): that is dense
    # attention, so run the dense kernel (same output as default attention, and faster).
    keeps_all = settings.selector == "dense" or (settings.sparsity == 0.0 and options.get("threshold") is None)
    if keeps_all:
        sel = select_blocks(q, k, selector="dense", sparsity=0.0, block_size=bs, causal=causal, window=window,
                            check_finite=False)
        if mask is None and window is not None and window < k.shape[2]:
            if dense_mask is None:
                raise ValueError("a windowed layer kept every block but no mask describes its window")
            mask = dense_mask
        return _dense(q, k, v, mask, causal, scale), sel
    sel = select_blocks(q, k, selector=settings.selector, sparsity=settings.sparsity, block_size=bs, causal=causal,
                        window=window, scale=scale, check_finite=False, **options)
    backend = settings.backend
    if backend == "auto":
        # On CUDA the core's auto: the Triton kernel (flex for windowed selections); SDPA under the token
        # mask elsewhere (several times faster than the reference on CPU).
        backend = "auto" if q.is_cuda else "sdpa"
    if mask is None and backend != "sdpa":
        out = sparse_attention(q, k, v, selection=sel, block_size=bs, causal=causal, backend=backend, scale=scale,
                               check_finite=False)
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
        attention_mask = as_bool_mask(attention_mask, q_len, kv_len)
    elif sliding_window is not None and causal and kv_len > sliding_window:
        raise ValueError(
            f"layer {layer} has sliding_window={sliding_window} but no mask arrived for {kv_len} keys; "
            "CAB attention cannot honour the window without the model's mask"
        )
    bs = settings.block_size
    sel: Any = None
    kept = total = 0
    # The window selection honours: only when sliding layers are sparsified (else they run dense below).
    window = int(sliding_window) if (sliding_window is not None and causal) else None
    if window is not None and settings.sliding == "dense":
        # A sliding-window layer left dense: the SDPA call transformers' own path makes with its mask.
        path = "sliding-dense"
        out = _dense(query, key, value, attention_mask, causal, scaling)
    elif q_len < bs:
        # Decode / short chunk: dense to the whole cache, under the model's own mask.
        path = "dense"
        out = _dense(query, key, value, attention_mask, causal, scaling)
    elif attention_mask is None:
        # No mask: plain causal (a window, if any, covers every key: checked above).
        path = "sparse"
        out, sel = _block_sparse(settings, query, key, value, causal, scaling, window=window)
    else:
        if not causal:
            raise ValueError("CAB attention with an attention_mask supports causal (decoder) attention only")
        spans = _spans(settings, attention_mask, q_len, kv_len, window)
        if all(s is not None and s.causal and s.k0 == 0 and s.k1 == kv_len for s in spans):
            # Plain causal (within the window, if any) with an offset (e.g. chunked prefill): one batched call.
            path = "sparse"
            out, sel = _block_sparse(settings, query, key, value, True, scaling, window=window,
                                     dense_mask=attention_mask)
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
                row_mask = attention_mask[i : i + 1, :, s.q0 : s.q1, s.k0 : s.k1]
                sub = None if s.causal else row_mask
                if qi.shape[2] < bs:
                    o = _dense(qi, ki, vi, row_mask if window is not None else sub, True, scaling)
                    sel.append(None)
                else:
                    o, sel_i = _block_sparse(settings, qi, ki, vi, True, scaling, sub, window=window,
                                             dense_mask=row_mask)
                    sel.append(sel_i)
                out[i : i + 1, :, s.q0 : s.q1] = o
    if settings.recorders:
        # Counted only for a recorder: each count is a pass over the mask and two host syncs per layer.
        if path in SPARSE_PATHS:
            for one in (sel if isinstance(sel, list) else [sel]):
                if one is not None:
                    k_i, t_i = _count_blocks(one)
                    kept, total = kept + k_i, total + t_i
        rec = CallRecord(layer, path, b, q_len, kv_len, kept, total, window if path in SPARSE_PATHS else None)
        for r in settings.recorders:
            r.calls.append(rec)
            if layer in r.capture:
                r.captured.setdefault(layer, []).append(
                    {"q": query.detach(), "k": key.detach(), "v": value.detach(), "selection": sel}
                )
    return out.transpose(1, 2).contiguous(), None

