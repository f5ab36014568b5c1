"""The packed FlexAttention layout of a variable-length batch's per-sequence selections
(:class:`VarlenSelection`, made by :func:`cab_attention.varlen.select_blocks_varlen`).

**Packed block layout (why padding to block boundaries).** FlexAttention tiles both axes into blocks of
one size starting at token 0. In flash-attn's packing a sequence starts at an arbitrary token, so its
blocks would straddle tile boundaries: the kernel's tiles would no longer be the selection's blocks, a
kept block would cost two tiles, and every straddling tile would need a token-level document mask. So
each sequence is placed on whole blocks of a padded packed axis: on the query axis sequence ``b``
occupies ``Mq_b`` blocks from packed block ``Q_b = sum_{c<b} Mq_c``, with the chunked-prefill front
padding of its own grid (``grid.q_pad_front``) and end padding to a whole block; on the key axis ``Mk_b``
blocks from ``K_b = sum_{c<b} Mk_c``. Sequence ``b``'s kept block ``(i, j)`` is packed block
``(Q_b + i, K_b + j)``: the per-sequence ``kv_indices`` are stacked row-wise with a column offset, no
block ever holds tokens of two sequences, and no cross-sequence block exists to skip. The price is at
most one block of padding per sequence and axis (copied once into padded buffers; padded query rows are
computed only inside their sequence's kept blocks and dropped).

Kept blocks strictly below a sequence's diagonal and inside its keys are *full* (no ``mask_mod``); the
diagonal blocks and a sequence's partial last key block are *partial* and go through a document mask:
same sequence (padding belongs to none) and, when causal, key position <= query position (positions
within the sequence, queries shifted by the chunked-prefill offset ``Nk_b - Nq_b``).

On CUDA the packed ``BlockMask``'s ``kv_indices`` are ``[1, Hq, sum Mq_b, W]`` with ``W =
ceil(max_seqlen_k / block_size)`` columns (capped by the packed key blocks), not one column per packed
key block: the Triton kernel reads only the first ``kv_num_blocks`` entries of a row (through the
tensor's strides), and the full width would be quadratic in the batch's total length (``B = 32``
sequences of 8k tokens, 32 heads: ~2.5 GB per index tensor instead of ~0.1 GB). Consequently
``BlockMask.to_dense()`` of a narrow mask is *not* the packed block mask. The full width is used on CPU
(Inductor's CPU lowering of FlexAttention asserts that ``kv_indices`` span every key block) and with
gradients enabled (the backward pass needs the transposed index, built from the full width).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .select import kv_layout
from .selection import BlockSelection


@dataclass
class VarlenSelection:
    """Per-sequence selections of a packed batch, and their packed FlexAttention layout.

    Attributes:
        selections: one :class:`BlockSelection` per sequence (batch 1), ``None`` for a sequence without
            queries.
        seqlens_q, seqlens_k: the length of every sequence.
        block_size, causal: as passed to :func:`select_blocks_varlen`.
        q_heads, kv_heads: ``Hq``, ``Hkv``.
        max_seqlen_k: as passed; sets the width of the packed ``kv_indices``.
    """

    selections: list[BlockSelection | None]
    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    block_size: int
    causal: bool
    q_heads: int
    kv_heads: int
    max_seqlen_k: int

    @property
    def batch(self) -> int:
        return len(self.selections)

    def _blocks(self) -> tuple[list[int], list[int], list[int]]:
        """Per sequence: query blocks, key blocks, front padding. A sequence without queries keeps its keys
        on the packed key axis (every key token has a row of its own) and has no query blocks."""
        mq, mk, front = [], [], []
        for s, nk in zip(self.selections, self.seqlens_k):
            g = s.grid if s is not None else None
            mq.append(g.num_q_blocks if g else 0)
            mk.append(g.num_kv_blocks if g else -(-nk // self.block_size))
            front.append(g.q_pad_front if g else 0)
        return mq, mk, front

    @property
    def q_block_starts(self) -> list[int]:
        """``[B + 1]``: the first packed query block of every sequence (``Q_b``), then the total."""
        return prefix_sums(self._blocks()[0])

    @property
    def kv_block_starts(self) -> list[int]:
        """``[B + 1]``: the first packed key block of every sequence (``K_b``), then the total."""
        return prefix_sums(self._blocks()[1])

    @property
    def packed_lengths(self) -> tuple[int, int]:
        """Tokens of the padded packed query and key axes (whole blocks)."""
        bs = self.block_size
        return self.q_block_starts[-1] * bs, self.kv_block_starts[-1] * bs

    @property
    def density(self) -> float:
        """Kept blocks over causally valid blocks, over every sequence, head and row (1.0 is dense)."""
        kept = total = 0
        for s in self.selections:
            if s is None:
                continue
            valid = s.valid
            kept += (s.mask & valid).sum().item()
            total += valid.sum().item() * s.mask.shape[0] * s.mask.shape[1]
        return kept / total if total else 1.0

    def packed_rows(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Where every real token sits on the padded packed axes.

        Returns ``q_rows`` ``[total_q]`` and ``k_rows`` ``[total_k]`` int64: token ``t`` of sequence ``b``
        is packed query row ``Q_b * bs + front_b + t`` and packed key row ``K_b * bs + t``.
        """
        bs = self.block_size
        _, _, front = self._blocks()
        q_base = [qs * bs + f for qs, f in zip(self.q_block_starts[:-1], front)]
        k_base = [ks * bs for ks in self.kv_block_starts[:-1]]
        return _rows(q_base, self.seqlens_q, device), _rows(k_base, self.seqlens_k, device)

    def document_mask_mod(self, device: torch.device | str):
        """The ``mask_mod`` of the packed partial blocks: same sequence and (causal) key <= query position.

        ``q_idx`` and ``kv_idx`` are packed padded indices; padding rows and columns belong to no sequence.
        """
        tq, tk = self.packed_lengths
        q_rows, k_rows = self.packed_rows(device)
        b = torch.arange(self.batch, device=device, dtype=torch.int32)
        lq = torch.tensor(self.seqlens_q, device=device)
        lk = torch.tensor(self.seqlens_k, device=device)
        q_doc = torch.full((tq,), -1, dtype=torch.int32, device=device)
        kv_doc = torch.full((tk,), -2, dtype=torch.int32, device=device)
        q_doc[q_rows] = b.repeat_interleave(lq)
        kv_doc[k_rows] = b.repeat_interleave(lk)
        # Position of each query in its sequence's key coordinates (chunked prefill: the last Nq of Nk).
        q_pos = torch.zeros(tq, dtype=torch.int32, device=device)
        kv_pos = torch.zeros(tk, dtype=torch.int32, device=device)
        q_pos[q_rows] = (_local_positions(lq) + (lk - lq).repeat_interleave(lq)).to(torch.int32)
        kv_pos[k_rows] = _local_positions(lk).to(torch.int32)
        causal = self.causal

        def mask_mod(b, h, q_idx, kv_idx):
            same = q_doc[q_idx] == kv_doc[kv_idx]
            if causal:
                return same & (kv_pos[kv_idx] <= q_pos[q_idx])
            return same

        return mask_mod

    def to_block_mask(self, for_backward: bool = False, full_width: bool | None = None):
        """The packed FlexAttention ``BlockMask`` (see the module docstring for the layout).

        ``BLOCK_SIZE`` is the selection block size on both axes; ``kv_num_blocks`` ``[1, Hq, sum Mq_b]``;
        ``kv_indices`` ``[1, Hq, sum Mq_b, W]`` with ``W = sum Mk_b`` when ``full_width`` (default: on
        CPU or ``for_backward``), else ``W = min(ceil(max_seqlen_k / bs), sum Mk_b)``.
        ``for_backward`` also builds the transposed index.
        """
        from torch.nn.attention.flex_attention import BlockMask

        bs = self.block_size
        present = [s for s in self.selections if s is not None]
        if not present:
            raise ValueError("the batch has no queries: every sequence has Nq = 0")
        dev = present[0].mask.device
        total_kv_blocks = self.kv_block_starts[-1]
        if full_width is None:
            full_width = for_backward or dev.type == "cpu"
        if for_backward and not full_width:
            raise ValueError("for_backward=True needs full_width=True (the transposed index reads every key block)")
        width = total_kv_blocks if full_width else min(-(-self.max_seqlen_k // bs), total_kv_blocks)
        parts: list[tuple[torch.Tensor, ...]] = []
        for s, k0 in zip(self.selections, self.kv_block_starts[:-1]):
            if s is None:
                continue
            g = s.grid
            m = s.query_head_mask()  # [1, Hq, Mq, Mk]
            mk = g.num_kv_blocks
            j = torch.arange(mk, device=dev)
            partial = torch.zeros(g.num_q_blocks, mk, dtype=torch.bool, device=dev)
            if g.causal:
                partial |= j[None, :] >= g.diagonal(dev)[:, None]
            if g.kv_len % bs:
                partial |= j[None, :] == mk - 1
            p_num, p_idx = kv_layout(m & partial)
            f_num, f_idx = kv_layout(m & ~partial)
            parts.append((p_num, _shift_pad(p_idx, k0, width), f_num, _shift_pad(f_idx, k0, width)))
        p_num, p_idx, f_num, f_idx = (torch.cat(t, dim=2) for t in zip(*parts))
        tq, tk = self.packed_lengths
        return BlockMask.from_kv_blocks(
            p_num,
            p_idx,
            f_num,
            f_idx,
            BLOCK_SIZE=bs,
            mask_mod=self.document_mask_mod(dev),
            seq_lengths=(tq, tk),
            compute_q_blocks=for_backward,
        )


def prefix_sums(xs: list[int]) -> list[int]:
    """``[len(xs) + 1]``: 0, then the running sums of ``xs``."""
    out = [0]
    for x in xs:
        out.append(out[-1] + x)
    return out


def _local_positions(lens: torch.Tensor) -> torch.Tensor:
    """``[sum(lens)]`` int64: 0..len-1 for every sequence in turn."""
    total = int(lens.sum())
    starts = torch.cumsum(lens, 0) - lens
    return torch.arange(total, device=lens.device) - starts.repeat_interleave(lens)


def _rows(base: list[int], lens: tuple[int, ...], device) -> torch.Tensor:
    lt = torch.tensor(lens, device=device)
    return _local_positions(lt) + torch.tensor(base, device=device).repeat_interleave(lt)


def _shift_pad(idx: torch.Tensor, offset: int, width: int) -> torch.Tensor:
    """A sequence's ``kv_indices`` moved to its packed key blocks and cut or padded to ``width`` columns
    (entries past ``kv_num_blocks`` are never read)."""
    idx = idx[..., :width] + offset
    if idx.shape[-1] < width:
        idx = torch.nn.functional.pad(idx, (0, width - idx.shape[-1]))
    return idx.to(torch.int32)
