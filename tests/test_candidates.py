"""The selector-search candidates: vertical_slash (MInference), flexprefill (FlexPrefill) and cab_graph
(curvature on a row-softmax graph, two-hop score). Dense at sparsity 0, equal to the masked reference,
exact budgets under every allocation, GQA and chunked shapes, an independent vertical-slash estimate,
planted patterns, and bad options."""

from __future__ import annotations

import math

import pytest
import torch

import cab_attention as cab
from cab_attention import score as S
from cab_attention.geometry import BlockGrid
from reference import (
    SHAPES,
    dense_reference,
    diagonal_block,
    expected_row_budgets,
    make_qkv,
    masked_reference,
    valid_blocks,
)

CANDIDATES = ("vertical_slash", "flexprefill", "cab_graph")
VARIANTS = [
    ("vertical_slash", {}),
    ("vertical_slash", {"last_q": 7}),
    ("flexprefill", {}),
    ("flexprefill", {"tau": 0.0}),
    ("cab_graph", {}),
    ("cab_graph", {"affinity": "antidiagonal", "stride": 4, "lam": 1.0}),
    ("cab_graph", {"score": "triangle", "keep": "lowest"}),
]
SHAPE_IDS = ["gqa-b2-oddN-bs16", "chunk-unaligned-d128", "chunk-aligned-bs64"]


def _inputs(name, seed=0):
    b, hq, hkv, nq, nk, d, bs = SHAPES[name]
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, seed=seed)
    return q, k, v, bs


