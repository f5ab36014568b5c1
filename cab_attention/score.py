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


def augmented_forman(a: torch.Tensor, r: torch.Tensor, in_strength: torch.Tensor | None = None) -> torch.Tensor:
    """Augmented Forman-Ricci curvature on edges: ``F_ij = 4 A_ij - S_i - S_j + 3 R_ij``.

    The block graph is directed (causal), so ``S_i`` is the out-strength of query block ``i`` (its row
    sum) and ``S_j`` the in-strength of key block ``j`` (its column sum over the present query blocks).
    In prefill the in-strength includes later queries: the mask of a row may depend on later rows,
    which is harmless for prefill (all rows are computed together) but is not a causal predictor.
    ``in_strength`` (``[..., 1, Mk]``) gives ``S_j`` when ``a`` holds only some of the rows (row tiles,
    :mod:`cab_attention.streamed`); by default it is ``a``'s column sum.
    """
    s_out = a.sum(-1, keepdim=True)
    s_in = a.sum(-2, keepdim=True) if in_strength is None else in_strength
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


# ----------------------------------------------------------------------------------------------------
# Row-normalised graphs, two-hop scores, and the query-aware estimators (vertical-slash, FlexPrefill).


def row_shares(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Non-negative weights normalised over each row's valid blocks; 0 on non-edges.

    A row whose valid weights sum to 0 (no information) becomes uniform over its valid blocks.

    Args: x ``[B, H, Mq, Mk]``; valid ``[Mq, Mk]`` bool. Returns ``[B, H, Mq, Mk]`` float32 (float64 for a
    float64 ``x``), rows summing to 1.
    """
    x = x if x.dtype == torch.float64 else x.float()
    w = torch.where(valid, x.clamp_min(0.0), torch.zeros((), dtype=x.dtype, device=x.device))
    total = w.sum(-1, keepdim=True)
    uniform = valid.to(x.dtype) / valid.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(total > 0, w / total.clamp_min(1e-30), uniform.expand_as(w))


def softmax_affinity(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``A_ij = softmax_j(logits_ij)`` over the row's causal edges, 0 on non-edges.

    Unlike :func:`affinity` (relu), every causal edge keeps a positive weight, so negative logits stay
    ordered instead of collapsing to one tie; each row is a distribution (an estimate of the row's
    attention share per block), and ``A @ A`` is a two-step walk.

    Args: logits ``[B, H, Mq, Mk]``; valid ``[Mq, Mk]`` bool. Returns ``[B, H, Mq, Mk]`` float32.
    """
    return logits.float().masked_fill(~valid, float("-inf")).softmax(-1)


def two_hop(a: torch.Tensor, r: torch.Tensor, lam: float) -> torch.Tensor:
    """``A + lam * R``: direct affinity plus two-hop paths (``R = A @ A``, :func:`redundancy`), so a key
    block reached through an intermediate block that the row attends to gains weight (multi-hop chains)."""
    return a + lam * r


def last_query_attention(
    q: torch.Tensor, k: torch.Tensor, grid: BlockGrid, scale: float, last_q: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of the last ``min(last_q, Nq)`` queries to every key (GQA without copying keys).

    Args: q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``.

    Returns:
        ``p`` ``[B, Hq, L, Nk]`` float32 softmax rows (causal when ``grid.causal``) and ``pos`` ``[L]``
        int64, the absolute position of each of those queries.
    """
    b, hq, hkv, g, d = grid.batch, grid.q_heads, grid.kv_heads, grid.group, grid.head_dim
    n = min(int(last_q), grid.q_len)
    pos = torch.arange(grid.kv_len - n, grid.kv_len, device=q.device)
    qs = q[:, :, -n:].float().reshape(b, hkv, g, n, d)
    logits = torch.matmul(qs, k.float().transpose(-1, -2).unsqueeze(2)) * scale  # [B, Hkv, G, L, Nk]
    if grid.causal:
        col = torch.arange(grid.kv_len, device=q.device)
        logits = logits.masked_fill(col[None, :] > pos[:, None], float("-inf"))
    return logits.softmax(-1).reshape(b, hq, n, grid.kv_len), pos


def _block_sums(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[..., N]`` -> ``[..., ceil(N / block_size)]`` sums over blocks of the last axis (end padded with 0)."""
    n = x.shape[-1]
    m = -(-n // block_size)
    return torch.nn.functional.pad(x, (0, m * block_size - n)).reshape(*x.shape[:-1], m, block_size).sum(-1)


def vertical_slash_mass(p: torch.Tensor, pos: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """MInference's vertical-slash pattern, estimated from the last queries and turned into block scores.

    From ``p`` (:func:`last_query_attention`), a *vertical* weight per key position (its mean attention
    over the last queries) and a *slash* weight per offset ``o = query - key`` (the mean attention along
    that diagonal). Both patterns are assumed to hold for every query, so the share of query block
    ``i`` (absolute block ``I``) in key block ``j`` is estimated as

        ``V_j + S_(I - j)``,   ``V_j = sum_(c in block j) vertical_c``,
        ``S_d = sum_(|u| < bs) slash_(d bs + u) (bs - |u|) / bs``

    (``S_d`` averages the diagonal weight over the ``bs x bs`` tile: ``bs - |u|`` of its cells lie on
    offset ``d bs + u``). Rows are then normalised over their valid blocks.

    Args: p ``[B, H, L, Nk]``; pos ``[L]``. Returns ``[B, H, Mq, Mk]`` float32, rows summing to 1.
    """
    bs, nk = grid.block_size, grid.kv_len
    mq, mk = grid.num_q_blocks, grid.num_kv_blocks
    b, h, n = p.shape[0], p.shape[1], p.shape[2]
    vertical = _block_sums(p.mean(2), bs)  # [B, H, Mk]
    # Offsets o in [-(mk bs), mk bs - 1], stored at index o + mk bs: gather p[t, pos_t - o].
    span = mk * bs
    offs = torch.arange(-span, span, device=p.device)
    col = pos[:, None] - offs[None, :]  # [L, 2 span]
    inside = (col >= 0) & (col < nk)
    slash = p.gather(-1, col.clamp(0, nk - 1).expand(b, h, n, 2 * span))
    slash = (slash * inside).mean(2)  # [B, H, 2 span]
    u = torch.arange(-(bs - 1), bs, device=p.device, dtype=torch.float32)
    tent = ((bs - u.abs()) / bs).view(1, 1, -1)
    # Output n of the strided convolution is centred on offset (n - mk) * bs, i.e. block diagonal d = n - mk.
    diag = torch.nn.functional.conv1d(slash.reshape(b * h, 1, 2 * span), tent, stride=bs, padding=bs - 1)
    diag = diag.reshape(b, h, 2 * mk)
    i_abs = torch.arange(mq, device=p.device) + grid.block_offset
    d_idx = (i_abs[:, None] - torch.arange(mk, device=p.device)[None, :] + mk).clamp(0, 2 * mk - 1)
    s = diag[:, :, d_idx.reshape(-1)].reshape(b, h, mq, mk)
    return row_shares(vertical[:, :, None, :] + s, grid.valid(p.device))


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Square root of the Jensen-Shannon divergence (natural log) between distributions on the last axis."""
    m = 0.5 * (p + q)
    js = 0.5 * (torch.special.xlogy(p, p / m.clamp_min(1e-30)) + torch.special.xlogy(q, q / m.clamp_min(1e-30))).sum(-1)
    return js.clamp_min(0.0).sqrt()


def flexprefill_mass(
    p: torch.Tensor, pos: torch.Tensor, query_aware: torch.Tensor, grid: BlockGrid, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexPrefill's per-head choice between a query-aware block estimate and the vertical-slash pattern.

    The last queries' true block distribution (their mean attention summed per key block) is compared
    with the query-aware estimate of the last query-block row; a head whose square-root Jensen-Shannon
    divergence is below ``tau`` trusts the query-aware estimate everywhere, the others use
    :func:`vertical_slash_mass`.

    Args:
        p, pos: from :func:`last_query_attention`.
        query_aware: ``[B, H, Mq, Mk]`` row-normalised query-aware estimate (e.g. :func:`softmax_affinity`
            of mean-pooled coarse logits).
        tau: the divergence threshold.

    Returns:
        ``mass`` ``[B, H, Mq, Mk]`` float32 (rows summing to 1) and ``use_vertical_slash`` ``[B, H]`` bool.
    """
    truth = _block_sums(p.mean(2), grid.block_size)  # [B, H, Mk], sums to 1
    estimate = query_aware[:, :, -1]  # the row of the last query block
    use_vs = js_distance(truth, estimate) >= tau
    vs = vertical_slash_mass(p, pos, grid)
    return torch.where(use_vs[:, :, None, None], vs, query_aware), use_vs
