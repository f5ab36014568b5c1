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
* **Masks that are not plain causal** (a layer's sliding window, or any custom pattern): the block
  selection is intersected with the model's own mask, so the layer keeps its window; the budget is still
  counted over causal blocks.
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
"""Execution of a selection inside a model: the core's ``reference`` and ``flex``, plus ``sdpa`` (exact
attention under the selection's token mask through SDPA's fused kernels, chunked over queries: the
same result as ``reference``, several times faster on CPU, O(N^2) work like dense). ``auto``: flex on
CUDA, sdpa elsewhere."""


# ----------------------------------------------------------------------------------------------------
# Settings
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
class CABSettings:
    """Per-model configuration, shared by the model's attention modules (``module._cab_settings``)."""

    selector: str
    sparsity: float
    block_size: int
    backend: str
    options: dict[str, Any]
    previous: str | None = None
    # The open record() blocks (AttentionCallLog objects of cab_attention.hf.enabling) this model writes to.
    recorders: list[Any] = field(default_factory=list, repr=False)
    # The last few masks analysed (a forward passes one mask object to every layer; sliding-window
    # models alternate two), with their per-row spans, so the analysis runs once per forward.
    _mask_cache: list[tuple[torch.Tensor, Any]] = field(default_factory=list, repr=False)


def check_settings(selector: str, sparsity: float, block_size: int, backend: str, options: dict[str, Any]) -> dict:
    """Validate :func:`cab_attention.hf.enable`'s arguments (``ValueError`` names the bad one); return the
    options to store (``check_finite`` included: it applies to every prefill call)."""
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


def register() -> None:
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
) -> tuple[torch.Tensor, BlockSelection]:
    """Select and execute for ``q`` (at least one block), ``k``, ``v``; ``mask`` (bool ``(1, 1, Nq, Nk)``)
    is the model's own pattern to intersect with, ``None`` for plain causal."""
    bs = settings.block_size
    options = dict(settings.options)
    # One finite check of q, k and v together (select_blocks and sparse_attention then skip theirs).
    if options.pop("check_finite", True):
        check_finite(q=q, k=k, v=v)
    # Sparsity 0 keeps every causally valid block for every selector (k_i = v_i): that is dense
    # attention, so run the dense kernel (same output as default attention, and faster).
    keeps_all = settings.selector == "dense" or (settings.sparsity == 0.0 and options.get("threshold") is None)
    if keeps_all:
        sel = select_blocks(q, k, selector="dense", sparsity=0.0, block_size=bs, causal=causal, check_finite=False)
        return _dense(q, k, v, mask, causal, scale), sel
    sel = select_blocks(q, k, selector=settings.selector, sparsity=settings.sparsity, block_size=bs, causal=causal,
                        scale=scale, check_finite=False, **options)
    backend = settings.backend
    if backend == "auto":
        backend = "flex" if q.is_cuda else "sdpa"
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

