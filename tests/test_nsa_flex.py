"""NSA's flex backend on CPU (forward only: FlexAttention has no CPU backward) against the reference.

One input shape; at FlexAttention blocks equal to the selection's, the selected and window branches
share one compiled kernel (their mask_mod captures its window as a tensor); coarser blocks add one
kernel for the selected branch's table-reading mask_mod. Eager FlexAttention would ignore
the block indices; the checks that the flex branches equal the masked reference *and* differ from dense
attention rule that out. The CUDA forward and backward are checked by scripts/gpu_nsa.py.
"""

from __future__ import annotations

import pytest
import torch

import cab_attention as cab
from cab_attention.nsa import NSAAttention, window_blocks
from reference import make_qkv

pytestmark = pytest.mark.slow


def test_window_blocks_cover_exactly_the_window():
    """No compile: touched/full block sets against the token-level window."""
    n, bs, w = 50, 8, 13
    grid = cab.BlockGrid(1, 1, 1, n, n, 4, bs, True)
    touched, full = window_blocks(grid, w)
    pos = torch.arange(grid.num_kv_blocks * bs)
    tok = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < w)
    blocks = tok.view(grid.num_q_blocks, bs, grid.num_kv_blocks, bs)
    assert torch.equal(touched, blocks.any(3).any(1))
    assert torch.equal(full, blocks.all(3).all(1))


def test_training_uses_the_backward_capable_compile(monkeypatch):
    """No compile: with grads the flex branches ask for the max-autotune compile and fwd_-only tiles (the
    backward's default tile list cannot take 64-token blocks at head_dim 128 on Hopper); without, the
    plain one."""
    import cab_attention.nsa as nsa_mod
    from cab_attention.execute import flex_kernel_options

    assert flex_kernel_options(64, "cuda") == {"BLOCK_M": 64, "BLOCK_N": 64}
    assert flex_kernel_options(64, "cuda", for_backward=True) == {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64}
    assert flex_kernel_options(64, "cpu", for_backward=True) is None
    seen = []

    def fake_compiled(max_autotune=False):
        seen.append(max_autotune)
        return lambda q, k, v, **kw: (seen.append(kw["kernel_options"]), q)[1]

    monkeypatch.setattr(nsa_mod, "compiled_flex_attention", fake_compiled)
    monkeypatch.setattr(nsa_mod, "flex_kernel_options", lambda bs, t, for_backward=False: {"bwd": for_backward})
    kept = torch.ones(1, 1, 2, 2, dtype=torch.bool).tril()
    q = torch.randn(1, 1, 32, 8, requires_grad=True)
    nsa_mod._flex_branch(q, q, q, kept, kept, torch.tensor(64), 16, 1.0)
    with torch.no_grad():
        nsa_mod._flex_branch(q, q, q, kept, kept, torch.tensor(64), 16, 1.0)
    assert seen == [True, {"bwd": True}, False, {"bwd": False}]
    # 128-token FlexAttention blocks take Inductor's default backward tile: no tile search.
    seen.clear()
    q = torch.randn(1, 1, 256, 8, requires_grad=True)
    nsa_mod._flex_branch(q, q, q, kept, kept, None, 128, 1.0)
    nsa_mod._flex_branch(q, q, q, kept, kept, None, 64, 1.0, 128)
    nsa_mod._flex_branch(q, q, q, kept, kept, None, 32, 1.0, 64)
    assert seen == [False, {"bwd": True}, False, {"bwd": True}, True, {"bwd": True}]


@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("table_shape", [(2, 3), (1, 3), (1, 1)])
def test_coarse_blocks_give_the_same_token_mask(factor, table_shape):
    """No compile: coarse kept/full blocks plus the selected branch's mask_mod equal, token by token, the
    selection-block mask (kept blocks at or before the diagonal, causal inside it), edges included."""
    from cab_attention.nsa import _selected_mod, coarsen_blocks

    bs, mq = 4, 2 * factor + 1  # the coarse grid's last block is partly past the edge
    torch.manual_seed(factor)
    valid = torch.ones(mq, mq, dtype=torch.bool).tril()
    kept = (torch.rand(*table_shape, mq, mq) < 0.5) & valid
    kept |= torch.eye(mq, dtype=torch.bool)  # diagonal kept, as every selection does
    kept[..., factor:2 * factor, :factor] = True  # one whole coarse block below the diagonal
    below = torch.ones(mq, mq, dtype=torch.bool).tril(-1)
    coarse_kept, coarse_full = coarsen_blocks(kept, below, factor)
    assert coarse_kept.shape[-2:] == (-(-mq // factor),) * 2
    pad = -mq % factor
    mod = _selected_mod(torch.nn.functional.pad(kept, (0, pad, 0, pad)), bs)
    fb, n = bs * factor, coarse_kept.shape[-1] * bs * factor
    t = torch.arange(n)
    b = torch.arange(table_shape[0])[:, None, None, None]
    h = torch.arange(table_shape[1])[None, :, None, None]
    qi, ki = t[:, None], t[None, :]
    coarse_tok = coarse_full[..., qi // fb, ki // fb] | (coarse_kept[..., qi // fb, ki // fb] & mod(b, h, qi, ki))
    fine = torch.nn.functional.pad(kept, (0, pad, 0, pad))
    fine_tok = fine[..., qi // bs, ki // bs] & (ki <= qi)
    assert torch.equal(coarse_tok, fine_tok)
    assert coarse_full.any() and (coarse_kept & ~coarse_full).any()  # both kinds of coarse block occur


@pytest.mark.parametrize("flex_block", [None, 64])
@pytest.mark.parametrize("selection", ["nsa", "cab"])
def test_flex_forward_matches_reference(selection, flex_block):
    """At the selection's block and at 4x coarser FlexAttention blocks (mask_mod reading the selection)."""
    b, hq, hkv, n, d = 2, 4, 2, 100, 16
    torch.manual_seed(0)
    ref = NSAAttention(d, hq, hkv, block_size=16, num_selected=3, window=20, selection=selection, backend="reference")
    flex = NSAAttention(d, hq, hkv, block_size=16, num_selected=3, window=20, selection=selection, backend="flex",
                        flex_block_size=flex_block)
    flex.load_state_dict(ref.state_dict())
    q, k, v = make_qkv(b, hq, hkv, n, n, d, seed=11)
    with torch.no_grad():
        want, parts_ref = ref(q, k, v, return_parts=True)
        got, parts = flex(q, k, v, return_parts=True)
    assert torch.equal(parts["blocks"], parts_ref["blocks"])
    for name in ("selected", "window"):
        torch.testing.assert_close(parts[name], parts_ref[name], rtol=1e-5, atol=1e-5)
        assert (parts[name] - cab.dense_attention(q, k, v)).abs().max() > 1e-2, f"{name} branch is dense"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
