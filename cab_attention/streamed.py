"""Row-tiled ("streamed") selection and attention for very long causal prefill (one million tokens).

:func:`cab_attention.select_blocks` holds ``[B, H, Mq, Mk]`` tensors (priority, mask, ``kv_indices``,
sort orders). At 1M tokens with 64-token blocks (``M = 16,384``) and 32 query heads each is 8 GiB (bool)
to 64 GiB (int64): it cannot run. This module computes the *same* selection one tile of query-block rows
at a time and never materialises an ``[Mq, Mk]`` tensor; the parts live beside it, one job each:

* :mod:`cab_attention.streamed_tiles`: the geometry of a tile (each tile is a chunked-prefill call of
  its own, with the whole grid's block alignment, forced blocks and budgets) and chunked coarsening;
* :mod:`cab_attention.streamed_priority`: the priority per tile, float32 ``[B, Hq, T, Mk_tile]``, and the
  memory-bounded exact ``R = A @ A`` of ``cab``;
* :mod:`cab_attention.streamed_selection`: the selection per tile and :class:`CompactSelection`, the
  compact ``kv_indices`` ``[B, H, T, K]`` layout with ``K`` = the largest row budget.

:func:`select_blocks_streamed` returns the whole :class:`CompactSelection` (``kv_indices [B, H, Mq, K]``);
:func:`sparse_attention_streamed` selects *and executes* each tile before the next (the Triton
block-sparse kernel on CUDA, the exact reference elsewhere), so even the compact index exists one tile
at a time.

Memory beyond q, k, v and the output at 1M tokens (B=1, Hq=32, Hkv=8, D=128, bf16, 64-token blocks,
M = 16,384, 95% sparsity so K = 820, ``row_tile=256`` query blocks, ``col_chunk=2048``),
:func:`sparse_attention_streamed` (:func:`workspace_bytes` computes it for any shape):

==============================  ====================================  =========
coarse q, k                     ``(Hq + Hkv) M D`` bf16               168 MB
coarsening chunk                ``H * 128 blocks * bs * D`` fp32       134 MB (transient, before tiles)
tile priority                   ``Hq T M`` fp32                       537 MB
cab: A strip, A rows, R, logit  ``M C + 3 T M`` fp32 (one head)       184 MB
tile selection                  ``Hq T K`` int32 + ``Hq T`` int32      27 MB
torch path only (CPU): sorts    ``~4 Hq T M`` int64                   (not used on CUDA)
tile output                     ``Hq T bs D`` bf16                    134 MB
==============================  ====================================  =========

about 1.05 GB at the peak for cab (magnitude 0.87 GB, antidiagonal 0.70 GB; a few transient ``[T, Mk]``
float32 temporaries of one head, 17 MB each, come on top), under the 2 GB target. The whole compact index of
:func:`select_blocks_streamed` adds ``Hq M K * 4`` = 1.72 GB (0.43 GB with ``share_kv``: one list per KV
head), which is why the fused form is the 1M path. ``scripts/gpu_million.py`` measures the peaks.

Restrictions (``ValueError``): causal only; fixed sparsity (no ``threshold``), ``allocation="row"``;
selectors ``dense``, ``magnitude``, ``streaming``, ``antidiagonal``, ``cab``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .options import DEFAULT_SELECTOR
from .geometry import BlockGrid, blocks_kept, check_block_size, check_finite, check_qkv, check_sparsity
from .options import check_stride, resolve_options
from .selection import BlockSelection
from .streamed_priority import cab_in_strength, tile_priority
from .streamed_selection import CompactSelection, dense_rows, mask_from_lists, select_tile
from .streamed_tiles import RowTile, coarsen_chunked, row_budget, row_tiles

#: Selectors the streamed path computes exactly as :func:`cab_attention.select_blocks` does.
STREAMED_SELECTORS = ("dense", "magnitude", "streaming", "antidiagonal", "cab")

__all__ = [
    "STREAMED_SELECTORS",
    "CompactSelection",
    "select_blocks_streamed",
    "sparse_attention_streamed",
    "workspace_bytes",
]


@dataclass
class _Plan:
    """What every tile of one call shares: the checked options, the per-row budgets, the coarse vectors."""

    grid: BlockGrid
    selector: str
    sparsity: float
    opts: dict[str, Any]
    scale: float
    share_kv: bool
    use_triton: bool
    tiles: list[RowTile]
    budget: torch.Tensor  # [Mq] int64
    width: int  # K
    qc: torch.Tensor | None
    kc: torch.Tensor | None
    in_strength: list[torch.Tensor] | None
    col_chunk: int

    def select(self, q: torch.Tensor, k: torch.Tensor, tile: RowTile) -> tuple[torch.Tensor, torch.Tensor]:
        budget = self.budget[tile.i0 : tile.i1]
        if self.selector == "dense" or self.grid.q_len < self.grid.block_size:
            return dense_rows(tile.grid, self.share_kv, budget.shape[0], self.width, q.device)
        prio, demote = tile_priority(
            self.selector, q, k, self.qc, self.kc, self.grid, tile, self.scale, self.opts, self.use_triton,
            self.in_strength, self.col_chunk,
        )
        return select_tile(prio, demote, tile.grid, budget, self.width, self.share_kv, self.use_triton)



def _plan(q, k, selector, sparsity, block_size, causal, options, row_tile, col_chunk, coarsen_chunk, impl) -> _Plan:
    check_qkv(q, k)
    check_block_size(block_size)
    check_sparsity(sparsity)
    if causal is not True:
        raise ValueError(f"causal must be True: the streamed path tiles causal prefill rows, got causal={causal!r}")
    if selector not in STREAMED_SELECTORS:
        raise ValueError(f"selector must be one of {STREAMED_SELECTORS} for the streamed path, got {selector!r}")
    for name, val in (("row_tile", row_tile), ("col_chunk", col_chunk), ("coarsen_chunk", coarsen_chunk)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int (query or key blocks), got {val!r}")
    if impl not in (None, "torch", "triton"):
        raise ValueError(f"impl must be None (triton on CUDA, else torch), 'torch' or 'triton', got {impl!r}")
    opts = resolve_options(selector, options)
    if opts["threshold"] is not None:
        raise ValueError("threshold (adaptive mode) is not supported by the streamed path; pass sparsity instead")
    if opts["allocation"] != "row":
        raise ValueError(f"allocation must be 'row' for the streamed path, got {opts['allocation']!r}")
    if opts["return_diagnostics"]:
        raise ValueError("return_diagnostics=True is not supported by the streamed path (it would hold [Mq, Mk] tensors)")
    if opts["impl"] != "torch":
        raise ValueError("pass impl= to the streamed functions directly (None, 'torch' or 'triton')")
    if selector == "antidiagonal":
        check_stride(opts["stride"], block_size)
    use_triton = q.is_cuda if impl is None else impl == "triton"
    if use_triton:
        from .kernels import HAS_TRITON

        if not HAS_TRITON:
            raise ValueError("impl='triton' needs the triton package")
    if opts["check_finite"]:
        check_finite(q=q, k=k)
    grid = BlockGrid.of(q, k, block_size, True)
    dev = q.device
    scale = float(opts["scale"]) if opts["scale"] is not None else grid.head_dim**-0.5
    budget = row_budget(grid, sparsity, dev)
    dense = selector == "dense" or grid.q_len < block_size
    if dense:
        budget = grid.diagonal(dev) + 1
    width = int(budget.max())
    qc = kc = None
    in_strength = None
    if not dense and selector in ("magnitude", "cab"):
        qc = coarsen_chunked(q, block_size, opts["coarsen"], grid.q_pad_front, coarsen_chunk)
        kc = coarsen_chunked(k, block_size, opts["coarsen"], 0, coarsen_chunk)
        if selector == "cab" and opts["score"] == "forman":
            g = grid.group
            in_strength = [cab_in_strength(qc[:, h], kc[:, h // g], grid, scale, row_tile) for h in range(grid.q_heads)]
    return _Plan(grid, selector, float(sparsity), opts, scale, bool(opts["share_kv"]), use_triton,
                 row_tiles(grid, row_tile), budget, width, qc, kc, in_strength, col_chunk)


def select_blocks_streamed(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    selector: str = DEFAULT_SELECTOR,
    sparsity: float = 0.9,
    block_size: int = 64,
    causal: bool = True,
    row_tile: int = 256,
    col_chunk: int = 2048,
    coarsen_chunk: int = 128,
    impl: str | None = None,
    **options: Any,
) -> CompactSelection:
    """:func:`cab_attention.select_blocks`, one tile of ``row_tile`` query-block rows at a time.

    Args:
        q: ``[B, Hq, Nq, D]`` (the last ``Nq`` of the ``Nk`` positions); k: ``[B, Hkv, Nk, D]``.
        selector: one of :data:`STREAMED_SELECTORS`; sparsity, block_size: as ``select_blocks``.
        causal: ``True`` only.
        row_tile: query blocks per tile (memory ``~ Hq * row_tile * Mk * 4`` bytes for the priority).
        col_chunk: ``cab``: key blocks per recomputed strip of ``A``.
        coarsen_chunk: blocks per coarsening step.
        impl: ``None`` (Triton kernels on CUDA: the fused antidiagonal estimator and the radix select;
            torch elsewhere), ``"torch"`` or ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        **options: the selector's options (:mod:`cab_attention.options`), incl. ``share_kv``, ``coarsen``,
            ``scale``, ``check_finite``; not ``threshold``, ``allocation``, ``return_diagnostics``.

    Returns:
        :class:`CompactSelection`: ``kv_num_blocks [B, H, Mq]`` and ``kv_indices [B, H, Mq, K]`` equal to
        ``select_blocks``'s ``kv_num_blocks`` and ``kv_indices[..., :K]`` (``K`` = largest row budget).
    """
    plan = _plan(q, k, selector, sparsity, block_size, causal, options, row_tile, col_chunk, coarsen_chunk, impl)
    g = plan.grid
    heads = g.kv_heads if plan.share_kv else g.q_heads
    num = torch.empty(g.batch, heads, g.num_q_blocks, dtype=torch.int32, device=q.device)
    idx = torch.empty(g.batch, heads, g.num_q_blocks, plan.width, dtype=torch.int32, device=q.device)
    for tile in plan.tiles:
        n_t, i_t = plan.select(q, k, tile)
        num[:, :, tile.i0 : tile.i1] = n_t
        idx[:, :, tile.i0 : tile.i1] = i_t
    return CompactSelection(num, idx, g, selector, plan.share_kv)


def _execute(q, k, v, num, idx, grid: BlockGrid, shared_kv: bool, scale: float | None, backend: str,
             dense: bool) -> torch.Tensor:
    # ``dense``: the whole call has fewer queries than a block (select_blocks' dense rule); a short
    # *last tile* of a longer call is block-sparse like any other.
    if dense:
        from .execute import dense_attention

        return dense_attention(q, k, v, causal=True, scale=scale)
    if backend == "triton":
        from .kernels.attention import block_sparse_attention, check_triton_available

        check_triton_available(q, grid.block_size)
        return block_sparse_attention(q, k, v, num, idx, grid, shared_kv=shared_kv, scale=scale)
    from .execute import reference_attention

    mask = mask_from_lists(num, idx, grid.num_kv_blocks)
    return reference_attention(q, k, v, BlockSelection(mask, num, idx, grid, "streamed", shared_kv), scale=scale)


def sparse_attention_streamed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    selection: CompactSelection | None = None,
    selector: str = DEFAULT_SELECTOR,
    sparsity: float = 0.9,
    block_size: int = 64,
    causal: bool = True,
    backend: str | None = None,
    row_tile: int = 256,
    col_chunk: int = 2048,
    coarsen_chunk: int = 128,
    impl: str | None = None,
    **options: Any,
) -> torch.Tensor:
    """Block-sparse causal attention, selected and executed one tile of query-block rows at a time.

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]``.
        selection: a :class:`CompactSelection` of these inputs: executed in one launch (selection
            arguments are then ignored). Without it each tile is selected (as
            :func:`select_blocks_streamed`) and executed before the next, so no full-length index exists.
        backend: ``None`` (``"triton"`` on CUDA, ``"reference"`` elsewhere), ``"triton"`` (the block-sparse
            kernel of :mod:`cab_attention.kernels.attention`, compact indices; CUDA or
            ``TRITON_INTERPRET=1``) or ``"reference"`` (exact dense-mask attention per tile).
        other arguments: as :func:`select_blocks_streamed`; ``scale`` is also the attention scale.

    Returns:
        ``[B, Hq, Nq, D]`` in q's dtype.
    """
    check_qkv(q, k, v)
    if backend is None:
        backend = "triton" if q.is_cuda else "reference"
    if backend not in ("triton", "reference"):
        raise ValueError(f"backend must be None, 'triton' or 'reference', got {backend!r}")
    scale = options.get("scale")
    if selection is not None:
        if not isinstance(selection, CompactSelection):
            raise ValueError(f"selection must be a CompactSelection from select_blocks_streamed, got {type(selection).__name__}")
        want = BlockGrid.of(q, k, selection.grid.block_size, True)
        if selection.grid != want:
            raise ValueError(f"selection was made for {selection.grid} but q, k describe {want}")
        if options.get("check_finite", True):
            check_finite(q=q, k=k, v=v)
        return _execute(q, k, v, selection.kv_num_blocks, selection.kv_indices, selection.grid,
                        selection.shared_kv, scale, backend,
                        selection.grid.q_len < selection.grid.block_size)
    if options.get("check_finite", True):
        check_finite(q=q, k=k, v=v)
    options = dict(options, check_finite=False)
    plan = _plan(q, k, selector, sparsity, block_size, causal, options, row_tile, col_chunk, coarsen_chunk, impl)
    out = torch.empty_like(q)
    for tile in plan.tiles:
        num, idx = plan.select(q, k, tile)
        o = _execute(q[:, :, tile.t0 : tile.t1], k[:, :, : tile.kend], v[:, :, : tile.kend], num, idx, tile.grid,
                     plan.share_kv, scale, backend, plan.grid.q_len < plan.grid.block_size)
        out[:, :, tile.t0 : tile.t1] = o
        del num, idx, o
    return out


def workspace_bytes(
    n: int,
    *,
    q_heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 64,
    sparsity: float = 0.95,
    row_tile: int = 256,
    col_chunk: int = 2048,
    selector: str = DEFAULT_SELECTOR,
    elem_bytes: int = 2,
    share_kv: bool = False,
) -> dict[str, int]:
    """Analytic peak workspace (bytes) of :func:`sparse_attention_streamed` on CUDA beyond q, k, v and
    the output, by term (B = 1; the table in the module docstring), plus ``compact_index``: the whole
    ``kv_indices`` that :func:`select_blocks_streamed` returns."""
    m = -(-n // block_size)
    t = min(row_tile, m)
    kmax = blocks_kept(m, sparsity)
    sel_heads = kv_heads if share_kv else q_heads
    terms = {
        "coarse_qk": (q_heads + kv_heads) * m * head_dim * elem_bytes if selector in ("magnitude", "cab") else 0,
        "tile_priority": q_heads * t * m * 4,
        "cab_strips": (m * min(col_chunk, m) + 3 * t * m) * 4 if selector == "cab" else 0,
        "tile_selection": sel_heads * t * (kmax + 1) * 4,
        "tile_output": q_heads * t * block_size * head_dim * elem_bytes,
    }
    terms["total"] = sum(terms.values())
    terms["compact_index"] = sel_heads * m * kmax * 4
    return terms
