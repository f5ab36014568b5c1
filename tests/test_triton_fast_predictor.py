"""The fused antidiagonal estimator, the radix selection kernel and the CUDA-graph cache, against their
PyTorch twins, on CPU under ``TRITON_INTERPRET=1`` (``pytest -k triton``).

* ``kernels.antidiagonal_mass`` vs ``score.antidiagonal_mass`` (float32 rounding), and the selections of
  ``select_blocks(selector="antidiagonal", impl="triton")`` vs ``impl="torch"`` (exact: mask,
  ``kv_num_blocks``, ``kv_indices``) on seeded random inputs, fixed sparsity and adaptive threshold;
* ``kernels.radix_select_rows`` vs ``rank_order`` + ``keep_first`` + ``kv_layout`` and vs the 64-bit
  key kernel on tie-heavy priorities (NaN, infinities, signed zeros), per-row budgets and candidates;
* the graph cache's bookkeeping (the capture itself needs CUDA: ``scripts/gpu_predictor.py``).
"""

from __future__ import annotations

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit decorates the kernels

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[triton]')")

import cab_attention as cab  # noqa: E402
from cab_attention import score as S  # noqa: E402
from cab_attention.geometry import BlockGrid  # noqa: E402
from cab_attention.select import adaptive_budget, keep_first, kv_layout, rank_order  # noqa: E402


def _load_kernels():
    """Import the kernels in interpreter mode, re-decorating them if they were imported without it."""
    import cab_attention.kernels as K

    if K.unavailable_reason("cpu", torch.float32) is not None:
        for name in ("coarsen", "scores", "topk", "radix_select", "antidiagonal", "predictor", "graphs"):
            importlib.reload(importlib.import_module(f"cab_attention.kernels.{name}"))
        K = importlib.reload(K)
    return K


K = _load_kernels()
pytestmark = pytest.mark.triton


def _qk(b, hq, hkv, nq, nk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, hq, nq, d, generator=g).to(dtype), torch.randn(b, hkv, nk, d, generator=g).to(dtype)


def _same_selection(a, b):
    assert torch.equal(a.mask, b.mask), f"{(a.mask != b.mask).sum().item()} mask entries differ"
    assert torch.equal(a.kv_num_blocks, b.kv_num_blocks)
    assert torch.equal(a.kv_indices, b.kv_indices)
    assert a.grid == b.grid and a.shared_kv == b.shared_kv


# (B, Hq, Hkv, Nq, Nk, D, block_size, stride, causal): odd N, chunked prefill, GQA, B > 1, non-causal,
# strides from 1 (P = block_size) to block_size (P = 1).
AD_SHAPES = [
    (1, 2, 1, 100, 100, 16, 16, 8, True),
    (2, 2, 1, 70, 150, 32, 16, 4, True),
    (1, 3, 3, 97, 97, 32, 16, 8, False),
    (1, 4, 2, 129, 300, 64, 32, 16, True),
    (1, 2, 1, 64, 64, 16, 16, 1, True),
    (1, 2, 2, 90, 90, 24, 16, 16, True),
]


# ------------------------------------------------------------------------------------ antidiagonal


@pytest.mark.parametrize("shape", AD_SHAPES[1:5])
def test_triton_antidiagonal_mass_matches_twin(shape):
    b, hq, hkv, nq, nk, d, bs, stride, causal = shape
    for dtype in (torch.float32, torch.bfloat16):
        q, k = _qk(b, hq, hkv, nq, nk, d, dtype, seed=nq)
        grid = BlockGrid.of(q, k, bs, causal)
        want = S.antidiagonal_mass(q, k, grid, d**-0.5, stride)
        # one pass (default), one pass with the heads in chunks of one, two passes
        for kw in ({}, {"scratch_mib": 1e-6}, {"passes": 2}):
            got = K.antidiagonal_mass(q, k, grid, d**-0.5, stride, **kw)
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-7)  # zeros past the causal range too
            torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), rtol=1e-5, atol=1e-5)
            if dtype == torch.bfloat16:
                break


