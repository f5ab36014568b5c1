"""cab's edges="positive": zero-affinity blocks rank after every positive-affinity block, budgets stay exact."""

import pytest
import torch

import cab_attention as ca


@pytest.mark.parametrize("keep", ["lowest", "highest"])
@pytest.mark.parametrize("share_kv", [False, True])
def test_positive_edges_rank_zero_affinity_last(keep, share_kv):
    torch.manual_seed(3)
    q, k = torch.randn(2, 4, 400, 16), torch.randn(2, 2, 400, 16)
    base = ca.select_blocks(q, k, selector="cab", sparsity=0.6, block_size=16, keep=keep, share_kv=share_kv)
    sel = ca.select_blocks(q, k, selector="cab", sparsity=0.6, block_size=16, keep=keep, share_kv=share_kv,
                           edges="positive", return_diagnostics=True)
    assert torch.equal(sel.kv_num_blocks, base.kv_num_blocks)  # the budget does not move
    a = sel.diagnostics["A"]
    if share_kv:
        zero = (a.view(2, 2, 2, *a.shape[2:]) <= 0).all(2)
    else:
        zero = a <= 0
    valid, forced = sel.grid.valid(), sel.grid.forced()
    free = valid & ~forced
    # A row keeps a zero-affinity free block only when every positive free block is already kept.
    kept_zero = (sel.mask & zero & free).any(-1)
    dropped_positive = (~sel.mask & ~zero & free).any(-1)
    assert not (kept_zero & dropped_positive).any()
    assert (sel.mask & ~valid).sum() == 0


def test_positive_edges_rejected_by_triton():
    q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
    with pytest.raises(ValueError, match="edges"):
        ca.select_blocks(q, k, selector="cab", block_size=16, edges="positive", impl="triton")
    with pytest.raises(ValueError, match="edges"):
        ca.select_blocks(q, k, selector="cab", block_size=16, edges="both")
