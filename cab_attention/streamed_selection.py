"""The selection of one row tile of the streamed path (:mod:`cab_attention.streamed`) and the compact
selection it writes.

Selection per tile: the torch rule (``rank_order`` + ``keep_first`` + ``kv_layout``) or on CUDA the
exact radix select of :mod:`cab_attention.kernels.radix_select` (same set, bit for bit), writing a
*compact* ``kv_indices`` ``[B, H, T, K]`` with ``K`` = the largest row budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry import BlockGrid
from .select_order import keep_first, rank_order
from .selection import BlockSelection, kv_layout

__all__ = ["CompactSelection", "dense_rows", "mask_from_lists", "select_tile"]


@dataclass
class CompactSelection:
    """A selection stored as row lists only (no ``[Mq, Mk]`` mask).

    Attributes:
        kv_num_blocks: ``[B, H, Mq]`` int32, kept blocks per row.
        kv_indices: ``[B, H, Mq, K]`` int32, each row's kept key blocks ascending, then zeros;
            ``K`` is the largest row budget.
        grid: the block grid; selector: the selector's name; shared_kv: ``H`` is the KV heads.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    grid: BlockGrid
    selector: str
    shared_kv: bool = False

    def to_block_selection(self) -> BlockSelection:
        """The equivalent :class:`BlockSelection` (builds the ``[B, H, Mq, Mk]`` mask: small inputs only)."""
        mask = mask_from_lists(self.kv_num_blocks, self.kv_indices, self.grid.num_kv_blocks)
        num, idx = kv_layout(mask)
        return BlockSelection(mask, num, idx, self.grid, self.selector, self.shared_kv)


def mask_from_lists(num: torch.Tensor, idx: torch.Tensor, mk: int) -> torch.Tensor:
    """The ``[..., Mk]`` bool mask of row lists: ``num [...]`` kept blocks, ``idx [..., K]`` their indices
    (columns past ``num`` are ignored; they scatter into a spare column that is cut off)."""
    k = idx.shape[-1]
    used = torch.arange(k, device=idx.device) < num[..., None].long()
    mask = torch.zeros(*idx.shape[:-1], mk + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(used, idx.long(), mk), True)
    return mask[..., :mk]


def select_tile(
    prio: torch.Tensor,
    demote: torch.Tensor | None,
    sub: BlockGrid,
    budget: torch.Tensor,
    width: int,
    share_kv: bool,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``budget`` ``[T]`` blocks per row of the tile. Returns ``(num [B, H, T], idx [B, H, T, width])``."""
    if share_kv:
        prio = prio.reshape(sub.batch, sub.kv_heads, sub.group, *prio.shape[2:]).mean(2)
        if demote is not None:
            demote = demote.reshape(sub.batch, sub.kv_heads, sub.group, *demote.shape[2:]).all(2)
    if use_triton and demote is None:
        from .kernels.radix_select import radix_select_rows

        _, num, idx = radix_select_rows(prio, budget, sub.block_offset, True, write_mask=False, index_width=width)
        # The kernel leaves columns past the tile's key blocks unwritten; the layout promises zeros there.
        past = torch.arange(width, device=idx.device) >= num[..., None]
        return num, idx.masked_fill_(past, 0)
    dev = prio.device
    order = rank_order(prio, sub.valid(dev), sub.forced(dev), demote)
    mask = keep_first(order, budget)
    num, idx = kv_layout(mask)
    w = min(width, idx.shape[-1])
    out = torch.zeros(*idx.shape[:-1], width, dtype=torch.int32, device=dev)
    out[..., :w] = idx[..., :w]
    return num, out


def dense_rows(sub: BlockGrid, share_kv: bool, t: int, width: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense selection of a tile's ``t`` rows, every causally valid block kept:
    ``(num [B, H, t] int32, idx [B, H, t, width] int32)``."""
    heads = sub.kv_heads if share_kv else sub.q_heads
    n = sub.diagonal(dev) + 1  # [T]
    num = n.to(torch.int32).expand(sub.batch, heads, t).contiguous()
    j = torch.arange(width, device=dev)
    idx = torch.where(j[None, :] < n[:, None], j[None, :], 0).to(torch.int32)
    return num, idx.expand(sub.batch, heads, t, width).contiguous()
