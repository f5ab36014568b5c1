"""Stage 1, coarsen: one representative vector per block of tokens.

``max_l2`` (this function's default, and every selector's but ``cab``'s) keeps the block's token with
the largest L2 norm, CAB's original choice: a single loud token survives where mean pooling would
average it away. ``mean`` is ``cab``'s default (it kept more attention mass in an ablation on an H100,
docs/results.md); ``max`` (element-wise) is an ablation. Padded positions never win and never count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COARSEN_METHODS = ("max_l2", "mean", "max")


def coarsen(x: torch.Tensor, block_size: int, method: str = "max_l2", pad_front: int = 0) -> torch.Tensor:
    """Pool tokens into blocks.

    Args:
        x: ``[B, H, N, D]``.
        block_size: tokens per block.
        method: ``"max_l2"`` (token of largest L2 norm; ties to the earliest token), ``"mean"`` or ``"max"``.
        pad_front: virtual padding rows before token 0 (``< block_size``), used to align chunked-prefill
            queries with the key grid.

    Returns:
        ``[B, H, M, D]`` in ``x``'s dtype, ``M = ceil((pad_front + N) / block_size)``.
    """
    if method not in COARSEN_METHODS:
        raise ValueError(f"coarsen must be one of {COARSEN_METHODS}, got {method!r}")
    b, h, n, d = x.shape
    total = pad_front + n
    m = -(-total // block_size)
    pad_back = m * block_size - total
    xp = F.pad(x, (0, 0, pad_front, pad_back)) if (pad_front or pad_back) else x
    xb = xp.view(b, h, m, block_size, d)
    pos = torch.arange(m * block_size, device=x.device).view(m, block_size)
    real = (pos >= pad_front) & (pos < total)  # [M, bs]
    if method == "max_l2":
        norms = xb.float().square().sum(-1)  # [B, H, M, bs]
        norms = norms.masked_fill(~real, float("-inf"))
        idx = norms.argmax(-1)  # first maximum on ties
        return xb.gather(3, idx[..., None, None].expand(b, h, m, 1, d)).squeeze(3)
    if method == "mean":
        count = real.sum(-1).clamp_min(1).to(torch.float32)  # [M]
        s = (xb.float() * real[..., None]).sum(3)
        return (s / count[:, None]).to(x.dtype)
    neg = torch.finfo(x.dtype).min
    return xb.masked_fill(~real[..., None], neg).amax(3)
