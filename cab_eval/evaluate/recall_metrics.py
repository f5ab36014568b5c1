"""Recall and relative output error of many block masks on one layer, from one pass over dense attention.

* **recall**: for each query token, the share of its true causal softmax mass that falls in the key
  blocks its query block keeps; averaged over query tokens (per head).
* **relative error** ``||O_sparse - O_dense|| / ||O_dense||`` of the layer's attention output (Frobenius
  over tokens and channels), where ``O_sparse`` is exact attention restricted to the kept blocks.

Both come from one pass over the dense probabilities: with ``P`` the causal softmax (the windowed
softmax on a sliding layer) and ``U[t, j] = sum_{s in block j} P[t, s] v_s``, a mask ``m`` gives
``recall_t = sum_j m_tj P_t(block j)`` and ``O_sparse[t] = sum_j m_tj U[t, j] / recall_t``, which is
exactly the softmax renormalised over the kept blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_metrics(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    masks: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    max_elems: int = 1 << 26,
    chunk_rows: int = 512,
    window: int | None = None,
) -> dict[str, torch.Tensor]:
    """Recall and output error of many block masks on one layer, from one pass over dense attention.

    Args:
        q: ``[1, Hq, N, D]``; k, v: ``[1, Hkv, N, D]`` (causal self-attention, queries = keys' positions).
        masks: ``[S, Hq, M, M]`` bool block masks (``M = ceil(N / block_size)``).
        max_elems, chunk_rows: row-chunk size bounds (elements of the per-block partial outputs; rows).
        window: a sliding window in tokens: the true attention is then the windowed softmax (query ``t``
            sees keys ``t - window < s <= t``), as the model computes it.

    Returns (float64, on CPU): ``recall [S, Hq]`` (mean over query rows of the kept softmax mass),
    ``err2 [S, Hq]`` (sum of squared output differences), ``dense2 [Hq]`` (sum of squared dense outputs),
    ``min_recall [S, Hq]``. Relative error of a head: ``sqrt(err2 / dense2)``.
    """
    if q.dim() != 4 or q.shape[0] != 1:
        raise ValueError(f"q must be [1, Hq, N, D], got {tuple(q.shape)}")
    _, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    bs = block_size
    m = -(-n // bs)
    if masks.dim() != 4 or tuple(masks.shape[1:]) != (hq, m, m):
        raise ValueError(f"masks must be [S, {hq}, {m}, {m}], got {tuple(masks.shape)}")
    scale = d**-0.5 if scale is None else float(scale)
    npad = m * bs
    qf = q[0].float().view(hkv, g, n, d)
    kf = F.pad(k[0].float(), (0, 0, 0, npad - n))  # [Hkv, Npad, D]
    vf = F.pad(v[0].float(), (0, 0, 0, npad - n)).view(hkv, m, bs, d)
    n_s = masks.shape[0]
    # [S, Hkv, G, M, M] -> [Hkv, G, M(query block), S, M(key block)] so that a chunk's rows pick their row.
    mk = masks.to(torch.float32).view(n_s, hkv, g, m, m).permute(1, 2, 3, 0, 4)
    # Row chunks of whole blocks; a chunk needs only the key blocks up to its last row (causal).
    rows_per = max(bs, min(chunk_rows, max_elems // max(1, hq * m * d)) // bs * bs)
    recall = torch.zeros(hkv, g, n_s, dtype=torch.float64, device=q.device)
    min_rec = torch.ones(hkv, g, n_s, dtype=torch.float64, device=q.device)
    err2 = torch.zeros(hkv, g, n_s, dtype=torch.float64, device=q.device)
    dense2 = torch.zeros(hkv, g, dtype=torch.float64, device=q.device)
    kt = kf.transpose(-1, -2).unsqueeze(1)  # [Hkv, 1, D, Npad]
    for r0 in range(0, n, rows_per):
        r1 = min(n, r0 + rows_per)
        r = r1 - r0
        cb = -(-r1 // bs)  # key blocks this chunk can see
        rows = torch.arange(r0, r1, device=q.device)
        cols = torch.arange(cb * bs, device=q.device)
        logits = torch.matmul(qf[:, :, r0:r1], kt[..., : cb * bs]).mul_(scale)  # [Hkv, G, R, cb*bs]
        hidden = cols[None, :] > rows[:, None]
        if window is not None:
            hidden |= cols[None, :] <= rows[:, None] - window
        logits.masked_fill_(hidden, float("-inf"))
        p = logits.softmax(-1)
        del logits
        pb = p.view(hkv, g, r, cb, bs).sum(-1)  # [Hkv, G, R, cb] block mass per row
        # U[h, g, r, j, :] = sum_{s in block j} P[h, g, r, s] v_s, computed per key block as one batched matmul.
        pj = p.view(hkv, g * r, cb, bs).transpose(1, 2)  # [Hkv, cb, G*R, bs]
        u = torch.matmul(pj, vf[:, :cb])  # [Hkv, cb, G*R, D]
        del p, pj
        u = u.view(hkv, cb, g, r, d).permute(0, 2, 3, 1, 4)  # [Hkv, G, R, cb, D]
        od = u.sum(3)  # [Hkv, G, R, D]
        mrow = mk[:, :, rows // bs, :, :cb]  # [Hkv, G, R, S, cb]
        kept = torch.matmul(mrow, pb.unsqueeze(-1)).squeeze(-1)  # [Hkv, G, R, S]
        os_ = torch.matmul(mrow, u) / kept.clamp_min(1e-30).unsqueeze(-1)  # [Hkv, G, R, S, D]
        # Per-chunk sums in float32 (at most a few hundred thousand terms), accumulated in float64.
        recall += kept.sum(2).double()
        min_rec = torch.minimum(min_rec, kept.amin(2).double())
        err2 += os_.sub_(od.unsqueeze(3)).square_().sum((2, 4)).double()
        dense2 += od.square().sum((2, 3)).double()
    recall = recall.permute(2, 0, 1)
    min_rec = min_rec.permute(2, 0, 1)
    err2 = err2.permute(2, 0, 1)
    return {
        "recall": (recall / n).reshape(n_s, hq).cpu(),
        "min_recall": min_rec.reshape(n_s, hq).cpu(),
        "err2": err2.reshape(n_s, hq).cpu(),
        "dense2": dense2.view(hq).cpu(),
    }
