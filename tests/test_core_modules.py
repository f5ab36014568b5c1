"""Drop-in modules and the FLOP estimate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cab_attention as cab
from reference import dense_reference, masked_reference


def manual_attention(mod: cab.CABAttention, x: torch.Tensor, mask_fn) -> torch.Tensor:
    """The module's projections written out by hand around a reference attention."""
    b, n, _ = x.shape
    hd = mod.head_dim
    q = (x @ mod.q_proj.weight.T).view(b, n, mod.num_heads, hd).transpose(1, 2)
    k = (x @ mod.k_proj.weight.T).view(b, n, mod.num_kv_heads, hd).transpose(1, 2)
    v = (x @ mod.v_proj.weight.T).view(b, n, mod.num_kv_heads, hd).transpose(1, 2)
    o = mask_fn(q, k, v).to(x.dtype)
    return o.transpose(1, 2).reshape(b, n, -1) @ mod.o_proj.weight.T


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("selector", ["cab", "magnitude", "oracle"])
def test_attention_sparsity_zero_is_dense(heads, kv_heads, selector):
    torch.manual_seed(70)
    mod = cab.CABAttention(64, heads, kv_heads, block_size=16, sparsity=0.0, selector=selector)
    x = torch.randn(2, 75, 64)
    y = mod(x)
    assert y.shape == x.shape
    want = manual_attention(mod, x, lambda q, k, v: dense_reference(q, k, v, causal=True))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_attention_sparse_matches_its_selection():
    torch.manual_seed(71)
    mod = cab.CABAttention(64, 4, 2, block_size=16, sparsity=0.7, selector="cab", keep="highest")
    x = torch.randn(2, 90, 64)
    y, sel = mod(x, return_selection=True)
    assert isinstance(sel, cab.BlockSelection)
    assert sel.mask.shape == (2, 4, 6, 6)
    assert sel.density < 1.0
    want = manual_attention(mod, x, lambda q, k, v: masked_reference(q, k, v, sel.mask, block_size=16, causal=True))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    dense = manual_attention(mod, x, lambda q, k, v: dense_reference(q, k, v, causal=True))
    assert not torch.allclose(y, dense, atol=1e-4)


def test_attention_share_kv_and_bias():
    torch.manual_seed(72)
    mod = cab.CABAttention(32, 4, 2, block_size=16, sparsity=0.5, share_kv=True, bias=True)
    y, sel = mod(torch.randn(1, 64, 32), return_selection=True)
    assert y.shape == (1, 64, 32) and sel.mask.shape == (1, 2, 4, 4)


def test_attention_gradients_flow():
    torch.manual_seed(73)
    mod = cab.CABAttention(32, 2, 1, block_size=16, sparsity=0.5)
    mod(torch.randn(1, 48, 32)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())


def test_layer_sparsity_zero_is_dense_transformer_block():
    torch.manual_seed(74)
    layer = cab.CABAttentionLayer(64, 4, 2, block_size=16, sparsity=0.0).eval()
    x = torch.randn(2, 70, 64)
    y = layer(x)
    assert y.shape == x.shape
    attn = layer.attn
    h = F.layer_norm(x, (64,), layer.norm1.weight, layer.norm1.bias)
    x1 = x + manual_attention(attn, h, lambda q, k, v: dense_reference(q, k, v, causal=True))
    h2 = F.layer_norm(x1, (64,), layer.norm2.weight, layer.norm2.bias)
    lin1, lin2 = layer.ffn[0], layer.ffn[2]
    want = x1 + F.linear(F.gelu(F.linear(h2, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_modules_short_input_is_dense():
    torch.manual_seed(75)
    mod = cab.CABAttention(32, 2, block_size=64, sparsity=0.9)
    x = torch.randn(1, 10, 32)
    want = manual_attention(mod, x, lambda q, k, v: dense_reference(q, k, v, causal=True))
    torch.testing.assert_close(mod(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=30, num_heads=4), "dim"),
        (dict(dim=32, num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(dim=32, num_heads=0), "num_heads"),
        (dict(dim=32, num_heads=4, block_size=24), "block_size"),
        (dict(dim=32, num_heads=4, sparsity=1.0), "sparsity"),
        (dict(dim=32, num_heads=4, selector="h2o"), "selector"),
        (dict(dim=32, num_heads=4, backend="cuda"), "backend"),
        (dict(dim=32, num_heads=4, keep="middle"), "keep"),
        (dict(dim=32, num_heads=4, bogus=1), "bogus"),
    ],
)
def test_module_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cab.CABAttention(**kwargs)


def test_module_bad_input_shape():
    mod = cab.CABAttention(32, 4)
    with pytest.raises(ValueError, match=r"\bx\b"):
        mod(torch.randn(1, 16, 16))
    with pytest.raises(ValueError, match=r"\bx\b"):
        mod(torch.randn(16, 32))


def test_estimate_flops_sanity():
    base = dict(num_heads=8, head_dim=64, num_kv_heads=2, block_size=64)
    ns = [512, 1024, 4096, 16384]
    for sel in cab.SELECTORS:
        f = [cab.estimate_flops(n, sparsity=0.9, selector=sel, **base) for n in ns]
        for key in ("predictor", "attention_dense", "attention_sparse", "total_sparse"):
            vals = [x[key] for x in f]
            assert all(a <= b for a, b in zip(vals, vals[1:])), (sel, key, vals)
        for x in f:
            assert x["attention_sparse"] <= x["attention_dense"]
            assert x["predictor"] == pytest.approx(x["coarsen"] + x["affinity"] + x["redundancy"] + x["curvature"])
            assert x["total_sparse"] == pytest.approx(x["predictor"] + x["attention_sparse"])
    sp = [cab.estimate_flops(8192, sparsity=s, **base)["attention_sparse"] for s in (0.0, 0.5, 0.9, 0.98)]
    assert all(a >= b for a, b in zip(sp, sp[1:])) and sp[0] > sp[-1]
    d = cab.estimate_flops(8192, sparsity=0.0, **base)
    assert d["attention_sparse"] == pytest.approx(d["attention_dense"])
    # Dense causal attention is 4 N^2 D per head, halved by causality; batch scales everything.
    assert d["attention_dense"] == pytest.approx(8 * 4 * 8192**2 * 64 / 2)
    assert cab.estimate_flops(8192, batch=3, **base)["total_sparse"] == pytest.approx(3 * cab.estimate_flops(8192, **base)["total_sparse"])
    # The kept share is the exact budget rule: at 98% on 128 blocks rows keep max(2, ...) blocks.
    m = 8192 // 64
    from reference import expected_budget

    share = sum(expected_budget(v, 0.98) for v in range(1, m + 1)) / sum(range(1, m + 1))
    assert sp[-1] == pytest.approx(d["attention_dense"] * share)
    # The curvature predictor costs more than magnitude's, which costs more than streaming's.
    cost = {s: cab.estimate_flops(8192, selector=s, **base)["predictor"] for s in ("cab", "magnitude", "streaming")}
    assert cost["cab"] > cost["magnitude"] > cost["streaming"] >= 0
