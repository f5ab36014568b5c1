"""Row-tiled ("streamed") selection and attention for very long causal prefill (one million tokens).

:func:`cab_attention.select_blocks` holds ``[B, H, Mq, Mk]`` tensors (priority, mask, ``kv_indices``,
sort orders). At 1M tokens with 64-token blocks (``M = 16,384``) and 32 query heads each is 8 GiB (bool)
to 64 GiB (int64): it cannot run. This module computes the *same* selection one tile of query-block rows
at a time and never materialises an ``[Mq, Mk]`` tensor:

* **Geometry of a tile.** Rows ``[i0, i1)`` are queries ``[t0, t1)``; causally they see keys
  ``[0, kend)`` with ``kend = min(Nk, (i1 + block_offset) * block_size)``. The tile is a chunked-prefill
  call of its own (its queries are the last of ``k[:kend]``), so its :class:`BlockGrid` has the same
  block alignment, forced blocks and per-row budgets as the whole grid's rows ``i0..i1-1``.
* **Priority per tile**, float32 ``[B, Hq, T, Mk_tile]``: ``magnitude`` (coarse logits), ``streaming``
  (recency), ``dense``, ``antidiagonal`` (the torch twin per tile, or on CUDA the fused Triton estimator
  of :mod:`cab_attention.kernels.antidiagonal` with ``passes=2``: no scratch, memory = the tile's output)
  and ``cab``. Coarse vectors are computed once, in chunks of blocks (``[B, H, M, D]``, small).
* **cab** needs ``R = A @ A`` over every present query block: ``R[I, c] = sum_k A[I, lo + k] A[k, c]``.
  Memory-bounded form (exact, not candidates): one query head at a time; for each column chunk
  ``[c0, c1)`` the strip ``A[k0:i1, c0:c1]`` is recomputed from the coarse vectors (``k0 = c0 - lo``:
  rows above it are causally zero there; ``i1``: the tile's rows see no later node), so ``A`` is never
  held whole. FLOPs ``~ M^3 / 3`` per head (the causal third of the dense ``A @ A``) plus
  ``~ M^3 D / (3 T)`` to recompute ``A``. Augmented Forman's in-strength (a column sum over *all* rows)
  is one pre-pass per head. Only exact zeros are skipped, so priorities equal the torch rule's up to
  float32 summation order.
* **Selection per tile**: the torch rule (``rank_order`` + ``keep_first`` + ``kv_layout``) or on CUDA the
  exact radix select of :mod:`cab_attention.kernels.radix_select` (same set, bit for bit), writing a
  *compact* ``kv_indices`` ``[B, H, T, K]`` with ``K`` = the largest row budget.

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
from . import score as S
from .coarsen import coarsen
from .geometry import BlockGrid, blocks_kept, check_block_size, check_finite, check_qkv, check_sparsity
from .options import check_stride, resolve_options
from .select import keep_first, rank_order, row_rank01
from .selection import BlockSelection, kv_layout

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
        mask = _mask_from_lists(self.kv_num_blocks, self.kv_indices, self.grid.num_kv_blocks)
        num, idx = kv_layout(mask)
        return BlockSelection(mask, num, idx, self.grid, self.selector, self.shared_kv)


def _mask_from_lists(num: torch.Tensor, idx: torch.Tensor, mk: int) -> torch.Tensor:
    k = idx.shape[-1]
    used = torch.arange(k, device=idx.device) < num[..., None].long()
    mask = torch.zeros(*idx.shape[:-1], mk + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(used, idx.long(), mk), True)
    return mask[..., :mk]


# ------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Tile:
    i0: int  # first query-block row
    i1: int  # one past the last
    t0: int  # first query token
    t1: int  # one past the last
    kend: int  # keys the tile's rows can see (causal)
    grid: BlockGrid  # the tile as its own chunked-prefill call


def _tiles(grid: BlockGrid, row_tile: int) -> list[_Tile]:
    bs, pad = grid.block_size, grid.q_pad_front
    out = []
    for i0 in range(0, grid.num_q_blocks, row_tile):
        i1 = min(grid.num_q_blocks, i0 + row_tile)
        t0 = max(0, i0 * bs - pad)
        t1 = min(grid.q_len, i1 * bs - pad)
        kend = grid.offset + t1
        sub = BlockGrid(grid.batch, grid.q_heads, grid.kv_heads, t1 - t0, kend, grid.head_dim, bs, True)
        out.append(_Tile(i0, i1, t0, t1, kend, sub))
    return out


def _row_budget(grid: BlockGrid, sparsity: float, device: torch.device) -> torch.Tensor:
    """``[Mq]`` int64 per-row budget (:meth:`BlockGrid.budget` without its ``[Mq, Mk]`` valid mask)."""
    valid_count = grid.diagonal(device) + 1  # causal: blocks 0..diagonal
    return blocks_kept(valid_count, sparsity)


def _coarsen_chunked(x: torch.Tensor, block_size: int, method: str, pad_front: int, chunk_blocks: int) -> torch.Tensor:
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


# ------------------------------------------------------------------------------------------- priority


def _cab_head_priority(
    qc_h: torch.Tensor,
    kc_h: torch.Tensor,
    grid: BlockGrid,
    tile: _Tile,
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


def _cab_in_strength(qc_h: torch.Tensor, kc_h: torch.Tensor, grid: BlockGrid, scale: float, row_chunk: int) -> torch.Tensor:
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


def _tile_priority(
    selector: str,
    q: torch.Tensor,
    k: torch.Tensor,
    qc: torch.Tensor | None,
    kc: torch.Tensor | None,
    grid: BlockGrid,
    tile: _Tile,
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
        p, d = _cab_head_priority(
            qc[:, h], kc[:, h // g], grid, tile, scale, opts, None if in_strength is None else in_strength[h], col_chunk
        )
        prio[:, h] = p[..., :mk_t]
        if demote is not None:
            demote[:, h] = d[..., :mk_t]
    return prio, demote


# ------------------------------------------------------------------------------------------- selection


def _select_tile(
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


# ------------------------------------------------------------------------------------------- the plan


@dataclass
class _Plan:
    grid: BlockGrid
    selector: str
    sparsity: float
    opts: dict[str, Any]
    scale: float
    share_kv: bool
    use_triton: bool
    tiles: list[_Tile]
    budget: torch.Tensor  # [Mq] int64
    width: int  # K
    qc: torch.Tensor | None
    kc: torch.Tensor | None
    in_strength: list[torch.Tensor] | None
    col_chunk: int

    def select(self, q: torch.Tensor, k: torch.Tensor, tile: _Tile) -> tuple[torch.Tensor, torch.Tensor]:
        budget = self.budget[tile.i0 : tile.i1]
        if self.selector == "dense" or self.grid.q_len < self.grid.block_size:
            return _dense_rows(tile.grid, self.share_kv, budget.shape[0], self.width, q.device)
        prio, demote = _tile_priority(
            self.selector, q, k, self.qc, self.kc, self.grid, tile, self.scale, self.opts, self.use_triton,
            self.in_strength, self.col_chunk,
        )
        return _select_tile(prio, demote, tile.grid, budget, self.width, self.share_kv, self.use_triton)


def _dense_rows(sub: BlockGrid, share_kv: bool, t: int, width: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    heads = sub.kv_heads if share_kv else sub.q_heads
    n = sub.diagonal(dev) + 1  # [T]
    num = n.to(torch.int32).expand(sub.batch, heads, t).contiguous()
    j = torch.arange(width, device=dev)
    idx = torch.where(j[None, :] < n[:, None], j[None, :], 0).to(torch.int32)
    return num, idx.expand(sub.batch, heads, t, width).contiguous()


_OWN = ("row_tile", "col_chunk", "coarsen_chunk", "impl")


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
    budget = _row_budget(grid, sparsity, dev)
    dense = selector == "dense" or grid.q_len < block_size
    if dense:
        budget = grid.diagonal(dev) + 1
    width = int(budget.max())
    qc = kc = None
    in_strength = None
    if not dense and selector in ("magnitude", "cab"):
        qc = _coarsen_chunked(q, block_size, opts["coarsen"], grid.q_pad_front, coarsen_chunk)
        kc = _coarsen_chunked(k, block_size, opts["coarsen"], 0, coarsen_chunk)
        if selector == "cab" and opts["score"] == "forman":
            g = grid.group
            in_strength = [_cab_in_strength(qc[:, h], kc[:, h // g], grid, scale, row_tile) for h in range(grid.q_heads)]
    return _Plan(grid, selector, float(sparsity), opts, scale, bool(opts["share_kv"]), use_triton,
                 _tiles(grid, row_tile), budget, width, qc, kc, in_strength, col_chunk)


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

    mask = _mask_from_lists(num, idx, grid.num_kv_blocks)
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
