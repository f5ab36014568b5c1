"""Row-tiled selection and attention (cab_attention.streamed) against the whole-grid torch path."""

from __future__ import annotations

import os

import pytest
import torch

from cab_attention import select_blocks, sparse_attention
from cab_attention.streamed import (
    CompactSelection,
    select_blocks_streamed,
    sparse_attention_streamed,
    workspace_bytes,
)

BS = 16
CASES = [  # (Nq, Nk, share_kv): square, chunked (odd offset), odd length, short chunk, shorter than a block
    (300, 300, False),
    (200, 333, True),
    (333, 333, False),
    (64, 500, False),
    (10, 100, False),
]
SELECTORS = [
    ("magnitude", {}),
    ("streaming", {}),
    ("antidiagonal", {"stride": 4}),
    ("dense", {}),
    ("cab", {}),
    ("cab", {"score": "forman", "keep": "lowest", "coarsen": "max_l2"}),
    ("cab", {"hybrid": 0.3, "norm": "rowmax"}),
    ("cab", {"edges": "positive"}),
]


def qkv(nq, nk, seed=0, hq=4, hkv=2, d=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, hq, nq, d, generator=g), torch.randn(1, hkv, nk, d, generator=g),
            torch.randn(1, hkv, nk, d, generator=g))


@pytest.mark.parametrize("selector,opts", SELECTORS)
@pytest.mark.parametrize("nq,nk,share", CASES)
def test_selection_equals_select_blocks(selector, opts, nq, nk, share):
    q, k, _ = qkv(nq, nk)
    ref = select_blocks(q, k, selector=selector, sparsity=0.6, block_size=BS, share_kv=share, **opts)
    for row_tile in (1, 3, 100):
        cs = select_blocks_streamed(q, k, selector=selector, sparsity=0.6, block_size=BS, share_kv=share,
                                    row_tile=row_tile, col_chunk=5, **opts)
        width = cs.kv_indices.shape[-1]
        assert width == int(ref.kv_num_blocks.max())  # K = the largest row budget
        assert torch.equal(cs.kv_num_blocks, ref.kv_num_blocks)
        assert torch.equal(cs.kv_indices, ref.kv_indices[..., :width])
        assert torch.equal(cs.to_block_selection().mask, ref.mask)


@pytest.mark.parametrize("selector,opts", [SELECTORS[0], SELECTORS[2], SELECTORS[4]])
@pytest.mark.parametrize("nq,nk,share", CASES[:4])
def test_attention_equals_sparse_attention_reference(selector, opts, nq, nk, share):
    q, k, v = qkv(nq, nk, seed=1)
    want = sparse_attention(q, k, v, selector=selector, sparsity=0.7, block_size=BS, backend="reference",
                            share_kv=share, **opts)
    got = sparse_attention_streamed(q, k, v, selector=selector, sparsity=0.7, block_size=BS, share_kv=share,
                                    row_tile=2, **opts)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    sel = select_blocks_streamed(q, k, selector=selector, sparsity=0.7, block_size=BS, share_kv=share, **opts)
    torch.testing.assert_close(sparse_attention_streamed(q, k, v, selection=sel), want, atol=1e-6, rtol=0)


def test_sparsity0_equals_dense_attention():
    from cab_attention import dense_attention

    q, k, v = qkv(200, 333, seed=2)
    got = sparse_attention_streamed(q, k, v, selector="cab", sparsity=0.0, block_size=BS, row_tile=3)
    torch.testing.assert_close(got, dense_attention(q, k, v), atol=1e-5, rtol=0)


def test_queries_in_chunks_equal_one_call():
    """Chunked prefill: each chunk's rows select over every earlier key, as in one call."""
    q, k, v = qkv(320, 320, seed=3)
    one = sparse_attention_streamed(q, k, v, selector="magnitude", sparsity=0.6, block_size=BS, row_tile=4)
    parts = [sparse_attention_streamed(q[:, :, a:b], k[:, :, :b], v[:, :, :b], selector="magnitude",
                                       sparsity=0.6, block_size=BS, row_tile=4)
             for a, b in ((0, 128), (128, 256), (256, 320))]
    torch.testing.assert_close(torch.cat(parts, 2), one, atol=1e-6, rtol=0)


