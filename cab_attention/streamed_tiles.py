"""Row tiles of the streamed path (:mod:`cab_attention.streamed`).

Geometry of a tile. Rows ``[i0, i1)`` are queries ``[t0, t1)``; causally they see keys
``[0, kend)`` with ``kend = min(Nk, (i1 + block_offset) * block_size)``. The tile is a chunked-prefill
call of its own (its queries are the last of ``k[:kend]``), so its :class:`BlockGrid` has the same
block alignment, forced blocks and per-row budgets as the whole grid's rows ``i0..i1-1``.

Also the per-row budget without an ``[Mq, Mk]`` mask and coarsening in chunks of blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .coarsen import coarsen
from .geometry import BlockGrid, blocks_kept

__all__ = ["RowTile", "coarsen_chunked", "row_budget", "row_tiles"]


@dataclass(frozen=True)
class RowTile:
    """One tile of query-block rows ``[i0, i1)``, its query tokens and the keys it sees."""

    i0: int  # first query-block row
    i1: int  # one past the last
    t0: int  # first query token
    t1: int  # one past the last
    kend: int  # keys the tile's rows can see (causal)
    grid: BlockGrid  # the tile as its own chunked-prefill call


def row_tiles(grid: BlockGrid, row_tile: int) -> list[RowTile]:
    """``grid``'s query-block rows in tiles of ``row_tile`` (the last may be shorter), each with its own grid."""
    bs, pad = grid.block_size, grid.q_pad_front
    out = []
    for i0 in range(0, grid.num_q_blocks, row_tile):
        i1 = min(grid.num_q_blocks, i0 + row_tile)
        t0 = max(0, i0 * bs - pad)
        t1 = min(grid.q_len, i1 * bs - pad)
        kend = grid.offset + t1
        sub = BlockGrid(grid.batch, grid.q_heads, grid.kv_heads, t1 - t0, kend, grid.head_dim, bs, True)
        out.append(RowTile(i0, i1, t0, t1, kend, sub))
    return out


def row_budget(grid: BlockGrid, sparsity: float, device: torch.device) -> torch.Tensor:
    """``[Mq]`` int64 per-row budget (:meth:`BlockGrid.budget` without its ``[Mq, Mk]`` valid mask)."""
    valid_count = grid.diagonal(device) + 1  # causal: blocks 0..diagonal
    return blocks_kept(valid_count, sparsity)


def coarsen_chunked(x: torch.Tensor, block_size: int, method: str, pad_front: int, chunk_blocks: int) -> torch.Tensor:
    """:func:`cab_attention.coarsen.coarsen` of ``x`` ``[B, H, N, D]`` in chunks of blocks (coarsening is
    block-local, so the result is the same; the float32 temporaries stay chunk-sized)."""
    n = x.shape[2]
    m = -(-(pad_front + n) // block_size)
    parts = []
    for c0 in range(0, m, chunk_blocks):
        c1 = min(m, c0 + chunk_blocks)
        a = max(0, c0 * block_size - pad_front)
        b = min(n, c1 * block_size - pad_front)
        parts.append(coarsen(x[:, :, a:b], block_size, method, pad_front=pad_front if c0 == 0 else 0))
    return torch.cat(parts, 2) if len(parts) > 1 else parts[0]

