"""Packed variable-length batches: selection per sequence, one FlexAttention launch for the batch.

Layout (flash-attn's ``flash_attn_varlen_func``): q ``[total_q, Hq, D]``, k and v ``[total_k, Hkv, D]``,
``cu_seqlens_q`` and ``cu_seqlens_k`` int32 ``[B + 1]``; sequence ``b`` owns rows
``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of k and v.
Inside a sequence the library's rules hold unchanged: ``Nq_b <= Nk_b`` and the queries are the *last*
``Nq_b`` of the ``Nk_b`` positions (chunked prefill), blocks start at the sequence's own first key, the
budgets are per row. A sequence with no queries is skipped; one shorter than a block attends densely.

Selection runs :func:`cab_attention.select_blocks` once per sequence (a Python loop over ``B``), so the
result is the per-sequence result by construction. Execution is one kernel launch for the whole batch:

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

FlexAttention compiles with static shapes (as in :mod:`cab_attention.execute`), so each new packed
length compiles once; the document mask reads its sequence layout from tensors, so batches of the same
packed shape reuse the compiled kernel.

Backends: ``reference`` runs :func:`cab_attention.sparse_attention` with ``backend="reference"`` per
sequence (exact: the ground truth, any device and dtype); ``flex`` the one packed launch; ``auto`` flex on
CUDA (not float64), reference elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .options import DEFAULT_SELECTOR
from .execute import BACKENDS, check_flex_available, compiled_flex_attention, flex_kernel_options, sparse_attention
from .geometry import check_block_size
from .select import kv_layout
from .selection import BlockSelection
from .select import select_blocks

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------------------------------
# input checks


def _check_packed(name: str, t: Any, heads_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [total, {heads_name}, D], got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be 3-D [total, {heads_name}, D] (flash-attn's packed layout), got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (float32, float16, bfloat16, float64), got {t.dtype}")
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(f"{name} must have non-empty head and head_dim dimensions, got shape {tuple(t.shape)}")


def _seqlens(name: str, cu: Any, total: int, tensor_name: str) -> list[int]:
    """The per-sequence lengths of a ``cu_seqlens`` tensor, after checking it."""
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"{name} must be an int32 torch.Tensor [B + 1], got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be int32 (flash-attn's cu_seqlens), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D [B + 1] with B >= 1, got shape {tuple(cu.shape)}")
    vals = [int(x) for x in cu.tolist()]
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {vals[0]}")
    lens = [b - a for a, b in zip(vals[:-1], vals[1:])]
    bad = [i for i, n in enumerate(lens) if n < 0]
    if bad:
        i = bad[0]
        raise ValueError(
            f"{name} must be non-decreasing (sorted cumulative lengths), but {name}[{i + 1}] = {vals[i + 1]} "
            f"< {name}[{i}] = {vals[i]}"
        )
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] = {vals[-1]} must equal the packed length of {tensor_name} ({total})")
    return lens


def _check_max_seqlen(name: str, value: Any, lens: list[int]) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int (the longest sequence, or an upper bound), got {value!r}")
    longest = max(lens)
    if value < longest:
        i = lens.index(longest)
        raise ValueError(f"{name} = {value} is smaller than the length of sequence {i} ({longest})")


def check_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> tuple[list[int], list[int]]:
    """Check packed inputs; return the query and key length of every sequence.

    Raises ``ValueError`` naming the argument for: wrong shapes or dtypes, q, k, v disagreeing (dtype,
    device, heads, head_dim), ``cu_seqlens`` not int32 ``[B + 1]``, not starting at 0, decreasing, not
    ending at the packed length, a different ``B`` for queries and keys, a ``max_seqlen`` below a real
    length, or a sequence with more queries than keys.
    """
    _check_packed("q", q, "Hq")
    _check_packed("k", k, "Hkv")
    named = [("k", k)] + ([("v", v)] if v is not None else [])
    if v is not None:
        _check_packed("v", v, "Hkv")
    for name, t in named:
        if t.dtype != q.dtype:
            raise ValueError(f"q, k and v must share one dtype; q is {q.dtype} but {name} is {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q, k and v must be on one device; q is on {q.device} but {name} is on {t.device}")
        if t.shape[2] != q.shape[2]:
            raise ValueError(f"head_dim differs: q has D={q.shape[2]} but {name} has D={t.shape[2]}")
    if v is not None and v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k and v must have the same [total_k, Hkv], got {tuple(k.shape[:2])} and {tuple(v.shape[:2])}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"the query heads (Hq={q.shape[1]}) must be a multiple of the key/value heads (Hkv={k.shape[1]}) for GQA")
    lens_q = _seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q")
    lens_k = _seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k")
    if len(lens_q) != len(lens_k):
        raise ValueError(
            f"cu_seqlens_q describes B={len(lens_q)} sequences but cu_seqlens_k describes B={len(lens_k)}; "
            "they must describe the same batch"
        )
    _check_max_seqlen("max_seqlen_q", max_seqlen_q, lens_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k, lens_k)
    for b, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        if nq > nk:
            raise ValueError(
                f"sequence {b} has more queries than keys (Nq={nq} > Nk={nk}): queries must be the last Nq of "
                "the sequence's Nk positions"
            )
    return lens_q, lens_k


# --------------------------------------------------------------------------------------------------
# selection


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
        return _cumsum(self._blocks()[0])

    @property
    def kv_block_starts(self) -> list[int]:
        """``[B + 1]``: the first packed key block of every sequence (``K_b``), then the total."""
        return _cumsum(self._blocks()[1])

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


def _cumsum(xs: list[int]) -> list[int]:
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


def _sequence(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows ``start:end`` of a packed ``[total, H, D]`` tensor as a contiguous ``[1, H, n, D]``."""
    return x[start:end].transpose(0, 1).unsqueeze(0).contiguous()


