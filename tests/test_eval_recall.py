"""``cab eval recall`` and the ablation machinery: exact metrics on synthetic inputs, one tiny real run."""

from __future__ import annotations

import json
import math

import pytest
import torch

import cab_attention as cab
from cab_eval.evaluate import ablation as AB
from cab_eval.evaluate import recall as R


def _qkv(n=200, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, n, d, generator=g)
    k = torch.randn(1, hkv, n, d, generator=g) * 1.5
    v = torch.randn(1, hkv, n, d, generator=g)
    return q, k, v


def _direct(q, k, v, sel):
    """Recall and relative error per head straight from the token mask and the reference backend."""
    hq, hkv = q.shape[1], k.shape[1]
    kk = k.repeat_interleave(hq // hkv, 1)
    n = q.shape[2]
    s = (q @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    rec = (p * sel.token_mask()).sum(-1).mean(-1)[0]
    od = cab.dense_attention(q, k, v)
    os_ = cab.reference_attention(q, k, v, sel)
    err = ((os_ - od)[0].square().sum((-1, -2)) / od[0].square().sum((-1, -2))).sqrt()
    return rec, err


@pytest.mark.parametrize("selector", ["magnitude", "cab", "streaming", "oracle"])
def test_layer_metrics_match_token_mask_and_reference_attention(selector):
    q, k, v = _qkv()
    sel = cab.select_blocks(q, k, selector=selector, sparsity=0.7, block_size=32)
    res = R.layer_metrics(q, k, v, sel.mask[0][None], 32, chunk_rows=64)  # several row chunks, N not a multiple
    rec, err = _direct(q, k, v, sel)
    torch.testing.assert_close(res["recall"][0].float(), rec, atol=1e-5, rtol=0)
    torch.testing.assert_close((res["err2"][0] / res["dense2"]).sqrt().float(), err, atol=1e-5, rtol=0)


def test_dense_recall_is_one_and_oracle_is_best_at_equal_budget():
    q, k, v = _qkv(n=256, seed=1)
    cfgs = [R.parse_spec(s) for s in ("dense", "oracle", "magnitude", "cab", "cab:keep=highest", "streaming", "random",
                                       "antidiagonal:stride=4")]
    per = [R.config_masks(q, k, c, [0.5, 0.8], 32, None) for c in cfgs]
    masks = torch.stack([x["mask"] for ms in per for x in ms])
    res = R.layer_metrics(q, k, v, masks, 32)
    rec = res["recall"].view(len(cfgs), 2, -1)
    assert torch.allclose(rec[0], torch.ones_like(rec[0]), atol=1e-6)
    assert (res["err2"].view(len(cfgs), 2, -1)[0] < 1e-10).all()
    # Same budget for every non-dense method, and the oracle's recall is the highest for every head: it
    # keeps, per query block, the blocks with the most true mass.
    for j in range(2):
        kept = {per[i][j]["kept"] for i in range(1, len(cfgs))}
        assert len(kept) == 1
        assert per[1][j]["kept"] == per[1][j]["budget"]
        for i in range(2, len(cfgs)):
            assert (rec[1, j] >= rec[i, j] - 1e-6).all(), cfgs[i].label
    assert (rec[1, 1] < 1).all()  # sparsity 0.8 does drop mass


@pytest.mark.parametrize("spec", ["cab", "magnitude:share_kv=true", "random:seed=3", "cab:score=triangle,keep=highest"])
def test_config_masks_equal_select_blocks_per_sparsity(spec):
    q, k, _ = _qkv(n=300, seed=2)
    cfg = R.parse_spec(spec)
    sps = [0.3, 0.6, 0.9]
    got = R.config_masks(q, k, cfg, sps, 32, 0.25)
    for s, g in zip(sps, got):
        sel = cab.select_blocks(q, k, selector=cfg.selector, sparsity=s, block_size=32, scale=0.25, **cfg.options)
        assert torch.equal(g["mask"], sel.query_head_mask()[0])
        assert g["density"] == pytest.approx(sel.density)
        assert g["kept"] == g["budget"]


def test_parse_spec_labels_and_errors():
    c = R.parse_spec("hi@cab:keep=highest,lam=0")
    assert (c.label, c.selector, c.options) == ("hi", "cab", {"keep": "highest", "lam": 0})
    assert R.parse_spec("magnitude").label == "magnitude"
    with pytest.raises(ValueError, match="selector"):
        R.parse_spec("nope")
    with pytest.raises(ValueError, match="keep"):
        R.parse_spec("cab:keep=sideways")
    with pytest.raises(ValueError, match="label"):
        R.parse_spec("@cab")


def _rows(effects: dict[str, float], sparsities=(0.9, 0.95, 0.98), windows=4, layers=3, noise=0.002):
    """Synthetic recorder rows: recall = 0.5 + effect + a per-window term + small per-unit noise."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for s in sparsities:
        for w in range(windows):
            wterm = 0.05 * w
            for layer in range(layers):
                for m, e in effects.items():
                    x = 0.5 + e + wterm + noise * float(torch.randn(1, generator=g))
                    rows.append({"window": w, "layer": layer, "method": m, "sparsity": s, "recall": x,
                                 "rel_err": 1 - x, "free_blocks": 10})
    return rows


def test_ablation_analysis_follows_the_preregistered_rule():
    effects = {m: 0.0 for m in (*AB.VARIANTS, *AB.BASELINES, AB.ORACLE)}
    effects.update({"antidiagonal": 0.02, "streaming": 0.01, "oracle": 0.1, "tri-high": 0.05, "cab": -0.03})
    res = AB.analyse(_rows(effects))
    assert set(res["best_baseline"].values()) == {"antidiagonal"}
    d = next(r for r in res["vs_best"] if r["a"] == "tri-high" and r["sparsity"] == 0.95)
    assert d["diff"] == pytest.approx(0.03, abs=0.005) and d["above_zero"]
    assert d["units"] == 12 and d["windows"] == 4
    d = next(r for r in res["vs_best"] if r["a"] == "cab" and r["sparsity"] == 0.9)
    assert d["below_zero"]
    v = res["verdict"]
    assert v["variants_beating_best_baseline"] == ["tri-high"]
    assert v["recommended_default"] == "tri-high" and "triangle" in v["recommended_spec"]
    q = next(r for r in res["pairwise"] if r["a"] == "cab" and r["b"] == "cab-high" and r["sparsity"] == 0.98)
    assert q["diff"] == pytest.approx(-0.03, abs=0.005)
    text = AB.markdown(res)
    assert "Pre-registered ablation" in text and "tri-high" in text


def test_ablation_keeps_the_original_formulation_without_evidence():
    effects = {m: 0.0 for m in (*AB.VARIANTS, *AB.BASELINES, AB.ORACLE)}
    effects["cab-high"] = 0.0005  # highest mean, but well inside the noise
    res = AB.analyse(_rows(effects, noise=0.02))
    assert res["verdict"]["recommended_default"] == "cab"
    assert res["verdict"]["variants_beating_best_baseline"] == []
    with pytest.raises(ValueError, match="missing"):
        AB.analyse([r for r in _rows(effects) if r["method"] != "oracle"])


def test_ablation_flags_sparsities_where_no_row_has_a_free_pick():
    effects = {m: 0.0 for m in (*AB.VARIANTS, *AB.BASELINES, AB.ORACLE)}
    rows = _rows(effects)
    for r in rows:
        if r["sparsity"] == 0.95:
            r["free_blocks"] = 0
    v = AB.analyse(rows)["verdict"]
    assert v["degenerate_sparsities"] == [0.95]
    assert v["recommended_default"] == "cab" and "tied" in v["reason"]
    assert "0.95" in v["statement"]


def test_cluster_bootstrap():
    m, lo, hi = AB.cluster_bootstrap({0: [1.0, 3.0], 1: [2.0, 2.0]})
    assert m == 2.0 and lo <= m <= hi
    assert AB.cluster_bootstrap({0: [1.0, 2.0]})[1:] == (1.5, 1.5)


# ----------------------------------------------------------------------------------------------------
# The real model (few and short).


@pytest.fixture(scope="module")
def smollm2():
    from cab_attention import hf

    return hf.load_smollm2()


@pytest.mark.model
def test_recorder_leaves_the_forward_unchanged(smollm2):
    model, tok = smollm2
    ids = R.text_windows(tok, 1, 96)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    rec = R.Recorder([R.parse_spec("magnitude")], [0.5], 32)
    R.register(rec)
    prev = model.config._attn_implementation
    model.set_attn_implementation(R.ATTN_NAME)
    try:
        with torch.no_grad():
            got = model(input_ids=ids, use_cache=False).logits
    finally:
        model.set_attn_implementation(prev)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert len(rec.rows) == model.config.num_hidden_layers
    assert model.config._attn_implementation == prev


@pytest.mark.model
def test_recall_tiny_run_writes_files(smollm2, tmp_path):
    res = R.run(tmp_path, ["dense", "oracle", "magnitude", "cab", "streaming"], [0.8], windows=2, length=128,
                block_size=16, progress=False, model_obj=smollm2)
    by = {r["method"]: r for r in res["summary"]}
    assert by["dense"]["recall"] == pytest.approx(1.0, abs=1e-6)
    assert by["dense"]["rel_err"] < 1e-4
    for m in ("magnitude", "cab", "streaming"):
        assert by["oracle"]["recall"] >= by[m]["recall"] - 1e-6
        assert by[m]["exact_budget"] and by[m]["density"] == pytest.approx(by["oracle"]["density"])
    # every (window, layer) row of the oracle is at least every other method's
    rows = res["rows"]
    for r in rows:
        o = next(x for x in rows if x["method"] == "oracle" and x["window"] == r["window"] and x["layer"] == r["layer"])
        assert o["recall"] >= r["recall"] - 1e-6 or r["method"] == "dense"
    assert len(rows) == 2 * 30 * 5
    for name in res["files"]:
        assert (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "recall.json").read_text())
    assert data["summary"][0]["windows"] == 2 and math.isfinite(data["summary"][0]["recall_lo"])


def test_masks_for_several_sparsities_equal_select_blocks_with_demotion():
    """Masks reused across sparsities must equal a fresh select_blocks call, demotion included."""
    import torch

    from cab_attention import select_blocks
    from cab_eval.evaluate.recall import Config, config_masks

    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 512, 16), torch.randn(1, 1, 512, 16)
    cfg = Config("cab-pos", "cab", {"score": "forman", "keep": "lowest", "coarsen": "max_l2", "edges": "positive"})
    got = config_masks(q, k, cfg, [0.5, 0.8, 0.9], 32, None)
    for s, row in zip([0.5, 0.8, 0.9], got):
        want = select_blocks(q, k, selector="cab", sparsity=s, block_size=32, **cfg.options).query_head_mask()[0]
        assert torch.equal(row["mask"], want)
