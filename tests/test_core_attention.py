"""Attention outputs of the reference backend against the independent float64 reference."""

from __future__ import annotations

import pytest
import torch

import cab_attention as cab
from reference import SHAPES, dense_reference, make_qkv, masked_reference, token_mask

SHAPE_IDS = list(SHAPES)


def _inputs(name, dtype=torch.float32, seed=0):
    b, hq, hkv, nq, nk, d, bs = SHAPES[name]
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dtype=dtype, seed=seed)
    return q, k, v, bs


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", SHAPE_IDS)
@pytest.mark.parametrize("selector", cab.SELECTORS)
def test_sparsity_zero_is_dense(selector, shape, causal):
    q, k, v, bs = _inputs(shape)
    want = dense_reference(q, k, v, causal=causal)
    got = cab.sparse_attention(q, k, v, selector=selector, sparsity=0.0, block_size=bs, causal=causal, backend="reference")
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    # The library's own dense path must agree with the same ground truth.
    torch.testing.assert_close(cab.dense_attention(q, k, v, causal=causal).double(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", SHAPE_IDS)
@pytest.mark.parametrize("selector", cab.SELECTORS)
def test_sparse_equals_masked_reference(selector, shape, causal):
    q, k, v, bs = _inputs(shape, seed=1)
    sel = cab.select_blocks(q, k, selector=selector, sparsity=0.6, block_size=bs, causal=causal)
    want = masked_reference(q, k, v, sel.mask, block_size=bs, causal=causal)
    got = cab.sparse_attention(q, k, v, selection=sel, block_size=bs, causal=causal, backend="reference")
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    # Selecting inside sparse_attention must give the same result as selecting first.
    again = cab.sparse_attention(q, k, v, selector=selector, sparsity=0.6, block_size=bs, causal=causal, backend="reference")
    assert torch.equal(again, got)
    if sel.density < 1.0:
        # The mask really drops attention: otherwise the comparison above proves nothing beyond dense.
        assert not torch.allclose(got.double(), dense_reference(q, k, v, causal=causal), atol=1e-4)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", SHAPE_IDS)
def test_token_mask_matches_reference(shape, causal):
    q, k, v, bs = _inputs(shape, seed=2)
    sel = cab.select_blocks(q, k, selector="random", sparsity=0.5, block_size=bs, causal=causal, seed=3)
    want = token_mask(sel.mask, q.shape[2], k.shape[2], bs, causal, q.shape[1])
    assert torch.equal(sel.token_mask(), want)


@pytest.mark.parametrize("shape", ["gqa-b2-oddN-bs16", "chunk-unaligned-d128"])
def test_shared_kv_selection_executes_per_group(shape):
    q, k, v, bs = _inputs(shape, seed=4)
    sel = cab.select_blocks(q, k, selector="cab", sparsity=0.7, block_size=bs, share_kv=True)
    assert sel.mask.shape[1] == k.shape[1]
    # reference.token_mask repeats a KV-head mask over each query group itself.
    want = masked_reference(q, k, v, sel.mask, block_size=bs, causal=True)
    got = cab.sparse_attention(q, k, v, selection=sel, block_size=bs, backend="reference")
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)


def test_float64_is_exact():
    q, k, v, bs = _inputs("chunk-unaligned-d128", dtype=torch.float64, seed=5)
    sel = cab.select_blocks(q, k, selector="magnitude", sparsity=0.5, block_size=bs)
    got = cab.sparse_attention(q, k, v, selection=sel, block_size=bs, backend="reference")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, masked_reference(q, k, v, sel.mask, block_size=bs, causal=True), atol=1e-12, rtol=1e-10)


def test_auto_backend_on_cpu_is_reference():
    q, k, v, bs = _inputs("gqa-b2-oddN-bs16", seed=6)
    sel = cab.select_blocks(q, k, selector="cab", sparsity=0.5, block_size=bs)
    auto = cab.sparse_attention(q, k, v, selection=sel, block_size=bs, backend="auto")
    ref = cab.sparse_attention(q, k, v, selection=sel, block_size=bs, backend="reference")
    assert torch.equal(auto, ref)


def test_explicit_scale_reaches_selection_and_attention():
    q, k, v, bs = _inputs("full-bs32", seed=7)
    sel = cab.select_blocks(q, k, selector="magnitude", sparsity=0.5, block_size=bs, scale=0.05)
    got = cab.sparse_attention(q, k, v, selector="magnitude", sparsity=0.5, block_size=bs, backend="reference", scale=0.05)
    want = masked_reference(q, k, v, sel.mask, block_size=bs, causal=True, scale=0.05)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
