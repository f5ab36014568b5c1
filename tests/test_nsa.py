"""NSA module against its naive twin (tests/nsa_reference.py): outputs, gradients, block choices, budgets.

float64 on the reference backend (the exact dense-mask path); small shapes, since the twin loops over
queries in Python. The flex backend's forward on CPU is in test_nsa_flex.py (slow: one compile).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import cab_attention as cab
from cab_attention.nsa import NSA_SELECTIONS, NSAAttention, compressed_to_blocks, num_compressed
from nsa_reference import blocks_from_mask, nsa_twin
from reference import make_qkv


def _module(d, hq, hkv, seed=0, **kw):
    torch.manual_seed(seed)
    m = NSAAttention(d, hq, hkv, backend="reference", **kw).double()
    with torch.no_grad():  # move every parameter off its init so each one's gradient is exercised
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def _inputs(b, hq, hkv, n, d, seed=1):
    return [t.double().requires_grad_(True) for t in make_qkv(b, hq, hkv, n, n, d, seed=seed)]


def _grads(out, tensors, seed=2):
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    return torch.autograd.grad(out, tensors, upstream, allow_unused=True, materialize_grads=True)


# (B, Hq, Hkv, N, D, module options): GQA with an odd length, MHA with a length that is a whole number
# of blocks, overlapping compression blocks (l = 2d), a larger compression stride than block, N < l.
SHAPES = {
    "gqa-odd": (2, 4, 2, 37, 8, dict(block_size=8, num_selected=3, window=5)),
    "mha-aligned": (1, 2, 2, 32, 4, dict(block_size=8, num_selected=2, window=11)),
    "overlap": (1, 4, 1, 29, 4, dict(block_size=4, num_selected=3, window=6, compress_block=8, compress_stride=4)),
    "stride2": (1, 2, 1, 23, 4, dict(block_size=8, num_selected=2, window=3, compress_block=6, compress_stride=2, compress_hidden=5)),
    "short": (1, 2, 1, 5, 4, dict(block_size=8, num_selected=2, window=2)),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_nsa_selection_output_and_gradients_match_twin(shape):
    b, hq, hkv, n, d, kw = SHAPES[shape]
    m = _module(d, hq, hkv, **kw)
    q, k, v = _inputs(b, hq, hkv, n, d)
    gate_in = torch.randn(b, hq, n, d, dtype=torch.float64, requires_grad=True)
    out, parts = m(q, k, v, gate_input=gate_in, return_parts=True)
    ref, ref_blocks = nsa_twin(m, q, k, v, gate_input=gate_in)
    assert blocks_from_mask(parts["blocks"]) == ref_blocks
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    params = [p for _, p in m.named_parameters()]
    wrt = [q, k, v, gate_in] + params
    for got, want, name in zip(_grads(out, wrt), _grads(ref, wrt), ["q", "k", "v", "gate_input"] + [x for x, _ in m.named_parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=lambda s: f"grad {name}: {s}")


@pytest.mark.parametrize("selection", [s for s in NSA_SELECTIONS if s != "nsa"])
def test_library_selection_output_and_gradients_match_twin(selection):
    b, hq, hkv, n, d = 1, 4, 2, 27, 8
    opts = {"stride": 2} if selection == "antidiagonal" else None
    m = _module(d, hq, hkv, block_size=4, num_selected=3, window=4, selection=selection, selection_options=opts)
    q, k, v = _inputs(b, hq, hkv, n, d, seed=3)
    out, parts = m(q, k, v, return_parts=True)
    # The selector is the library's (tested on its own); the twin executes the same blocks independently.
    ref, _ = nsa_twin(m, q, k, v, blocks=blocks_from_mask(parts["blocks"]))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    wrt = [q, k, v] + list(m.parameters())
    for got, want in zip(_grads(out, wrt), _grads(ref, wrt)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("selection", NSA_SELECTIONS)
def test_budget_is_exact_and_shared_by_every_selection(selection):
    b, hq, hkv, n, d, bs, n_sel = 2, 4, 2, 45, 8, 4, 4
    opts = {"stride": 4} if selection == "antidiagonal" else None
    m = _module(d, hq, hkv, block_size=bs, num_selected=n_sel, selection=selection, selection_options=opts)
    q, k, _ = make_qkv(b, hq, hkv, n, n, d, seed=4)
    kept = m.select(q.double(), k.double())
    mq = -(-n // bs)
    assert kept.shape == (b, hkv, mq, mq)
    rows = torch.arange(mq)
    valid = rows[None, :] <= rows[:, None]
    assert not (kept & ~valid).any(), "a selection kept a future block"
    assert torch.equal(kept.sum(-1), (rows + 1).clamp_max(n_sel).expand(b, hkv, mq)), "budget is not min(v_i, n)"
    assert kept[..., 0].all() and kept[..., rows, rows].all(), "sink or diagonal block missing"


def test_streaming_selection_keeps_sink_and_most_recent_blocks():
    """A known answer: the recency selector through the module's budget cut."""
    m = _module(4, 2, 1, block_size=4, num_selected=3, selection="streaming")
    q, k, _ = make_qkv(1, 2, 1, 30, 30, 4, seed=5)
    kept = m.select(q.double(), k.double())[0, 0]
    for i in range(kept.shape[0]):
        want = sorted({0, i, i - 1} if i >= 2 else set(range(i + 1)))
        assert torch.nonzero(kept[i]).flatten().tolist() == want