def test_budgets_are_exact_and_rows_ascending():
    q, k, _ = qkv(400, 400, seed=4)
    cs = select_blocks_streamed(q, k, selector="cab", sparsity=0.8, block_size=BS, row_tile=7)
    g = cs.grid
    valid = g.diagonal() + 1
    want = torch.minimum(valid, torch.ceil(0.2 * valid.double() - 1e-9).long().clamp_min(2))
    assert torch.equal(cs.kv_num_blocks[0, 0].long(), want)
    for i in range(g.num_q_blocks):
        row = cs.kv_indices[0, 1, i, : int(cs.kv_num_blocks[0, 1, i])]
        assert torch.all(row[1:] > row[:-1]) and int(row[0]) == 0 and int(row[-1]) == int(g.diagonal()[i])


def test_workspace_at_one_million_is_under_two_gb():
    w = workspace_bytes(1 << 20)
    assert w["total"] < 2e9
    assert w["compact_index"] == 32 * 16384 * 820 * 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"selector": "oracle"}, "selector must be one of"),
        ({"causal": False}, "causal must be True"),
        ({"threshold": 0.9}, "threshold"),
        ({"row_tile": 0}, "row_tile must be a positive int"),
        ({"impl": "cuda"}, "impl must be"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"block_size": 48}, "block_size"),
        ({"selector": "antidiagonal", "stride": 5}, "stride"),
        ({"allocation": "head"}, "allocation"),
        ({"selector": "cab", "bogus": 1}, "unknown option"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    q, k, _ = qkv(64, 64)
    with pytest.raises(ValueError, match=match):
        select_blocks_streamed(q, k, **kwargs)


def test_bad_attention_inputs_raise():
    q, k, v = qkv(64, 64)
    with pytest.raises(ValueError, match="backend"):
        sparse_attention_streamed(q, k, v, backend="flex")
    with pytest.raises(ValueError, match="CompactSelection"):
        sparse_attention_streamed(q, k, v, selection=select_blocks(q, k, block_size=BS))
    sel = select_blocks_streamed(q[:, :, :32], k[:, :, :32], block_size=BS)
    with pytest.raises(ValueError, match="was made for"):
        sparse_attention_streamed(q, k, v, selection=sel)
    with pytest.raises(ValueError, match="NaN"):
        sparse_attention_streamed(q, k, v.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="k and v"):
        sparse_attention_streamed(q, k, v[:, :, :10])
    assert isinstance(sel, CompactSelection)


@pytest.mark.triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("selector", ["antidiagonal", "magnitude"])
@pytest.mark.parametrize("nq,nk", [(96, 160), (160, 160)])
def test_triton_path_equals_torch(selector, nq, nk):
    """The CUDA path (fused antidiagonal estimator, radix select, block-sparse kernel) in the interpreter."""
    q, k, v = qkv(nq, nk, seed=5, d=16)
    kw = dict(selector=selector, sparsity=0.5, block_size=BS, row_tile=4, **({"stride": 4} if selector == "antidiagonal" else {}))
    ref = select_blocks(q, k, **{name: val for name, val in kw.items() if name != "row_tile"})
    a = select_blocks_streamed(q, k, impl="torch", **kw)
    b = select_blocks_streamed(q, k, impl="triton", **kw)
    assert torch.equal(a.kv_num_blocks, b.kv_num_blocks) and torch.equal(a.kv_indices, b.kv_indices)
    assert torch.equal(b.kv_indices, ref.kv_indices[..., : b.kv_indices.shape[-1]])
    want = sparse_attention_streamed(q, k, v, backend="reference", impl="torch", **kw)
    got = sparse_attention_streamed(q, k, v, backend="triton", impl="triton", **kw)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