@pytest.mark.parametrize("shape", AD_SHAPES)
def test_triton_antidiagonal_selection_equals_torch(shape):
    b, hq, hkv, nq, nk, d, bs, stride, causal = shape
    for seed, (sparsity, share_kv, dtype) in enumerate([(0.9, False, torch.float32), (0.6, hq > hkv, torch.bfloat16)]):
        q, k = _qk(b, hq, hkv, nq, nk, d, dtype, seed=seed + 10 * nq)
        kw = dict(selector="antidiagonal", sparsity=sparsity, block_size=bs, causal=causal, stride=stride,
                  share_kv=share_kv)
        _same_selection(cab.select_blocks(q, k, **kw), cab.select_blocks(q, k, impl="triton", **kw))


@pytest.mark.parametrize("shape", [AD_SHAPES[0], AD_SHAPES[2]])
def test_triton_antidiagonal_adaptive_threshold_equals_torch(shape):
    b, hq, hkv, nq, nk, d, bs, stride, causal = shape
    q, k = _qk(b, hq, hkv, nq, nk, d, seed=3)
    for threshold in (0.5, 0.9):
        kw = dict(selector="antidiagonal", threshold=threshold, block_size=bs, causal=causal, stride=stride)
        ref = cab.select_blocks(q, k, **kw)
        _same_selection(ref, cab.select_blocks(q, k, impl="triton", **kw))
    assert ref.kv_num_blocks.min() >= 1


def test_triton_antidiagonal_dense_and_bad_inputs():
    q, k = _qk(1, 2, 1, 10, 100, 16)  # fewer queries than a block: dense
    kw = dict(selector="antidiagonal", block_size=16)
    _same_selection(cab.select_blocks(q, k, **kw), cab.select_blocks(q, k, impl="triton", **kw))
    q, k = _qk(1, 2, 1, 64, 64, 16)
    with pytest.raises(ValueError, match="stride"):
        cab.select_blocks(q, k, impl="triton", selector="antidiagonal", block_size=16, stride=3)
    with pytest.raises(ValueError, match="stride"):
        K.predict_antidiagonal(q, k, block_size=16, stride=32)
    with pytest.raises(ValueError, match="diagnostics"):
        cab.select_blocks(q, k, impl="triton", selector="antidiagonal", block_size=16, return_diagnostics=True)
    with pytest.raises(ValueError, match="precision"):
        K.predict_antidiagonal(q, k, block_size=16, precision="fp8")
    with pytest.raises(ValueError, match="passes"):
        K.predict_antidiagonal(q, k, block_size=16, passes=3)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        cab.select_blocks(q.double(), k.double(), impl="triton", selector="antidiagonal", block_size=16)


# -------------------------------------------------------------------------------------- radix select


