"""The priority of one row tile of the streamed path (:mod:`cab_attention.streamed`), computed as
:func:`cab_attention.select_blocks` computes it for those rows, without an ``[Mq, Mk]`` tensor.

Priority per tile, float32 ``[B, Hq, T, Mk_tile]``: ``magnitude`` (coarse logits), ``streaming``
(recency), ``dense``, ``antidiagonal`` (the torch twin per tile, or on CUDA the fused Triton estimator
of :mod:`cab_attention.kernels.antidiagonal` with ``passes=2``: no scratch, memory = the tile's output)
and ``cab``. Coarse vectors are computed once, in chunks of blocks (``[B, H, M, D]``, small).

cab needs ``R = A @ A`` over every present query block: ``R[I, c] = sum_k A[I, lo + k] A[k, c]``.
Memory-bounded form (exact, not candidates): one query head at a time; for each column chunk
``[c0, c1)`` the strip ``A[k0:i1, c0:c1]`` is recomputed from the coarse vectors (``k0 = c0 - lo``:
rows above it are causally zero there; ``i1``: the tile's rows see no later node), so ``A`` is never
held whole. FLOPs ``~ M^3 / 3`` per head (the causal third of the dense ``A @ A``) plus
``~ M^3 D / (3 T)`` to recompute ``A``. Augmented Forman's in-strength (a column sum over *all* rows)
is one pre-pass per head. Only exact zeros are skipped, so priorities equal the torch rule's up to
float32 summation order.
"""

from __future__ import annotations

from typing import Any

import torch

from . import score as S
from .geometry import BlockGrid
from .select_order import row_rank01
from .streamed_tiles import RowTile

__all__ = ["cab_head_priority", "cab_in_strength", "tile_priority"]


def cab_head_priority(
    qc_h: torch.Tensor,
    kc_h: torch.Tensor,
    grid: BlockGrid,
    tile: RowTile,
    scale: float,
    opts: dict[str, Any],
    in_strength: torch.Tensor | None,
    col_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``cab``'s priority of one query head for the tile's rows, full key width.

    Args: qc_h ``[B, Mq, D]`` (all query blocks), kc_h ``[B, Mk, D]``; in_strength ``[B, Mk]`` (Forman).
    Returns ``(priority [B, T, Mk] float32, demote [B, T, Mk] bool or None)``.
    """
    mk, lo = grid.num_kv_blocks, grid.block_offset
    i0, i1 = tile.i0, tile.i1
    dev = qc_h.device
    rows = torch.arange(i0, i1, device=dev)
    cols = torch.arange(mk, device=dev)
    diag = (rows + lo).clamp_max(mk - 1)
    valid = cols[None, :] <= diag[:, None]  # [T, Mk]
    logits = S.coarse_logits(qc_h[:, None, i0:i1], kc_h[:, None], scale)[:, 0]  # [B, T, Mk]
    a = S.affinity(logits, valid)
    # R[I, c] = sum_k A[I, lo + k] A[k, c]; A[I, lo + k] = 0 for k >= i1, A[k, c] = 0 for k < c - lo.
    r = torch.zeros_like(a)
    a_rows = a[..., lo : lo + i1]  # [B, T, i1]
    for c0 in range(0, min(mk, i1 + lo), col_chunk):
        c1 = min(mk, c0 + col_chunk)
        k0 = max(0, c0 - lo)
        if k0 >= i1:
            break
        kr = torch.arange(k0, i1, device=dev)
        strip_valid = torch.arange(c0, c1, device=dev)[None, :] <= (kr + lo).clamp_max(mk - 1)[:, None]
        strip = S.affinity(S.coarse_logits(qc_h[:, None, k0:i1], kc_h[:, None, c0:c1], scale)[:, 0], strip_valid)
        r[..., c0:c1] = torch.matmul(a_rows[..., k0:i1], strip)
    if opts["score"] == "forman":
        f = S.augmented_forman(a, r, in_strength=in_strength[:, None, :])
    else:
        f = S.triangle_proxy(a, r, lam=float(opts["lam"]), norm=opts["norm"])
    prio = -f if opts["keep"] == "lowest" else f
    w = float(opts["hybrid"])
    if w > 0:
        prio = (1 - w) * row_rank01(prio, valid) + w * row_rank01(logits, valid)
    demote = a <= 0 if opts["edges"] == "positive" else None
    return prio, demote


def cab_in_strength(qc_h: torch.Tensor, kc_h: torch.Tensor, grid: BlockGrid, scale: float, row_chunk: int) -> torch.Tensor:
    """Column sums of ``A`` over every present query block (augmented Forman's in-strength), ``[B, Mk]``."""
    mq, mk, lo = grid.num_q_blocks, grid.num_kv_blocks, grid.block_offset
    dev = qc_h.device
    total = torch.zeros(qc_h.shape[0], mk, device=dev)
    cols = torch.arange(mk, device=dev)
    for i0 in range(0, mq, row_chunk):
        i1 = min(mq, i0 + row_chunk)
        valid = cols[None, :] <= (torch.arange(i0, i1, device=dev) + lo).clamp_max(mk - 1)[:, None]
        a = S.affinity(S.coarse_logits(qc_h[:, None, i0:i1], kc_h[:, None], scale)[:, 0], valid)
        total += a.sum(-2)
    return total


def tile_priority(
    selector: str,
    q: torch.Tensor,
    k: torch.Tensor,
    qc: torch.Tensor | None,
    kc: torch.Tensor | None,
    grid: BlockGrid,
    tile: RowTile,
    scale: float,
    opts: dict[str, Any],
    use_triton: bool,
    in_strength: list[torch.Tensor] | None,
    col_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tile's priority ``[B, Hq, T, Mk_tile]`` float32 and demotion mask (or ``None``)."""
    sub = tile.grid
    mk_t = sub.num_kv_blocks
    b, hq, t = grid.batch, grid.q_heads, tile.i1 - tile.i0
    dev = q.device
    if selector in ("streaming", "dense"):
        j = torch.arange(mk_t, device=dev, dtype=torch.float32)
        return j.expand(b, hq, t, mk_t), None
    if selector == "magnitude":
        return S.coarse_logits(qc[:, :, tile.i0 : tile.i1], kc[:, :, :mk_t], scale), None
    if selector == "antidiagonal":
        q_t, k_t = q[:, :, tile.t0 : tile.t1], k[:, :, : tile.kend]
        if use_triton:
            from .kernels.antidiagonal import antidiagonal_mass

            return antidiagonal_mass(q_t, k_t, sub, scale, int(opts["stride"]), passes=2), None
        return S.antidiagonal_mass(q_t, k_t, sub, scale, stride=int(opts["stride"])), None
    # cab: one query head at a time.
    prio = torch.empty(b, hq, t, mk_t, device=dev, dtype=torch.float32)
    demote = torch.empty(b, hq, t, mk_t, device=dev, dtype=torch.bool) if opts["edges"] == "positive" else None
    g = grid.group
    for h in range(hq):
        p, d = cab_head_priority(
            qc[:, h], kc[:, h // g], grid, tile, scale, opts, None if in_strength is None else in_strength[h], col_chunk
        )
        prio[:, h] = p[..., :mk_t]
        if demote is not None:
            demote[:, h] = d[..., :mk_t]
    return prio, demote

