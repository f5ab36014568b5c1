"""Exact budgets, causality, forced blocks, the FlexAttention layout, share_kv and adaptive mode."""

from __future__ import annotations

import pytest
import torch

import cab_attention as cab
from reference import (
    SHAPES,
    diagonal_block,
    expected_budget,
    expected_row_budgets,
    grid_shape,
    make_qkv,
    valid_blocks,
)

SHAPE_IDS = list(SHAPES)
SPARSITIES = (0.0, 0.3, 0.75, 0.9, 0.95)


def check_selection(sel, nq, nk, bs, causal, sparsity, heads, batch):
    """Every invariant of a fixed-sparsity selection, against the independent reference."""
    mq, mk = grid_shape(nq, nk, bs)
    assert sel.mask.shape == (batch, heads, mq, mk) and sel.mask.dtype == torch.bool
    valid = valid_blocks(nq, nk, bs, causal)
    budgets = torch.tensor(expected_row_budgets(nq, nk, bs, sparsity, causal))
    counts = sel.mask.sum(-1)
    assert torch.equal(counts, budgets.expand_as(counts)), f"row counts {counts.tolist()} != {budgets.tolist()}"
    assert not (sel.mask & ~valid).any(), "a causally invalid block was kept"
    for i in range(mq):
        assert sel.mask[..., i, 0].all(), f"sink block dropped in row {i}"
        assert sel.mask[..., i, diagonal_block(i, nq, nk, bs)].all(), f"diagonal block dropped in row {i}"
    check_layout(sel)
    kept = int(sel.mask.sum())
    assert sel.density == pytest.approx(kept / (int(valid.sum()) * batch * heads))


def check_layout(sel):
    """``kv_num_blocks``/``kv_indices`` list exactly the kept blocks of each row, ascending."""
    mask = sel.mask
    assert sel.kv_num_blocks.shape == mask.shape[:-1] and sel.kv_indices.shape == mask.shape
    assert sel.kv_num_blocks.dtype == torch.int32 and sel.kv_indices.dtype == torch.int32
    flat_m = mask.reshape(-1, mask.shape[-1])
    flat_n = sel.kv_num_blocks.reshape(-1)
    flat_i = sel.kv_indices.reshape(-1, mask.shape[-1])
    for row in range(flat_m.shape[0]):
        want = torch.nonzero(flat_m[row]).flatten().tolist()
        n = int(flat_n[row])
        assert n == len(want)
        assert flat_i[row, :n].tolist() == want


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", SHAPE_IDS)
@pytest.mark.parametrize("selector", cab.SELECTORS)
def test_fixed_budget_invariants(selector, shape, causal):
    b, hq, hkv, nq, nk, d, bs = SHAPES[shape]
    q, k, _ = make_qkv(b, hq, hkv, nq, nk, d, seed=20)
    for s in SPARSITIES:
        sel = cab.select_blocks(q, k, selector=selector, sparsity=s, block_size=bs, causal=causal)
        want_s = 0.0 if selector == "dense" else s
        check_selection(sel, nq, nk, bs, causal, want_s, hq, b)


