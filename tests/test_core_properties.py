"""Property-based tests: random small shapes, sparsities, selectors and options.

Examples are few (the ``cab-ci`` profile in conftest: 25, no deadline, derandomised so CI is stable);
``CAB_HYPOTHESIS_PROFILE=cab-long`` explores more.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import cab_attention as cab
from reference import (
    diagonal_block,
    expected_row_budgets,
    grid_shape,
    make_qkv,
    masked_reference,
    valid_blocks,
)


@st.composite
def problems(draw):
    bs = draw(st.sampled_from([16, 32]))
    hkv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    nk = draw(st.integers(1, 6 * bs))
    # Chunked prefill of any length, often the full sequence.
    nq = draw(st.one_of(st.just(nk), st.integers(1, nk)))
    return dict(
        b=draw(st.integers(1, 2)),
        hq=hkv * group,
        hkv=hkv,
        nq=nq,
        nk=nk,
        d=draw(st.sampled_from([8, 16])),
        bs=bs,
        causal=draw(st.booleans()),
        selector=draw(st.sampled_from(cab.SELECTORS)),
        # Three decimals: the budget's ceil then never sits within float error of an integer.
        sparsity=draw(st.integers(0, 999)) / 1000,
        share_kv=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _extra(selector):
    return {"cab": dict(keep="highest"), "random": dict(seed=3), "antidiagonal": dict(stride=4)}.get(selector, {})


@given(problems())
def test_selection_invariants_and_output(p):
    q, k, v = make_qkv(p["b"], p["hq"], p["hkv"], p["nq"], p["nk"], p["d"], seed=p["seed"])
    bs, causal = p["bs"], p["causal"]
    sel = cab.select_blocks(
        q, k, selector=p["selector"], sparsity=p["sparsity"], block_size=bs, causal=causal,
        share_kv=p["share_kv"], **_extra(p["selector"]),
    )
    heads = p["hkv"] if p["share_kv"] else p["hq"]
    mq, mk = grid_shape(p["nq"], p["nk"], bs)
    assert sel.mask.shape == (p["b"], heads, mq, mk)
    s = 0.0 if p["selector"] == "dense" else p["sparsity"]
    budgets = torch.tensor(expected_row_budgets(p["nq"], p["nk"], bs, s, causal))
    assert torch.equal(sel.mask.sum(-1), budgets.expand(p["b"], heads, mq))
    valid = valid_blocks(p["nq"], p["nk"], bs, causal)
    assert not (sel.mask & ~valid).any()
    for i in range(mq):
        assert sel.mask[..., i, 0].all() and sel.mask[..., i, diagonal_block(i, p["nq"], p["nk"], bs)].all()
    assert torch.equal(sel.kv_num_blocks, sel.mask.sum(-1, dtype=torch.int32))
    for row, n, idx in zip(sel.mask.reshape(-1, mk), sel.kv_num_blocks.reshape(-1), sel.kv_indices.reshape(-1, mk)):
        assert idx[: int(n)].tolist() == torch.nonzero(row).flatten().tolist()

    out = cab.sparse_attention(q, k, v, selection=sel, block_size=bs, causal=causal, backend="reference")
    want = masked_reference(q, k, v, sel.mask, block_size=bs, causal=causal)
    torch.testing.assert_close(out.double(), want, atol=5e-6, rtol=1e-5)


@given(problems(), st.sampled_from([0.2, 0.5, 0.8, 0.95]))
def test_adaptive_invariants(p, threshold):
    if p["selector"] == "dense":
        p["selector"] = "magnitude"
    q, k, _ = make_qkv(p["b"], p["hq"], p["hkv"], p["nq"], p["nk"], p["d"], seed=p["seed"])
    bs, causal = p["bs"], p["causal"]
    sel = cab.select_blocks(
        q, k, selector=p["selector"], block_size=bs, causal=causal, threshold=threshold,
        share_kv=p["share_kv"], **_extra(p["selector"]),
    )
    mq, _ = grid_shape(p["nq"], p["nk"], bs)
    valid = valid_blocks(p["nq"], p["nk"], bs, causal)
    assert not (sel.mask & ~valid).any()
    for i in range(mq):
        assert sel.mask[..., i, 0].all() and sel.mask[..., i, diagonal_block(i, p["nq"], p["nk"], bs)].all()
    # Never more than the valid blocks, and a stricter threshold never keeps fewer.
    assert (sel.mask.sum(-1) <= valid.sum(-1)).all()
    looser = cab.select_blocks(
        q, k, selector=p["selector"], block_size=bs, causal=causal, threshold=threshold / 2,
        share_kv=p["share_kv"], **_extra(p["selector"]),
    )
    assert not (looser.mask & ~sel.mask).any()


@given(problems())
def test_sparsity_monotone(p):
    """For a fixed ranking, a higher sparsity keeps a subset of the blocks of a lower one."""
    q, k, _ = make_qkv(p["b"], p["hq"], p["hkv"], p["nq"], p["nk"], p["d"], seed=p["seed"])
    kw = dict(selector=p["selector"], block_size=p["bs"], causal=p["causal"], share_kv=p["share_kv"], **_extra(p["selector"]))
    lo = cab.select_blocks(q, k, sparsity=p["sparsity"] / 2, **kw).mask
    hi = cab.select_blocks(q, k, sparsity=p["sparsity"], **kw).mask
    assert not (hi & ~lo).any()
