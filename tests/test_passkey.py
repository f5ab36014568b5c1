"""`cab eval passkey` and its prompt/spec helpers (cab_eval.evaluate.text)."""

from __future__ import annotations

import json

import pytest

from cab_eval.evaluate import passkey, text
from cab_eval.evaluate.report import wilson


def test_parse_selector_spec():
    assert text.parse_selector_spec("cab") == ("cab", {})
    assert text.parse_selector_spec(" cab:keep=highest, score=triangle,lam=0 ") == (
        "cab", {"keep": "highest", "score": "triangle", "lam": 0})
    assert text.parse_selector_spec("cab:hybrid=0.25,share_kv=true") == ("cab", {"hybrid": 0.25, "share_kv": True})
    assert text.parse_selector_spec("random:seed=7") == ("random", {"seed": 7})
    assert text.format_selector_spec("cab", {"score": "triangle", "keep": "highest"}) == "cab:keep=highest,score=triangle"
    for bad, match in [("nope", "selector"), ("cab:keep", "key=value"), ("cab:keep=sideways", "keep"),
                       ("magnitude:lam=1", "lam"), ("", "spec"), ("cab:lam=-1", "lam")]:
        with pytest.raises(ValueError, match=match):
            text.parse_selector_spec(bad)


def test_split_specs_and_lists():
    assert text.split_specs("dense,cab:keep=highest,lam=0,magnitude") == ["dense", "cab:keep=highest,lam=0", "magnitude"]
    assert text.split_specs("cab:keep=highest;cab:keep=lowest streaming") == [
        "cab:keep=highest", "cab:keep=lowest", "streaming"]
    assert text.parse_list("1024, 2048", int, "--lengths") == [1024, 2048]
    with pytest.raises(ValueError, match="--lengths"):
        text.parse_list("1k", int, "--lengths")
    with pytest.raises(ValueError, match="--depths"):
        text.parse_list(",", float, "--depths")


def test_key_found_and_keys():
    assert text.key_found(31337, " 31337.\n")
    assert text.key_found(7, "The pass key is 7")
    assert not text.key_found(7, "The pass key is 17")
    assert not text.key_found(31337, " 3133")
    keys = text.passkey_keys(5, seed=0, length=1024, depth=0.5)
    assert len(set(keys)) == 5 and all(1 <= k <= 50000 for k in keys)
    assert keys == text.passkey_keys(5, seed=0, length=1024, depth=0.5)
    assert keys != text.passkey_keys(5, seed=1, length=1024, depth=0.5)
    assert keys != text.passkey_keys(5, seed=0, length=1024, depth=0.1)


def test_build_methods():
    ms = passkey.build_methods(["dense", "cab:keep=highest", "magnitude"], [0.5, 0.9])
    assert [m.label for m in ms] == ["dense", "cab:keep=highest@0.5", "cab:keep=highest@0.9", "magnitude@0.5",
                                     "magnitude@0.9"]
    assert ms[0].sparsity == 0.0
    with pytest.raises(ValueError, match="sparsities"):
        passkey.build_methods(["cab"], [1.0])
    with pytest.raises(ValueError, match="selector"):
        passkey.build_methods(["cabb"], [0.5])


def test_aggregate_counts_and_wilson():
    trials = [
        {"method": "cab", "sparsity": 0.5, "length": 1024, "depth": d, "correct": c, "density": 0.6, "tokens": 1000}
        for d, c in [(0.1, True), (0.1, False), (0.9, True), (0.9, True)]
    ]
    rows = passkey.aggregate(trials, ("method", "sparsity"))
    assert len(rows) == 1
    r = rows[0]
    assert (r["correct"], r["total"], r["accuracy"]) == (3, 4, 0.75)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(wilson(3, 4))
    assert 0.30 < r["ci_low"] < 0.31 and 0.95 < r["ci_high"] < 0.96  # 95% Wilson for 3/4
    by_depth = passkey.aggregate(trials, ("method", "depth"))
    assert [(x["depth"], x["correct"], x["total"]) for x in by_depth] == [(0.1, 1, 2), (0.9, 2, 2)]


def test_cli_rejects_bad_grid_before_loading(capsys):
    assert passkey.main(["--selectors", "dense,cabb"]) == 2
    assert "selector" in capsys.readouterr().err
    assert passkey.main(["--sparsities", "0.5,1.2"]) == 2


# ----------------------------------------------------------------------------------------------------
# With the real tokenizer / model
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2():
    from cab_attention import hf

    return hf.load_smollm2()


@pytest.mark.model
def test_passkey_prompt_layout(smollm2):
    _, tok = smollm2
    p = text.passkey_prompt(tok, 4242, 1024, 0.3, align=64)
    assert len(p.ids) <= 1024 and p.question_start % 64 == 0
    decoded = tok.decode(p.ids)
    assert decoded.startswith(text.TASK) and decoded.endswith(text.QUESTION)
    assert "The pass key is 4242. Remember it. 4242 is the pass key." in tok.decode(p.ids[p.needle_start : p.needle_end])
    filler = p.question_start - (p.needle_end - p.needle_start) - len(tok(text.TASK + "\n").input_ids)
    before = p.needle_start - len(tok(text.TASK + "\n").input_ids)
    assert before == round(0.3 * filler)
    # one token count per length whatever the key and depth (they batch together)
    assert len(text.passkey_prompt(tok, 7, 1024, 0.9).ids) == len(p.ids)
    free = text.passkey_prompt(tok, 4242, 1000, 0.3, align=None)
    assert len(free.ids) == 1000
    for kw, match in [({"key": 0}, "key"), ({"depth": 1.5}, "depth"), ({"length": 20}, "length"),
                      ({"align": 0}, "align")]:
        args = {"key": 5, "length": 512, "depth": 0.5, **kw}
        with pytest.raises(ValueError, match=match):
            text.passkey_prompt(tok, args.pop("key"), args.pop("length"), args.pop("depth"), **args)


@pytest.mark.model
def test_passkey_cli_tiny_grid_writes_files(tmp_path, capsys):
    out = tmp_path / "pk"
    rc = passkey.main(["--lengths", "256", "--depths", "0.5", "--keys", "2", "--selectors", "dense,cab:keep=highest",
                       "--sparsities", "0.5", "--out", str(out), "--json", "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    rows = payload["results"]
    assert {(r["method"], r["sparsity"]) for r in rows} == {("dense", 0.0), ("cab:keep=highest", 0.5)}
    for r in rows:
        assert set(r) >= {"method", "sparsity", "length", "depth", "correct", "total", "density"}
        assert r["total"] == 2 and 0 <= r["correct"] <= 2 and r["length"] == 256
        assert r["ci_low"] <= r["accuracy"] <= r["ci_high"]
    dense = next(r for r in rows if r["method"] == "dense")
    sparse = next(r for r in rows if r["method"] != "dense")
    assert dense["density"] == 1.0 and 0.5 <= sparse["density"] < 1.0
    assert len(payload["trials"]) == 4 and payload["environment"]["device"]
    for name in ("passkey.json", "passkey.csv", "summary.md", "heatmap_dense.png", "heatmap_cab_keep_highest.png"):
        assert (out / name).stat().st_size > 0
    assert "| method |" in (out / "summary.md").read_text()
    assert json.loads((out / "passkey.json").read_text())["results"] == rows