def _ids(variant):
    name, opts = variant
    return name + "".join(f"-{k}={v}" for k, v in opts.items())


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", SHAPE_IDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_sparsity_zero_is_dense(variant, shape, causal):
    name, opts = variant
    q, k, v, bs = _inputs(shape)
    got = cab.sparse_attention(q, k, v, selector=name, sparsity=0.0, block_size=bs, causal=causal,
                               backend="reference", **opts)
    torch.testing.assert_close(got.double(), dense_reference(q, k, v, causal=causal), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("allocation", ["row", "head", "layer"])
@pytest.mark.parametrize("shape", ["gqa-b2-oddN-bs16", "chunk-unaligned-d128"])
@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_sparse_equals_masked_reference_with_exact_budget(variant, shape, allocation):
    name, opts = variant
    q, k, v, bs = _inputs(shape, seed=1)
    nq, nk = q.shape[2], k.shape[2]
    sel = cab.select_blocks(q, k, selector=name, sparsity=0.6, block_size=bs, allocation=allocation, **opts)
    valid = valid_blocks(nq, nk, bs, True)
    assert not bool((sel.mask & ~valid).any()), "a non-edge was selected"
    kept = sel.mask.sum(-1)
    assert int(kept.sum()) == q.shape[0] * q.shape[1] * sum(expected_row_budgets(nq, nk, bs, 0.6, True))
    assert bool((kept <= valid.sum(-1)).all()) and bool((kept >= valid.sum(-1).clamp_max(2)).all())
    if allocation == "row":
        assert kept.tolist() == [[expected_row_budgets(nq, nk, bs, 0.6, True)] * q.shape[1]] * q.shape[0]
    # Sink and diagonal are always kept.
    for i in range(sel.mask.shape[2]):
        assert bool(sel.mask[..., i, 0].all()) and bool(sel.mask[..., i, diagonal_block(i, nq, nk, bs)].all())
    want = masked_reference(q, k, v, sel.mask, block_size=bs, causal=True)
    got = cab.sparse_attention(q, k, v, selection=sel, block_size=bs, backend="reference")
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    assert not torch.allclose(got.double(), dense_reference(q, k, v, causal=True), atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_shared_kv_masks_are_per_kv_head(variant):
    name, opts = variant
    q, k, v, bs = _inputs("gqa-b2-oddN-bs16", seed=2)
    sel = cab.select_blocks(q, k, selector=name, sparsity=0.6, block_size=bs, share_kv=True, **opts)
    assert sel.mask.shape[1] == k.shape[1]
    got = cab.sparse_attention(q, k, v, selection=sel, block_size=bs, backend="reference")
    torch.testing.assert_close(got.double(), masked_reference(q, k, v, sel.mask, block_size=bs, causal=True),
                               atol=2e-6, rtol=1e-5)


def _vertical_slash_reference(q, k, bs, last_q):
    """Block estimate of the vertical-slash pattern by loops over tokens and tiles, float64, keys repeated
    for GQA. Returns ``[B, Hq, Mq, Mk]`` rows normalised over valid blocks."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    kk = k.double().repeat_interleave(hq // k.shape[1], dim=1)
    n = min(last_q, nq)
    qs = q[:, :, -n:].double()
    pos = list(range(nk - n, nk))
    logits = torch.einsum("bhtd,bhsd->bhts", qs, kk) / math.sqrt(d)
    for t, p in enumerate(pos):
        logits[:, :, t, p + 1:] = float("-inf")
    p = torch.exp(logits - logits.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    vert = p.mean(2)  # [B, H, Nk]
    slash = {}
    for o in range(-nk, nk):
        acc = torch.zeros(b, hq, dtype=torch.float64)
        for t, ps in enumerate(pos):
            c = ps - o
            if 0 <= c < nk:
                acc += p[:, :, t, c]
        slash[o] = acc / n
    valid = valid_blocks(nq, nk, bs, True)
    mq, mk = valid.shape
    off = (nk - nq) // bs
    out = torch.zeros(b, hq, mq, mk, dtype=torch.float64)
    for i in range(mq):
        for j in range(mk):
            if not valid[i, j]:
                continue
            v_part = sum(vert[:, :, c] for c in range(j * bs, min(nk, (j + 1) * bs)))
            s_part = torch.zeros(b, hq, dtype=torch.float64)
            for a in range(bs):
                for c in range(bs):
                    s_part += slash.get((i + off) * bs + a - (j * bs + c), torch.zeros(b, hq, dtype=torch.float64))
            out[:, :, i, j] = v_part + s_part / bs
        out[:, :, i] /= out[:, :, i].sum(-1, keepdim=True)
    return out


@pytest.mark.parametrize("shape,last_q", [("gqa-b2-oddN-bs16", 64), ("chunk-unaligned-d128", 20)])
def test_vertical_slash_mass_matches_token_loop_reference(shape, last_q):
    q, k, _, bs = _inputs(shape, seed=3)
    sel = cab.select_blocks(q, k, selector="vertical_slash", sparsity=0.5, block_size=bs, last_q=last_q,
                            return_diagnostics=True)
    want = _vertical_slash_reference(q, k, bs, last_q)
    valid = valid_blocks(q.shape[2], k.shape[2], bs, True)
    torch.testing.assert_close(sel.diagnostics["mass"].double()[..., valid], want[..., valid], atol=1e-5, rtol=1e-4)


def _free_order(prio_row, free_row):
    """Free (non-forced, valid) key blocks of one row, highest priority first."""
    js = [j for j in range(len(free_row)) if free_row[j]]
    return sorted(js, key=lambda j: -float(prio_row[j]))


def _free(nq, nk, bs):
    free = valid_blocks(nq, nk, bs, True).clone()
    free[:, 0] = False
    for i in range(free.shape[0]):
        free[i, diagonal_block(i, nq, nk, bs)] = False
    return free


def test_vertical_slash_recovers_a_planted_vertical_column():
    n, d, bs, hot = 256, 32, 16, 60  # key 60 sits in block 3
    gen = torch.Generator().manual_seed(4)
    q = 0.3 * torch.randn(1, 2, n, d, generator=gen)
    k = 0.3 * torch.randn(1, 1, n, d, generator=gen)
    q[..., 0] += 3.0
    k[0, 0, hot, 0] = 12.0  # every query attends key 60
    sel = cab.select_blocks(q, k, selector="vertical_slash", sparsity=0.6, block_size=bs, return_diagnostics=True)
    free = _free(n, n, bs)
    for i in range(5, n // bs):
        for h in range(2):
            assert _free_order(sel.diagnostics["scores"][0, h, i], free[i])[0] == hot // bs, (h, i)
            assert bool(sel.mask[0, h, i, hot // bs])


def test_vertical_slash_recovers_a_planted_slash_diagonal():
    n, bs, lag = 256, 16, 40  # every query attends the key 40 positions back: block diagonals 2 and 3
    d = n
    gen = torch.Generator().manual_seed(5)
    k = torch.eye(n).view(1, 1, n, d) * 4.0 + 0.05 * torch.randn(1, 1, n, d, generator=gen)
    q = 0.05 * torch.randn(1, 2, n, d, generator=gen)
    for t in range(lag, n):
        q[0, :, t, t - lag] += 3.0 * math.sqrt(d)  # logit 12 on the planted key
    sel = cab.select_blocks(q, k, selector="vertical_slash", sparsity=0.3, block_size=bs, return_diagnostics=True)
    free = _free(n, n, bs)
    for i in range(5, n // bs):
        for h in range(2):
            top = _free_order(sel.diagnostics["scores"][0, h, i], free[i])[:2]
            assert sorted(top) == [i - 3, i - 2], (h, i, top)
            assert bool(sel.mask[0, h, i, i - 2]) and bool(sel.mask[0, h, i, i - 3])


def test_flexprefill_switches_per_head_by_the_divergence():
    q, k, _, bs = _inputs("gqa-b2-oddN-bs16", seed=6)
    kw = dict(sparsity=0.6, block_size=bs, return_diagnostics=True)
    vs = cab.select_blocks(q, k, selector="flexprefill", tau=0.0, **kw)  # distance >= 0: vertical-slash
    assert bool(vs.diagnostics["use_vertical_slash"].all())
    assert torch.equal(vs.mask, cab.select_blocks(q, k, selector="vertical_slash", **kw).mask)
    qa = cab.select_blocks(q, k, selector="flexprefill", tau=1.0, **kw)  # sqrt(JS) <= sqrt(ln 2) < 1
    assert not bool(qa.diagnostics["use_vertical_slash"].any())
    # The query-aware estimate is a row softmax of the mean-pooled coarse logits: magnitude's ranking.
    assert torch.equal(qa.mask, cab.select_blocks(q, k, selector="magnitude", coarsen="mean", **kw).mask)


def test_js_distance_bounds():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert float(S.js_distance(p, p)) == pytest.approx(0.0, abs=1e-7)
    disjoint = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    assert float(S.js_distance(p, disjoint)) == pytest.approx(math.sqrt(math.log(2)), rel=1e-6)


def test_two_hop_ranks_the_block_two_hops_away_above_noise():
    # Chain: query block 7 reads block 4 (its middle hop), whose queries read block 1.
    n, d, bs = 128, 32, 16
    gen = torch.Generator().manual_seed(7)
    q = 0.2 * torch.randn(1, 1, n, d, generator=gen)
    k = 0.2 * torch.randn(1, 1, n, d, generator=gen)
    e1, e2 = torch.zeros(d), torch.zeros(d)
    e1[0], e2[1] = 8.0, 8.0
    q[0, 0, 7 * bs:] += e1
    k[0, 0, 4 * bs:5 * bs] += e1
    q[0, 0, 4 * bs:5 * bs] += e2
    k[0, 0, 1 * bs:2 * bs] += e2
    free = _free(n, n, bs)
    two = cab.select_blocks(q, k, selector="cab_graph", lam=1.0, sparsity=0.5, block_size=bs, return_diagnostics=True)
    assert _free_order(two.diagnostics["scores"][0, 0, 7], free[7])[:2] == [4, 1]
    assert bool(two.mask[0, 0, 7, 1]) and bool(two.mask[0, 0, 7, 4])
    # The direct affinity alone (lam = 0) gives block 1 only noise-level weight; the two-hop term lifts it.
    a = two.diagnostics["A"][0, 0, 7]
    assert float(a[1]) < 1e-2 and float(two.diagnostics["scores"][0, 0, 7, 1]) > 0.5
    # Formula: A + lam * A @ A on the row-softmax graph.
    dg = two.diagnostics
    torch.testing.assert_close(dg["scores"], dg["A"] + 1.0 * dg["A"] @ dg["A"])


def test_row_softmax_graph_has_no_relu_ties():
    q, k, _, bs = _inputs("bs64-d128-oddN", seed=8)
    sel = cab.select_blocks(q, k, selector="cab_graph", lam=0.0, sparsity=0.5, block_size=bs, return_diagnostics=True)
    valid = valid_blocks(q.shape[2], k.shape[2], bs, True)
    a = sel.diagnostics["A"]
    assert bool((a[..., valid] > 0).all()) and bool((a[..., ~valid] == 0).all())
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))


@pytest.mark.parametrize(
    "selector,opts,match",
    [
        ("vertical_slash", {"last_q": 0}, "last_q must be a positive int"),
        ("vertical_slash", {"last_q": True}, "last_q must be a positive int"),
        ("flexprefill", {"tau": -0.1}, r"tau must be a number in \[0.0, 1.0\]"),
        ("flexprefill", {"tau": "high"}, "tau must be a number"),
        ("flexprefill", {"last_q": 2.5}, "last_q must be a positive int"),
        ("cab_graph", {"affinity": "relu"}, "affinity must be one of"),
        ("cab_graph", {"score": "forman"}, "score must be one of"),
        ("cab_graph", {"lam": -1.0}, "lam must be a number"),
        ("cab_graph", {"lam": math.inf}, "lam must be a number"),
        ("cab_graph", {"affinity": "antidiagonal", "stride": 3}, "stride must be a positive divisor"),
        ("cab_graph", {"keep": "middle"}, "keep must be one of"),
        ("vertical_slash", {"allocation": "global"}, "allocation must be one of"),
        ("vertical_slash", {"stride": 4}, "unknown option"),
    ],
)
def test_bad_options_raise(selector, opts, match):
    q, k, _, _ = _inputs("full-bs32")
    with pytest.raises(ValueError, match=match):
        cab.select_blocks(q, k, selector=selector, sparsity=0.5, block_size=32, **opts)


def test_vertical_slash_block_diagonal_convolution_on_a_grid():
    # One query at the end that attends a single key: the slash weight sits at one offset, and the tile
    # average spreads it over the two block diagonals that offset crosses, by (bs - |u|) / bs.
    bs, nk = 8, 64
    grid = BlockGrid(1, 1, 1, nk, nk, 4, bs, True)
    p = torch.zeros(1, 1, 1, nk)
    p[..., 60] = 1.0  # the query at position 63 attends key 60: offset 3
    mass = S.vertical_slash_mass(p, torch.tensor([63]), grid)
    raw_diag0, raw_diag1 = (bs - 3) / bs, (bs - 5) / bs  # offset 3 = block diagonal 0 (u = 3) or 1 (u = -5)
    row = 3  # a row that cannot see key 60's block: only slash weight is left
    got = mass[0, 0, row, : row + 1].double()
    want = torch.zeros(row + 1, dtype=torch.float64)
    want[row], want[row - 1] = raw_diag0, raw_diag1
    torch.testing.assert_close(got, want / want.sum())
