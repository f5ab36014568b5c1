"""The PyTorch stages (coarsen_stage -> score_stage -> select_stage) are select_blocks, stage by stage;
the option tables live in one module; the old names still work and warn."""

from __future__ import annotations

import importlib

import pytest
import torch

import cab_attention as cab
from cab_attention import options as O
from cab_attention import select as SEL
from cab_attention.geometry import BlockGrid
from reference import make_qkv

CASES = [
    ("cab", {}),
    ("cab", O.FORMAN_KEEP_LOWEST_MAXL2),
    ("cab", {"hybrid": 0.5, "score": "triangle", "norm": "rowmax"}),
    ("cab", {"edges": "positive"}),
    ("magnitude", {}),
]


@pytest.mark.parametrize("selector,opts", CASES)
@pytest.mark.parametrize("share_kv", [False, True])
def test_stages_equal_select_blocks(selector, opts, share_kv):
    q, k, _ = make_qkv(1, 4, 2, 100, 160, 16, seed=3)
    bs, sp = 16, 0.6
    want = cab.select_blocks(q, k, selector=selector, sparsity=sp, block_size=bs, share_kv=share_kv, **opts)
    grid = BlockGrid.of(q, k, bs, True)
    full = O.resolve_options(selector, dict(opts))
    qc, kc = SEL.coarsen_stage(q, k, grid, full["coarsen"])
    kw = {n: full[n] for n in ("score", "keep", "lam", "norm", "hybrid", "edges") if n in full}
    scores = SEL.score_stage(qc, kc, grid, selector=selector, **kw)
    assert scores.priority.shape == (1, 4, grid.num_q_blocks, grid.num_kv_blocks)
    mask, num, idx = SEL.select_stage(scores, grid, grid.budget(sp), share_kv=share_kv)
    assert torch.equal(mask, want.mask)
    assert torch.equal(num, want.kv_num_blocks)
    assert torch.equal(idx, want.kv_indices)
    _, _, narrow = SEL.select_stage(scores, grid, grid.budget(sp), share_kv=share_kv, write_mask=False, index_width=3)
    assert torch.equal(narrow, want.kv_indices[..., :3])


def test_score_stage_rejects_what_it_cannot_do():
    q, k, _ = make_qkv(1, 2, 2, 64, 64, 16, seed=4)
    grid = BlockGrid.of(q, k, 16, True)
    qc, kc = SEL.coarsen_stage(q, k, grid)
    with pytest.raises(ValueError, match="selector"):
        SEL.score_stage(qc, kc, grid, selector="streaming")
    with pytest.raises(ValueError, match="precision"):
        SEL.score_stage(qc, kc, grid, precision="bf16")
    with pytest.raises(ValueError, match="two_stage"):
        SEL.score_stage(qc, kc, grid, two_stage=True)
    with pytest.raises(ValueError, match="keep"):
        SEL.score_stage(qc, kc, grid, keep="middle")


def test_options_tables_and_named_configurations():
    assert cab.SELECTORS == O.SELECTORS == tuple(O.SELECTOR_OPTIONS)
    assert O.defaults("cab")["score"] == "triangle" and O.defaults("cab")["check_finite"] is True
    assert O.resolve_options("cab", O.TRIANGLE_KEEP_HIGHEST_MEAN) == O.defaults("cab")
    assert O.FORMAN_KEEP_LOWEST_MAXL2 == {"score": "forman", "keep": "lowest", "coarsen": "max_l2"}
    with pytest.raises(ValueError, match="unknown option"):
        O.resolve_options("magnitude", {"lam": 1.0})
    with pytest.raises(ValueError, match="check_finite"):
        O.resolve_options("cab", {"check_finite": "yes"})


def test_deprecated_names_warn_and_match():
    import cab_attention.selectors as old

    with pytest.warns(DeprecationWarning, match="FORMAN_KEEP_LOWEST_MAXL2"):
        assert old.SEED_CAB_OPTIONS == O.FORMAN_KEEP_LOWEST_MAXL2
    with pytest.warns(DeprecationWarning, match="select_blocks"):
        assert old.select_blocks is cab.select_blocks
    with pytest.warns(DeprecationWarning, match="row_rank01"):
        assert old._row_rank01 is SEL.row_rank01
    with pytest.warns(DeprecationWarning):
        assert O.SEED_CAB_OPTIONS == O.FORMAN_KEEP_LOWEST_MAXL2
    with pytest.warns(DeprecationWarning, match="BlockGrid.budget"):
        fb = SEL.fixed_budget
    g = BlockGrid(1, 1, 1, 200, 200, 8, 16, True)
    assert torch.equal(fb(g, 0.7, "cpu"), g.budget(0.7))


def test_no_import_cycle_between_select_and_kernels():
    # The kernels import the selection stage; the selection stage imports the kernels only lazily.
    for name in ("select", "select_order", "select_stages", "select_scorers"):
        src = importlib.util.find_spec(f"cab_attention.{name}").origin
        top = [ln for ln in open(src).read().splitlines() if ln.startswith(("from ", "import "))]
        assert not any("kernels" in ln for ln in top), (name, top)
    pred = importlib.util.find_spec("cab_attention.kernels.predictor").origin
    text = open(pred).read()
    assert "cab_attention.selectors" not in text and "..selectors" not in text and "_row_rank01" not in text


def test_estimate_flops_uses_the_budget_rule():
    f = cab.estimate_flops(1000, 2, 16, block_size=32, sparsity=0.8)
    g = BlockGrid(1, 1, 1, 1000, 1000, 16, 32, True)
    share = int(g.budget(0.8).sum()) / int(g.valid().sum())
    assert f["attention_sparse"] == pytest.approx(f["attention_dense"] * share)


def test_import_is_light():
    # The core imports torch only: no plotting, graph or transformers code (tqdm comes with torch.hub).
    import subprocess
    import sys

    code = "import sys, cab_attention; print(sorted(m for m in ('matplotlib', 'networkx', 'transformers', 'triton', 'cab_eval') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
