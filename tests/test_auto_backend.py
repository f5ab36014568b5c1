"""``backend="auto"``: which backend it picks, and the dense fallback below ``AUTO_DENSE_BELOW``.

CPU only: the device checks (``_on_cuda``, the kernel's availability) are monkeypatched, so these test the
dispatch logic, not any kernel's speed.
"""

from __future__ import annotations

import pytest
import torch

from cab_attention import dense_attention, execute as E, reference_attention, select_blocks, sparse_attention


def qkv(n=128, hq=4, hkv=2, d=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, n, d, generator=g, dtype=dtype)
    k = torch.randn(1, hkv, n, d, generator=g, dtype=dtype)
    v = torch.randn(1, hkv, n, d, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_auto_prefers_triton_on_cuda(monkeypatch, dtype):
    q, _, _ = qkv(dtype=dtype)
    monkeypatch.setattr(E, "_on_cuda", lambda t: True)
    monkeypatch.setattr(E, "_triton_kernel_runs", lambda q, bs: True)
    assert E.auto_backend(q, 64) == "triton"
    monkeypatch.setattr(E, "_triton_kernel_runs", lambda q, bs: False)
    assert E.auto_backend(q, 64) == "flex"


def test_auto_float64_and_cpu_take_reference(monkeypatch):
    q64, _, _ = qkv(dtype=torch.float64)
    monkeypatch.setattr(E, "_on_cuda", lambda t: True)
    assert E.auto_backend(q64, 64) == "reference"  # the kernel refuses float64 and so does flex
    monkeypatch.setattr(E, "_on_cuda", lambda t: False)
    q, _, _ = qkv()
    assert E.auto_backend(q, 64) == "reference"


def test_triton_kernel_runs_asks_the_kernel(monkeypatch):
    pytest.importorskip("triton")
    from cab_attention.kernels import attention as A

    q, _, _ = qkv(dtype=torch.bfloat16)
    assert not E._triton_kernel_runs(q, 64)  # a CPU tensor: auto never picks the interpreter
    monkeypatch.setattr(E, "_on_cuda", lambda t: True)
    monkeypatch.setattr(A, "check_triton_available", lambda q, bs: None)
    assert E._triton_kernel_runs(q, 64)

    def refuse(q, bs):
        raise ValueError("no")

    monkeypatch.setattr(A, "check_triton_available", refuse)
    assert not E._triton_kernel_runs(q, 64)
    assert not E._triton_kernel_runs(qkv(dtype=torch.float64)[0], 64)


def test_auto_dispatches_to_the_triton_kernel(monkeypatch):
    pytest.importorskip("triton")
    from cab_attention.kernels import attention as A

    q, k, v = qkv()
    calls = []

    def spy(q, k, v, selection, *, scale=None):
        calls.append(selection)
        return reference_attention(q, k, v, selection, scale=scale)

    monkeypatch.setattr(E, "auto_backend", lambda q, bs: "triton")
    monkeypatch.setattr(A, "triton_attention_blocks", spy)
    monkeypatch.setattr(E, "AUTO_DENSE_BELOW", 128)  # 128 keys: not below, so select + the kernel
    out = sparse_attention(q, k, v, sparsity=0.5, block_size=32)
    assert len(calls) == 1
    torch.testing.assert_close(out, reference_attention(q, k, v, calls[0]))
    monkeypatch.setattr(E, "AUTO_DENSE_BELOW", 129)  # below the break-even where auto runs triton: dense
    torch.testing.assert_close(sparse_attention(q, k, v, sparsity=0.5, block_size=32), dense_attention(q, k, v))
    assert len(calls) == 1  # the kernel did not run again


def test_dense_fallback_below_the_break_even(monkeypatch):
    q, k, v = qkv(n=128)
    sel = select_blocks(q, k, sparsity=0.75, block_size=32)
    sparse = reference_attention(q, k, v, sel)
    dense = dense_attention(q, k, v)
    assert not torch.allclose(sparse, dense)  # the two outcomes differ, so the test can fail
    # On CPU auto runs the reference backend, for which no break-even was measured: let it count here.
    monkeypatch.setattr(E, "AUTO_DENSE_BACKENDS", ("triton", "reference"))
    monkeypatch.setattr(E, "AUTO_DENSE_BELOW", 0)  # off: select + sparse
    torch.testing.assert_close(sparse_attention(q, k, v, sparsity=0.75, block_size=32), sparse)
    monkeypatch.setattr(E, "AUTO_DENSE_BELOW", 129)  # 128 keys < 129: exact dense attention
    torch.testing.assert_close(sparse_attention(q, k, v, sparsity=0.75, block_size=32), dense)
    monkeypatch.setattr(E, "AUTO_DENSE_BELOW", 128)  # not below: sparse again
    torch.testing.assert_close(sparse_attention(q, k, v, sparsity=0.75, block_size=32), sparse)


def test_dense_fallback_only_where_it_was_measured(monkeypatch):
    """Whatever AUTO_DENSE_BELOW is, auto selects blocks where its backend is not in AUTO_DENSE_BACKENDS
    (on CPU: reference), and with a sliding window (dense SDPA would ignore it)."""
    q, k, v = qkv(n=128)
    sparse = reference_attention(q, k, v, select_blocks(q, k, sparsity=0.75, block_size=32))
    monkeypatch.setattr(E, "AUTO_DENSE_BELOW", 10**6)
    assert E.auto_backend(q, 32) not in E.AUTO_DENSE_BACKENDS
    torch.testing.assert_close(sparse_attention(q, k, v, sparsity=0.75, block_size=32), sparse)
    monkeypatch.setattr(E, "AUTO_DENSE_BACKENDS", ("triton", "reference"))
    assert E.auto_runs_dense(q, k, None, 32)
    assert not E.auto_runs_dense(q, k, None, 32, window=64)
    windowed = reference_attention(q, k, v, select_blocks(q, k, sparsity=0.5, block_size=32, window=64))
    torch.testing.assert_close(sparse_attention(q, k, v, sparsity=0.5, block_size=32, window=64), windowed)


def test_dense_fallback_never_overrides_a_given_selection_or_backend(monkeypatch):
    q, k, v = qkv(n=128)
    sel = select_blocks(q, k, sparsity=0.75, block_size=32)
    sparse = reference_attention(q, k, v, sel)
    monkeypatch.setattr(E, "AUTO_DENSE_BACKENDS", ("triton", "reference"))
    monkeypatch.setattr(E, "AUTO_DENSE_BELOW", 10**6)
    torch.testing.assert_close(sparse_attention(q, k, v, selection=sel), sparse)
    torch.testing.assert_close(sparse_attention(q, k, v, sparsity=0.75, block_size=32, backend="reference"), sparse)


def test_dense_fallback_keeps_input_checks(monkeypatch):
    q, k, v = qkv(n=128)
    monkeypatch.setattr(E, "AUTO_DENSE_BACKENDS", ("triton", "reference"))
    monkeypatch.setattr(E, "AUTO_DENSE_BELOW", 10**6)
    with pytest.raises(ValueError, match="selector"):
        sparse_attention(q, k, v, selector="nope")
    with pytest.raises(ValueError, match="sparsity"):
        sparse_attention(q, k, v, sparsity=1.5)
    with pytest.raises(ValueError, match="causal"):
        sparse_attention(q, k, v, causal="yes")
    bad = v.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="v"):
        sparse_attention(q, k, bad)
    # scale and causal reach the dense path
    torch.testing.assert_close(sparse_attention(q, k, v, scale=0.1, causal=False),
                               dense_attention(q, k, v, scale=0.1, causal=False))


def test_break_even_constants_are_well_formed():
    assert isinstance(E.AUTO_DENSE_BELOW, int) and E.AUTO_DENSE_BELOW >= 0
    assert set(E.AUTO_DENSE_BACKENDS) <= set(E.BACKENDS) - {"auto"}


def test_auto_takes_flex_for_a_windowed_selection(monkeypatch):
    """The Triton kernel masks only the diagonal block, so auto must not hand it a sliding-window selection;
    an explicit backend='triton' is refused instead."""
    q, k, v = qkv(n=128)
    sel = select_blocks(q, k, selector="magnitude", sparsity=0.5, block_size=16, window=40)
    monkeypatch.setattr(E, "auto_backend", lambda q, bs: "triton")
    monkeypatch.setattr(E, "check_flex_available", lambda q, bs: None)
    calls = []
    monkeypatch.setattr(E, "flex_attention_blocks", lambda q, k, v, s, scale=None: calls.append("flex") or q.clone())
    sparse_attention(q, k, v, selection=sel)
    assert calls == ["flex"]
    with pytest.raises(ValueError, match="sliding window"):
        sparse_attention(q, k, v, selection=sel, backend="triton")
