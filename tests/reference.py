"""An independent naive reference for the core tests.

Written on purpose unlike the library: Python loops over blocks instead of index arithmetic, explicit
``repeat_interleave`` for GQA instead of grouped views, float64 and a hand-written softmax, exact
rational arithmetic for budgets. If the library and this file agree, two different derivations of the
same rule agree; neither imports the other's helpers.

Convention (chunked prefill): ``Nq <= Nk`` queries are the last ``Nq`` key positions, so query ``t``
is at absolute position ``Nk - Nq + t``. Query block ``i`` of a selection holds the queries whose
absolute position lies in key block ``i + (Nk - Nq) // bs``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def make_qkv(b, hq, hkv, nq, nk, d, *, dtype=torch.float32, seed=0):
    """Seeded test inputs: q ``[b, hq, nq, d]``, k and v ``[b, hkv, nk, d]`` (CPU)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=gen)
    k = torch.randn(b, hkv, nk, d, generator=gen)
    v = torch.randn(b, hkv, nk, d, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def num_blocks(n: int, bs: int) -> int:
    return -(-n // bs)


def query_block_of(pos: int, nq: int, nk: int, bs: int) -> int:
    """Selection row of the query at absolute position ``pos``."""
    return pos // bs - (nk - nq) // bs


def grid_shape(nq: int, nk: int, bs: int) -> tuple[int, int]:
    """``(Mq, Mk)``: one row per key block that holds at least one query."""
    first, last = nk - nq, nk - 1
    return last // bs - first // bs + 1, num_blocks(nk, bs)


def valid_blocks(nq: int, nk: int, bs: int, causal: bool) -> torch.Tensor:
    """``[Mq, Mk]`` bool: a key block is a valid edge of row ``i`` when some query of row ``i`` may
    see some key of it (causal), or always (non-causal)."""
    mq, mk = grid_shape(nq, nk, bs)
    out = torch.zeros(mq, mk, dtype=torch.bool)
    for i in range(mq):
        # The last position of row i (or the last key) bounds what the row can see.
        last_pos = min((i + (nk - nq) // bs) * bs + bs - 1, nk - 1)
        for j in range(mk):
            out[i, j] = (not causal) or j * bs <= last_pos
    return out


def diagonal_block(i: int, nq: int, nk: int, bs: int) -> int:
    return min(i + (nk - nq) // bs, num_blocks(nk, bs) - 1)


def expected_budget(v: int, sparsity: float) -> int:
    """``min(v, max(2, ceil((1 - s) v)))`` in exact decimal arithmetic (``0.9`` means 9/10)."""
    keep = math.ceil((1 - Fraction(str(sparsity))) * v)
    return min(v, max(2, keep))


def expected_row_budgets(nq: int, nk: int, bs: int, sparsity: float, causal: bool) -> list[int]:
    """Blocks per row; fewer queries than one block take the dense path (every valid block)."""
    valid = valid_blocks(nq, nk, bs, causal)
    counts = [int(valid[i].sum()) for i in range(valid.shape[0])]
    if nq < bs:
        return counts
    return [expected_budget(v, sparsity) for v in counts]


def token_mask(block_mask: torch.Tensor, nq: int, nk: int, bs: int, causal: bool, q_heads: int) -> torch.Tensor:
    """``[B, Hq, Nq, Nk]`` bool from a ``[B, H, Mq, Mk]`` block mask, ``H`` the query heads or the KV heads
    (repeated to ``q_heads``), by a loop over blocks."""
    bm = block_mask.bool().cpu()
    if bm.shape[1] != q_heads:
        bm = bm.repeat_interleave(q_heads // bm.shape[1], dim=1)
    b, h, mq, mk = bm.shape
    tok = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    for i in range(mq):
        # Queries (as indices into q) whose absolute position falls in key block i + block offset.
        lo_abs = (i + (nk - nq) // bs) * bs
        q_lo = max(lo_abs - (nk - nq), 0)
        q_hi = min(lo_abs + bs - (nk - nq), nq)
        if q_lo >= q_hi:
            continue
        for j in range(mk):
            k_lo, k_hi = j * bs, min(j * bs + bs, nk)
            tok[:, :, q_lo:q_hi, k_lo:k_hi] = bm[:, :, i, j][..., None, None]
    if causal:
        for t in range(nq):
            tok[:, :, t, nk - nq + t + 1 :] = False
    return tok


def causal_token_mask(nq: int, nk: int, causal: bool) -> torch.Tensor:
    """``[Nq, Nk]`` bool, dense (causal with the chunked-prefill offset, or all True)."""
    m = torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        for t in range(nq):
            m[t, nk - nq + t + 1 :] = False
    return m


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    *,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Softmax attention over an explicit token mask, computed in ``dtype`` (float64 by default).

    Args: q ``[B, Hq, Nq, D]``, k, v ``[B, Hkv, Nk, D]``, allowed broadcastable to ``[B, Hq, Nq, Nk]``.
    Returns ``[B, Hq, Nq, D]`` in ``dtype``.
    """
    g = q.shape[1] // k.shape[1]
    qq = q.to(dtype)
    kk = k.to(dtype).repeat_interleave(g, dim=1)
    vv = v.to(dtype).repeat_interleave(g, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (qq @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    s = s - s.amax(-1, keepdim=True)
    e = s.exp()
    return (e / e.sum(-1, keepdim=True)) @ vv


def plain_attention(q, k, v, allowed, *, scale: float | None = None) -> torch.Tensor:
    """Same-precision PyTorch reference (matmul, softmax, matmul in the inputs' dtype), for the
    flash-attention error rule."""
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, dim=1)
    vv = v.repeat_interleave(g, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ vv


def masked_reference(q, k, v, selection_mask: torch.Tensor, *, block_size: int, causal: bool, scale=None):
    """float64 attention under a block mask (the ground truth at sparsity > 0)."""
    nq, nk = q.shape[2], k.shape[2]
    allowed = token_mask(selection_mask, nq, nk, block_size, causal, q.shape[1])
    return attention(q, k, v, allowed, scale=scale)


def dense_reference(q, k, v, *, causal: bool, scale=None):
    return attention(q, k, v, causal_token_mask(q.shape[2], k.shape[2], causal), scale=scale)


def coarse_max_l2(x: torch.Tensor, bs: int, pad_front: int = 0) -> torch.Tensor:
    """``[B, H, M, D]``: per block, the real token of largest L2 norm (first on ties), by a loop.
    ``pad_front`` virtual rows precede token 0."""
    b, h, n, d = x.shape
    m = num_blocks(pad_front + n, bs)
    out = torch.zeros(b, h, m, d, dtype=x.dtype)
    for blk in range(m):
        lo = max(blk * bs - pad_front, 0)
        hi = min(blk * bs + bs - pad_front, n)
        chunk = x[:, :, lo:hi]
        idx = chunk.double().norm(dim=-1).argmax(-1)  # [B, H]
        for bi in range(b):
            for hi_ in range(h):
                out[bi, hi_, blk] = chunk[bi, hi_, idx[bi, hi_]]
    return out


def coarse_logits(q, k, bs: int) -> torch.Tensor:
    """``[B, Hq, Mq, Mk]`` float64 coarse logits of max-L2 representatives (queries aligned to the key grid)."""
    nq, nk = q.shape[2], k.shape[2]
    qc = coarse_max_l2(q, bs, pad_front=(nk - nq) % bs).double()
    kc = coarse_max_l2(k, bs).double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return qc @ kc.transpose(-1, -2) * q.shape[-1] ** -0.5


def forman_scores(q, k, bs: int) -> torch.Tensor:
    """Augmented Forman curvature ``4A - S_out(i) - S_in(j) + 3 (A @ A)_ij`` for full prefill (Nq == Nk),
    float64, from the coarse graph built independently."""
    assert q.shape[2] == k.shape[2], "two-hop paths are only checked for full prefill"
    logits = coarse_logits(q, k, bs)
    m = logits.shape[-1]
    a = torch.zeros_like(logits)
    for i in range(m):
        for j in range(i + 1):
            a[..., i, j] = logits[..., i, j].clamp_min(0)
    r = torch.zeros_like(a)
    for i in range(m):
        for j in range(i + 1):
            r[..., i, j] = sum(a[..., i, x] * a[..., x, j] for x in range(j, i + 1))
    s_out = a.sum(-1, keepdim=True)
    s_in = a.sum(-2, keepdim=True)
    return 4 * a - s_out - s_in + 3 * r


def true_block_mass(q, k, bs: int, causal: bool) -> torch.Tensor:
    """``[B, Hq, Mq, Mk]`` float64: mean over each query block's real rows of the dense softmax mass in
    each key block."""
    nq, nk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(g, dim=1).transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~causal_token_mask(nq, nk, causal), float("-inf"))
    p = torch.softmax(s, dim=-1)
    mq, mk = grid_shape(nq, nk, bs)
    out = torch.zeros(*q.shape[:2], mq, mk, dtype=torch.float64)
    rows: list[list[int]] = [[] for _ in range(mq)]
    for t in range(nq):
        rows[query_block_of(nk - nq + t, nq, nk, bs)].append(t)
    for i in range(mq):
        for j in range(mk):
            out[..., i, j] = p[:, :, rows[i], j * bs : min(j * bs + bs, nk)].sum(-1).mean(-1)
    return out


def ranking_consistent(mask_row: torch.Tensor, prio_row: torch.Tensor, free: torch.Tensor, tol: float = 0.0) -> bool:
    """Every kept free block has priority >= every dropped free block (up to ``tol``)."""
    kept = prio_row[mask_row & free]
    dropped = prio_row[~mask_row & free]
    if kept.numel() == 0 or dropped.numel() == 0:
        return True
    return bool(kept.min() >= dropped.max() - tol)


# Shapes the core tests sweep: (batch, q_heads, kv_heads, q_len, kv_len, head_dim, block_size).
SHAPES = {
    "full-bs32": (1, 2, 2, 128, 128, 64, 32),
    "gqa-b2-oddN-bs16": (2, 4, 2, 100, 100, 64, 16),
    "bs64-d128-oddN": (1, 2, 1, 300, 300, 128, 64),
    "chunk-unaligned-d128": (1, 4, 1, 70, 150, 128, 32),
    "chunk-aligned-bs64": (2, 2, 1, 64, 192, 64, 64),
    "shorter-than-block": (1, 2, 2, 40, 40, 64, 64),
    "chunk-shorter-than-block": (1, 2, 1, 20, 100, 64, 32),
}
