"""The flex backend on CPU: FlexAttention under torch.compile with the BlockMask from coarse indices.

Every compile costs seconds on CI's two cores and the backend compiles with ``dynamic=False``, so all
flex calls here share one input shape (chunked, block-unaligned, odd length, GQA, B = 2) and differ
only in dtype and causality: three compiles in all. Eager FlexAttention would ignore the block
indices and apply only the causal ``mask_mod``; the checks that sparse flex output equals the masked
reference *and* differs from dense attention are what rule that out.
"""

from __future__ import annotations

import pytest
import torch

import cab_attention as cab
from reference import attention, dense_reference, make_qkv, masked_reference, plain_attention, token_mask

pytestmark = pytest.mark.slow

B, HQ, HKV, NQ, NK, D, BS = 2, 4, 2, 100, 150, 64, 16


@pytest.fixture(scope="module")
def fp32():
    return make_qkv(B, HQ, HKV, NQ, NK, D, seed=60)


def test_block_mask_matches_selection(fp32):
    """No compile: the BlockMask (full + partial blocks) covers exactly the selected blocks."""
    q, k, _ = fp32
    for causal in (True, False):
        for share_kv in (False, True):
            sel = cab.select_blocks(q, k, selector="cab", sparsity=0.6, block_size=BS, causal=causal, share_kv=share_kv)
            bm = sel.to_block_mask()
            assert bm.BLOCK_SIZE == (BS, BS)
            assert torch.equal(bm.to_dense().bool(), sel.query_head_mask())


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_flex_fp32_every_selector(fp32, causal):
    q, k, v = fp32
    dense = dense_reference(q, k, v, causal=causal)
    for selector in cab.SELECTORS:
        got = cab.sparse_attention(q, k, v, selector=selector, sparsity=0.0, block_size=BS, causal=causal, backend="flex")
        assert got.shape == q.shape and got.dtype == q.dtype
        torch.testing.assert_close(got.double(), dense, atol=2e-6, rtol=1e-5, msg=f"{selector} at sparsity 0")
        for sparsity, share_kv in ((0.6, False), (0.85, True)):
            sel = cab.select_blocks(
                q, k, selector=selector, sparsity=sparsity, block_size=BS, causal=causal, share_kv=share_kv
            )
            got = cab.sparse_attention(q, k, v, selection=sel, block_size=BS, causal=causal, backend="flex")
            want = masked_reference(q, k, v, sel.mask, block_size=BS, causal=causal)
            torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5, msg=f"{selector} at {sparsity}")
            if sel.density < 1.0:
                assert not torch.allclose(got.double(), dense, atol=1e-4), f"{selector}: flex ignored the block mask"


def test_flex_bf16_error_rule(fp32):
    q, k, v = (t.bfloat16() for t in fp32)
    for selector, sparsity in (("dense", 0.0), ("cab", 0.0), ("cab", 0.7), ("magnitude", 0.8), ("streaming", 0.5)):
        sel = cab.select_blocks(q, k, selector=selector, sparsity=sparsity, block_size=BS)
        got = cab.sparse_attention(q, k, v, selection=sel, block_size=BS, backend="flex")
        assert got.dtype == torch.bfloat16 and got.shape == q.shape
        allowed = token_mask(sel.mask, NQ, NK, BS, True, HQ)
        truth = attention(q, k, v, allowed)
        err = (got.double() - truth).abs().max().item()
        err_pt = (plain_attention(q, k, v, allowed).double() - truth).abs().max().item()
        assert err <= 2 * err_pt + 1e-5, f"{selector}@{sparsity}: flex bf16 error {err:.3e} vs plain bf16 {err_pt:.3e}"


def test_flex_refuses_float16_on_cpu(fp32):
    q, k, v = (t.half() for t in fp32)
    with pytest.raises(ValueError, match="float16"):
        cab.sparse_attention(q, k, v, selector="cab", sparsity=0.5, block_size=BS, backend="flex")


def test_flex_short_query_takes_dense_path(fp32):
    # Fewer queries than one block: dense over the cache, no kernel compile needed.
    q, k, v = fp32
    qs = q[:, :, -5:]
    got = cab.sparse_attention(qs, k, v, selector="cab", sparsity=0.9, block_size=BS, backend="flex")
    torch.testing.assert_close(got.double(), dense_reference(qs, k, v, causal=True), atol=2e-6, rtol=1e-5)
