"""Native Sparse Attention (NSA) with a pluggable selection branch.

NSA (Yuan et al. 2025, arXiv:2502.11089; reference design fla-org/native-sparse-attention) mixes three
attention branches over the same q, k, v with sigmoid gates per query head:

* **compressed**: each key (value) block of ``l`` tokens, taken every ``d`` tokens, becomes one token
  through a small learned map (an MLP over the flattened block plus a learned intra-block position
  embedding). Query ``t`` attends to the compressed tokens whose whole block lies at or before ``t``;
  a query with none (``t < l - 1``) gets zeros from this branch.
* **selected**: per query block and KV head (shared by the KV group, as NSA does for GQA), exactly
  ``min(v_i, n)`` key blocks of ``block_size`` tokens are kept (``v_i`` causally valid blocks of row
  ``i``): the sink block 0 and the diagonal block, then the highest priorities. The priority is the
  pluggable part (``selection``): ``"nsa"`` is NSA's own (the compressed-attention probabilities of
  the block's queries, summed over the KV group's query heads and over the queries of the block, mapped
  from compressed tokens to selection blocks by their share of overlap), and any library selector
  (``"cab"``, ``"antidiagonal"``, ...) ranks by its own scores (``share_kv`` averaging over the group),
  so every choice keeps the same number of blocks per row. The choice is not differentiated (as in NSA);
  gradients flow through the attention over the chosen blocks.
* **window**: query ``t`` attends to keys ``t - w < s <= t``.

``output = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` with ``g = sigmoid(x W_h + b_h)`` per query
head ``h``, ``x`` the head's query (or ``gate_input``, e.g. the query before rotary embeddings).

Execution: ``flex`` runs the selected and window branches as FlexAttention ``BlockMask`` calls
(CUDA, forward and backward); ``reference`` runs them as exact dense-mask attention (any device and
dtype, the ground truth; FlexAttention does not run float64). ``auto`` picks flex for CUDA tensors that
are not float64. FlexAttention's block is the selection block unless ``flex_block_size`` asks for a
coarser one (on Hopper at head_dim 64-128, Inductor's default backward tile needs 128-token blocks;
finer blocks train through its slower-to-compile tile search). The compressed branch is small (``N x N/d``) and is dense-mask SDPA on both paths.

Training and prefill only: q, k, v have the same length (no KV cache, no chunked prefill).

Causality: every differentiable path is causal (tested). The block choice, shared by the queries of a
query block so that it maps onto FlexAttention tiles, reads all of that block's queries (and, for
NSA's own scores, the compressed tokens they see), so query ``t``'s choice may depend on queries and
keys later in its own block; the chosen blocks themselves are always at or before the diagonal. NSA's
paper chooses per query token (fla-org's kernels too); per-block choice is this module's simplification.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .execute import compiled_flex_attention, flex_kernel_options
from .geometry import BlockGrid, check_block_size, check_qkv
from .options import SELECTORS, check_int_at_least, resolve_options
from .select import keep_first, rank_order, select_blocks
from .selection import kv_layout

NSA_SELECTIONS = ("nsa",) + tuple(s for s in SELECTORS if s != "dense")
"""Selection-branch choices: NSA's own compressed-attention ranking, or a library selector."""

NSA_BACKENDS = ("auto", "reference", "flex")

# Options the module sets itself for a library selector: one mask per KV head (NSA's GQA sharing), the
# fixed budget (no adaptive threshold), the rank order from the diagnostics, the torch path.
_RESERVED_OPTIONS = ("share_kv", "threshold", "return_diagnostics", "impl")


def num_compressed(seq_len: int, block_len: int, stride: int) -> int:
    """Compressed tokens of a sequence: whole blocks ``[c*stride, c*stride + block_len)`` inside it."""
    return 0 if seq_len < block_len else (seq_len - block_len) // stride + 1


def compressed_visible(seq_len: int, block_len: int, stride: int, device: Any = "cpu") -> torch.Tensor:
    """``[N, C]`` bool: compressed token ``c`` is visible to query ``t`` when its block ends at or before ``t``."""
    c = num_compressed(seq_len, block_len, stride)
    ends = torch.arange(c, device=device) * stride + block_len - 1
    return ends[None, :] <= torch.arange(seq_len, device=device)[:, None]