@pytest.mark.parametrize("shape", ["gqa-b2-oddN-bs16", "chunk-unaligned-d128", "bs64-d128-oddN"])
@pytest.mark.parametrize("selector", cab.SELECTORS)
def test_share_kv_gives_kv_head_masks(selector, shape):
    b, hq, hkv, nq, nk, d, bs = SHAPES[shape]
    q, k, _ = make_qkv(b, hq, hkv, nq, nk, d, seed=21)
    sel = cab.select_blocks(q, k, selector=selector, sparsity=0.8, block_size=bs, share_kv=True)
    assert sel.shared_kv
    check_selection(sel, nq, nk, bs, True, 0.0 if selector == "dense" else 0.8, hkv, b)
    assert torch.equal(sel.query_head_mask(), sel.mask.repeat_interleave(hq // hkv, dim=1))


def test_budget_formula_edges():
    # Hand-picked rows: tiny rows keep 2 (or all), and exact decimals do not round up (0.9 of 10 is 1 -> 2).
    assert [expected_budget(v, 0.9) for v in (1, 2, 3, 10, 11, 20, 21)] == [1, 2, 2, 2, 2, 2, 3]
    assert [expected_budget(v, 0.5) for v in (1, 2, 3, 4, 5)] == [1, 2, 2, 2, 3]
    assert [expected_budget(v, 0.0) for v in (1, 5, 9)] == [1, 5, 9]
    # The library's grid agrees on a 20-block causal grid at sparsities where float rounding bites.
    q, k, _ = make_qkv(1, 1, 1, 320, 320, 16, seed=22)
    for s in (0.9, 0.7, 0.3, 0.1, 0.95, 0.55):
        sel = cab.select_blocks(q, k, selector="streaming", sparsity=s, block_size=16)
        assert sel.mask.sum(-1).flatten().tolist() == [expected_budget(v, s) for v in range(1, 21)], s


ADAPTIVE = ["cab", "magnitude", "antidiagonal", "oracle", "streaming", "random"]


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("shape", ["gqa-b2-oddN-bs16", "chunk-unaligned-d128", "bs64-d128-oddN"])
@pytest.mark.parametrize("selector", ADAPTIVE)
def test_adaptive_mode_mass_rule(selector, shape, threshold):
    """Each row keeps the forced blocks plus the shortest priority-ordered prefix of the others whose
    share of the row's mass reaches the threshold (the forced blocks come first in that order)."""
    b, hq, hkv, nq, nk, d, bs = SHAPES[shape]
    q, k, _ = make_qkv(b, hq, hkv, nq, nk, d, seed=23)
    sel = cab.select_blocks(q, k, selector=selector, block_size=bs, threshold=threshold, return_diagnostics=True)
    mask, prio, mass = sel.mask, sel.diagnostics["priority"], sel.diagnostics["mass"]
    mq, mk = grid_shape(nq, nk, bs)
    valid = valid_blocks(nq, nk, bs, True)
    assert not (mask & ~valid).any()
    check_layout(sel)
    # The documented mass: the selector's own block mass where it has one, else the softmax of the
    # coarse logits over the row's valid blocks.
    if selector in ("antidiagonal", "oracle"):
        assert torch.equal(mass, sel.diagnostics["scores"])
    else:
        want = sel.diagnostics["logits"].masked_fill(~valid, float("-inf")).softmax(-1)
        torch.testing.assert_close(mass, want)
    for bi in range(b):
        for h in range(hq):
            for i in range(mq):
                forced = torch.zeros(mk, dtype=torch.bool)
                forced[0] = forced[diagonal_block(i, nq, nk, bs)] = True
                row, w = mask[bi, h, i], mass[bi, h, i].double().clamp_min(0) * valid[i]
                assert row[forced].all()
                share = w / w.sum()
                free = valid[i] & ~forced
                kept_free = row & free
                # Priority order: every kept free block outranks every dropped one.
                if kept_free.any() and (free & ~row).any():
                    assert prio[bi, h, i][kept_free].min() >= prio[bi, h, i][free & ~row].max()
                covered = share[row].sum().item()
                assert covered >= threshold - 1e-5 or row[valid[i]].all(), (bi, h, i, covered)
                if kept_free.any():
                    # Minimal: without the lowest-priority kept free block the threshold is missed.
                    p = prio[bi, h, i].masked_fill(~kept_free, float("inf"))
                    # Among equal priorities the older block ranks last (ties go to the more recent).
                    last = int(torch.nonzero(p == p.min()).flatten().min())
                    assert covered - share[last].item() < threshold + 1e-5, (bi, h, i)


def test_adaptive_threshold_one_keeps_all_mass():
    b, hq, hkv, nq, nk, d, bs = SHAPES["gqa-b2-oddN-bs16"]
    q, k, _ = make_qkv(b, hq, hkv, nq, nk, d, seed=24)
    sel = cab.select_blocks(q, k, selector="oracle", block_size=bs, threshold=1.0, return_diagnostics=True)
    mass = sel.diagnostics["mass"]
    valid = valid_blocks(nq, nk, bs, True)
    # Every block carrying a visible share of the row's mass is kept.
    share = mass / mass.sum(-1, keepdim=True)
    assert not ((share > 1e-4) & valid & ~sel.mask).any()


def test_adaptive_mode_is_monotone_in_threshold():
    b, hq, hkv, nq, nk, d, bs = SHAPES["bs64-d128-oddN"]
    q, k, _ = make_qkv(b, hq, hkv, nq, nk, d, seed=25)
    prev = None
    for t in (0.2, 0.5, 0.8, 0.95):
        m = cab.select_blocks(q, k, selector="magnitude", block_size=bs, threshold=t).mask
        if prev is not None:
            assert not (prev & ~m).any(), "a higher threshold dropped a block a lower one kept"
        prev = m
