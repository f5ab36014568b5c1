"""Triton kernels, stage 2: coarse logits, affinity, redundancy and curvature.

Layout: every ``M x M`` buffer is contiguous ``[B * Hq, Mq, Mk]``. Only *tiles that hold a causal edge*
are written; tiles entirely above the causal diagonal are never written nor read (the buffers are
``torch.empty``), and every consumer masks by edge validity. The validity rule is the one of
:meth:`cab_attention.geometry.BlockGrid.valid`: edge ``(i, j)`` exists iff ``j <= min(i + lo, Mk - 1)``
(causal) or ``j < Mk`` (not causal), with ``lo = BlockGrid.block_offset``.

Kernels:

* :func:`_affinity_kernel` (grid ``[B*Hq, cdiv(Mk, BJ)]``): one key-block column tile per program,
  its coarse keys loaded once (the program's query head reads KV head ``h // group``: GQA without
  repeating), looping down the query tiles. Writes any of: logits (``qc . kc * scale``), ``A``
  (``relu`` on edges, 0 elsewhere; fp32 or bf16), ``A^T`` (for the two-stage gather), the column sums
  ``S_in`` (deterministic: one program owns a column), and per-column-tile partial row sums and row
  maxima (summed / maxed on the host: ``[B*Hq, Mq, cdiv(Mk, BJ)]``, tiny).
* :func:`_redundancy_kernel` (grid ``[B*Hq, cdiv(Mq, BM), cdiv(Mk, BN)]``): ``R = A[:, lo:lo+Mq] @ A``
  tile by tile over the causal range of the inner index only (``j - lo <= k <= i``), with the curvature
  formula in the epilogue, so ``R`` never goes to memory: augmented Forman ``4A - S_out_i - S_in_j +
  3R`` or the triangle proxy ``A - lam * (R / norm)``; the priority (``-F`` for keep-lowest) is the only
  output. For ``norm="rowmax"`` the row maximum of ``R`` is a whole-row quantity, so that mode writes
  ``R`` itself plus partial row maxima and the host combines.
* :func:`_two_stage_kernel` (grid ``[B*Hq*Mq, cdiv(W, BC)]``): ``R_ij`` only for each row's candidate
  key blocks ``j`` (a gather of ``A^T`` rows), then the triangle proxy; ``O(M^2 k)`` work.

Matmul precision (``PREC`` constexpr): 0 ``fp32`` (IEEE float32 operands; matches the PyTorch reference
to rounding), 1 ``tf32``, 2 ``bf16`` (``A`` stored in bfloat16, tensor-core dots; an approximation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PRECISIONS = {"fp32": 0, "tf32": 1, "bf16": 2}
SCORE_FORMAN, SCORE_TRIANGLE, SCORE_RAW_R = 0, 1, 2


@triton.jit
def _mm(a, b, acc, PREC: tl.constexpr):
    if PREC == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif PREC == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _edge(i, j, Mk, lo, CAUSAL: tl.constexpr):
    """Causal edge test for broadcastable row / column index tensors."""
    if CAUSAL:
        return (j <= tl.minimum(i + lo, Mk - 1)) & (j < Mk)
    else:
        return j < Mk


@triton.jit
def _affinity_kernel(
    qc_ptr, kc_ptr, l_ptr, a_ptr, at_ptr, sin_ptr, rsum_ptr, rmax_ptr,
    Hq, G, Mq, Mk, lo, D, NJ, scale,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_m,
    CAUSAL: tl.constexpr, WRITE_L: tl.constexpr, WRITE_A: tl.constexpr, WRITE_AT: tl.constexpr,
    WRITE_SUMS: tl.constexpr, WRITE_RMAX: tl.constexpr, PREC: tl.constexpr,
    BI: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr,
):
    bh = tl.program_id(0)
    jb = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    j = jb * BJ + tl.arange(0, BJ)
    d = tl.arange(0, BD)
    jm = j < Mk
    dm = d < D
    kt_ptrs = kc_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h + j[None, :] * sk_m + d[:, None]
    kt = tl.load(kt_ptrs, mask=dm[:, None] & jm[None, :], other=0.0)  # [BD, BJ]
    q_base = qc_ptr + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
    mm_base = bh.to(tl.int64) * Mq * Mk
    colsum = tl.zeros([BJ], dtype=tl.float32)
    i_start = 0
    if CAUSAL:
        i_start = tl.maximum(jb * BJ - lo, 0)
    for i0 in range(i_start, Mq, BI):
        i = i0 + tl.arange(0, BI)
        im = i < Mq
        qt = tl.load(q_base + i[:, None] * sq_m + d[None, :], mask=im[:, None] & dm[None, :], other=0.0)
        lg = _mm(qt, kt, tl.zeros([BI, BJ], dtype=tl.float32), PREC) * scale
        inb = im[:, None] & jm[None, :]
        edge = inb & _edge(i[:, None], j[None, :], Mk, lo, CAUSAL)
        a = tl.where(edge, tl.maximum(lg, 0.0), 0.0)
        offs = mm_base + i[:, None] * Mk + j[None, :]
        if WRITE_L:
            tl.store(l_ptr + offs, lg, mask=inb)
        if WRITE_A:
            tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=inb)
        if WRITE_AT:
            tl.store(at_ptr + mm_base + j[None, :] * Mq + i[:, None], a.to(at_ptr.dtype.element_ty), mask=inb)
        if WRITE_SUMS:
            colsum += tl.sum(a, axis=0)
            tl.store(rsum_ptr + (bh.to(tl.int64) * Mq + i) * NJ + jb, tl.sum(a, axis=1), mask=im)
        if WRITE_RMAX:
            tl.store(rmax_ptr + (bh.to(tl.int64) * Mq + i) * NJ + jb, tl.max(a, axis=1), mask=im)
    if WRITE_SUMS:
        tl.store(sin_ptr + bh.to(tl.int64) * Mk + j, colsum, mask=jm)


@triton.jit
def _redundancy_kernel(
    a_ptr, r_ptr, sout_ptr, sin_ptr, out_ptr, rmax_ptr,
    Mq, Mk, lo, NJ, lam, norm,
    CAUSAL: tl.constexpr, SCORE: tl.constexpr, NEGATE: tl.constexpr, PREC: tl.constexpr, R_IN: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    bh = tl.program_id(0)
    ib = tl.program_id(1)
    jb = tl.program_id(2)
    i0 = ib * BM
    j0 = jb * BN
    if CAUSAL:
        if j0 > tl.minimum(i0 + BM - 1 + lo, Mk - 1):
            return  # the whole tile lies above the causal diagonal: no edge, nothing to write
    i = i0 + tl.arange(0, BM)
    j = j0 + tl.arange(0, BN)
    im = i < Mq
    jm = j < Mk
    base = a_ptr + bh.to(tl.int64) * Mq * Mk
    inb = im[:, None] & jm[None, :]
    offs = bh.to(tl.int64) * Mq * Mk + i[:, None] * Mk + j[None, :]
    if R_IN:
        # R computed by a library matmul: only the epilogue runs here.
        acc = tl.load(r_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        k_start = 0
        k_end = Mq
        if CAUSAL:
            # A[i, lo + k] needs k <= i; A[k, j] needs j <= k + lo.
            k_start = tl.maximum(j0 - lo, 0)
            k_end = tl.minimum(i0 + BM, Mq)
        for k0 in range(k_start, k_end, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < Mq
            col = lo + kk
            m1 = im[:, None] & km[None, :] & _edge(i[:, None], col[None, :], Mk, lo, CAUSAL)
            a1 = tl.load(base + i[:, None] * Mk + col[None, :], mask=m1, other=0.0)
            m2 = km[:, None] & jm[None, :] & _edge(kk[:, None], j[None, :], Mk, lo, CAUSAL)
            a2 = tl.load(base + kk[:, None] * Mk + j[None, :], mask=m2, other=0.0)
            acc = _mm(a1, a2, acc, PREC)
    if SCORE == 2:
        edge = inb & _edge(i[:, None], j[None, :], Mk, lo, CAUSAL)
        tl.store(out_ptr + offs, acc, mask=inb)
        tl.store(rmax_ptr + (bh.to(tl.int64) * Mq + i) * NJ + jb, tl.max(tl.where(edge, acc, 0.0), axis=1), mask=im)
    else:
        edge = inb & _edge(i[:, None], j[None, :], Mk, lo, CAUSAL)
        a = tl.load(base + i[:, None] * Mk + j[None, :], mask=edge, other=0.0).to(tl.float32)
        if SCORE == 0:
            s_out = tl.load(sout_ptr + bh.to(tl.int64) * Mq + i, mask=im, other=0.0)
            s_in = tl.load(sin_ptr + bh.to(tl.int64) * Mk + j, mask=jm, other=0.0)
            f = 4.0 * a - s_out[:, None] - s_in[None, :] + 3.0 * acc
        else:
            f = a - lam * (acc / norm)
        if NEGATE:
            f = -f
        tl.store(out_ptr + offs, f, mask=inb)


@triton.jit
def _two_stage_kernel(
    a_ptr, at_ptr, cidx_ptr, cnum_ptr, out_ptr,
    Mq, Mk, lo, W, lam, norm,
    CAUSAL: tl.constexpr, NEGATE: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
):
    row = tl.program_id(0)
    cb = tl.program_id(1)
    bh = row // Mq
    i = row % Mq
    n = tl.load(cnum_ptr + row)
    c0 = cb * BC
    if c0 >= n:
        return
    cc = c0 + tl.arange(0, BC)
    cm = cc < n
    jj = tl.load(cidx_ptr + row.to(tl.int64) * W + cc, mask=cm, other=0)
    mm_base = bh.to(tl.int64) * Mq * Mk
    acc = tl.zeros([BC], dtype=tl.float32)
    k_end = Mq
    if CAUSAL:
        k_end = tl.minimum(i + 1, Mq)
    for k0 in range(0, k_end, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < Mq
        col = lo + kk
        av = tl.load(a_ptr + mm_base + i * Mk + col, mask=km & _edge(i, col, Mk, lo, CAUSAL), other=0.0)
        mt = cm[:, None] & km[None, :] & _edge(kk[None, :], jj[:, None], Mk, lo, CAUSAL)
        at = tl.load(at_ptr + mm_base + jj[:, None] * Mq + kk[None, :], mask=mt, other=0.0)
        acc += tl.sum(at.to(tl.float32) * av.to(tl.float32)[None, :], axis=1)
    a = tl.load(a_ptr + mm_base + i * Mk + jj, mask=cm, other=0.0).to(tl.float32)
    f = a - lam * (acc / norm)
    if NEGATE:
        f = -f
    tl.store(out_ptr + mm_base + i * Mk + jj, f, mask=cm)


def _dot_code(precision: str, device: torch.device) -> int:
    """``PREC`` for the kernels. Triton's CPU interpreter (3.9) multiplies bfloat16 ``tl.dot`` operands as
    raw bits, so there the bf16 mode keeps its bf16 *storage* but multiplies in float32."""
    code = PRECISIONS[precision]
    return 0 if (code == 2 and device.type != "cuda") else code


def _tiles(device: torch.device, m: int) -> tuple[int, int, int]:
    """(BM, BN, BK) of the curvature kernel: 64 x 64 x 32 on GPU; small in the CPU interpreter."""
    if device.type == "cuda":
        return 64, 64, 32
    t = 16 if m <= 16 else 32
    return t, t, t


# num_warps by kernel on CUDA, chosen from ptxas resource usage (sm_90, no register spills):
# the curvature kernel at 64 x 64 x 32 needs 8 warps (4 warps: 238-255 registers, spills in fp32);
# the affinity kernel in IEEE fp32 spills at 64 x 64 (D = 128) and takes 32 x 32 tiles.
_CURVATURE_WARPS = 8


def _affinity_tiles(device: torch.device, m: int, dot_code: int) -> tuple[int, int, int]:
    """(BI, BJ, num_warps) of the affinity kernel."""
    if device.type == "cuda":
        return (32, 32, 4) if dot_code == 0 else (64, 64, 8)
    bi, bj, _ = _tiles(device, m)
    return bi, bj, 4


def affinity(
    qc: torch.Tensor,
    kc: torch.Tensor,
    lo: int,
    causal: bool,
    scale: float,
    *,
    logits: bool = False,
    a: bool = False,
    a_t: bool = False,
    sums: bool = False,
    rowmax: bool = False,
    precision: str = "fp32",
    zero_a: bool = False,
) -> dict[str, torch.Tensor]:
    """Run :func:`_affinity_kernel`.

    Args:
        qc: ``[B, Hq, Mq, D]``; kc: ``[B, Hkv, Mk, D]``; lo: ``BlockGrid.block_offset``.
        logits, a, a_t, sums, rowmax: which outputs to write; zero_a: allocate ``A`` zeroed (for a
            library matmul, which reads the tiles above the diagonal too).

    Returns:
        A dict with the requested entries, ``M x M`` ones shaped ``[B, Hq, Mq, Mk]`` (``"A_T"``
        ``[B, Hq, Mk, Mq]``) and written only on tiles holding an edge: ``"logits"`` (fp32), ``"A"`` and
        ``"A_T"`` (fp32, bf16 when ``precision="bf16"``), ``"S_out"`` ``[B, Hq, Mq]``, ``"S_in"``
        ``[B, Hq, Mk]`` and ``"A_rowmax"`` ``[B, Hq, Mq]`` (fp32, complete).
    """
    qc = qc.contiguous()
    kc = kc.contiguous()
    b, hq, mq, d = qc.shape
    hk, mk = kc.shape[1], kc.shape[2]
    dev = qc.device
    code = _dot_code(precision, dev)
    bi, bj, warps = _affinity_tiles(dev, max(mq, mk), code)
    nj = triton.cdiv(mk, bj)
    a_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    dummy = torch.empty(1, device=dev, dtype=torch.float32)
    out: dict[str, torch.Tensor] = {}
    lg = torch.empty(b, hq, mq, mk, device=dev, dtype=torch.float32) if logits else dummy
    alloc = torch.zeros if zero_a else torch.empty  # a library matmul reads every tile of A
    aa = alloc(b, hq, mq, mk, device=dev, dtype=a_dtype) if a else dummy
    at = torch.empty(b, hq, mk, mq, device=dev, dtype=a_dtype) if a_t else dummy
    s_in = torch.empty(b, hq, mk, device=dev, dtype=torch.float32) if sums else dummy
    rsum = torch.zeros(b, hq, mq, nj, device=dev, dtype=torch.float32) if sums else dummy
    rmax = torch.zeros(b, hq, mq, nj, device=dev, dtype=torch.float32) if rowmax else dummy
    grid = (b * hq, nj)
    _affinity_kernel[grid](
        qc, kc, lg, aa, at, s_in, rsum, rmax,
        hq, hq // hk, mq, mk, lo, d, nj, float(scale),
        *qc.stride()[:3], *kc.stride()[:3],
        CAUSAL=bool(causal), WRITE_L=logits, WRITE_A=a, WRITE_AT=a_t, WRITE_SUMS=sums, WRITE_RMAX=rowmax,
        PREC=code, BI=bi, BJ=bj, BD=triton.next_power_of_2(d), num_warps=warps,
    )
    if logits:
        out["logits"] = lg
    if a:
        out["A"] = aa
    if a_t:
        out["A_T"] = at
    if sums:
        out["S_out"] = rsum.sum(-1)
        out["S_in"] = s_in
    if rowmax:
        out["A_rowmax"] = rmax.amax(-1)
    return out


def redundancy_scores(
    a: torch.Tensor,
    lo: int,
    causal: bool,
    *,
    score: str,
    keep: str = "lowest",
    lam: float = 0.5,
    norm: str = "blocks",
    s_out: torch.Tensor | None = None,
    s_in: torch.Tensor | None = None,
    a_rowmax: torch.Tensor | None = None,
    precision: str = "fp32",
    r: torch.Tensor | None = None,
    tiles: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Fused ``R = A[..., lo:lo+Mq] @ A`` and curvature: returns the priority ``[B, Hq, Mq, Mk]`` fp32.

    The priority is ``-F`` (``keep="lowest"``) or ``F``, written on tiles that hold an edge.
    ``score="forman"`` needs ``s_out``/``s_in``; ``score="triangle"`` with ``norm="rowmax"`` needs
    ``a_rowmax`` and takes a second, elementwise pass on the host (``R`` goes to memory once).
    ``r``: ``R`` computed elsewhere (e.g. by ``torch.matmul``); then the kernel runs only the epilogue.
    ``tiles``: ``(BM, BN, BK, num_warps[, num_stages])`` overriding the default (64, 64, 32, 8 on CUDA).
    """
    b, hq, mq, mk = a.shape
    dev = a.device
    bm, bn, bk = _tiles(dev, max(mq, mk))
    warps = _CURVATURE_WARPS if dev.type == "cuda" else 4
    extra = {}
    if tiles is not None:
        bm, bn, bk, warps = tiles[:4]
        if len(tiles) > 4:
            extra["num_stages"] = tiles[4]
    nj = triton.cdiv(mk, bn)
    out = torch.empty(b, hq, mq, mk, device=dev, dtype=torch.float32)
    dummy = torch.empty(1, device=dev, dtype=torch.float32)
    if score == "forman":
        code, nrm = SCORE_FORMAN, 1.0
    elif norm == "rowmax":
        code, nrm = SCORE_RAW_R, 1.0
    else:
        code, nrm = SCORE_TRIANGLE, (float(mk) if norm == "blocks" else 1.0)
    rmax = torch.zeros(b, hq, mq, nj, device=dev, dtype=torch.float32) if code == SCORE_RAW_R else dummy
    grid = (b * hq, triton.cdiv(mq, bm), nj)
    _redundancy_kernel[grid](
        a, r.contiguous() if r is not None else dummy,
        s_out if s_out is not None else dummy, s_in if s_in is not None else dummy, out, rmax,
        mq, mk, lo, nj, float(lam), nrm,
        CAUSAL=bool(causal), SCORE=code, NEGATE=(keep == "lowest" and code != SCORE_RAW_R),
        PREC=_dot_code(precision, dev), R_IN=r is not None, BM=bm, BN=bn, BK=bk, num_warps=warps, **extra,
    )
    if code == SCORE_RAW_R:
        # Reference: rn = R * (amax_A / amax_R.clamp_min(1e-30)); F = A - lam * rn. Entries off the edge
        # set are garbage here and masked by selection.
        fac = (a_rowmax / rmax.amax(-1).clamp_min(1e-30))[..., None]
        out = a.float() - lam * (out * fac)
        if keep == "lowest":
            out = -out
    return out


