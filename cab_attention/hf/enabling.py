"""Switch a transformers model to CAB attention and back, and record what its attention calls did.

:func:`enable` registers :func:`cab_attention.hf.attention.cab_attention_forward` and calls
``model.set_attn_implementation(ATTN_NAME)``; the settings live on each attention module, so two models
can run different settings side by side. :func:`disable` restores the previous implementation.

Recording: ``with record(model) as log: model(...)`` collects one :class:`CallRecord` per attention call
(layer, lengths, kept and valid blocks) in an :class:`AttentionCallLog`; ``log.density`` is the effective
block density over all sparse prefill calls; ``capture=[layer, ...]`` also keeps those layers' q, k, v
and selection.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..options import DEFAULT_SELECTOR
from .attention import ATTN_NAME, CABSettings, CallRecord, check_settings, register


@dataclass
class AttentionCallLog:
    """The attention calls of one :func:`record` block. ``captured[layer]`` is a list (one entry per call) of dicts with
    ``q``, ``k``, ``v`` (the tensors the attention function received, detached, on their device) and
    ``selection`` (the :class:`BlockSelection`, ``None`` on dense calls; a list of per-row selections
    when the batch was padded)."""

    capture: frozenset[int] = frozenset()
    calls: list[CallRecord] = field(default_factory=list)
    captured: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def kept_blocks(self) -> int:
        return sum(c.kept_blocks for c in self.calls if c.sparse)

    @property
    def valid_blocks(self) -> int:
        return sum(c.valid_blocks for c in self.calls if c.sparse)

    @property
    def dense_layers(self) -> list[int | None]:
        """Layers whose calls ran dense because of their sliding window (``"sliding-dense"``: prefill and decode)."""
        return sorted({c.layer for c in self.calls if c.path == "sliding-dense"}, key=lambda x: (x is None, x))

    @property
    def density(self) -> float | None:
        """Kept over valid blocks, summed over every block-sparse call (layers, heads, rows); dense calls
        (decode, short chunks, sliding-window layers left dense: :attr:`dense_layers`) are not in it;
        ``None`` if no call was block-sparse (e.g. the prompt was shorter than a block)."""
        valid = self.valid_blocks
        return self.kept_blocks / valid if valid else None

    def per_layer(self) -> dict[int | None, float]:
        """Effective density of each layer over its block-sparse calls."""
        kept: dict[int | None, int] = {}
        valid: dict[int | None, int] = {}
        for c in self.calls:
            if not c.sparse:
                continue
            kept[c.layer] = kept.get(c.layer, 0) + c.kept_blocks
            valid[c.layer] = valid.get(c.layer, 0) + c.valid_blocks
        return {layer: kept[layer] / valid[layer] for layer in kept if valid[layer]}

    def reset(self) -> None:
        self.calls.clear()
        self.captured.clear()



def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
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
    selector: str = DEFAULT_SELECTOR,
    sparsity: float = 0.9,
    block_size: int = 64,
    backend: str = "auto",
    sliding: str = "dense",
    **options: Any,
) -> Any:
    """Switch a loaded transformers model to CAB attention; returns the model.

    Args:
        model: a ``PreTrainedModel`` whose attention goes through transformers' ``AttentionInterface``
            (Llama, Mistral, Qwen2, Gemma and most current decoder models).
        selector: one of :data:`cab_attention.SELECTORS`.
        sparsity: in ``[0, 1)``, the share of causal blocks each query-block row drops.
        block_size: selection block (a power of two).
        backend: ``"auto"`` (on CUDA the Triton kernel, flex for windowed selections; sdpa elsewhere), ``"reference"``, ``"flex"``, ``"triton"`` or ``"sdpa"``
            (see :data:`HF_BACKENDS`).
        sliding: what happens to sliding-window layers (those transformers calls with ``sliding_window=``):
            ``"dense"`` (default) runs them exactly as the model's SDPA attention with its window mask
            (they already cost ``O(N w)``; recorded as ``"sliding-dense"``, outside the density);
            ``"sparse"`` selects inside the window (a window-local sink, the diagonal, the budget over the
            blocks the window allows) and executes under the window exactly.
        **options: selector options (see :mod:`cab_attention.options`); not ``scale``, which is always
            the model's own ``scaling``. ``check_finite=False`` skips the NaN/inf check of each prefill
            call's q, k and v (on by default; decode calls are not checked).

    Calling ``enable`` again on an enabled model replaces its settings; :func:`disable` still restores
    the implementation the model had before the first call.
    """
    _check_model(model)
    options = check_settings(selector, sparsity, block_size, backend, options, sliding)
    mods = attention_modules(model)
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
    settings = CABSettings(selector, float(sparsity), int(block_size), backend, options, previous=previous,
                           sliding=sliding)
    if old is not None:
        settings.recorders = old.recorders  # an open record() block keeps recording across a re-enable
    register()
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
    mods = attention_modules(model)
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
    mods = attention_modules(model)
    return getattr(mods[0], "_cab_settings", None) if mods else None


@contextlib.contextmanager
def record(model: Any, capture: Any = ()) -> Iterator[AttentionCallLog]:
    """Record every attention call of an enabled model while the block runs.

    Args:
        model: a model after :func:`enable`.
        capture: layer indices whose q, k, v and selection are kept (memory: the full tensors).

    Yields:
        An :class:`AttentionCallLog`; ``rec.density`` is the effective density of the block-sparse calls.
    """
    settings = settings_of(model)
    if settings is None:
        raise ValueError("record(model): enable CAB attention first (cab_attention.hf.enable(model, ...))")
    try:
        layers = frozenset(int(i) for i in capture)
    except (TypeError, ValueError) as e:
        raise ValueError(f"capture must be an iterable of layer indices, got {capture!r}") from e
    rec = AttentionCallLog(capture=layers)
    settings.recorders.append(rec)
    try:
        yield rec
    finally:
        settings.recorders.remove(rec)



# Old names kept for one release.
_attention_modules = attention_modules


def __getattr__(name: str) -> Any:
    if name == "Recorder":
        warnings.warn("cab_attention.hf.Recorder is deprecated; use cab_attention.hf.AttentionCallLog",
                      DeprecationWarning, stacklevel=2)
        return AttentionCallLog
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
