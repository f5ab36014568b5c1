"""The result of selection: a block mask, its FlexAttention layout, and how to execute it.

One home each for: the FlexAttention layout of a block mask (:func:`kv_layout`), the dense selection
(:func:`dense_selection`), the token-level mask (:meth:`BlockSelection.token_mask`) and the FlexAttention
``BlockMask`` (:func:`block_mask`; its ``fast=True`` form is the sort-free twin in
:mod:`cab_attention.kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .geometry import BlockGrid


def kv_layout(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's layout of a block mask.

    Args: mask ``[B, H, Mq, Mk]`` bool.

    Returns:
        ``kv_num_blocks`` ``[B, H, Mq]`` int32 and ``kv_indices`` ``[B, H, Mq, Mk]`` int32: the kept key
        blocks of each row in ascending order, then zeros (FlexAttention reads only the first
        ``kv_num_blocks`` entries).
    """
    mk = mask.shape[-1]
    num = mask.sum(-1, dtype=torch.int32)
    # A kept block goes to its rank among the kept blocks of its row; the others to a spare column that
    # is cut off. A scatter instead of a sort: O(Mk) per row.
    pos = torch.where(mask, mask.cumsum(-1) - 1, mk)
    idx = torch.zeros(*mask.shape[:-1], mk + 1, dtype=torch.int32, device=mask.device)
    src = torch.arange(mk, dtype=torch.int32, device=mask.device).expand_as(mask)
    idx.scatter_(-1, pos, src)
    return num, idx[..., :mk].contiguous()