def two_stage_scores(
    a: torch.Tensor,
    a_t: torch.Tensor,
    cand_num: torch.Tensor,
    cand_idx: torch.Tensor,
    lo: int,
    causal: bool,
    *,
    keep: str = "lowest",
    lam: float = 0.5,
    norm: str = "blocks",
) -> torch.Tensor:
    """Triangle-proxy priority on each row's candidates only.

    Args:
        a: ``[B, Hq, Mq, Mk]``; a_t: ``[B, Hq, Mk, Mq]``; cand_num ``[B, Hq, Mq]`` int32 and cand_idx
        ``[B, Hq, Mq, W]`` int32 (the candidates first), from the stage-1 selection.

    Returns:
        ``[B, Hq, Mq, Mk]`` fp32 priority, written at candidate positions only.
    """
    b, hq, mq, mk = a.shape
    w = cand_idx.shape[-1]
    out = torch.empty(b, hq, mq, mk, device=a.device, dtype=torch.float32)
    bc = 32 if a.device.type == "cuda" else 16
    bk = 64 if a.device.type == "cuda" else 32
    nrm = float(mk) if norm == "blocks" else 1.0
    grid = (b * hq * mq, triton.cdiv(w, bc))
    _two_stage_kernel[grid](
        a, a_t, cand_idx.contiguous(), cand_num.contiguous(), out,
        mq, mk, lo, w, float(lam), nrm,
        CAUSAL=bool(causal), NEGATE=(keep == "lowest"), BC=bc, BK=bk, num_warps=4,
    )
    return out
