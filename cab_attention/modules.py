"""Drop-in ``nn.Module``s: a CAB attention layer and a pre-norm transformer block around it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .options import DEFAULT_SELECTOR
from .execute import BACKENDS, sparse_attention
from .geometry import check_block_size, check_finite, check_sparsity
from .options import resolve_options
from .select import select_blocks


class CABAttention(nn.Module):
    """Multi-head (GQA-capable) self-attention whose prefill runs block-sparse.

    RoPE-free: positions are the caller's business. ``**options`` are selector options
    (:data:`cab_attention.options.COMMON_OPTIONS` and the selector's own), ``check_finite`` included. ``forward(x)`` takes ``[B, N, dim]`` and returns
    ``[B, N, dim]``; ``forward(x, return_selection=True)`` also returns the :class:`BlockSelection`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        block_size: int = 64,
        sparsity: float = 0.9,
        selector: str = DEFAULT_SELECTOR,
        *,
        backend: str = "auto",
        causal: bool = True,
        bias: bool = False,
        **options: Any,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, val in (("dim", dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        check_block_size(block_size)
        check_sparsity(sparsity)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        resolve_options(selector, options)
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.block_size, self.sparsity, self.selector = block_size, sparsity, selector
        self.backend, self.causal, self.options = backend, causal, dict(options)
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, return_selection: bool = False):
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, N, dim={self.dim}], got shape {tuple(x.shape)}")
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        opts = dict(self.options)
        # One finite check of q, k and v together, before selecting.
        if opts.pop("check_finite", True):
            check_finite(q=q, k=k, v=v)
        sel = select_blocks(
            q, k, selector=self.selector, sparsity=self.sparsity, block_size=self.block_size,
            causal=self.causal, check_finite=False, **opts,
        )
        scale = opts.get("scale")
        out = sparse_attention(
            q, k, v, selection=sel, block_size=self.block_size, causal=self.causal, backend=self.backend,
            check_finite=False, **({"scale": scale} if scale is not None else {}),
        )
        y = self.o_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        return (y, sel) if return_selection else y


class CABAttentionLayer(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))`` (GELU MLP)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        block_size: int = 64,
        sparsity: float = 0.9,
        selector: str = DEFAULT_SELECTOR,
        *,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        **attn_kwargs: Any,
    ):
        super().__init__()
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CABAttention(dim, num_heads, num_kv_heads, block_size, sparsity, selector, **attn_kwargs)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))
