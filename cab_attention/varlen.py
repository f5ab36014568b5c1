"""Packed variable-length batches: selection per sequence, one FlexAttention launch for the batch.

Layout (flash-attn's ``flash_attn_varlen_func``): q ``[total_q, Hq, D]``, k and v ``[total_k, Hkv, D]``,
``cu_seqlens_q`` and ``cu_seqlens_k`` int32 ``[B + 1]``; sequence ``b`` owns rows
``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of k and v.
Inside a sequence the library's rules hold unchanged: ``Nq_b <= Nk_b`` and the queries are the *last*
``Nq_b`` of the ``Nk_b`` positions (chunked prefill), blocks start at the sequence's own first key, the
budgets are per row. A sequence with no queries is skipped; one shorter than a block attends densely.

Selection runs :func:`cab_attention.select_blocks` once per sequence (a Python loop over ``B``), so the
result is the per-sequence result by construction. Execution is one kernel launch for the whole batch,
over the packed block layout of :mod:`cab_attention.varlen_layout` (why each sequence sits on whole
blocks, which kept blocks are full and which partial, the width of the packed ``kv_indices``).

FlexAttention compiles with static shapes (as in :mod:`cab_attention.execute`), so each new packed
length compiles once; the document mask reads its sequence layout from tensors, so batches of the same
packed shape reuse the compiled kernel.

Backends: ``reference`` runs :func:`cab_attention.sparse_attention` with ``backend="reference"`` per
sequence (exact: the ground truth, any device and dtype); ``flex`` the one packed launch; ``auto`` flex on
CUDA (not float64), reference elsewhere.

The input checks are in :mod:`cab_attention.varlen_checks`, the packed layout in
:mod:`cab_attention.varlen_layout`; :func:`check_varlen` and :class:`VarlenSelection` are re-exported here.
"""

from __future__ import annotations

from typing import Any

import torch

from .options import DEFAULT_SELECTOR
from .execute import BACKENDS, check_flex_available, compiled_flex_attention, flex_kernel_options, sparse_attention
from .geometry import check_block_size
from .selection import BlockSelection
from .select import select_blocks
from .varlen_checks import check_varlen
from .varlen_layout import VarlenSelection, prefix_sums

__all__ = ["VarlenSelection", "check_varlen", "packed_flex_attention", "select_blocks_varlen", "sparse_attention_varlen"]


# --------------------------------------------------------------------------------------------------
# selection


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
    cq, ck = prefix_sums(lens_q), prefix_sums(lens_k)
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
    cq, ck = prefix_sums(lens_q), prefix_sums(lens_k)
    for b, sel in enumerate(selection.selections):
        if sel is None:
            continue
        qb, kb, vb = (_sequence(x, c[b], c[b + 1]) for x, c in ((q, cq), (k, ck), (v, ck)))
        ob = sparse_attention(qb, kb, vb, selection=sel, causal=causal, backend="reference", scale=scale)
        out[cq[b] : cq[b + 1]] = ob[0].transpose(0, 1)
    return out
