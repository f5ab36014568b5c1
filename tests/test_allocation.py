"""Budget allocation (cab_attention.allocation): exact totals, row bounds, reduction to the per-row rule,
an independent greedy reference, and the wiring through select_blocks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cab_attention as cab
from cab_attention.allocation import ALLOCATIONS, allocate
from cab_attention.geometry import BlockGrid
from reference import expected_row_budgets, grid_shape, make_qkv, valid_blocks

SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95)


def _grid(b, h, nq, nk, bs, causal=True):
    return BlockGrid(b, h, h, nq, nk, 8, bs, causal)


def _bounds(nq, nk, bs, causal=True):
    valid = valid_blocks(nq, nk, bs, causal)
    v = valid.sum(-1)
    return v.clamp_max(2), v


def _mass(kind, b, h, mq, mk, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.ones(b, h, mq, mk)
    if kind == "zero":
        return torch.zeros(b, h, mq, mk)
    if kind == "skewed":
        return torch.exp(4 * torch.randn(b, h, mq, mk, generator=gen))
    return torch.rand(b, h, mq, mk, generator=gen) * (torch.rand(b, h, mq, mk, generator=gen) < 0.5)


@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    nk=st.integers(1, 200),
    chunk=st.floats(0.05, 1.0),
    bs=st.sampled_from([8, 16, 32]),
    sparsity=st.sampled_from(SPARSITIES),
    kind=st.sampled_from(["uniform", "zero", "skewed", "sparse"]),
    allocation=st.sampled_from(ALLOCATIONS),
    seed=st.integers(0, 1000),
)
def test_totals_exact_and_rows_bounded(b, h, nk, chunk, bs, sparsity, kind, allocation, seed):
    nq = max(bs, int(nk * chunk))  # fewer queries than a block take the dense path, never an allocation
    nk = max(nk, nq)
    grid = _grid(b, h, nq, nk, bs)
    mq, mk = grid_shape(nq, nk, bs)
    k = allocate(allocation, _mass(kind, b, h, mq, mk, seed), grid, sparsity)
    want = sum(expected_row_budgets(nq, nk, bs, sparsity, True)) * h
    assert k.shape == (b, h, mq) and k.dtype == torch.int64
    assert k.sum((1, 2)).tolist() == [want] * b
    lo, hi = _bounds(nq, nk, bs)
    assert bool((k >= lo).all()) and bool((k <= hi).all())


@pytest.mark.parametrize("allocation", ["head", "layer"])
@pytest.mark.parametrize("kind", ["uniform", "zero"])
@pytest.mark.parametrize("nq,nk,bs", [(300, 300, 16), (70, 150, 32), (200, 200, 8), (64, 192, 64)])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_no_information_reduces_to_per_row_fixed(allocation, kind, nq, nk, bs, sparsity):
    grid = _grid(2, 3, nq, nk, bs)
    mq, mk = grid_shape(nq, nk, bs)
    k = allocate(allocation, _mass(kind, 2, 3, mq, mk, 0), grid, sparsity)
    want = torch.tensor(expected_row_budgets(nq, nk, bs, sparsity, True))
    assert torch.equal(k, want.expand(2, 3, -1))


def _shares(mass, valid):
    """Row shares in float64 by plain loops (uniform for an all-zero row)."""
    out = torch.zeros(mass.shape, dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in mass.shape[:3]]).tolist():
        row = [max(float(mass[tuple(idx)][j]), 0.0) if valid[idx[2], j] else 0.0 for j in range(mass.shape[3])]
        tot = sum(row)
        nv = int(valid[idx[2]].sum())
        for j in range(mass.shape[3]):
            if valid[idx[2], j]:
                out[tuple(idx)][j] = row[j] / tot if tot > 0 else 1.0 / nv
    return out


def _greedy_layer(mass, nq, nk, bs, sparsity):
    """Give one block at a time to the row (any head) whose kept share is lowest; ties to the first row."""
    b, h, mq, mk = mass.shape
    valid = valid_blocks(nq, nk, bs, True)
    sh = _shares(mass, valid)
    fixed = expected_row_budgets(nq, nk, bs, sparsity, True)
    out = torch.zeros(b, h, mq, dtype=torch.int64)
    for bi in range(b):
        rows = {}
        for hi in range(h):
            for i in range(mq):
                diag = min(i + (nk - nq) // bs, mk - 1)
                forced = {0, diag}
                cov = sum(float(sh[bi, hi, i, j]) for j in forced)
                rest = sorted((float(sh[bi, hi, i, j]) for j in range(mk) if valid[i, j] and j not in forced), reverse=True)
                rows[(hi, i)] = [len(forced), cov, rest]
        extra = h * sum(fixed) - sum(r[0] for r in rows.values())
        for _ in range(extra):
            key = min((r[1], hi, i) for (hi, i), r in rows.items() if r[2])
            r = rows[(key[1], key[2])]
            r[0] += 1
            r[1] += r[2].pop(0)
        for (hi, i), r in rows.items():
            out[bi, hi, i] = r[0]
    return out


def _greedy_head(mass, nq, nk, bs, sparsity):
    """Heads take blocks in turn by lowest head coverage (token-weighted), then spread them in the fixed
    row shape by lowest kept / k_i."""
    b, h, mq, mk = mass.shape
    valid = valid_blocks(nq, nk, bs, True)
    sh = _shares(mass, valid)
    fixed = expected_row_budgets(nq, nk, bs, sparsity, True)
    pad = (nk - nq) % bs
    tokens = [min((i + 1) * bs, pad + nq) - max(i * bs, pad) for i in range(mq)]
    w = [t / sum(tokens) for t in tokens]
    forced = [{0, min(i + (nk - nq) // bs, mk - 1)} for i in range(mq)]
    nf = [len(f) for f in forced]
    nv = [int(valid[i].sum()) for i in range(mq)]
    out = torch.zeros(b, h, mq, dtype=torch.int64)
    for bi in range(b):
        heads = []
        for hi in range(h):
            cov = sum(w[i] * float(sh[bi, hi, i, j]) for i in range(mq) for j in forced[i])
            rest = sorted((w[i] * float(sh[bi, hi, i, j]) for i in range(mq) for j in range(mk)
                           if valid[i, j] and j not in forced[i]), reverse=True)
            heads.append([0, cov, rest])
        for _ in range(h * (sum(fixed) - sum(nf))):
            _, hi = min((hd[1], hi) for hi, hd in enumerate(heads) if hd[2])
            heads[hi][0] += 1
            heads[hi][1] += heads[hi][2].pop(0)
        for hi, hd in enumerate(heads):
            kept = list(nf)
            for _ in range(hd[0]):
                _, i = min((kept[i] / fixed[i], i) for i in range(mq) if kept[i] < nv[i])
                kept[i] += 1
            out[bi, hi] = torch.tensor(kept)
    return out


@pytest.mark.parametrize("nq,nk,bs", [(100, 100, 16), (45, 120, 16)])
@pytest.mark.parametrize("kind", ["skewed", "sparse"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_matches_greedy_reference(nq, nk, bs, kind, sparsity):
    mq, mk = grid_shape(nq, nk, bs)
    mass = _mass(kind, 2, 2, mq, mk, 7)
    grid = _grid(2, 2, nq, nk, bs)
    assert torch.equal(allocate("layer", mass, grid, sparsity), _greedy_layer(mass, nq, nk, bs, sparsity))
    assert torch.equal(allocate("head", mass, grid, sparsity), _greedy_head(mass, nq, nk, bs, sparsity))


def test_concentrated_heads_and_rows_get_fewer_blocks():
    nq = nk = 256
    bs = 16
    mq, mk = grid_shape(nq, nk, bs)
    mass = torch.ones(1, 2, mq, mk)
    mass[0, 0] = 1e-6
    mass[0, 0, :, 0] = 1.0  # head 0: every row's mass sits in the sink
    grid = _grid(1, 2, nq, nk, bs)
    k_head = allocate("head", mass, grid, 0.8)
    assert k_head[0, 0].sum() < k_head[0, 1].sum()
    k_layer = allocate("layer", mass, grid, 0.8)
    assert k_layer[0, 0, 5:].sum() < k_layer[0, 1, 5:].sum()


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("shape", [(2, 4, 2, 100, 100, 16), (1, 4, 1, 70, 150, 32)])
def test_select_blocks_keeps_the_allocated_counts(allocation, shape):
    b, hq, hkv, nq, nk, bs = shape
    q, k, v = make_qkv(b, hq, hkv, nq, nk, 32, seed=5)
    sel = cab.select_blocks(q, k, selector="antidiagonal", sparsity=0.7, block_size=bs, allocation=allocation,
                            stride=4, return_diagnostics=True)
    want = allocate(allocation, sel.diagnostics["mass"], sel.grid, 0.7)
    assert torch.equal(sel.mask.sum(-1), want.expand_as(sel.mask[..., 0]))
    assert int(sel.mask.sum()) == b * hq * sum(expected_row_budgets(nq, nk, bs, 0.7, True))
    assert math.isclose(sel.density, cab.select_blocks(q, k, selector="antidiagonal", sparsity=0.7,
                                                         block_size=bs, stride=4).density)


def test_bad_allocation_inputs_raise():
    grid = _grid(1, 2, 64, 64, 16)
    with pytest.raises(ValueError, match="allocation must be one of"):
        allocate("global", torch.ones(1, 2, 4, 4), grid, 0.5)
    with pytest.raises(ValueError, match="needs a mass estimate"):
        allocate("head", None, grid, 0.5)
    with pytest.raises(ValueError, match=r"mass must be \[B, H, 4, 4\]"):
        allocate("layer", torch.ones(1, 2, 4, 5), grid, 0.5)
    q, k, _ = make_qkv(1, 2, 2, 64, 64, 16)
    with pytest.raises(ValueError, match="allocation must be one of"):
        cab.select_blocks(q, k, selector="magnitude", block_size=16, allocation="global")
    with pytest.raises(ValueError, match="needs fixed sparsity"):
        cab.select_blocks(q, k, selector="magnitude", block_size=16, allocation="head", threshold=0.9)
