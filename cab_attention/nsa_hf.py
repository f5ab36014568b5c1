"""NSA as a drop-in attention layer for transformers' Llama-family decoders (training from scratch).

:class:`NSALlamaAttention` keeps the original layer's q/k/v/o projections and applies the rotary
embeddings exactly as the original does, then runs :class:`cab_attention.nsa.NSAAttention` on the
rotated q, k, v; the gates read the query *before* rotation (a position-independent input).
:func:`replace_attention` swaps every decoder layer's ``self_attn``. Training and full-sequence forward
only: no KV cache (call the model with ``use_cache=False``) and no padding (causal masks only).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .nsa import NSAAttention


def _check_causal_mask(mask: Any, n: int) -> None:
    """Raise ``ValueError`` unless ``mask`` is ``None`` or a plain causal mask (no padding)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(f"NSALlamaAttention takes no custom attention mask, got {type(mask).__name__}")
    allowed = mask if mask.dtype == torch.bool else mask == 0
    allowed = allowed[..., -n:, -n:]
    causal = torch.ones(n, n, dtype=torch.bool, device=allowed.device).tril()
    if not torch.equal(allowed, causal.expand_as(allowed)):
        raise ValueError("NSALlamaAttention supports plain causal attention only (no padding or custom masks)")


class NSALlamaAttention(nn.Module):
    """A Llama attention layer whose attention is NSA.

    Args:
        original: the ``LlamaAttention`` (or compatible: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
            ``head_dim``, ``config``) whose projections are kept.
        **nsa_options: :class:`NSAAttention` keyword arguments (block_size, num_selected, window,
            selection, ...).
    """

    def __init__(self, original: nn.Module, **nsa_options: Any):
        super().__init__()
        cfg = original.config
        self.config, self.layer_idx = cfg, getattr(original, "layer_idx", None)
        self.head_dim = original.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = original.q_proj, original.k_proj, original.v_proj, original.o_proj
        self.nsa = NSAAttention(self.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, **nsa_options)
        p = original.q_proj.weight
        self.nsa.to(device=p.device, dtype=p.dtype)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """hidden_states ``[B, N, hidden]`` -> ``([B, N, hidden], None)`` (the transformers layer contract)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("NSALlamaAttention keeps no KV cache; call the model with use_cache=False")
        if position_embeddings is None:
            raise ValueError("position_embeddings (cos, sin) are required, as for LlamaAttention")
        b, n, _ = hidden_states.shape
        _check_causal_mask(attention_mask, n)
        shape = (b, n, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
        # Under autocast the projections give bf16 but float32 cos/sin promote the rotated q, k to float32;
        # NSA takes one dtype, so they go back to the projections' dtype (as SDPA's autocast would cast).
        q_rot, k_rot = q_rot.to(v.dtype), k_rot.to(v.dtype)
        out = self.nsa(q_rot, k_rot, v, gate_input=q)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.o_proj(out), None


def replace_attention(model: nn.Module, **nsa_options: Any) -> nn.Module:
    """Swap every decoder layer's ``self_attn`` for :class:`NSALlamaAttention` (in place); returns the model.

    The model must expose ``model.model.layers[i].self_attn`` (Llama, Qwen2, Mistral, SmolLM2, ...).
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError("model must be a transformers decoder with model.model.layers (Llama family)")
    for layer in layers:
        layer.self_attn = NSALlamaAttention(layer.self_attn, **nsa_options)
    model.config.use_cache = False
    return model
