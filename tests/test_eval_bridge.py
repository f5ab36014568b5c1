"""``cab eval bridge``: the N=100 bridge experiment, its block-level and noise-sweep extensions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cab_eval.evaluate import bridge as B

SPARSITIES = (0.8, 0.9, 0.95, 0.99)


def test_token_level_experiment_reproduces_the_published_numbers():
    a = B.sbm_weights(42)
    res = B.token_level(a, (0.5, *SPARSITIES))
    assert res["edges_directed"] == 4414
    assert round(res["bridge_curvature"], 2) == -85.71
    assert res["bridge_rank"] == 1  # the only negative entry by construction
    for s in SPARSITIES:
        assert res["retrieved"]["h2o"][format(s, "g")] is False
        assert res["retrieved"]["cab"][format(s, "g")] is True
    # At s=0.5 the budget exceeds the edge count: the k-th largest weight is 0 and H2O keeps everything.
    assert res["retrieved"]["h2o"]["0.5"] is True
    row = next(r for r in res["rows"] if r["sparsity"] == 0.95)
    assert row["k"] == 500 and row["cab_kept"] == 500


def test_forman_scores_match_the_formula_on_a_small_graph():
    a = np.zeros((4, 4), dtype=np.float32)
    for u, v, w in [(0, 1, 1.0), (1, 2, 2.0), (0, 2, 0.5), (2, 3, 1.5)]:
        a[u, v] = a[v, u] = w
    f = B.forman_scores(a)
    s = a.sum(1)
    r = a @ a
    assert f[0, 1] == pytest.approx(4 * 1.0 - s[0] - s[1] + 3 * r[0, 1])
    assert f[0, 3] == B.NON_EDGE_SCORE and f[2, 2] == B.NON_EDGE_SCORE


def test_block_level_goes_through_the_library_and_sees_the_same_graph():
    a = B.sbm_weights(42)
    forman = B.BLOCK_METHODS[1][0]
    assert forman == "cab:coarsen=max_l2,keep=lowest,score=forman"
    res = B.block_level(a, (0.5, 0.9), block_size=8, methods=["magnitude", forman, "oracle"])
    # The embedding makes the library's coarse affinity the toy's A, and its Forman score of the bridge
    # edge the toy's -85.71.
    assert res["coarse_affinity_error"] < 1e-5
    assert res["bridge_curvature_library"] == pytest.approx(-85.71, abs=0.01)
    assert res["row_budget"] == {"0.5": 50, "0.9": 10}
    # The bridge is node 0's 46th strongest edge (its ~45 community edges come first): per-row magnitude
    # keeps it with 50 blocks, not with 10.
    assert res["retrieved"]["magnitude"] == {"0.5": True, "0.9": False}
    for m in res["density"]:
        assert res["density"][m]["0.9"] == pytest.approx(10 / 100)


def test_noise_sweep_pushes_the_bridge_down_the_ranking():
    res = B.noise_sweep([0, 100], seeds=[42, 43], sparsities=(0.99,), block_size=4, progress=False)
    by_n = {e["noise_edges"]: e for e in res["summary"]}
    assert by_n[0]["rank_max"] == 1
    assert by_n[100]["rank_min"] > 10
    r = by_n[0]["retrieval"]["cab"]["0.99"]
    assert r["retrieved"] == 2 and r["total"] == 2 and r["ci"][1] == 1.0
    assert len(res["per_seed"]) == 4


def test_cli_prints_curvature_and_table(tmp_path, capsys):
    assert B.main(["--out", str(tmp_path), "--seeds", "2", "--noise", "0,5", "--block-size", "4", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "-85.71" in text
    lines = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln.strip() and ln.split()[0] in ("0.8", "0.9", "0.95", "0.99")}
    for s in ("0.8", "0.9", "0.95", "0.99"):
        assert lines[s][-2:] == ["lost", "retrieved"], lines[s]
    for name in ("bridge.json", "bridge_token_level.csv", "bridge_block_level.csv", "bridge_noise_sweep.csv",
                 "summary.md", "bridge_token_level.png", "bridge_block_level.png", "bridge_noise_sweep.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "-85.71" in (tmp_path / "summary.md").read_text()


def test_cli_json_schema(tmp_path, capsys):
    assert B.main(["--json", "--out", str(tmp_path), "--seeds", "2", "--noise", "0", "--block-size", "4",
                   "--no-progress"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data["bridge_curvature"], float)
    assert round(data["bridge_curvature"], 2) == -85.71
    for s in ("0.8", "0.9", "0.95", "0.99"):
        assert data["retrieved"]["h2o"][s] is False
        assert data["retrieved"]["cab"][s] is True
    assert data["noise_sweep"][0]["noise_edges"] == 0


def test_bad_input_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match="noise_edges"):
        B.sbm_weights(42, noise_edges=-1)
    with pytest.raises(ValueError, match="sparsities"):
        B.run(tmp_path, sparsities=(1.0,), seeds=1, progress=False)
    with pytest.raises(ValueError, match="seeds"):
        B.run(tmp_path, seeds=0, progress=False)
    with pytest.raises(ValueError, match="methods"):
        B.block_level(B.sbm_weights(42), (0.9,), 4, methods=["nope"])
