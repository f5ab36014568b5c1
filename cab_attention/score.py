"""Stage 2, score: coarse block graph, curvature, and the baselines' block scores.

All scores are ``[B, Hq, Mq, Mk]`` float32 over the block grid of :mod:`cab_attention.geometry`.
Entries outside the causal edge set are meaningless here; the selection stage never picks them.

The block graph: nodes are key blocks ``0..Mk-1``; query block ``i`` is node ``i + block_offset``.
Edge ``i -> j`` (query block ``i`` reads key block ``j``) exists when ``j`` is causally valid, with
weight ``A_ij = relu(qc_i . kc_j * scale)``. With chunked prefill the rows of earlier nodes are
unknown (their queries are not here), so two-hop paths run only through nodes whose queries are present.
"""

from __future__ import annotations

import torch

from .geometry import BlockGrid

TRIANGLE_NORMS = ("blocks", "rowmax", "none")


def coarse_logits(qc: torch.Tensor, kc: torch.Tensor, scale: float) -> torch.Tensor:
    """GQA-aware coarse logits ``qc . kc * scale`` without repeating keys in memory.

    Args:
        qc: ``[B, Hq, Mq, D]``; kc: ``[B, Hkv, Mk, D]`` with ``Hq % Hkv == 0``.

    Returns:
        ``[B, Hq, Mq, Mk]`` float32.
    """
    b, hq, mq, d = qc.shape
    hkv, mk = kc.shape[1], kc.shape[2]
    g = hq // hkv
    qg = qc.float().view(b, hkv, g, mq, d)
    kt = kc.float().transpose(-1, -2).unsqueeze(2)  # [B, Hkv, 1, D, Mk], broadcast over the group
    return (torch.matmul(qg, kt) * scale).view(b, hq, mq, mk)


