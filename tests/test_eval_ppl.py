"""``cab eval ppl``: perplexity through ``hf.enable``; sparsity 0 equals the model's own attention."""

from __future__ import annotations

import math

import pytest

from cab_eval.evaluate import ppl as P


def test_ppl_and_paired_difference_statistics():
    nll, cnt = [200.0, 400.0], [100, 100]
    ppl, lo, hi = P.ppl_with_ci(nll, cnt)
    assert ppl == pytest.approx(math.exp(3.0))
    assert math.exp(2.0) - 1e-9 <= lo <= ppl <= hi <= math.exp(4.0) + 1e-9
    d, dlo, dhi = P.paired_nll_diff([210.0, 410.0], nll, cnt)
    assert d == pytest.approx(0.1) and dlo == pytest.approx(0.1) and dhi == pytest.approx(0.1)


def test_bad_input_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match="sparsity"):
        P.run(tmp_path, ["cab"], [1.5], model_obj=(None, None), progress=False)
    with pytest.raises(ValueError, match="selector"):
        P.run(tmp_path, ["nope"], [0.5], model_obj=(None, None), progress=False)
    with pytest.raises(ValueError, match="reps"):
        P.run(tmp_path, ["cab"], [0.5], reps=0, model_obj=(None, None), progress=False)


@pytest.mark.model
def test_ppl_tiny_run(tmp_path):
    from cab_attention import hf

    smollm2 = hf.load_smollm2()
    res = P.run(tmp_path, ["cab"], [0.0, 0.8], windows=2, length=128, block_size=16,
                progress=False, model_obj=smollm2)
    dense = res["dense"]
    assert 5 < dense["ppl"] < 200
    by = {(r["method"], r["sparsity"]): r for r in res["results"]}
    for m in ("cab",):
        assert by[(m, 0.0)]["ppl"] == pytest.approx(dense["ppl"], rel=1e-5)
        assert by[(m, 0.0)]["density"] == 1.0
        assert by[(m, 0.8)]["density"] < 0.6
        assert abs(by[(m, 0.8)]["ppl"] - dense["ppl"]) > 1e-3 * dense["ppl"]
    assert not res["speed_measured"]
    for name in res["files"]:
        assert (tmp_path / name).stat().st_size > 0, name
    # the model is back on its own attention afterwards
    assert smollm2[0].config._attn_implementation != hf.ATTN_NAME
