"""Every bad input is a ValueError that names the offending argument."""

from __future__ import annotations

import pytest
import torch

import cab_attention as cab
from reference import make_qkv


@pytest.fixture
def good():
    return make_qkv(1, 4, 2, 64, 64, 16, seed=50)


def both(q, k, v, **kw):
    """Call select_blocks and sparse_attention; each must raise on its own."""
    opts = dict(selector="cab", sparsity=0.5, block_size=16)
    opts.update(kw)
    backend = opts.pop("backend", "reference")
    calls = [lambda: cab.select_blocks(q, k, **opts), lambda: cab.sparse_attention(q, k, v, backend=backend, **opts)]
    return calls


def raises_all(calls, match):
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("ndim", [3, 5])
def test_non_4d(good, which, ndim):
    t = dict(zip("qkv", good))
    x = t[which]
    t[which] = x[0] if ndim == 3 else x[None]
    match = rf"\b{which}\b.*4-D"
    if which == "v":
        with pytest.raises(ValueError, match=match):
            cab.sparse_attention(t["q"], t["k"], t["v"], block_size=16, backend="reference")
    else:
        raises_all(both(t["q"], t["k"], t["v"]), match)


def test_not_a_tensor(good):
    q, k, v = good
    with pytest.raises(ValueError, match=r"\bk\b.*torch.Tensor"):
        cab.select_blocks(q, k.numpy(), block_size=16)


def test_integer_tensor(good):
    q, k, v = good
    with pytest.raises(ValueError, match=r"\bq\b.*floating"):
        cab.select_blocks(q.long(), k.long(), block_size=16)


def test_mismatched_batch(good):
    q, k, v = good
    raises_all(both(q, torch.cat([k, k]), torch.cat([v, v])), r"batch.*\bk\b")
    with pytest.raises(ValueError, match=r"batch.*\bv\b"):
        cab.sparse_attention(q, k, torch.cat([v, v]), block_size=16, backend="reference")


def test_mismatched_head_dim(good):
    q, k, v = good
    raises_all(both(q, k[..., :8], v[..., :8]), r"head_dim.*\bk\b")
    with pytest.raises(ValueError, match=r"head_dim.*\bv\b"):
        cab.sparse_attention(q, k, v[..., :8], block_size=16, backend="reference")


def test_mismatched_kv_length(good):
    q, k, v = good
    with pytest.raises(ValueError, match=r"\bk\b.*\bv\b.*length"):
        cab.sparse_attention(q, k, v[:, :, :32], block_size=16, backend="reference")
    with pytest.raises(ValueError, match=r"\bk\b.*\bv\b.*heads"):
        cab.sparse_attention(q, k, v[:, :1], block_size=16, backend="reference")


def test_query_longer_than_keys(good):
    q, k, v = good
    raises_all(both(q, k[:, :, :32], v[:, :, :32]), r"\bq\b.*longer.*\bk\b")


def test_gqa_heads_not_multiple():
    q, k, v = make_qkv(1, 4, 3, 64, 64, 16, seed=51)
    raises_all(both(q, k, v), r"query heads.*Hq=4.*Hkv=3")


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan"), "0.5", True, None])
def test_sparsity_out_of_range(good, sparsity):
    raises_all(both(*good, sparsity=sparsity), r"sparsity.*\[0, 1\)")


@pytest.mark.parametrize("block_size", [0, -16, 3, 48, 100, 16.0, True, "64"])
def test_block_size_not_power_of_two(good, block_size):
    raises_all(both(*good, block_size=block_size), r"block_size.*power of two")


def test_unknown_selector(good):
    raises_all(both(*good, selector="h2o"), r"selector.*'h2o'")


@pytest.mark.parametrize("backend", ["cuda", "cudnn", None, "Flex"])
def test_unknown_backend(good, backend):
    q, k, v = good
    with pytest.raises(ValueError, match=r"backend"):
        cab.sparse_attention(q, k, v, block_size=16, backend=backend)


