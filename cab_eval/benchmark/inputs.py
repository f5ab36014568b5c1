"""What the benchmarks feed the timed code, and the FLOPs they credit it with.

Inputs are random q ``[B, Hq, N, D]``, k and v ``[B, Hkv, N, D]`` in the benchmark dtype, reproducible
from ``--seed``, N and B. FLOPs: the attention tiles a selection computes, counted exactly
(:func:`tile_flops`), the kept tiles counted whole for the kept-tile rate (:func:`kept_flops`), and dense
causal attention per token pair (:func:`dense_causal_flops`).
"""

from __future__ import annotations

from typing import Any

import torch


def make_inputs(cfg: Any, n: int, batch: int):
    """Random q ``[B, Hq, N, D]``, k and v ``[B, Hkv, N, D]`` on the device, in the benchmark dtype."""
    dev = "cuda" if cfg.cuda else "cpu"
    gen = torch.Generator(device=dev).manual_seed(cfg.seed + n + 7919 * batch)
    shape_q = (batch, cfg.heads, n, cfg.head_dim)
    shape_kv = (batch, cfg.kv_heads, n, cfg.head_dim)
    q = torch.randn(shape_q, generator=gen, device=dev, dtype=cfg.dtype)
    k = torch.randn(shape_kv, generator=gen, device=dev, dtype=cfg.dtype)
    v = torch.randn(shape_kv, generator=gen, device=dev, dtype=cfg.dtype)
    return q, k, v


def tile_flops(selection) -> float:
    """FLOPs of the attention tiles a selection computes: ``4 * bs^2 * D`` per kept tile per query head
    (``QK^T`` and ``PV``, a multiply-add = 2 FLOPs), a causal diagonal tile at half. Counted exactly
    from ``kv_num_blocks`` (kept tiles) and the mask's diagonal (always kept, at most one per row)."""
    g = selection.grid
    bs = g.block_size
    kept = selection.kv_num_blocks.to(torch.int64).sum().item()
    if selection.shared_kv:
        kept *= g.group
    diag = 0
    if g.causal:
        m = selection.query_head_mask()
        d = g.diagonal(m.device)
        diag = m.gather(-1, d.view(1, 1, -1, 1).expand(m.shape[0], m.shape[1], -1, 1)).sum().item()
    return 4.0 * bs * bs * g.head_dim * (kept - 0.5 * diag)


def kept_flops(selection) -> float | None:
    """FLOPs of the kept tiles, each counted whole (``4 bs^2 D`` per kept tile and query head): the
    numerator of the *kept-tile rate* that the speed targets name. The formula's home is
    :func:`cab_attention.kernels.attention.kept_tile_flops`; ``None`` where it does not import (no triton)."""
    try:
        from cab_attention.kernels.attention import kept_tile_flops
    except ImportError:
        return None
    return kept_tile_flops(selection.kv_num_blocks, selection.grid, selection.shared_kv)


def dense_causal_flops(batch: int, heads: int, n: int, head_dim: int) -> float:
    """FLOPs of dense causal attention counted per token pair: ``4 D`` per pair ``j <= i``."""
    return 4.0 * head_dim * batch * heads * n * (n + 1) / 2