def _tie_heavy_priority(shape, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(-3, 4, shape, generator=g).float()  # many exact ties
    p[torch.rand(shape, generator=g) < 0.1] = float("nan")
    p[torch.rand(shape, generator=g) < 0.05] = float("inf")
    p[torch.rand(shape, generator=g) < 0.05] = float("-inf")
    zero = torch.rand(shape, generator=g) < 0.15
    sign = torch.rand(shape, generator=g) < 0.5
    p[zero & sign] = -0.0
    p[zero & ~sign] = 0.0
    noise = torch.rand(shape, generator=g) < 0.2  # and some distinct values
    p[noise] = torch.randn(shape, generator=g)[noise]
    return p


@pytest.mark.parametrize(
    "b,h,nq,nk,bs,causal",
    [(2, 2, 100, 100, 16, True), (1, 2, 70, 300, 16, True), (2, 1, 97, 97, 16, False), (1, 1, 300, 1000, 32, True)],
)
def test_triton_radix_select_matches_rank_order(b, h, nq, nk, bs, causal):
    grid = BlockGrid(b, h, 1, nq, nk, 4, bs, causal)
    valid, forced = grid.valid(), grid.forced()
    shape = (b, h, grid.num_q_blocks, grid.num_kv_blocks)
    for n, sparsity in enumerate((0.0, 0.5, 0.95)):
        prio = _tie_heavy_priority(shape, seed=nq + n)
        budget = grid.budget(sparsity)
        want = keep_first(rank_order(prio, valid, forced), budget)
        num_w, idx_w = kv_layout(want)
        mask, num, idx = K.radix_select_rows(prio, budget, grid.block_offset, causal)
        assert torch.equal(mask, want) and torch.equal(num, num_w) and torch.equal(idx, idx_w)
        old = K.select_rows(prio, budget, grid.block_offset, causal, method="bits64")
        assert torch.equal(old[0], mask) and torch.equal(old[1], num) and torch.equal(old[2], idx)
        w = int(budget.max())
        _, num2, idx2 = K.radix_select_rows(prio, budget, grid.block_offset, causal, write_mask=False, index_width=w)
        assert torch.equal(num2, num_w) and torch.equal(idx2, idx_w[..., :w])
    # Per-row budgets (adaptive mode): any budget between the forced and the valid count of each row.
    g = torch.Generator().manual_seed(5)
    nf, nv = (valid & forced).sum(-1), valid.sum(-1)
    per_row = nf + (torch.rand(b, h, grid.num_q_blocks, generator=g) * (nv - nf + 1)).long().clamp_max(nv - nf)
    want = keep_first(rank_order(prio, valid, forced), per_row)
    mask, num, _ = K.radix_select_rows(prio, per_row, grid.block_offset, causal)
    assert torch.equal(mask, want) and torch.equal(num.long(), per_row)
    # A candidate mask: non-forced blocks outside it are never kept.
    cand = (torch.rand(shape, generator=g) < 0.6) | forced
    kb = torch.minimum(budget, nf + (valid & ~forced & cand).sum(-1)).min(dim=0).values.min(dim=0).values
    mask_c, _, _ = K.radix_select_rows(prio, kb, grid.block_offset, causal, candidates=cand)
    assert torch.equal(mask_c, keep_first(rank_order(prio, valid & cand, forced), kb))


def test_triton_radix_select_rejects_bad_budget_shape():
    prio = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="budget"):
        K.radix_select_rows(prio, torch.ones(3, dtype=torch.int32), 0, True)
    with pytest.raises(ValueError, match="method"):
        K.select_rows(prio, torch.full((4,), 2), 0, True, method="sort")


# --------------------------------------------------------------------------------- CUDA-graph cache


def test_triton_graph_cache_builds_once_per_key_and_evicts_lru():
    cache = K.GraphCache(max_entries=2)
    built = []

    def builder(name):
        return lambda: built.append(name) or name

    assert cache.get("a", builder("a")) == "a" and cache.get("a", builder("a2")) == "a"
    cache.get("b", builder("b"))
    cache.get("a", builder("a3"))  # a is now the most recent
    cache.get("c", builder("c"))  # evicts b
    assert built == ["a", "b", "c"] and "b" not in cache and "a" in cache and len(cache) == 2
    assert (cache.hits, cache.misses) == (2, 3)
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="max_entries"):
        K.GraphCache(0)


def test_triton_graph_key_separates_shapes_dtypes_and_options():
    q, k = _qk(1, 4, 2, 64, 64, 16)
    base = K.graph_key(q, k, {"sparsity": 0.9, "selector": "cab"})
    assert base == K.graph_key(q.clone(), k.clone(), {"selector": "cab", "sparsity": 0.9})  # order-free
    assert base != K.graph_key(q, k, {"sparsity": 0.8, "selector": "cab"})
    assert base != K.graph_key(q[:, :, :32], k[:, :, :32], {"sparsity": 0.9, "selector": "cab"})
    assert base != K.graph_key(q.bfloat16(), k.bfloat16(), {"sparsity": 0.9, "selector": "cab"})
    with pytest.raises(ValueError, match="hashable"):
        K.graph_key(q, k, {"tiles": [64, 64]})


def test_triton_predict_graphed_input_checks():
    q, k = _qk(1, 4, 2, 64, 64, 16)
    with pytest.raises(ValueError, match="CUDA"):
        K.predict_graphed(q, k, block_size=16)
    for bad in ({"two_stage": True}, {"head_chunk": 2}, {"threshold": 0.9}):
        with pytest.raises(ValueError, match="does not take"):
            K.predict_graphed(q, k, block_size=16, **bad)
    with pytest.raises(ValueError, match="unknown option"):
        K.predict_graphed(q, k, block_size=16, selector="cab", stride=8)
    with pytest.raises(ValueError, match="selector"):
        K.predict_graphed(q, k, block_size=16, selector="oracle")