@pytest.mark.parametrize(
    "selector,option,value",
    [
        ("cab", "temperature", 1.0),  # nobody's option
        ("cab", "seed", 1),  # random's option on another selector
        ("magnitude", "keep", "lowest"),
        ("streaming", "stride", 8),
    ],
)
def test_unknown_option(good, selector, option, value):
    raises_all(both(*good, selector=selector, **{option: value}), rf"{option}")


@pytest.mark.parametrize(
    "selector,option,value",
    [
        ("cab", "keep", "middle"),
        ("cab", "score", "ollivier"),
        ("cab", "hybrid", 1.5),
        ("cab", "lam", -1.0),
        ("cab", "norm", "l2"),
        ("cab", "coarsen", "median"),
        ("cab", "share_kv", 1),
        ("cab", "threshold", 0.0),
        ("cab", "threshold", 1.5),
        ("cab", "scale", -1.0),
        ("cab", "return_diagnostics", "yes"),
        ("random", "seed", 1.5),
        ("antidiagonal", "stride", 3),  # must divide the block size
        ("antidiagonal", "stride", 0),
    ],
)
def test_bad_option_value(good, selector, option, value):
    raises_all(both(*good, selector=selector, **{option: value}), rf"{option}")


def test_causal_must_be_bool(good):
    raises_all(both(*good, causal="yes"), r"causal")


def test_mixed_dtypes(good):
    q, k, v = good
    raises_all(both(q, k.double(), v.double()), r"dtype.*\bk\b")
    with pytest.raises(ValueError, match=r"dtype.*\bv\b"):
        cab.sparse_attention(q, k, v.half(), block_size=16, backend="reference")


def test_flex_float16_on_cpu(good):
    q, k, v = (t.half() for t in good)
    with pytest.raises(ValueError, match=r"flex.*float16"):
        cab.sparse_attention(q, k, v, block_size=16, backend="flex")


class TestForeignSelection:
    """A selection made for other inputs must not be applied silently."""

    def _sel(self, q, k, **kw):
        return cab.select_blocks(q, k, selector="cab", sparsity=0.5, block_size=kw.pop("block_size", 16), **kw)

    def test_other_length(self, good):
        q, k, v = good
        sel = self._sel(q[:, :, :48], k[:, :, :48])
        with pytest.raises(ValueError, match="selection"):
            cab.sparse_attention(q, k, v, selection=sel, block_size=16, backend="reference")

    def test_other_heads(self, good):
        q, k, v = good
        sel = self._sel(q[:, :2], k[:, :1])
        with pytest.raises(ValueError, match="selection"):
            cab.sparse_attention(q, k, v, selection=sel, block_size=16, backend="reference")

    def test_other_block_size(self, good):
        q, k, v = good
        sel = self._sel(q, k, block_size=32)
        with pytest.raises(ValueError, match="selection"):
            cab.sparse_attention(q, k, v, selection=sel, block_size=16, backend="reference")

    def test_other_causality(self, good):
        q, k, v = good
        sel = self._sel(q, k, causal=False)
        with pytest.raises(ValueError, match="selection"):
            cab.sparse_attention(q, k, v, selection=sel, block_size=16, causal=True, backend="reference")

    def test_other_chunk_offset(self, good):
        # Same q and k lengths' block grid shape but a different chunk offset is another grid.
        q, k, v = good
        sel = self._sel(q[:, :, :40], k[:, :, :56])
        with pytest.raises(ValueError, match="selection"):
            cab.sparse_attention(q[:, :, :40], k[:, :, :60], v[:, :, :60], selection=sel, block_size=16, backend="reference")

    def test_not_a_selection(self, good):
        q, k, v = good
        with pytest.raises(ValueError, match="selection"):
            cab.sparse_attention(q, k, v, selection=torch.ones(1, 4, 4, 4, dtype=torch.bool), block_size=16)

    def test_selector_options_with_a_selection(self, good):
        q, k, v = good
        sel = self._sel(q, k)
        with pytest.raises(ValueError, match="keep"):
            cab.sparse_attention(q, k, v, selection=sel, block_size=16, backend="reference", keep="highest")