def test_all_blocks_and_long_window_give_dense_branches():
    """The sparsity-0 gate: every block selected, or a window as long as the sequence, is dense attention."""
    b, hq, hkv, n, d = 1, 4, 2, 33, 8
    m = _module(d, hq, hkv, block_size=4, num_selected=9, window=33)
    q, k, v = (t.double() for t in make_qkv(b, hq, hkv, n, n, d, seed=6))
    _, parts = m(q, k, v, return_parts=True)
    dense = cab.dense_attention(q, k, v)
    torch.testing.assert_close(parts["selected"], dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts["window"], dense, rtol=1e-12, atol=1e-12)


def test_gradients_do_not_reach_future_keys():
    """Every differentiable path is causal: output t has zero gradient with respect to k, v after t."""
    b, hq, hkv, n, d, t = 1, 2, 1, 24, 4, 13
    m = _module(d, hq, hkv, block_size=4, num_selected=2, window=3)
    q, k, v = _inputs(b, hq, hkv, n, d, seed=7)
    out = m(q, k, v)
    gk, gv = torch.autograd.grad(out[:, :, t].sum(), [k, v])
    assert gk[:, :, t + 1 :].abs().max() == 0 and gv[:, :, t + 1 :].abs().max() == 0
    assert gk[:, :, : t + 1].abs().max() > 0


def test_gradcheck_tiny():
    b, hq, hkv, n, d = 1, 2, 1, 10, 3
    m = _module(d, hq, hkv, block_size=4, num_selected=2, window=3, compress_hidden=2)
    q, k, v = _inputs(b, hq, hkv, n, d, seed=8)
    names = [x for x, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in m.parameters()]
    # The block choice is fixed at the point (NSA does not differentiate it); gradcheck's perturbations
    # must not flip it, so it is computed once and passed to every evaluation.
    kept = m.select(q.detach(), k.detach())
    m.select = lambda *a, **kw: kept

    def f(q, k, v, *ps):
        return functional_call(m, dict(zip(names, ps)), (q, k, v))

    assert torch.autograd.gradcheck(f, (q, k, v, *params), eps=1e-6, atol=1e-7)


def test_compressed_to_blocks_shares_sum_to_one():
    w = compressed_to_blocks(num_compressed(40, 8, 4), 8, 4, 10, 4)
    torch.testing.assert_close(w.sum(1), torch.ones(w.shape[0], dtype=torch.float64))
    assert torch.equal(compressed_to_blocks(5, 4, 4, 5, 4), torch.eye(5, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(head_dim=0), "head_dim"),
        (dict(q_heads=3, kv_heads=2), "multiple of kv_heads"),
        (dict(block_size=12), "block_size"),
        (dict(num_selected=1), "num_selected"),
        (dict(window=0), "window"),
        (dict(compress_block=4, compress_stride=8), "compress_stride"),
        (dict(compress_hidden=0), "compress_hidden"),
        (dict(selection="dense"), "selection must be one of"),
        (dict(selection="nsa", selection_options={"lam": 1.0}), "takes none"),
        (dict(selection="cab", selection_options={"threshold": 0.9}), "must not set"),
        (dict(selection="cab", selection_options={"bogus": 1}), "unknown option"),
        (dict(selection="antidiagonal", selection_options={"stride": "x"}), "stride"),
        (dict(selection="antidiagonal", selection_options={"stride": 3}), "must divide block_size"),
        (dict(backend="triton"), "backend"),
        (dict(flex_block_size=0), "flex_block_size must be an int"),
        (dict(flex_block_size=4), "block_size=8 times a power of two"),
        (dict(flex_block_size=24), "block_size=8 times a power of two"),
        (dict(flex_block_size=12), "block_size=8 times a power of two"),
        (dict(scale=-1.0), "scale"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = dict(head_dim=8, q_heads=4, kv_heads=2, block_size=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        NSAAttention(**args)


def test_bad_forward_inputs():
    m = NSAAttention(8, 4, 2, block_size=8, backend="reference")
    q, k, v = make_qkv(1, 4, 2, 16, 16, 8)
    with pytest.raises(ValueError, match="one length"):
        m(q[:, :, :8], k, v)
    with pytest.raises(ValueError, match="expected q"):
        m(q[:, :2], k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="4-D"):
        m(q[0], k, v)
    with pytest.raises(ValueError, match="gate_input"):
        m(q, k, v, gate_input=q[:, :, :3])
    with pytest.raises(ValueError, match="float64"):
        NSAAttention(8, 4, 2, block_size=8, backend="flex").double()(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="no backward on CPU"):
        NSAAttention(8, 4, 2, block_size=8, backend="flex")(q, k, v)


def test_library_selection_skips_the_finiteness_sync_unless_asked():
    """In training a NaN shows in the loss; the check costs a host sync per layer and step, so NSA turns it
    off for library selectors, and ``selection_options`` can turn it back on."""
    q, k, v = (torch.randn(1, 2, 32, 8, dtype=torch.float64) for _ in range(3))
    q[0, 0, 5, 0] = float("nan")
    k, v = k[:, :1], v[:, :1]
    quiet = NSAAttention(8, 2, 1, block_size=8, num_selected=2, window=8, selection="cab", backend="reference").double()
    assert torch.isnan(quiet(q, k, v)).any()
    strict = NSAAttention(8, 2, 1, block_size=8, num_selected=2, window=8, selection="cab", backend="reference",
                          selection_options={"check_finite": True}).double()
    with pytest.raises(ValueError, match="q holds NaN"):
        strict(q, k, v)
