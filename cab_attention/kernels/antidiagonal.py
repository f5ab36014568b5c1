"""Triton kernel: XAttention's strided antidiagonal block mass straight from Q and K.

The PyTorch twin is :func:`cab_attention.score.antidiagonal_mass` (the home of the formula). With
``S = stride`` and ``P = block_size / S`` strided rows per block, strided query row ``r`` is the
concatenation of tokens ``r*S .. r*S+S-1`` (front-padded per :class:`~cab_attention.geometry.BlockGrid`)
and strided key column ``c`` the concatenation of tokens ``c*S+S-1 .. c*S`` (reversed), so

    x[r, c] = (scale / S) * sum_{t<S} q[r*S + t] . k[c*S + S-1-t]        (an antidiagonal sum)
    mass[i, j] = (1/P) * sum_{r in block i} sum_{c in block j} softmax_c(x[r, :])[c]

with the causal mask ``c > r + block_offset * P`` (padded tokens are zero vectors and their columns
count, exactly as in the twin). One kernel, grid ``(B*Hq, row tiles)``: each program owns ``BM``
strided rows (``BM / P`` query blocks) and makes two passes over the causal column range:

1. online softmax statistics (row max ``m_r`` and normaliser ``l_r``), never stored;
2. the logits again, ``exp(x - m_r) / l_r`` summed over ``P x P`` groups into the ``[BM/P, BN/P]``
   block tile, written once to ``mass`` (and zeros above the causal range, so the output equals the
   twin everywhere).

No ``N x N`` (or strided ``N/S x N/S``) intermediate and no strided copy: the strided rows are address
arithmetic on Q and K (the ``t`` loop walks the ``S`` tokens of a strided row, reversed for K). GQA:
query head ``h`` reads KV head ``h // group``, never repeated; programs of one KV group run side by side
so their K tiles are shared through L2.

Arithmetic: products of bf16/fp16 inputs are exact in float32, so for half inputs the kernel multiplies
the native operands on tensor cores with float32 accumulation (the same numbers as the twin's
``q.float() @ k.float()``, up to summation order). Float32 inputs use IEEE float32 dots (``precision
"fp32"``), TF32 (``"tf32"``) or bf16-rounded operands (``"bf16"``, approximate). Summation order differs
from cuBLAS and from torch's softmax, so masses agree to float32 rounding, not bit for bit; selections
are identical unless two blocks of a row tie to within that rounding (the tests and
``scripts/gpu_predictor.py`` check and report it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..geometry import BlockGrid

# DOT: 0 IEEE float32, 1 TF32, 2 native half operands (exact products, float32 accumulation),
# 3 float32 inputs rounded to bf16 (approximate).
_DOT_IEEE, _DOT_TF32, _DOT_NATIVE, _DOT_BF16 = 0, 1, 2, 3


@triton.jit
def _strided_logits(
    q_base, k_base, r, c, rm, Nq, Nk, PADQ, sq_n, sq_d, sk_n, sk_d, D, scale,
    S: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr,
):
    """``[BM, BN]`` float32 ``x[r, c]`` (no mask applied)."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    d = tl.arange(0, BD)
    nd = tl.cdiv(D, BD)
    # One flat loop over (token t of the strided row, head-dim chunk): a single pipelinable K loop.
    for kk in range(0, S * nd):
        t = kk // nd
        dd = (kk % nd) * BD + d
        dm = dd < D
        qtok = r * S + t - PADQ
        qm = rm & (qtok >= 0) & (qtok < Nq)
        ktok = c * S + (S - 1 - t)
        km = ktok < Nk
        qt = tl.load(q_base + qtok.to(tl.int64)[:, None] * sq_n + dd[None, :] * sq_d,
                     mask=qm[:, None] & dm[None, :], other=0.0)
        kt = tl.load(k_base + ktok.to(tl.int64)[None, :] * sk_n + dd[:, None] * sk_d,
                     mask=km[None, :] & dm[:, None], other=0.0)
        if DOT == 0:
            acc = tl.dot(qt.to(tl.float32), kt.to(tl.float32), acc, input_precision="ieee")
        elif DOT == 1:
            acc = tl.dot(qt.to(tl.float32), kt.to(tl.float32), acc, input_precision="tf32")
        elif DOT == 2:
            acc = tl.dot(qt, kt, acc)
        else:
            acc = tl.dot(qt.to(tl.bfloat16), kt.to(tl.bfloat16), acc)
    return acc * scale


