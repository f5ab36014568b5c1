"""A naive twin of :class:`cab_attention.nsa.NSAAttention`, written independently for the tests.

Unlike the module it loops over queries one at a time in Python (no token masks, no SDPA, no unfold),
applies the compression MLP by hand to each block (hand-written GELU), ranks NSA's blocks with Python's
``sorted`` over ``(score, block)`` pairs, and uses a hand-written softmax and sigmoid. It reads only the
module's parameters. It is slow: small shapes only (float64).
"""

from __future__ import annotations

import math

import torch


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _softmax_weighted(scores: list, values: list):
    m = max(float(s.detach()) for s in scores)
    w = [torch.exp(s - m) for s in scores]
    total = sum(w)
    return sum(wi * vi for wi, vi in zip(w, values)) / total


def _sigmoid(z):
    return 1.0 / (1.0 + torch.exp(-z))


def compress(x, comp, block_len, stride):
    """x ``[B, H, N, D]`` -> list over blocks of ``[B, H, D]`` (the module's compressor weights)."""
    n = x.shape[2]
    w1, b1 = comp.mlp[0].weight, comp.mlp[0].bias
    w2, b2 = comp.mlp[2].weight, comp.mlp[2].bias
    out = []
    c = 0
    while c * stride + block_len <= n:
        blk = x[:, :, c * stride : c * stride + block_len, :] + comp.pos  # [B, H, l, D]
        flat = blk.reshape(blk.shape[0], blk.shape[1], -1)
        hidden = _gelu(flat @ w1.T + b1)
        out.append(hidden @ w2.T + b2)
        c += 1
    return out


def nsa_blocks(q, kc, kv_heads, *, block_size, block_len, stride, num_selected, scale):
    """NSA's own choice: ``{(b, kv_head, query_block): sorted list of kept key blocks}``."""
    b_, hq, n, _ = q.shape
    hkv = kv_heads
    num_blocks = -(-n // block_size)
    group = hq // hkv
    chosen = {}
    for b in range(b_):
        for h in range(hkv):
            for i in range(num_blocks):
                score = [0.0] * (i + 1)
                for t in range(i * block_size, min(n, (i + 1) * block_size)):
                    visible = [c for c in range(len(kc)) if c * stride + block_len - 1 <= t]
                    if not visible:
                        continue
                    for g in range(group):
                        qh = q[b, h * group + g, t]
                        s = [float((qh * kc[c][b, h]).sum()) * scale for c in visible]
                        m = max(s)
                        e = [math.exp(x - m) for x in s]
                        for c, ec in zip(visible, e):
                            p = ec / sum(e)
                            for j in range(i + 1):
                                lo, hi = j * block_size, (j + 1) * block_size
                                ov = max(0, min(c * stride + block_len, hi) - max(c * stride, lo))
                                score[j] += p * ov / block_len
                forced = sorted({0, i})
                rest = sorted((j for j in range(i + 1) if j not in forced), key=lambda j: (score[j], j), reverse=True)
                chosen[(b, h, i)] = sorted(forced + rest[: max(0, num_selected - len(forced))])
    return chosen


def blocks_from_mask(mask):
    """``[B, Hkv, Mq, Mk]`` bool -> the twin's dict form."""
    b_, h_, mq, _ = mask.shape
    return {(b, h, i): torch.nonzero(mask[b, h, i]).flatten().tolist() for b in range(b_) for h in range(h_) for i in range(mq)}


def nsa_twin(module, q, k, v, blocks=None, gate_input=None):
    """The module's output, one query at a time. ``blocks``: a selection in dict form, or ``None`` for
    NSA's own choice computed here. Returns ``(out [B, Hq, N, D], blocks)``."""
    bs, n_sel, w = module.block_size, module.num_selected, module.window
    l, d, scale = module.compress_block, module.compress_stride, module.scale
    b_, hq, n, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    kc = compress(k, module.compress_k, l, d)
    vc = compress(v, module.compress_v, l, d)
    if blocks is None:
        blocks = nsa_blocks(q.detach(), [c.detach() for c in kc], hkv, block_size=bs, block_len=l, stride=d,
                            num_selected=n_sel, scale=scale)
    x = q if gate_input is None else gate_input
    rows = []
    for b in range(b_):
        heads = []
        for h in range(hq):
            kvh = h // group
            outs = []
            for t in range(n):
                qt = q[b, h, t]
                visible = [c for c in range(len(kc)) if c * d + l - 1 <= t]
                if visible:
                    o_cmp = _softmax_weighted([(qt * kc[c][b, kvh]).sum() * scale for c in visible], [vc[c][b, kvh] for c in visible])
                else:
                    o_cmp = torch.zeros(dim, dtype=q.dtype)
                kept = blocks[(b, kvh, t // bs)]
                keys = [s for s in range(t + 1) if s // bs in kept]
                o_slc = _softmax_weighted([(qt * k[b, kvh, s]).sum() * scale for s in keys], [v[b, kvh, s] for s in keys])
                keys = list(range(max(0, t - w + 1), t + 1))
                o_win = _softmax_weighted([(qt * k[b, kvh, s]).sum() * scale for s in keys], [v[b, kvh, s] for s in keys])
                z = x[b, h, t] @ module.gate_weight[h] + module.gate_bias[h]
                g = _sigmoid(z)
                outs.append(g[0] * o_cmp + g[1] * o_slc + g[2] * o_win)
            heads.append(torch.stack(outs))
        rows.append(torch.stack(heads))
    return torch.stack(rows), blocks