@pytest.mark.parametrize("stride", [0, 3, 32])
def test_bad_stride_fails_on_the_dense_short_path_too(stride):
    # Fewer queries than one block never run the scorer; the option is still wrong.
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, seed=52)
    with pytest.raises(ValueError, match="stride"):
        cab.select_blocks(q, k, selector="antidiagonal", stride=stride, block_size=16)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_name_the_tensor(good, which, bad):
    t = dict(zip("qkv", (x.clone() for x in good)))
    t[which][0, 1, 7, 3] = bad
    calls = [lambda: cab.sparse_attention(t["q"], t["k"], t["v"], sparsity=0.5, block_size=16, backend="reference")]
    if which != "v":
        calls.append(lambda: cab.select_blocks(t["q"], t["k"], sparsity=0.5, block_size=16))
    sel = cab.select_blocks(*good[:2], sparsity=0.5, block_size=16)
    calls.append(lambda: cab.sparse_attention(t["q"], t["k"], t["v"], selection=sel, backend="reference"))
    raises_all(calls, rf"^{which} holds NaN or inf")


def test_check_finite_false_skips_the_check(good):
    q, k, v = (x.clone() for x in good)
    v[0, 0, 5, 0] = float("nan")
    out = cab.sparse_attention(q, k, v, sparsity=0.5, block_size=16, backend="reference", check_finite=False)
    assert out.isnan().any()  # the NaN flows through, as asked
    q[0, 0, 3, 0] = float("inf")
    sel = cab.select_blocks(q, k, sparsity=0.5, block_size=16, check_finite=False)
    assert sel.mask.shape[-1] == 4
    with pytest.raises(ValueError, match="check_finite must be True or False"):
        cab.sparse_attention(q, k, v, sparsity=0.5, block_size=16, check_finite=1)
    with pytest.raises(ValueError, match="check_finite must be True or False"):
        cab.select_blocks(q, k, sparsity=0.5, block_size=16, check_finite=None)


def test_module_passes_check_finite(good):
    layer = cab.CABAttention(32, 4, 2, block_size=16, sparsity=0.5, backend="reference")
    x = torch.randn(1, 64, 32)
    x[0, 10, 0] = float("nan")
    with pytest.raises(ValueError, match="holds NaN or inf"):
        layer(x)
    off = cab.CABAttention(32, 4, 2, block_size=16, sparsity=0.5, backend="reference", check_finite=False)
    assert off(x).isnan().any()


def test_empty_selection_row_is_rejected(good):
    q, k, v = good
    sel = cab.select_blocks(q, k, sparsity=0.5, block_size=16)
    sel.mask[0, 2, 3] = False  # a hand-edited row among valid blocks
    for backend in ("reference", "auto"):
        with pytest.raises(ValueError, match=r"selection\.mask keeps no .*head 2, query block 3"):
            cab.sparse_attention(q, k, v, selection=sel, backend=backend)


@pytest.mark.parametrize(
    "kw", [{"sparsity": 0.5}, {"selector": "magnitude"}, {"selector": "cab", "sparsity": 0.9}, {"coarsen": "mean"},
           {"share_kv": True}]
)
def test_selection_with_selector_arguments_is_an_error(good, kw):
    q, k, v = good
    sel = cab.select_blocks(q, k, sparsity=0.5, block_size=16)
    with pytest.raises(ValueError, match=rf"{sorted(kw)[0] if len(kw) == 1 else 'selector, sparsity'}.*selection="):
        cab.sparse_attention(q, k, v, selection=sel, backend="reference", **kw)
    # scale and check_finite are execution arguments: allowed with a selection.
    cab.sparse_attention(q, k, v, selection=sel, backend="reference", scale=0.3, check_finite=False)


def test_flex_float64_on_cpu_is_a_clear_error(good):
    q, k, v = (x.double() for x in good)
    with pytest.raises(ValueError, match="backend='flex' does not support float64"):
        cab.sparse_attention(q, k, v, sparsity=0.5, block_size=16, backend="flex")
    # auto picks the exact reference for float64
    out = cab.sparse_attention(q, k, v, sparsity=0.5, block_size=16, backend="auto")
    assert out.dtype == torch.float64