def select_blocks_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    selector: str = DEFAULT_SELECTOR,
    sparsity: float = 0.9,
    block_size: int = 64,
    causal: bool = True,
    **options: Any,
) -> VarlenSelection:
    """Select blocks for every sequence of a packed batch (one :func:`select_blocks` call per sequence).

    Args:
        q: ``[total_q, Hq, D]``; k: ``[total_k, Hkv, D]``, ``Hq % Hkv == 0``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` cumulative lengths, from 0 to ``total``.
        max_seqlen_q, max_seqlen_k: the longest sequence (or an upper bound).
        selector, sparsity, block_size, causal, **options: as :func:`cab_attention.select_blocks`,
            applied to each sequence alone.

    Returns:
        A :class:`VarlenSelection`.
    """
    lens_q, lens_k = check_varlen(q, k, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_block_size(block_size)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    cq, ck = _cumsum(lens_q), _cumsum(lens_k)
    sels: list[BlockSelection | None] = []
    for b in range(len(lens_q)):
        if lens_q[b] == 0:
            sels.append(None)
            continue
        sels.append(
            select_blocks(
                _sequence(q, cq[b], cq[b + 1]),
                _sequence(k, ck[b], ck[b + 1]),
                selector=selector,
                sparsity=sparsity,
                block_size=block_size,
                causal=causal,
                **options,
            )
        )
    return VarlenSelection(sels, tuple(lens_q), tuple(lens_k), block_size, causal, q.shape[1], k.shape[1], max_seqlen_k)


# --------------------------------------------------------------------------------------------------
# execution


def _check_varlen_selection(sel: Any, lens_q, lens_k, q, k, block_size, causal) -> None:
    if not isinstance(sel, VarlenSelection):
        raise ValueError(f"selection must be a VarlenSelection from select_blocks_varlen, got {type(sel).__name__}")
    got = (sel.seqlens_q, sel.seqlens_k, sel.q_heads, sel.kv_heads, sel.block_size, sel.causal)
    want = (tuple(lens_q), tuple(lens_k), q.shape[1], k.shape[1], block_size, causal)
    if got != want:
        raise ValueError(
            "selection was made for (seqlens_q, seqlens_k, Hq, Hkv, block_size, causal) = "
            f"{got} but the inputs describe {want}; select again for these inputs"
        )


def packed_flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: VarlenSelection,
    *,
    scale: float | None = None,
    block_mask: Any = None,
) -> torch.Tensor:
    """One FlexAttention launch over the packed ``BlockMask``. Shapes as :func:`sparse_attention_varlen`.

    ``block_mask``: the selection's :meth:`VarlenSelection.to_block_mask`, when already built (e.g. to
    time the kernel alone); built here otherwise.
    """
    tq, tk = selection.packed_lengths
    q_rows, k_rows = selection.packed_rows(q.device)
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    # Contiguous [1, H, T, D] buffers (FlexAttention's usual layout); padding rows are zeros.
    qp = q.new_zeros(1, hq, tq, d)
    kp = k.new_zeros(1, hkv, tk, d)
    vp = v.new_zeros(1, hkv, tk, d)
    qp[0][:, q_rows] = q.transpose(0, 1)
    kp[0][:, k_rows] = k.transpose(0, 1)
    vp[0][:, k_rows] = v.transpose(0, 1)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if block_mask is None:
        block_mask = selection.to_block_mask(for_backward=needs_grad)
    out = compiled_flex_attention()(
        qp,
        kp,
        vp,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=hq != hkv,
        kernel_options=flex_kernel_options(selection.block_size, q.device.type),
    )
    return out[0][:, q_rows].transpose(0, 1).contiguous()