def affinity(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``A = relu(logits)`` on edges, exactly 0 on non-edges (so they carry no two-hop paths).

    Args: logits ``[B, H, Mq, Mk]``; valid ``[Mq, Mk]`` bool. Returns ``[B, H, Mq, Mk]`` float32.
    """
    return torch.where(valid, logits.clamp_min(0.0), torch.zeros((), device=logits.device))


def redundancy(a: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """Two-hop path weight ``R_ij = sum_k A_ik A_kj`` over intermediate blocks whose queries are present.

    Args: a ``[B, H, Mq, Mk]``. Returns ``[B, H, Mq, Mk]`` float32.
    """
    mq = grid.num_q_blocks
    lo = grid.block_offset
    # Column k of A (key block k) meets row (k - lo) of A (query block k): the square part of A.
    return torch.matmul(a[..., lo : lo + mq], a)


def triangle_proxy(a: torch.Tensor, r: torch.Tensor, lam: float = 0.5, norm: str = "blocks") -> torch.Tensor:
    """``F = A - lam * R / norm``: the affinity discounted by its two-hop (triangle) paths.

    ``norm="blocks"`` divides ``R`` by ``Mk`` (the author's form); ``"rowmax"`` rescales each row of ``R``
    to the row maximum of ``A``; ``"none"`` uses ``R`` as is.
    """
    if norm == "blocks":
        rn = r / a.shape[-1]
    elif norm == "rowmax":
        rn = r * (a.amax(-1, keepdim=True) / r.amax(-1, keepdim=True).clamp_min(1e-30))
    elif norm == "none":
        rn = r
    else:
        raise ValueError(f"norm must be one of {TRIANGLE_NORMS}, got {norm!r}")
    return a - lam * rn


def augmented_forman(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Augmented Forman-Ricci curvature on edges: ``F_ij = 4 A_ij - S_i - S_j + 3 R_ij``.

    The block graph is directed (causal), so ``S_i`` is the out-strength of query block ``i`` (its row
    sum) and ``S_j`` the in-strength of key block ``j`` (its column sum over the present query blocks).
    In prefill the in-strength includes later queries: the mask of a row may depend on later rows,
    which is harmless for prefill (all rows are computed together) but is not a causal predictor.
    """
    s_out = a.sum(-1, keepdim=True)
    s_in = a.sum(-2, keepdim=True)
    return 4.0 * a - s_out - s_in + 3.0 * r


def _pad_tokens(x: torch.Tensor, front: int, total: int) -> torch.Tensor:
    n = x.shape[2]
    return torch.nn.functional.pad(x, (0, 0, front, total - front - n))


def antidiagonal_mass(
    q: torch.Tensor, k: torch.Tensor, grid: BlockGrid, scale: float, stride: int = 8, chunk_blocks: int = 64
) -> torch.Tensor:
    """XAttention-style block mass from strided antidiagonal sums.

    Each group of ``stride`` consecutive queries is concatenated into one vector, and each group of keys
    likewise in reversed order, so one dot product sums an antidiagonal of the ``stride x stride`` tile.
    A causal softmax over those strided logits (scaled by ``scale / stride``), summed over each block
    tile and averaged over its strided rows, estimates the share of a query block's attention in each
    key block.

    Args: q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``. Returns ``[B, Hq, Mq, Mk]`` float32, rows summing to 1.
    """
    bs = grid.block_size
    if stride < 1 or bs % stride:
        raise ValueError(f"stride must be a positive divisor of block_size={bs}, got {stride!r}")
    b, hq, hkv, g, d = grid.batch, grid.q_heads, grid.kv_heads, grid.group, grid.head_dim
    mq, mk = grid.num_q_blocks, grid.num_kv_blocks
    per = bs // stride
    qs = _pad_tokens(q, grid.q_pad_front, mq * bs).float().reshape(b, hkv, g, mq * per, stride * d)
    ks = _pad_tokens(k, 0, mk * bs).float().reshape(b, hkv, mk * per, stride, d).flip(-2)
    ks = ks.reshape(b, hkv, 1, mk * per, stride * d).transpose(-1, -2)
    out = torch.empty(b, hq, mq, mk, device=q.device, dtype=torch.float32)
    col = torch.arange(mk * per, device=q.device)
    for i0 in range(0, mq, chunk_blocks):
        i1 = min(mq, i0 + chunk_blocks)
        logits = torch.matmul(qs[:, :, :, i0 * per : i1 * per], ks) * (scale / stride)
        if grid.causal:
            row = torch.arange(i0 * per, i1 * per, device=q.device) + grid.block_offset * per
            logits = logits.masked_fill(col[None, :] > row[:, None], float("-inf"))
        p = logits.softmax(-1).view(b, hq, i1 - i0, per, mk, per)
        out[:, :, i0:i1] = p.sum((3, 5)) / per
    return out


def oracle_mass(
    q: torch.Tensor, k: torch.Tensor, grid: BlockGrid, scale: float, chunk_blocks: int = 16
) -> torch.Tensor:
    """True block mass from full attention: for query block ``i``, the mean over its real query rows of
    the softmax mass in key block ``j``. An upper-bound selector for evaluation (O(N^2 D)), not for speed.

    Returns ``[B, Hq, Mq, Mk]`` float32.
    """
    bs = grid.block_size
    b, hq, hkv, g, d = grid.batch, grid.q_heads, grid.kv_heads, grid.group, grid.head_dim
    mq, mk, nk = grid.num_q_blocks, grid.num_kv_blocks, grid.kv_len
    qp = _pad_tokens(q, grid.q_pad_front, mq * bs).float().view(b, hkv, g, mq * bs, d)
    kt = k.float().transpose(-1, -2).unsqueeze(2)
    kpos = torch.arange(nk, device=q.device)
    qpos_all = torch.arange(mq * bs, device=q.device) + (grid.offset - grid.q_pad_front)
    real_all = (qpos_all >= grid.offset)  # front padding is not a real query; end padding is past Nk-1
    real_all &= qpos_all < nk
    out = torch.empty(b, hq, mq, mk, device=q.device, dtype=torch.float32)
    for i0 in range(0, mq, chunk_blocks):
        i1 = min(mq, i0 + chunk_blocks)
        logits = torch.matmul(qp[:, :, :, i0 * bs : i1 * bs], kt) * scale  # [B, Hkv, G, rows, Nk]
        qpos = qpos_all[i0 * bs : i1 * bs]
        if grid.causal:
            logits = logits.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
        p = logits.softmax(-1)
        p = torch.nn.functional.pad(p, (0, mk * bs - nk)).view(b, hq, i1 - i0, bs, mk, bs).sum(-1)
        real = real_all[i0 * bs : i1 * bs].view(i1 - i0, bs).float()  # [rows_blocks, bs]
        out[:, :, i0:i1] = (p * real[None, None, :, :, None]).sum(3) / real.sum(-1).clamp_min(1)[:, None]
    return out
