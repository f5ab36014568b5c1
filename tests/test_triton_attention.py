"""The block-sparse Triton attention kernel (``backend="triton"``) on CPU under ``TRITON_INTERPRET=1``.

Each test pairs the kernel with two independent references: the library's ``reference_attention`` and
the naive float64 ``tests/reference.py`` (token mask built by loops from the block mask), plus the
kernel's own PyTorch twin. Error rule (flash-attention's): the kernel's max error against the float64
reference is at most twice that of a same-precision PyTorch reference (matmul, softmax, matmul in the
inputs' dtype), with a floor of 1e-6 for float32 where both errors are at rounding level. Shapes are tiny:
the interpreter runs every program in Python. ``scripts/gpu_attention.py`` runs the same checks on CUDA.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[triton]')")

import reference as R  # noqa: E402

import cab_attention as cab  # noqa: E402
from cab_attention.geometry import BlockGrid  # noqa: E402
from cab_attention.kernels import attention as A  # noqa: E402
from cab_attention.select import kv_layout  # noqa: E402
from cab_attention.selection import BlockSelection  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not A._interpreting(), reason="the kernel was imported without TRITON_INTERPRET=1"),
]


def random_selection(q, k, bs, causal, sparsity, shared_kv=False, seed=0) -> BlockSelection:
    """A valid selection unlike any selector's: the forced blocks plus random valid blocks, ~sparsity."""
    grid = BlockGrid.of(q, k, bs, causal)
    heads = grid.kv_heads if shared_kv else grid.q_heads
    gen = torch.Generator().manual_seed(seed)
    valid = grid.valid()
    mask = (torch.rand(grid.batch, heads, grid.num_q_blocks, grid.num_kv_blocks, generator=gen) >= sparsity)
    mask = (mask | grid.forced()) & valid
    num, idx = kv_layout(mask)
    return BlockSelection(mask, num, idx, grid, "random", shared_kv)


def check_error_rule(out, q, k, v, sel: BlockSelection, scale=None):
    """Kernel vs float64 reference within 2x the same-precision PyTorch reference's error."""
    g = sel.grid
    allowed = R.token_mask(sel.mask, g.q_len, g.kv_len, g.block_size, g.causal, g.q_heads)
    exact = R.attention(q, k, v, allowed, scale=scale)
    plain = R.plain_attention(q, k, v, allowed, scale=scale)
    err = (out.double() - exact).abs().max().item()
    err_plain = (plain.double() - exact).abs().max().item()
    floor = 1e-6 if q.dtype == torch.float32 else 0.0
    assert torch.isfinite(out).all()
    assert err <= max(2 * err_plain, floor), f"kernel error {err:.3g} > 2 x torch {err_plain:.3g}"
    return err, err_plain