@triton.jit(do_not_specialize=["Hc", "H0", "PADQ", "LOP", "NRB", "NCT"])  # one compile for every head chunk
def _antidiagonal_kernel(
    q_ptr, k_ptr, out_ptr, part_ptr, mrun_ptr,
    Hc, H0, G, Nq, Nk, PADQ, R_TOTAL, C_TOTAL, LOP, Mq, Mk, NRB, NCT, D, scale,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, so_b, so_h,
    CAUSAL: tl.constexpr, S: tl.constexpr, PER: tl.constexpr, DOT: tl.constexpr, ZERO_UPPER: tl.constexpr,
    ONE_PASS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    bh = tl.program_id(0)  # (batch, query head of this chunk); q_ptr / out_ptr point at the chunk
    rb = NRB - 1 - tl.program_id(1)  # the longest causal rows first (load balance)
    b = bh // Hc
    h = bh % Hc
    hk = (H0 + h) // G
    q_base = q_ptr + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
    k_base = k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    out_base = out_ptr + b.to(tl.int64) * so_b + h.to(tl.int64) * so_h
    r = rb * BM + tl.arange(0, BM)
    rm = r < R_TOTAL
    c_end = C_TOTAL
    if CAUSAL:
        c_end = tl.minimum(rb * BM + BM + LOP, C_TOTAL)  # last row's last visible column + 1
    BI: tl.constexpr = BM // PER
    BJ: tl.constexpr = BN // PER
    i = rb * BI + tl.arange(0, BI)
    im = i < Mq
    jj = tl.arange(0, BJ)
    part_base = part_ptr + bh.to(tl.int64) * R_TOTAL * Mk
    mrun_base = mrun_ptr + bh.to(tl.int64) * R_TOTAL * NCT
    # Pass 1: online softmax statistics per strided row. ONE_PASS also stores, per strided row and key
    # block, the partial sum of exp(x - running max) and, per column tile, that running max.
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    for c0 in range(0, c_end, BN):
        c = c0 + tl.arange(0, BN)
        x = _strided_logits(q_base, k_base, r, c, rm, Nq, Nk, PADQ, sq_n, sq_d, sk_n, sk_d, D, scale,
                            S, BM, BN, BD, DOT)
        ok = c[None, :] < C_TOTAL
        if CAUSAL:
            ok = ok & (c[None, :] <= r[:, None] + LOP)
        x = tl.where(ok, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        e = tl.exp(x - m_new[:, None])
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(e, axis=1)
        m_i = m_new
        if ONE_PASS:
            j = c0 // PER + jj
            srow = tl.sum(tl.reshape(e, (BM, BJ, PER)), axis=2)  # [BM, BJ]
            tl.store(part_base + r[:, None] * Mk + j[None, :], srow, mask=rm[:, None] & (j < Mk)[None, :])
            tl.store(mrun_base + r * NCT + c0 // BN, m_new, mask=rm)
    if ONE_PASS:
        tl.debug_barrier()  # this program's partials, written by other threads of it, are read below
        for c0 in range(0, c_end, BN):
            j = c0 // PER + jj
            srow = tl.load(part_base + r[:, None] * Mk + j[None, :], mask=rm[:, None] & (j < Mk)[None, :], other=0.0)
            mr = tl.load(mrun_base + r * NCT + c0 // BN, mask=rm, other=0.0)
            w = tl.where(rm, tl.exp(mr - m_i) / l_i, 0.0)
            blk = tl.sum(tl.reshape(srow * w[:, None], (BI, PER, BJ)), axis=1)
            tl.store(out_base + i[:, None] * Mk + j[None, :], blk / PER, mask=im[:, None] & (j < Mk)[None, :])
    else:
        # Pass 2: the logits again; probabilities summed over each P x P group.
        for c0 in range(0, c_end, BN):
            c = c0 + tl.arange(0, BN)
            x = _strided_logits(q_base, k_base, r, c, rm, Nq, Nk, PADQ, sq_n, sq_d, sk_n, sk_d, D, scale,
                                S, BM, BN, BD, DOT)
            ok = c[None, :] < C_TOTAL
            if CAUSAL:
                ok = ok & (c[None, :] <= r[:, None] + LOP)
            p = tl.where(ok, tl.exp(x - m_i[:, None]) / l_i[:, None], 0.0)
            blk = tl.sum(tl.sum(tl.reshape(p, (BI, PER, BJ, PER)), axis=3), axis=1)
            j = c0 // PER + jj
            tl.store(out_base + i[:, None] * Mk + j[None, :], blk / PER, mask=im[:, None] & (j < Mk)[None, :])
    if ZERO_UPPER:
        # Past the causal range: exact zeros, as the twin's softmax gives there.
        start = ((c_end + BN - 1) // BN) * BN
        for c0 in range(start, C_TOTAL, BN):
            j = c0 // PER + jj
            tl.store(out_base + i[:, None] * Mk + j[None, :], tl.zeros([BI, BJ], dtype=tl.float32),
                     mask=im[:, None] & (j < Mk)[None, :])


def _dot_mode(dtype: torch.dtype, precision: str, device: torch.device) -> int:
    if precision not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"precision must be one of ('fp32', 'tf32', 'bf16'), got {precision!r}")
    if dtype in (torch.bfloat16, torch.float16):
        # Triton's CPU interpreter multiplies half tl.dot operands as raw bits: upcast there (same
        # products, since half x half is exact in float32).
        return _DOT_NATIVE if device.type == "cuda" else _DOT_IEEE
    if precision == "fp32":
        return _DOT_IEEE
    if precision == "tf32":
        return _DOT_TF32
    return _DOT_BF16 if device.type == "cuda" else _DOT_IEEE


def _tiles(device: torch.device, per: int, d: int, dot: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BD, num_warps, num_stages): multiples of ``per`` strided rows / columns."""
    if device.type == "cuda":
        if dot == _DOT_NATIVE:
            bm, bn, bd, warps, stages = 128, 64, 64, 8, 3
        elif dot == _DOT_BF16:  # float32 loads rounded to bf16: 128-row tiles spill (ptxas, sm_90)
            bm, bn, bd, warps, stages = 64, 64, 64, 4, 3
        else:  # float32 operands: smaller tiles keep the registers from spilling
            bm, bn, bd, warps, stages = 64, 64, 32, 4, 2
    else:
        bm, bn, bd, warps, stages = 16, 16, 32, 4, 1
    bm, bn = max(bm, per), max(bn, per)
    bd = max(16, min(bd, triton.next_power_of_2(d)))
    return bm, bn, bd, warps, stages


def antidiagonal_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: BlockGrid,
    scale: float,
    stride: int = 8,
    *,
    precision: str = "fp32",
    zero_upper: bool = True,
    passes: int = 1,
    scratch_mib: float = 512.0,
) -> torch.Tensor:
    """Fused antidiagonal block mass, equal to :func:`cab_attention.score.antidiagonal_mass` to float32
    rounding.

    Args:
        q: ``[B, Hq, Nq, D]``; k: ``[B, Hkv, Nk, D]`` (float32/float16/bfloat16, any strides; CUDA, or
            CPU under ``TRITON_INTERPRET=1``); grid: their :class:`BlockGrid`.
        scale: the logit scale (``D**-0.5`` by default in ``select_blocks``); stride: ``S``, a positive
            divisor of ``grid.block_size``.
        precision: for float32 inputs, ``"fp32"`` (IEEE), ``"tf32"`` or ``"bf16"`` (approximate);
            half inputs always multiply exactly (native operands, float32 accumulation).
        zero_upper: write exact zeros on the blocks past the causal range (``False`` leaves them
            uninitialised: the selection never reads them).
        passes: ``1`` (default): one pass over the logits; each program stores per strided row and key
            block the partial ``sum exp(x - running max)`` (float32 scratch ``[heads, Nq/S, Mk]``, read
            back by the same program to normalise), so the matmul runs once. ``2``: recompute the logits
            in a second pass instead of storing partials (twice the FLOPs, no scratch).
        scratch_mib: bound on the one-pass scratch; heads are processed in chunks that fit (at least
            one head per launch). Fewer heads per launch means fewer programs to balance the causal
            rows' unequal work (128k, 64-token blocks: ~151 MB per head, 3 heads per launch at 512).

    Returns:
        ``[B, Hq, Mq, Mk]`` float32, each row summing to 1 over its valid blocks.
    """
    bs = grid.block_size
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or bs % stride:
        raise ValueError(f"stride must be a positive divisor of block_size={bs}, got {stride!r}")
    if passes not in (1, 2):
        raise ValueError(f"passes must be 1 or 2, got {passes!r}")
    b, hq, mq, mk, d = grid.batch, grid.q_heads, grid.num_q_blocks, grid.num_kv_blocks, grid.head_dim
    per = bs // stride
    dot = _dot_mode(q.dtype, precision, q.device)
    bm, bn, bd, warps, stages = _tiles(q.device, per, d, dot)
    r_total = mq * per
    nrb = triton.cdiv(r_total, bm)
    nct = triton.cdiv(mk * per, bn)
    out = torch.empty(b, hq, mq, mk, device=q.device, dtype=torch.float32)
    extra = {"num_stages": stages} if q.device.type == "cuda" else {}
    hc = hq
    if passes == 1:
        per_head = b * r_total * (mk + nct) * 4
        hc = int(max(1, min(hq, (scratch_mib * 2**20) // per_head)))
        part = torch.empty(b * hc * r_total * mk, device=q.device, dtype=torch.float32)
        mrun = torch.empty(b * hc * r_total * nct, device=q.device, dtype=torch.float32)
    else:
        part = mrun = out  # unused
    for h0 in range(0, hq, hc):
        h1 = min(hq, h0 + hc)
        qh, oh = q[:, h0:h1], out[:, h0:h1]
        _antidiagonal_kernel[(b * (h1 - h0), nrb)](
            qh, k, oh, part, mrun,
            h1 - h0, h0, grid.group, grid.q_len, grid.kv_len, grid.q_pad_front, r_total, mk * per,
            grid.block_offset * per, mq, mk, nrb, nct, d, float(scale) / stride,
            *qh.stride(), *k.stride(), oh.stride(0), oh.stride(1),
            CAUSAL=grid.causal, S=stride, PER=per, DOT=dot, ZERO_UPPER=bool(zero_upper and grid.causal),
            ONE_PASS=passes == 1, BM=bm, BN=bn, BD=bd, num_warps=warps, **extra,
        )
    return out


def predict_antidiagonal(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 64,
    sparsity: float = 0.9,
    causal: bool = True,
    stride: int = 8,
    scale: float | None = None,
    threshold: float | None = None,
    share_kv: bool = False,
    precision: str = "fp32",
    passes: int = 1,
    scratch_mib: float = 512.0,
):
    """``select_blocks(q, k, selector="antidiagonal", ...)`` with the fused mass kernel.

    Fixed sparsity (``threshold=None``): the exact per-row selection kernel
    (:func:`cab_attention.kernels.topk.select_rows`). Adaptive mode (``threshold``): the ranking and the
    cumulative-mass budget of :mod:`cab_attention.select` (torch sorts) on the kernel's mass.
    ``share_kv`` averages the mass over each KV head's query group first, as the torch path does.
    ``precision``, ``passes``, ``scratch_mib``: as in :func:`antidiagonal_mass`.

    Returns:
        A :class:`cab_attention.selection.BlockSelection` equal to the torch path's (see the module
        docstring for the float32-rounding caveat).
    """
    from ..geometry import check_block_size, check_qkv, check_sparsity, check_threshold
    from ..select import adaptive_budget, keep_first, kv_layout, rank_order
    from ..selection import BlockSelection
    from .topk import select_rows

    check_qkv(q, k)
    check_block_size(block_size)
    check_sparsity(sparsity)
    if threshold is not None:
        check_threshold(threshold)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or block_size % stride:
        raise ValueError(f"stride must be a positive divisor of block_size={block_size}, got {stride!r}")
    grid = BlockGrid.of(q, k, block_size, causal)
    dev = q.device
    heads = grid.kv_heads if share_kv else grid.q_heads
    valid = grid.valid(dev)
    if grid.q_len < block_size:
        mask = valid.expand(grid.batch, heads, grid.num_q_blocks, grid.num_kv_blocks).clone()
        num, idx = kv_layout(mask)
        return BlockSelection(mask, num, idx, grid, "antidiagonal", share_kv)
    scale = grid.head_dim**-0.5 if scale is None else float(scale)
    mass = antidiagonal_mass(q, k, grid, scale, stride, precision=precision, passes=passes, scratch_mib=scratch_mib)
    if share_kv:
        mass = mass.reshape(grid.batch, grid.kv_heads, grid.group, *mass.shape[2:]).mean(2)
    if threshold is None:
        budget = grid.budget(sparsity, dev).to(torch.int32)
        mask, num, idx = select_rows(mass, budget, grid.block_offset, grid.causal)
    else:
        forced = grid.forced(dev)
        order = rank_order(mass, valid, forced)
        budget = adaptive_budget(order, mass, valid, forced, float(threshold))
        mask = keep_first(order, budget)
        num, idx = kv_layout(mask)
    return BlockSelection(mask, num, idx, grid, "antidiagonal", share_kv)
