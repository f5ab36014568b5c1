"""Low-precision accuracy, by flash-attention's rule.

The ground truth is float64 attention on the upcast inputs under the same block mask. The path under
test may be off from it by at most twice the error of a plain PyTorch matmul-softmax-matmul run in the
same low precision, plus a tiny absolute slack: low precision is allowed its inherent error, not more.
"""

from __future__ import annotations

import pytest
import torch

import cab_attention as cab
from reference import SHAPES, make_qkv, plain_attention, token_mask, attention

SLACK = 1e-5


def check_error_rule(out, q, k, v, sel_mask, bs, causal):
    allowed = token_mask(sel_mask, q.shape[2], k.shape[2], bs, causal, q.shape[1])
    truth = attention(q, k, v, allowed)
    same_precision = plain_attention(q, k, v, allowed)
    err = (out.double() - truth).abs().max().item()
    err_pt = (same_precision.double() - truth).abs().max().item()
    assert err <= 2 * err_pt + SLACK, f"error {err:.3e} > 2 x {err_pt:.3e} + {SLACK}"
    return err, err_pt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", ["gqa-b2-oddN-bs16", "bs64-d128-oddN", "chunk-unaligned-d128"])
@pytest.mark.parametrize("selector,sparsity", [("dense", 0.0), ("cab", 0.0), ("cab", 0.7), ("magnitude", 0.8), ("oracle", 0.5)])
def test_reference_backend_error_rule(dtype, shape, selector, sparsity):
    b, hq, hkv, nq, nk, d, bs = SHAPES[shape]
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dtype=dtype, seed=11)
    sel = cab.select_blocks(q, k, selector=selector, sparsity=sparsity, block_size=bs)
    out = cab.sparse_attention(q, k, v, selection=sel, block_size=bs, backend="reference")
    assert out.dtype == dtype and out.shape == q.shape
    err, _ = check_error_rule(out, q, k, v, sel.mask, bs, True)
    if dtype != torch.float32:
        # The rule is only meaningful if low precision really is coarser than the float64 truth.
        assert err > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dense_path_below_one_block_error_rule(dtype):
    b, hq, hkv, nq, nk, d, bs = SHAPES["chunk-shorter-than-block"]
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dtype=dtype, seed=12)
    sel = cab.select_blocks(q, k, selector="cab", sparsity=0.9, block_size=bs)
    assert sel.density == 1.0
    out = cab.sparse_attention(q, k, v, selector="cab", sparsity=0.9, block_size=bs)
    assert out.dtype == dtype
    check_error_rule(out, q, k, v, sel.mask, bs, True)