# (batch, q_heads, kv_heads, q_len, kv_len, head_dim, block_size)
CASES = {
    "bs16-oddN-gqa": (1, 4, 2, 100, 100, 64, 16),
    "bs32-chunk-unaligned-b2": (2, 2, 1, 70, 150, 64, 32),
    "bs32-chunk-aligned": (1, 2, 2, 64, 128, 64, 32),
    "bs64-d128-oddN": (1, 2, 1, 150, 150, 128, 64),
    "bs16-d256": (1, 2, 1, 40, 48, 256, 16),
    "bs16-d80": (1, 2, 2, 33, 33, 80, 16),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("causal", [True, False])
def test_triton_attention_sparsity0_equals_dense(case, causal):
    b, hq, hkv, nq, nk, d, bs = CASES[case]
    q, k, v = R.make_qkv(b, hq, hkv, nq, nk, d, seed=1)
    sel = cab.select_blocks(q, k, selector="dense", block_size=bs, causal=causal)
    out = cab.sparse_attention(q, k, v, selection=sel, causal=sel.grid.causal, backend="triton")
    dense = R.dense_reference(q, k, v, causal=causal)
    torch.testing.assert_close(out.double(), dense, atol=2e-5, rtol=0)
    torch.testing.assert_close(out, cab.dense_attention(q, k, v, causal=causal), atol=2e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shared_kv", [False, True])
def test_triton_attention_matches_masked_reference(case, shared_kv):
    b, hq, hkv, nq, nk, d, bs = CASES[case]
    q, k, v = R.make_qkv(b, hq, hkv, nq, nk, d, seed=2)
    for causal in (True, False):
        sel = cab.select_blocks(q, k, selector="magnitude", sparsity=0.6, block_size=bs, causal=causal, share_kv=shared_kv)
        out = cab.sparse_attention(q, k, v, selection=sel, causal=sel.grid.causal, backend="triton")
        check_error_rule(out, q, k, v, sel)
        torch.testing.assert_close(out, cab.reference_attention(q, k, v, sel), atol=2e-5, rtol=0)
        twin = A.block_sparse_attention_reference(
            q, k, v, sel.kv_num_blocks, sel.kv_indices, sel.grid, shared_kv=shared_kv
        )
        torch.testing.assert_close(out, twin, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_attention_half_precision_error_rule(dtype):
    q, k, v = R.make_qkv(2, 4, 2, 90, 120, 64, dtype=dtype, seed=3)
    for shared_kv in (False, True):
        sel = random_selection(q, k, 16, True, 0.5, shared_kv=shared_kv, seed=4)
        out = cab.sparse_attention(q, k, v, selection=sel, causal=sel.grid.causal, backend="triton")
        assert out.dtype == dtype
        check_error_rule(out, q, k, v, sel)


@pytest.mark.parametrize(
    "config",
    [
        A.TileConfig(block_m=16, block_n=16),  # several query and key sub-tiles per 32-token block
        A.TileConfig(block_m=32, block_n=16),
        A.TileConfig(block_m=16, block_n=32, heads=2),  # two query heads of one KV group in one tile
        A.TileConfig(block_m=32, block_n=32, heads=4),
        A.TileConfig(block_m=32, block_n=64),  # two kept key blocks side by side per step
        A.TileConfig(block_m=16, block_n=128, heads=2),  # four kept key blocks per step
    ],
)
def test_triton_attention_tile_configs(config):
    q, k, v = R.make_qkv(1, 4, 1, 75, 110, 64, seed=5)
    for causal in (True, False):
        sel = random_selection(q, k, 32, causal, 0.5, shared_kv=True, seed=6)
        out = A.triton_attention_blocks(q, k, v, sel, config=config)
        check_error_rule(out, q, k, v, sel)


def test_triton_attention_compact_and_strided_indices():
    """A compact ``[.., Kmax]`` index and a non-contiguous one give the same output as the full width."""
    q, k, v = R.make_qkv(1, 2, 1, 96, 96, 64, seed=7)
    sel = random_selection(q, k, 16, True, 0.7, seed=8)
    full = A.triton_attention_blocks(q, k, v, sel)
    kmax = int(sel.kv_num_blocks.max())
    compact = A.block_sparse_attention(q, k, v, sel.kv_num_blocks, sel.kv_indices[..., :kmax].contiguous(), sel.grid)
    strided = A.block_sparse_attention(q, k, v, sel.kv_num_blocks, sel.kv_indices[..., :kmax], sel.grid)
    torch.testing.assert_close(compact, full, atol=0, rtol=0)
    torch.testing.assert_close(strided, full, atol=0, rtol=0)
    check_error_rule(full, q, k, v, sel)


def test_triton_attention_scale_and_selection_from_sparse_attention():
    q, k, v = R.make_qkv(1, 4, 2, 64, 64, 32, seed=9)
    out = cab.sparse_attention(q, k, v, sparsity=0.5, block_size=16, backend="triton", scale=0.3)
    sel = cab.select_blocks(q, k, sparsity=0.5, block_size=16, scale=0.3)
    ref = cab.reference_attention(q, k, v, sel, scale=0.3)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


def test_triton_attention_short_queries_take_dense():
    q, k, v = R.make_qkv(1, 2, 1, 10, 70, 64, seed=10)
    out = cab.sparse_attention(q, k, v, sparsity=0.5, block_size=16, backend="triton")
    torch.testing.assert_close(out.double(), R.dense_reference(q, k, v, causal=True), atol=2e-5, rtol=0)


def test_triton_attention_rejects_bad_input():
    q, k, v = R.make_qkv(1, 4, 2, 64, 64, 64, seed=11)
    with pytest.raises(ValueError, match="block_size >= 16"):
        cab.sparse_attention(q, k, v, sparsity=0.5, block_size=8, backend="triton")
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        cab.sparse_attention(q.double(), k.double(), v.double(), sparsity=0.5, block_size=16, backend="triton")
    sel = random_selection(q, k, 16, True, 0.5)
    with pytest.raises(ValueError, match="config.heads"):
        A.triton_attention_blocks(q, k, v, sel, config=A.TileConfig(16, 16, heads=2))
    with pytest.raises(ValueError, match="config.block_n"):
        A.triton_attention_blocks(q, k, v, sel, config=A.TileConfig(16, 24))
    with pytest.raises(ValueError, match="kv_num_blocks"):
        A.block_sparse_attention(q, k, v, sel.kv_num_blocks.long(), sel.kv_indices, sel.grid)
    with pytest.raises(ValueError, match="positive finite scale"):
        A.triton_attention_blocks(q, k, v, sel, scale=-1.0)
    qd, kd, vd = R.make_qkv(1, 1, 1, 32, 32, 264, seed=12)
    with pytest.raises(ValueError, match="head_dim <= 256"):
        cab.sparse_attention(qd, kd, vd, sparsity=0.5, block_size=16, backend="triton")
