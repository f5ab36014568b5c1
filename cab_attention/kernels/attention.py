"""Block-sparse attention forward in Triton, reading a selection's layout directly.

One program computes one query tile: ``BLOCK_M`` rows of one query block for ``HEADS`` query heads
(``HEADS > 1`` only when the heads share one mask, i.e. a ``shared_kv`` selection: their rows are
stacked into one ``HEADS * BLOCK_M``-row tile that reads each K/V tile once). It walks the row's kept key
blocks ``kv_indices[b, h, i, :kv_num_blocks[b, h, i]]`` (ascending) with an online softmax in the log2
domain (``exp2`` with ``log2(e)`` folded into the scale) and reads K/V of KV head ``h // group``: K/V are
never repeated. No host-side planning, no host sync.

Masking. With kept blocks ascending and every kept block causally valid (what every selector produces),
only the *last* kept block of a row can be partial: in a causal row it is the diagonal (blocks below the
diagonal are fully visible to every row of the query block), and in any row it is the only one that can be
the partial last key block (``Nk % block_size != 0``). So the loop runs the first ``n - 1`` blocks without
a mask and applies the causal / key-length mask on the last block only.

Geometry (``cab_attention.geometry.BlockGrid``): queries are front-padded by ``q_pad_front`` rows inside the
block grid (chunked prefill), so padded row ``p`` of query block ``i`` is query ``p - q_pad_front`` at
absolute position ``p + block_offset * block_size``; rows outside ``[0, Nq)`` are computed from zeros and
never stored. Keys past ``Nk`` are never read (masked loads only when ``Nk % block_size != 0``).

:func:`block_sparse_attention_reference` is the naive PyTorch twin with the same per-row semantics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..geometry import BlockGrid
from ..selection import BlockSelection

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    acc, l_i, m_i, q, k_base, v_base, cols, col_ok,
    stride_kn, stride_vn, kv_len, row_pos, qk_scale, offs_d,
    BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
    KV_PARTIAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """One ``[TILE_M, BLOCK_N]`` key tile (key positions ``cols``) into the running softmax. With ``MASK``
    the columns outside ``col_ok`` and (causal) after each row's position are excluded."""
    k_ptrs = k_base + cols[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :]
    if KV_PARTIAL or BLOCK_D != HEAD_DIM:
        ld_mask = (cols[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_ptrs, mask=ld_mask, other=0.0)
        v = tl.load(v_ptrs, mask=ld_mask, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    # Running max in the scaled log2 domain; the scale (log2(e) folded in) meets the max in one FMA below.
    if MASK:
        keep = col_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= row_pos[:, None])
        qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        # A row with no visible key in this tile (and none before) keeps m = -inf; subtract 0 there.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_sub = m_new
    p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _block_sparse_fwd_kernel(
    Q, K, V, O, NUM, IDX,
    qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im, stride_ik,
    q_len, kv_len, q_pad_front, block_offset, num_q_blocks, head_tiles, group, sel_div,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, KPB: tl.constexpr, HEADS: tl.constexpr,
    CAUSAL: tl.constexpr, KV_PARTIAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    # A key step is BLOCK_N keys: sub-tile of one block (SUB_N = BLOCK // BLOCK_N > 1), one block, or
    # KPB = BLOCK_N // BLOCK > 1 kept blocks gathered side by side (a wider MMA for small blocks).
    SUB_M: tl.constexpr = BLOCK // BLOCK_M  # query sub-tiles per query block
    TILE_M: tl.constexpr = HEADS * BLOCK_M
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # Longest rows first (causal rows keep more blocks further down): the tail of the launch is short.
    t_m = num_q_blocks * SUB_M - 1 - pid_m
    i = t_m // SUB_M
    sub = t_m % SUB_M
    b = (pid_bh // head_tiles).to(tl.int64)  # int64: batch and head offsets pass 2**31 at long N
    h0 = ((pid_bh % head_tiles) * HEADS).to(tl.int64)  # first query head of this tile
    hkv = h0 // group
    hs = h0 // sel_div  # selection head (query head, or KV head for a shared_kv selection)

    offs_r = tl.arange(0, TILE_M)
    head = h0 + offs_r // BLOCK_M
    p_row = i * BLOCK + sub * BLOCK_M + offs_r % BLOCK_M  # padded query row
    q_idx = p_row - q_pad_front
    row_pos = p_row + block_offset * BLOCK  # absolute position of each row
    row_ok = (q_idx >= 0) & (q_idx < q_len)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + q_idx[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh

    m_i = tl.full([TILE_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TILE_M], dtype=tl.float32)
    acc = tl.zeros([TILE_M, BLOCK_D], dtype=tl.float32)

    n = tl.load(NUM + b * stride_nb + hs * stride_nh + i * stride_nm)
    idx_row = IDX + b * stride_ib + hs * stride_ih + i * stride_im
    if KPB == 1:
        # Every kept block but the last: no mask (fully visible to every row of the tile).
        for t in range(0, (n - 1) * SUB_N):
            j = tl.load(idx_row + (t // SUB_N) * stride_ik)
            cols = j * BLOCK + (t % SUB_N) * BLOCK_N + offs_n
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, k_base, v_base, cols, cols < kv_len, stride_kn, stride_vn, kv_len, row_pos,
                qk_scale, offs_d, BLOCK_D, HEAD_DIM, False, CAUSAL, KV_PARTIAL, DOT_FP32, PRECISION,
            )
        if n > 0:
            j = tl.load(idx_row + (n - 1) * stride_ik)
            for c in tl.static_range(SUB_N):
                cols = j * BLOCK + c * BLOCK_N + offs_n
                acc, l_i, m_i = _attend_tile(
                    acc, l_i, m_i, q, k_base, v_base, cols, cols < kv_len, stride_kn, stride_vn, kv_len, row_pos,
                    qk_scale, offs_d, BLOCK_D, HEAD_DIM, True, CAUSAL, KV_PARTIAL, DOT_FP32, PRECISION,
                )
    else:
        blk_in = offs_n // BLOCK  # which of the KPB blocks a column belongs to
        pos_in = offs_n % BLOCK
        steps = (n - 1) // KPB  # whole steps of blocks that need no mask
        for t in range(0, steps):
            j = tl.load(idx_row + (t * KPB + blk_in) * stride_ik)
            cols = j * BLOCK + pos_in
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, k_base, v_base, cols, cols < kv_len, stride_kn, stride_vn, kv_len, row_pos,
                qk_scale, offs_d, BLOCK_D, HEAD_DIM, False, CAUSAL, KV_PARTIAL, DOT_FP32, PRECISION,
            )
        if n > 0:
            # The rest (1..KPB blocks, the last kept block among them) in one masked step.
            blk = steps * KPB + blk_in
            ok = blk < n
            j = tl.load(idx_row + blk * stride_ik, mask=ok, other=0)
            cols = j * BLOCK + pos_in
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, k_base, v_base, cols, ok & (cols < kv_len), stride_kn, stride_vn, kv_len,
                row_pos, qk_scale, offs_d, BLOCK_D, HEAD_DIM, True, CAUSAL, KV_PARTIAL, DOT_FP32, PRECISION,
            )
    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + head[:, None] * stride_oh + q_idx[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# ------------------------------------------------------------------------------------------- launcher


@dataclass(frozen=True)
class TileConfig:
    """Launch shape: ``block_m`` query rows (of one query block) per head, ``block_n`` keys per inner step
    (a divisor of the block size, or a multiple: ``block_n // block_size`` kept blocks side by side),
    ``heads`` query heads stacked in one tile (shared masks only), ``num_warps``, ``num_stages``."""

    block_m: int
    block_n: int
    heads: int = 1
    num_warps: int = 4
    num_stages: int = 2


def _interpreting() -> bool:
    return type(_block_sparse_fwd_kernel).__name__ == "InterpretedFunction"


def default_config(head_dim: int, block_size: int, group: int, shared_kv: bool, dtype: torch.dtype) -> TileConfig:
    """Tile shape per (D, block size), tuned on an H200 (``scripts/gpu_attention.py --tune``, bf16, D=128,
    128k tokens; docs/kernels.md records the sweep).

    Tiles divide the block size. 128-token blocks: 128 x 128 tiles, 8 warps, 3 stages. 64-token blocks,
    one mask per query head: 64 x 64, 4 warps, 4 stages (wider key steps spilled registers and ran
    slower; 4 stages beat 3 by 1-2% in both sweeps). A shared
    mask (``shared_kv``) stacks up to four query heads of one KV group into a 256-row tile, so each K/V
    tile feeds four times the rows; with two heads (128 rows) two kept blocks go side by side per key
    step. D=256 and float32 take smaller tiles (shared memory and registers); those are not tuned.
    """
    big = head_dim > 128 or dtype == torch.float32
    block_m = min(block_size, 64 if big else 128)
    block_n = min(block_size, 32 if head_dim > 128 else (128 if block_m >= 128 else 64))
    heads = 1
    if shared_kv and not big and block_m < 128:
        heads = max(1, min(group, 256 // block_m))
        while group % heads:
            heads -= 1
    rows = heads * block_m
    if heads > 1 and rows == 128 and block_m == 64:
        block_n = 128
    num_warps = 8 if rows >= 128 else 4
    num_stages = 2 if (big or heads > 1) else (4 if rows <= 64 else 3)
    return TileConfig(block_m, block_n, heads, num_warps, num_stages)


def _check_config(cfg: TileConfig, block_size: int, group: int, shared_kv: bool) -> None:
    if cfg.block_m < 16 or cfg.block_m & (cfg.block_m - 1) or block_size % cfg.block_m:
        raise ValueError(f"config.block_m must be a power of two >= 16 dividing block_size={block_size}, got {cfg.block_m}")
    if cfg.block_n < 16 or cfg.block_n & (cfg.block_n - 1):
        raise ValueError(
            f"config.block_n must be a power of two >= 16 (a divisor or a multiple of block_size={block_size}), "
            f"got {cfg.block_n}"
        )
    if cfg.heads < 1 or group % cfg.heads or (cfg.heads > 1 and not shared_kv):
        raise ValueError(
            f"config.heads must divide the group size ({group}) and be 1 unless the selection is shared_kv, "
            f"got {cfg.heads}"
        )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    grid: BlockGrid,
    *,
    shared_kv: bool = False,
    scale: float | None = None,
    config: TileConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention over a per-row kept-block list.

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` (fp16, bf16 or fp32; CUDA, or CPU under
            ``TRITON_INTERPRET=1``). ``D <= 256``.
        kv_num_blocks: ``[B, H, Mq]`` int32, kept key blocks per query block; ``H = Hq``, or ``Hkv`` when
            ``shared_kv``.
        kv_indices: ``[B, H, Mq, W]`` int32, each row's kept key blocks first, ascending, each causally
            valid (``W`` may be ``Mk`` or a compact ``max kv_num_blocks``; any strides).
        grid: the block grid of these inputs (``BlockGrid.of(q, k, block_size, causal)``).
        scale: softmax scale (default ``D**-0.5``).
        config: tile shape (default :func:`default_config`).
        out: optional contiguous ``[B, Hq, Nq, D]`` tensor of q's dtype to write into (e.g. poisoned by a
            correctness check, so that an unwritten element shows).

    Returns:
        ``[B, Hq, Nq, D]`` in q's dtype (``out`` when given).
    """
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    bs = grid.block_size
    if (b, hq, hkv, nq, k.shape[2], d) != (grid.batch, grid.q_heads, grid.kv_heads, grid.q_len, grid.kv_len, grid.head_dim):
        raise ValueError(f"grid {grid} does not describe q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"backend='triton' takes float16, bfloat16 or float32 inputs, got {q.dtype}")
    if bs < 16:
        raise ValueError(f"backend='triton' needs block_size >= 16 (tl.dot's smallest tile), got {bs}")
    if d > 256:
        raise ValueError(f"backend='triton' takes head_dim <= 256, got {d}")
    heads = hkv if shared_kv else hq
    want = (b, heads, grid.num_q_blocks)
    if kv_num_blocks.dtype != torch.int32 or tuple(kv_num_blocks.shape) != want:
        raise ValueError(f"kv_num_blocks must be int32 of shape {want}, got {kv_num_blocks.dtype} {tuple(kv_num_blocks.shape)}")
    if kv_indices.dtype != torch.int32 or kv_indices.dim() != 4 or tuple(kv_indices.shape[:3]) != want:
        raise ValueError(f"kv_indices must be int32 of shape {want + ('W',)}, got {kv_indices.dtype} {tuple(kv_indices.shape)}")
    group = hq // hkv
    cfg = config or default_config(d, bs, group, shared_kv, q.dtype)
    _check_config(cfg, bs, group, shared_kv)
    # The kernel assumes unit stride along D (vector loads); copy only where it is not.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}")
    interp = _interpreting()
    # Triton's CPU interpreter multiplies 16-bit dot operands wrongly (raw bits): multiply in float32 there.
    dot_fp32 = interp and q.dtype != torch.float32
    precision = "ieee" if (q.dtype == torch.float32 or interp) else "tf32"
    scale = d**-0.5 if scale is None else float(scale)
    if not (0.0 < scale < float("inf")):
        # The row max is taken before scaling (one FMA per score), which needs a positive scale.
        raise ValueError(f"backend='triton' needs a positive finite scale, got {scale}")
    sub_m = bs // cfg.block_m
    head_tiles = hq // cfg.heads
    launch = (grid.num_q_blocks * sub_m, b * head_tiles)
    _block_sparse_fwd_kernel[launch](
        q, k, v, out, kv_num_blocks, kv_indices,
        scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        kv_num_blocks.stride(0), kv_num_blocks.stride(1), kv_num_blocks.stride(2),
        kv_indices.stride(0), kv_indices.stride(1), kv_indices.stride(2), kv_indices.stride(3),
        nq, k.shape[2], grid.q_pad_front, grid.block_offset, grid.num_q_blocks, head_tiles, group,
        group if shared_kv else 1,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK=bs, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, SUB_N=max(1, bs // cfg.block_n), KPB=max(1, cfg.block_n // bs), HEADS=cfg.heads, CAUSAL=grid.causal, KV_PARTIAL=k.shape[2] % bs != 0,
        DOT_FP32=dot_fp32, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def triton_attention_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    *,
    scale: float | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """:func:`block_sparse_attention` over a :class:`BlockSelection`. Shapes as ``reference_attention``."""
    check_triton_available(q, selection.grid.block_size)
    return block_sparse_attention(
        q, k, v, selection.kv_num_blocks, selection.kv_indices, selection.grid,
        shared_kv=selection.shared_kv, scale=scale, config=config,
    )


def check_triton_available(q: torch.Tensor, block_size: int) -> None:
    """Raise ``ValueError`` where ``backend='triton'`` cannot run (device, dtype, block size)."""
    interp = _interpreting()
    if q.device.type == "cuda" and interp:
        raise ValueError("backend='triton' on CUDA: TRITON_INTERPRET=1 was set when the kernel was imported")
    if q.device.type == "cpu" and not interp:
        raise ValueError("backend='triton' on CPU needs TRITON_INTERPRET=1 set before cab_attention is imported")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"backend='triton' runs on CUDA (or CPU under TRITON_INTERPRET=1), got device {q.device}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"backend='triton' takes float16, bfloat16 or float32 inputs, got {q.dtype}; use 'reference'")
    if block_size < 16:
        raise ValueError(f"backend='triton' needs block_size >= 16 (tl.dot's smallest tile), got {block_size}")
    if q.shape[-1] > 256:
        raise ValueError(f"backend='triton' takes head_dim <= 256, got {q.shape[-1]}")


# ------------------------------------------------------------------------------------ PyTorch twin


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    grid: BlockGrid,
    *,
    shared_kv: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """The kernel's semantics in plain PyTorch, one (batch, head, query block) at a time, float32 math.

    For row ``i`` of head ``h``: keys = the tokens of ``kv_indices[b, hs, i, :n]`` (``hs = h // group``
    when ``shared_kv``), masked to ``< Nk`` and (causal) to ``<=`` each query's absolute position; values
    from KV head ``h // group``. Slow: for tests at tiny shapes.
    """
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    bs = grid.block_size
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            hs = h // group if shared_kv else h
            for i in range(grid.num_q_blocks):
                rows = torch.arange(i * bs, (i + 1) * bs) - grid.q_pad_front
                rows = rows[(rows >= 0) & (rows < nq)]
                if rows.numel() == 0:
                    continue
                n = int(kv_num_blocks[bi, hs, i])
                blocks = [int(j) for j in kv_indices[bi, hs, i, :n]]
                cols = torch.cat([torch.arange(j * bs, min((j + 1) * bs, grid.kv_len)) for j in blocks]) if blocks else torch.zeros(0, dtype=torch.long)
                kk = k[bi, h // group, cols].float()
                vv = v[bi, h // group, cols].float()
                s = (q[bi, h, rows].float() @ kk.T) * scale
                if grid.causal:
                    pos = rows + grid.offset
                    s = s.masked_fill(cols[None, :] > pos[:, None], float("-inf"))
                out[bi, h, rows] = (torch.softmax(s, dim=-1) @ vv).to(q.dtype)
    return out


def kept_tile_flops(kv_num_blocks: torch.Tensor, grid: BlockGrid, shared_kv: bool = False) -> float:
    """FLOPs of the kept tiles (``4 * bs^2 * D`` per kept block per query head), the kept-tile rate's
    numerator; every kept tile counts whole (padding and masked entries included)."""
    per_head = float(kv_num_blocks.sum(dtype=torch.float64))
    if shared_kv:
        per_head *= grid.group
    return 4.0 * per_head * grid.block_size**2 * grid.head_dim


__all__ = [
    "TileConfig",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "check_triton_available",
    "default_config",
    "kept_tile_flops",
    "triton_attention_blocks",
]