def compressed_to_blocks(num_tokens: int, block_len: int, stride: int, num_blocks: int, block_size: int) -> torch.Tensor:
    """``[C, Mk]`` float: share of compressed token ``c``'s span that lies in selection block ``j``.

    With ``l = d = block_size`` it is the identity; overlapping or larger compression blocks spread a
    compressed token's score over the selection blocks it summarises, in proportion to the overlap.
    """
    start = torch.arange(num_tokens)[:, None] * stride
    lo = torch.arange(num_blocks)[None, :] * block_size
    overlap = (torch.minimum(start + block_len, lo + block_size) - torch.maximum(start, lo)).clamp_min(0)
    return overlap.double() / block_len


class BlockCompressor(nn.Module):
    """Compress each block of ``block_len`` tokens (every ``stride`` tokens) to one token.

    ``phi(x_block) = MLP(flatten(x_block + pos))`` with a learned ``[block_len, D]`` position embedding
    and a two-layer GELU MLP ``block_len * D -> hidden -> D``, shared by all heads (NSA's ``phi``).
    """

    def __init__(self, head_dim: int, block_len: int, stride: int, hidden: int | None = None):
        super().__init__()
        self.block_len, self.stride = block_len, stride
        hidden = head_dim if hidden is None else hidden
        self.pos = nn.Parameter(torch.randn(block_len, head_dim) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(block_len * head_dim, hidden), nn.GELU(), nn.Linear(hidden, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, H, N, D]`` -> ``[B, H, C, D]``, ``C = num_compressed(N, block_len, stride)``."""
        b, h, n, d = x.shape
        if n < self.block_len:
            return x.new_zeros(b, h, 0, d)
        blocks = x.unfold(2, self.block_len, self.stride).transpose(-1, -2)  # [B, H, C, l, D]
        return self.mlp((blocks + self.pos).flatten(-2))


def compressed_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, block_len: int, stride: int, scale: float) -> torch.Tensor:
    """The compressed branch. q ``[B, Hq, N, D]``, kc, vc ``[B, Hkv, C, D]`` -> ``[B, Hq, N, D]``.

    Queries that see no compressed token return zeros: they attend to token 0 for a finite softmax and
    their output is multiplied by 0 (so no gradient flows from them).
    """
    n, c = q.shape[2], kc.shape[2]
    if c == 0:
        return torch.zeros_like(q)
    keep = compressed_visible(n, block_len, stride, q.device)
    seen = keep.any(-1, keepdim=True)
    keep = keep | (~seen & (torch.arange(c, device=q.device) == 0))
    group = q.shape[1] // kc.shape[1]
    # Compressed K/V are short ([C, D] per head): repeating them per query head keeps SDPA on its fused
    # masked kernels, which do not all take grouped heads.
    out = F.scaled_dot_product_attention(
        q, kc.repeat_interleave(group, 1), vc.repeat_interleave(group, 1), attn_mask=keep, scale=scale
    )
    return out * seen.to(out.dtype)


@torch.no_grad()
def nsa_block_priority(
    q: torch.Tensor, kc: torch.Tensor, grid: BlockGrid, block_len: int, stride: int, scale: float, chunk_blocks: int = 64
) -> torch.Tensor:
    """NSA's selection score: ``[B, Hkv, Mq, Mk]`` float.

    For query block ``i`` and KV head ``h``: the compressed-attention probabilities of the block's
    queries, summed over the KV group's query heads and the block's queries, mapped to selection blocks
    by :func:`compressed_to_blocks`. Computed in float32 (float64 inputs stay float64), in chunks of
    query blocks so that memory is ``O(chunk x C)``.
    """
    b, hq, n, d = q.shape
    hkv, c = kc.shape[1], kc.shape[2]
    bs, mq, mk = grid.block_size, grid.num_q_blocks, grid.num_kv_blocks
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if c == 0:
        return torch.zeros(b, hkv, mq, mk, device=q.device, dtype=dt)
    qg = q.to(dt).view(b, hkv, hq // hkv, n, d)
    kt = kc.to(dt).transpose(-1, -2).unsqueeze(2)  # [B, Hkv, 1, D, C]
    visible = compressed_visible(n, block_len, stride, q.device)
    per_block = torch.zeros(b, hkv, mq, c, device=q.device, dtype=dt)
    for i0 in range(0, mq, chunk_blocks):
        i1 = min(mq, i0 + chunk_blocks)
        r0, r1 = i0 * bs, min(n, i1 * bs)
        s = torch.matmul(qg[:, :, :, r0:r1], kt) * scale  # [B, Hkv, G, rows, C]
        vis = visible[r0:r1]
        p = s.masked_fill(~vis, float("-inf")).softmax(-1)
        p = torch.where(vis.any(-1, keepdim=True), p, torch.zeros((), device=q.device, dtype=dt)).sum(2)
        p = F.pad(p, (0, 0, 0, (i1 - i0) * bs - (r1 - r0)))  # whole blocks of rows
        per_block[:, :, i0:i1] = p.view(b, hkv, i1 - i0, bs, c).sum(3)
    to_blocks = compressed_to_blocks(c, block_len, stride, mk, bs).to(device=q.device, dtype=dt)
    return per_block @ to_blocks


def keep_top(priority: torch.Tensor, grid: BlockGrid, num_selected: int) -> torch.Tensor:
    """``[B, H, Mq, Mk]`` bool: per row the sink and diagonal blocks, then the highest priorities (ties
    to the more recent block), ``min(v_i, num_selected)`` blocks in all."""
    dev = priority.device
    valid = grid.valid(dev)
    order = rank_order(priority, valid, grid.forced(dev))
    return keep_first(order, valid.sum(-1).clamp_max(num_selected))


def _causal_window_mod(limit: torch.Tensor):
    """Token mask ``kv <= q < kv + limit``. ``limit`` is a captured 0-d tensor, so the selected branch
    (limit past the sequence) and the window branch share one compiled kernel per shape."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < limit)

    return mask_mod


def window_blocks(grid: BlockGrid, window: int, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``([Mq, Mk], [Mq, Mk])`` bool: blocks the window touches, and blocks it covers entirely."""
    bs = grid.block_size
    i = torch.arange(grid.num_q_blocks, device=device)[:, None]
    j = torch.arange(grid.num_kv_blocks, device=device)[None, :]
    touched = (j <= i) & ((i - j - 1) * bs + 1 < window)
    full = (j < i) & ((i - j + 1) * bs - 1 < window)
    return touched, full


def _selected_mod(table: torch.Tensor, block_size: int):
    """Token mask ``kv <= q`` and block ``(q // block_size, kv // block_size)`` of ``table``
    ``[B|1, H|1, Mq, Mk]`` kept: the selected branch at the selection's granularity when FlexAttention's
    blocks are coarser (a size-1 batch or head dimension of ``table`` is shared)."""
    per_batch, per_head = table.shape[0] > 1, table.shape[1] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        kept = table[b if per_batch else 0, h if per_head else 0, q_idx // block_size, kv_idx // block_size]
        return (kv_idx <= q_idx) & kept

    return mask_mod


def coarsen_blocks(kept: torch.Tensor, full: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block masks at ``factor`` times the block size: ``[..., Mq, Mk]`` -> ``[..., ceil(Mq/f), ceil(Mk/f)]``.

    A coarse block is kept when any of its ``factor x factor`` blocks is, and full (no mask_mod needed)
    only when every one of them is kept and full; blocks past the edge count as neither."""
    mq, mk = kept.shape[-2:]
    cq, ck = -(-mq // factor), -(-mk // factor)
    pad = (0, ck * factor - mk, 0, cq * factor - mq)
    kept_f, full_f = (F.pad(t, pad).unflatten(-1, (ck, factor)).unflatten(-3, (cq, factor)) for t in (kept, kept & full))
    return kept_f.any(-1).any(-2), full_f.all(-1).all(-2)


def _flex_branch(q, k, v, kept, full, limit, bs, scale, flex_block=None):
    """FlexAttention over ``kept`` ``[B|1, Hq|1, Mq, Mk]`` blocks, ``full`` ones (broadcastable to it)
    skipping the mask_mod.

    ``limit`` is the window (a 0-d tensor) or ``None`` for the selected branch. ``flex_block``
    (default ``bs``, a multiple of it): FlexAttention's block; a coarser block than the selection's holds
    several selection blocks, and its mask_mod reads which of them are kept (``kept`` itself)."""
    from torch.nn.attention.flex_attention import BlockMask

    flex_block = bs if flex_block is None else flex_block
    n = q.shape[2]
    if flex_block == bs:
        if limit is None:
            limit = torch.full((), kept.shape[-1] * bs + 1, device=q.device)  # a fill: no host-to-device copy, no sync
        mask_mod = _causal_window_mod(limit)
    else:
        factor = flex_block // bs
        if limit is None:  # the table is read at rows and columns up to the coarse grid's edge
            mask_mod = _selected_mod(F.pad(kept, (0, -kept.shape[-1] % factor, 0, -kept.shape[-2] % factor)), bs)
        else:  # the window is a token rule: exact at any block size
            mask_mod = _causal_window_mod(limit)
        kept, full = coarsen_blocks(kept, full, factor)
    mk = kept.shape[-1]
    pad = mk * flex_block - n
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    part_num, part_idx = kv_layout(kept & ~full)
    full_num, full_idx = kv_layout(kept & full)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    block_mask = BlockMask.from_kv_blocks(
        part_num, part_idx, full_num, full_idx, BLOCK_SIZE=flex_block, mask_mod=mask_mod,
        seq_lengths=(mk * flex_block, mk * flex_block), compute_q_blocks=needs_grad,
    )
    # Training at blocks under 128 tokens needs the backward-capable compile: Inductor's default backward
    # tile (64 x 128 on Hopper at head_dim 64-128) cannot take them, its max-autotune list can (a tile
    # search per new shape). Every default backward tile in Inductor's tables is at most 128 wide, so
    # 128-token blocks keep the plain compile.
    autotune = needs_grad and flex_block < 128
    out = compiled_flex_attention(max_autotune=autotune)(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=flex_kernel_options(flex_block, q.device.type, for_backward=needs_grad),
    )
    return out[:, :, :n]


def _masked_attention(q, k, v, keep, scale):
    """Exact attention under a token mask ``keep`` broadcastable to ``[B, Hq, N, N]``."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


class NSAAttention(nn.Module):
    """Three-branch Native Sparse Attention over given q, k, v (GQA), with a pluggable selection branch.

    Args:
        head_dim, q_heads, kv_heads: ``D``, ``Hq``, ``Hkv`` (``Hq % Hkv == 0``).
        block_size: selection block (a power of two; also the FlexAttention block).
        num_selected: ``n``, kept blocks per query block and KV head (sink and diagonal included), >= 2.
        window: sliding-window length ``w`` in tokens.
        compress_block, compress_stride: ``l`` and ``d`` of the compression (default ``block_size``),
            ``1 <= d <= l``.
        compress_hidden: hidden width of the compression MLP (default ``D``).
        selection: ``"nsa"`` or a library selector (:data:`NSA_SELECTIONS`).
        selection_options: options for a library selector (see :func:`cab_attention.select_blocks`),
            except ``share_kv``, ``threshold``, ``return_diagnostics`` and ``impl``, which the module sets;
            ``check_finite`` defaults to ``False`` here (no host sync per call; NaN shows in the output).
        backend: ``"auto"``, ``"reference"`` or ``"flex"`` (:data:`NSA_BACKENDS`).
        flex_block_size: FlexAttention's block for the selected and window branches (``flex`` backend):
            ``block_size`` (default) or a multiple of it. A coarser block holds several selection blocks
            and its mask_mod reads which are kept: the same attention, more masked tiles; at 128 tokens
            training compiles without Inductor's tile search (see :func:`_flex_branch`).
        scale: attention scale (default ``D**-0.5``).
    """

    def __init__(
        self,
        head_dim: int,
        q_heads: int,
        kv_heads: int,
        *,
        block_size: int = 64,
        num_selected: int = 16,
        window: int = 512,
        compress_block: int | None = None,
        compress_stride: int | None = None,
        compress_hidden: int | None = None,
        selection: str = "nsa",
        selection_options: dict[str, Any] | None = None,
        backend: str = "auto",
        flex_block_size: int | None = None,
        scale: float | None = None,
    ):
        super().__init__()
        self.head_dim = check_int_at_least("head_dim", head_dim)
        self.q_heads = check_int_at_least("q_heads", q_heads)
        self.kv_heads = check_int_at_least("kv_heads", kv_heads)
        if q_heads % kv_heads:
            raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
        check_block_size(block_size)
        self.block_size = block_size
        self.num_selected = check_int_at_least("num_selected", num_selected, 2)
        self.window = check_int_at_least("window", window)
        self.compress_block = check_int_at_least("compress_block", block_size if compress_block is None else compress_block)
        self.compress_stride = check_int_at_least("compress_stride", block_size if compress_stride is None else compress_stride)
        if self.compress_stride > self.compress_block:
            raise ValueError(
                f"compress_stride ({self.compress_stride}) must be <= compress_block ({self.compress_block}): "
                "a larger stride leaves tokens out of every compressed block"
            )
        if compress_hidden is not None:
            check_int_at_least("compress_hidden", compress_hidden)
        if selection not in NSA_SELECTIONS:
            raise ValueError(f"selection must be one of {NSA_SELECTIONS}, got {selection!r}")
        options = dict(selection_options or {})
        if selection == "nsa" and options:
            raise ValueError(f"selection_options are for library selectors; selection='nsa' takes none, got {sorted(options)}")
        reserved = sorted(set(options) & set(_RESERVED_OPTIONS))
        if reserved:
            raise ValueError(f"selection_options must not set {reserved}: the NSA module sets them (fixed budget, one mask per KV head)")
        if selection != "nsa":
            resolved = resolve_options(selection, options)  # raises ValueError on unknown or bad options
            if selection == "antidiagonal" and block_size % resolved["stride"]:
                raise ValueError(f"selection_options stride must divide block_size={block_size}, got {resolved['stride']}")
        self.selection, self.selection_options = selection, options
        if backend not in NSA_BACKENDS:
            raise ValueError(f"backend must be one of {NSA_BACKENDS}, got {backend!r}")
        self.backend = backend
        self.flex_block_size = block_size if flex_block_size is None else check_int_at_least("flex_block_size", flex_block_size)
        factor, rest = divmod(self.flex_block_size, block_size)
        if rest or factor & (factor - 1):  # FlexAttention blocks are powers of two, like the selection's
            raise ValueError(f"flex_block_size must be block_size={block_size} times a power of two, got {flex_block_size}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
            raise ValueError(f"scale must be None or a positive number, got {scale!r}")
        self.scale = float(scale) if scale is not None else head_dim**-0.5
        self.compress_k = BlockCompressor(head_dim, self.compress_block, self.compress_stride, compress_hidden)
        self.compress_v = BlockCompressor(head_dim, self.compress_block, self.compress_stride, compress_hidden)
        # Gates: one linear map per query head from its D-dim input to the 3 branch gates.
        self.gate_weight = nn.Parameter(torch.randn(q_heads, head_dim, 3) * 0.02)
        self.gate_bias = nn.Parameter(torch.zeros(q_heads, 3))

    def extra_repr(self) -> str:
        return (
            f"heads={self.q_heads}/{self.kv_heads}, D={self.head_dim}, block_size={self.block_size}, "
            f"num_selected={self.num_selected}, window={self.window}, compress=({self.compress_block}, "
            f"{self.compress_stride}), selection={self.selection!r}, backend={self.backend!r}"
            + (f", flex_block_size={self.flex_block_size}" if self.flex_block_size != self.block_size else "")
        )

    def _check(self, q, k, v, gate_input):
        check_qkv(q, k, v)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"NSA takes q and k of one length (training/prefill, no cache), got Nq={q.shape[2]}, Nk={k.shape[2]}")
        if q.shape[1] != self.q_heads or k.shape[1] != self.kv_heads or q.shape[3] != self.head_dim:
            raise ValueError(
                f"expected q [B, {self.q_heads}, N, {self.head_dim}] and k, v [B, {self.kv_heads}, N, {self.head_dim}], "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        if gate_input is not None and (not isinstance(gate_input, torch.Tensor) or gate_input.shape != q.shape):
            raise ValueError(f"gate_input must be a tensor shaped like q {tuple(q.shape)}, got {getattr(gate_input, 'shape', type(gate_input))}")
        backend = self.backend
        if backend == "auto":
            backend = "flex" if q.is_cuda and q.dtype != torch.float64 else "reference"
        if backend == "flex":
            if q.dtype == torch.float64:
                raise ValueError("backend='flex' does not run float64; use backend='reference'")
            if q.device.type not in ("cuda", "cpu") or (q.is_cuda and self.block_size < 16):
                raise ValueError(f"backend='flex' needs CUDA (block_size >= 16) or CPU tensors, got {q.device}, block_size={self.block_size}")
            grads = torch.is_grad_enabled() and (any(t.requires_grad for t in (q, k, v)) or any(p.requires_grad for p in self.parameters()))
            if q.device.type == "cpu" and grads:
                raise ValueError("backend='flex' has no backward on CPU (FlexAttention); use backend='reference' or torch.no_grad()")
        return backend

    def grid(self, q: torch.Tensor, k: torch.Tensor) -> BlockGrid:
        return BlockGrid.of(q, k, self.block_size, True)

    @torch.no_grad()
    def select(self, q: torch.Tensor, k: torch.Tensor, kc: torch.Tensor | None = None) -> torch.Tensor:
        """The selection branch's blocks: ``[B, Hkv, Mq, Mk]`` bool, ``min(v_i, num_selected)`` per row.

        Args: q ``[B, Hq, N, D]``, k ``[B, Hkv, N, D]``; kc ``[B, Hkv, C, D]`` compressed keys (computed
        when not given; used by ``selection="nsa"``).
        """
        grid = self.grid(q, k)
        if grid.num_kv_blocks == 1:  # one block: it is the sink and the diagonal
            return grid.valid(q.device).expand(grid.batch, grid.kv_heads, 1, 1).clone()
        if self.selection == "nsa":
            if kc is None:
                kc = self.compress_k(k)
            prio = nsa_block_priority(q, kc, grid, self.compress_block, self.compress_stride, self.scale)
        else:
            # No finiteness check by default: it is a host sync per layer and step, and in training a NaN
            # shows in the loss anyway (selection_options may turn it back on).
            opts = {"scale": self.scale, "check_finite": False, **self.selection_options}
            sel = select_blocks(
                q.detach(), k.detach(), selector=self.selection, sparsity=0.0, block_size=self.block_size,
                share_kv=True, return_diagnostics=True, **opts,
            )
            # The selector's own rank order (sink and diagonal first, its priorities, its tie-break and
            # demotions), cut at the NSA budget instead of a sparsity.
            order = sel.diagnostics["order"]
            valid = grid.valid(q.device)
            return keep_first(order, valid.sum(-1).clamp_max(self.num_selected))
        return keep_top(prio, grid, self.num_selected)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, Hq, N, D]`` -> ``[B, Hq, N, 3]`` sigmoid gates (compressed, selected, window)."""
        w = self.gate_weight.to(x.dtype)
        return torch.sigmoid(torch.einsum("bhnd,hdk->bhnk", x, w) + self.gate_bias.to(x.dtype)[:, None, :])

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate_input: torch.Tensor | None = None, return_parts: bool = False
    ):
        """q ``[B, Hq, N, D]``, k, v ``[B, Hkv, N, D]`` (rotary embeddings already applied), causal.

        Args:
            gate_input: ``[B, Hq, N, D]`` the gates' input (default q).
            return_parts: also return a dict of the branch outputs, gates and the selected blocks.

        Returns: ``[B, Hq, N, D]`` (and the dict).
        """
        backend = self._check(q, k, v, gate_input)
        grid = self.grid(q, k)
        bs, n = self.block_size, q.shape[2]
        kc, vc = self.compress_k(k), self.compress_v(v)
        o_cmp = compressed_attention(q, kc, vc, self.compress_block, self.compress_stride, self.scale)
        kept = self.select(q, k, kc.detach())  # [B, Hkv, Mq, Mk]
        kept_q = kept.repeat_interleave(grid.group, 1)  # a BlockMask has one row set per query head
        if backend == "flex":
            touched, full_win = window_blocks(grid, self.window, q.device)
            i = torch.arange(grid.num_q_blocks, device=q.device)[:, None]
            below = torch.arange(grid.num_kv_blocks, device=q.device)[None, :] < i
            fb = self.flex_block_size
            o_slc = _flex_branch(q, k, v, kept_q, below, None, bs, self.scale, fb)
            limit = torch.full((), self.window, device=q.device)  # a fill: no host-to-device copy, no sync
            o_win = _flex_branch(q, k, v, touched[None, None], full_win[None, None], limit, bs, self.scale, fb)
        else:
            pos = torch.arange(n, device=q.device)
            causal = pos[None, :] <= pos[:, None]
            slc_tok = kept_q[:, :, pos // bs][..., pos // bs] & causal
            win_tok = causal & (pos[:, None] - pos[None, :] < self.window)
            o_slc = _masked_attention(q, k, v, slc_tok, self.scale)
            o_win = _masked_attention(q, k, v, win_tok, self.scale)
        g = self.gates(q if gate_input is None else gate_input)
        out = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
        if return_parts:
            return out, {"compressed": o_cmp, "selected": o_slc, "window": o_win, "gates": g, "blocks": kept}
        return out