@dataclass
class BlockSelection:
    """Kept key blocks per query block.

    Attributes:
        mask: ``[B, H, Mq, Mk]`` bool; ``H`` is the query heads, or the KV heads when ``shared_kv``.
        kv_num_blocks: ``[B, H, Mq]`` int32, kept blocks per row.
        kv_indices: ``[B, H, Mq, Mk]`` int32, the kept blocks of each row first, ascending.
        grid: the block grid (lengths, heads, block size, causality, chunked-prefill alignment).
        selector: the selector's name.
        shared_kv: one mask per KV head instead of one per query head.
        diagnostics: the predictor's internals when asked for (``return_diagnostics=True``).
    """

    mask: torch.Tensor
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    grid: BlockGrid
    selector: str
    shared_kv: bool = False
    diagnostics: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def block_size(self) -> int:
        return self.grid.block_size

    @property
    def valid(self) -> torch.Tensor:
        """``[Mq, Mk]`` bool causally valid blocks."""
        return self.grid.valid(self.mask.device)

    @property
    def density(self) -> float:
        """Kept blocks over causally valid blocks, over all batches, heads and rows (1.0 is dense)."""
        valid = self.valid
        kept = (self.mask & valid).sum().item()
        total = valid.sum().item() * self.mask.shape[0] * self.mask.shape[1]
        return kept / total

    def query_head_mask(self) -> torch.Tensor:
        """``[B, Hq, Mq, Mk]`` bool, the mask of every query head (shared masks repeated per group)."""
        if self.shared_kv:
            return self.mask.repeat_interleave(self.grid.group, dim=1)
        return self.mask

    def token_mask(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``[B, Hq, stop - start, Nk]`` bool token-level mask (kept blocks and causality) of queries
        ``start:stop`` (default all ``Nq``). ``Nq x Nk`` per head: callers chunk over queries."""
        g = self.grid
        bs = g.block_size
        stop = g.q_len if stop is None else stop
        m = self.query_head_mask()
        rows = torch.arange(start, stop, device=m.device) + g.q_pad_front  # padded-query index
        cols = torch.arange(g.kv_len, device=m.device)
        tok = m[:, :, rows // bs][..., cols // bs]
        if g.causal:
            pos = (rows + g.offset - g.q_pad_front)[:, None]
            tok = tok & (cols[None, :] <= pos)
            if g.window is not None:
                tok = tok & (cols[None, :] > pos - g.window)
        return tok

    def check_rows(self) -> None:
        """Raise ``ValueError`` if some row keeps no causally valid block (its softmax would be empty
        and its output NaN); every selection from :func:`cab_attention.select_blocks` keeps at least
        the sink and diagonal blocks, so this catches hand-edited masks."""
        kept = (self.mask & self.valid).any(-1)
        if not bool(kept.all()):
            b, h, i = (int(x) for x in torch.nonzero(~kept)[0])
            raise ValueError(
                f"selection.mask keeps no causally valid key block in row (batch {b}, head {h}, query block "
                f"{i}); every row must keep at least one (select_blocks keeps the sink and diagonal blocks)"
            )

    def to_block_mask(self, for_backward: bool = False):
        """FlexAttention ``BlockMask`` of this selection: :func:`block_mask`."""
        return block_mask(self, for_backward=for_backward)


def dense_selection(
    grid: BlockGrid, selector: str = "dense", share_kv: bool = False, device: torch.device | str = "cpu"
) -> BlockSelection:
    """The selection that keeps every causally valid block: ``H`` = KV heads if ``share_kv`` else query heads."""
    heads = grid.kv_heads if share_kv else grid.q_heads
    mask = grid.valid(device).expand(grid.batch, heads, grid.num_q_blocks, grid.num_kv_blocks).clone()
    num, idx = kv_layout(mask)
    return BlockSelection(mask, num, idx, grid, selector, share_kv)


def block_mask(selection: BlockSelection, *, for_backward: bool = False, fast: bool = False):
    """FlexAttention ``BlockMask`` built from the coarse block mask (never from a token mask).

    Its ``BLOCK_SIZE`` is the selection block size on both axes and its query axis is the padded
    query axis (front padding of ``grid.q_pad_front`` rows, end padding to whole blocks), so the
    executing kernel must tile by a divisor of the block size: :mod:`cab_attention.execute` passes
    matching ``BLOCK_M``/``BLOCK_N`` kernel options. Kept blocks strictly below the diagonal and
    inside the keys are *full* (no mask_mod call); the diagonal block and a partial last key block
    are *partial* and go through the causal / length ``mask_mod``. ``for_backward=True`` also builds
    the transposed index that gradients need.

    ``fast=True`` takes :func:`cab_attention.kernels.block_mask` instead: the same mask built in
    ``O(B H Mq)`` from ``kv_indices`` without sorting; it trusts ``kv_indices`` (the mask is not read)
    and has no backward index.
    """
    if fast:
        if selection.grid.window is not None:
            raise ValueError("block_mask(fast=True) knows only the diagonal as a partial block, not a sliding "
                             "window's edge; use fast=False for a windowed selection")
        if for_backward:
            raise ValueError("block_mask(fast=True) builds no backward index; use fast=False for gradients")
        from .kernels import HAS_TRITON

        if not HAS_TRITON:
            raise ValueError("block_mask(fast=True) lives in cab_attention.kernels, which needs triton")
        from .kernels import block_mask as fast_block_mask

        return fast_block_mask(selection)
    from torch.nn.attention.flex_attention import BlockMask

    g = selection.grid
    m = selection.query_head_mask()
    dev = m.device
    mk = g.num_kv_blocks
    j = torch.arange(mk, device=dev)
    partial = torch.zeros(g.num_q_blocks, mk, dtype=torch.bool, device=dev)
    if g.causal:
        partial |= j[None, :] >= g.diagonal(dev)[:, None]
    if g.kv_len % g.block_size:
        partial |= j[None, :] == mk - 1
    if g.window is not None:
        # A key block is full only when every query of the row (padded rows too) sees all of it.
        last_q = torch.arange(g.num_q_blocks, device=dev) * g.block_size + g.offset - g.q_pad_front + g.block_size - 1
        partial |= (j[None, :] * g.block_size) <= (last_q - g.window)[:, None]
    part_num, part_idx = kv_layout(m & partial)
    full_num, full_idx = kv_layout(m & ~partial)
    return BlockMask.from_kv_blocks(
        part_num,
        part_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=g.block_size,
        mask_mod=make_mask_mod(g),
        seq_lengths=(g.num_q_blocks * g.block_size, mk * g.block_size),
        # The transposed (q-block) index is only read by the backward pass; prefill skips building it.
        compute_q_blocks=for_backward,
    )


def make_mask_mod(grid: BlockGrid):
    """Token-level mask for partial blocks: causal (with the chunked-prefill offset), inside the sliding
    window when the grid has one, and inside ``Nk``.

    ``q_idx`` is the padded-query index, ``kv_idx`` the key index.
    """
    shift = grid.offset - grid.q_pad_front
    kv_len = grid.kv_len
    causal = grid.causal
    window = grid.window

    def mask_mod(b, h, q_idx, kv_idx):
        inside = kv_idx < kv_len
        if causal and window is not None:
            return inside & (kv_idx <= q_idx + shift) & (kv_idx > q_idx + shift - window)
        if causal:
            return inside & (kv_idx <= q_idx + shift)
        return inside

    return mask_mod