def sparse_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    selector: str = DEFAULT_SELECTOR,
    sparsity: float = 0.9,
    block_size: int = 64,
    causal: bool = True,
    backend: str = "auto",
    selection: VarlenSelection | None = None,
    **options: Any,
) -> torch.Tensor:
    """Block-sparse attention over a packed variable-length batch.

    Args:
        q: ``[total_q, Hq, D]``; k, v: ``[total_k, Hkv, D]`` (flash-attn's packed layout).
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]``; max_seqlen_q, max_seqlen_k: ints (see
            :func:`check_varlen`).
        selector, sparsity, block_size, causal, **options: as :func:`cab_attention.sparse_attention`,
            applied per sequence; ``scale`` also sets the attention scale.
        backend: ``"auto"`` (flex on CUDA, not float64; else reference), ``"reference"`` (per-sequence
            exact attention) or ``"flex"`` (one launch for the batch).
        selection: a :class:`VarlenSelection` for these inputs (then selector, sparsity and the selector
            options are not used).

    Returns:
        ``[total_q, Hq, D]`` in q's dtype.
    """
    lens_q, lens_k = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_block_size(block_size)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "flex" if q.is_cuda and q.dtype != torch.float64 else "reference"
    if backend == "flex":
        check_flex_available(q.unsqueeze(0), block_size)
    scale = options.get("scale")
    if selection is None:
        selection = select_blocks_varlen(
            q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            selector=selector, sparsity=sparsity, block_size=block_size, causal=causal, **options,
        )
    else:
        extra = sorted(set(options) - {"scale"})
        if extra:
            raise ValueError(f"selector options {extra} have no effect with a given selection; pass them to select_blocks_varlen")
        _check_varlen_selection(selection, lens_q, lens_k, q, k, block_size, causal)
    if sum(lens_q) == 0:
        return q.new_empty(q.shape)
    if backend == "flex":
        return packed_flex_attention(q, k, v, selection, scale=scale)
    out = torch.empty_like(q)
    cq, ck = _cumsum(lens_q), _cumsum(lens_k)
    for b, sel in enumerate(selection.selections):
        if sel is None:
            continue
        qb, kb, vb = (_sequence(x, c[b], c[b + 1]) for x, c in ((q, cq), (k, ck), (v, ck)))
        ob = sparse_attention(qb, kb, vb, selection=sel, causal=causal, backend="reference", scale=scale)
        out[cq[b] : cq[b + 1]] = ob[0].transpose(0, 1)
    return out
