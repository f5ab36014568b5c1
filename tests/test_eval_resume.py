"""Interrupted evaluations leave their finished work on disk, and ``--resume`` runs only the rest.

A tiny random Llama (two layers) and a character tokenizer stand in for SmolLM2, so these tests need no
model download; an exception raised after a few trials (windows, jobs) plays the interruption.
"""

from __future__ import annotations

import json

import pytest
import torch

from cab_eval.evaluate import passkey as PK
from cab_eval.evaluate import ppl as P
from cab_eval.evaluate import recall as R
from cab_eval.evaluate.report import RowsFile

pytest.importorskip("transformers")


class CharTokenizer:
    """One token per character (code point mod 128); 0 is padding and end of text."""

    bos_token_id = None
    eos_token_id = 0
    pad_token_id = 0
    add_bos_token = False

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 127 + 1 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i) - 1) for i in ids if int(i) > 0)


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval(), CharTokenizer()


class Interrupt(RuntimeError):
    pass


def fail_after(n: int, fn):
    """``fn`` that raises :class:`Interrupt` on its ``n + 1``-th call; ``.calls`` counts calls."""

    def wrapped(*args, **kwargs):
        wrapped.calls += 1
        if wrapped.calls > n:
            raise Interrupt(f"interrupted after {n} calls")
        return fn(*args, **kwargs)

    wrapped.calls = 0
    return wrapped


def test_rows_file_round_trip(tmp_path):
    f = RowsFile(tmp_path / "r.csv", text_fields=("output",))
    assert f.start(resume=True) == []
    f.append([{"method": "cab:keep=highest", "sparsity": 0.5, "options": {"keep": "highest"}, "correct": True,
               "output": "12345", "kept": None}])
    f.append([{"method": "dense", "sparsity": 0.0, "options": {}, "correct": False, "output": " 7.", "kept": 3}])
    rows = RowsFile(tmp_path / "r.csv", text_fields=("output",)).read()
    assert rows[0] == {"method": "cab:keep=highest", "sparsity": 0.5, "options": {"keep": "highest"}, "correct": True,
                       "output": "12345", "kept": None}
    assert rows[1]["output"] == " 7." and rows[1]["kept"] == 3
    with pytest.raises(ValueError, match="fields"):
        f.append([{"method": "x", "new_field": 1}])
    assert f.start(resume=False) == [] and f.read() == []


def test_passkey_interrupted_then_resumed(tiny, tmp_path, monkeypatch):
    from cab_attention import hf

    monkeypatch.setattr(hf, "load_smollm2", lambda **kw: tiny)
    out = tmp_path / "pk"
    args = ["--lengths", "512", "--depths", "0.25,0.75", "--keys", "2", "--selectors", "dense,cab", "--sparsities",
            "0.5", "--batch", "1", "--max-new-tokens", "2", "--out", str(out), "--no-progress"]
    generate = PK.generate_answers
    monkeypatch.setattr(PK, "generate_answers", fail_after(3, generate))
    with pytest.raises(Interrupt):
        PK.main(args)
    trials = RowsFile(out / "passkey_trials.csv", PK.TEXT_FIELDS).read()
    assert len(trials) == 3 and all(t["method"] == "dense" for t in trials)
    partial = json.loads((out / "passkey_partial.json").read_text())
    assert partial["complete"] is False and sum(r["total"] for r in partial["summary"]) == 3

    resumed = fail_after(100, generate)
    monkeypatch.setattr(PK, "generate_answers", resumed)
    assert PK.main(args + ["--resume"]) == 0
    assert resumed.calls == 8 - 3  # 2 methods x 4 prompts, 3 done before
    payload = json.loads((out / "passkey.json").read_text())
    assert len(payload["trials"]) == 8 and sum(r["total"] for r in payload["summary"]) == 8
    assert payload["trials"][:3] == trials  # the interrupted run's trials, kept as they were
    assert not (out / "passkey_partial.json").exists()
    assert len(RowsFile(out / "passkey_trials.csv", PK.TEXT_FIELDS).read()) == 8


def test_recall_interrupted_then_resumed(tiny, tmp_path, monkeypatch):
    kw = dict(configs=["cab", "streaming"], sparsities=[0.5], windows=3, length=128, block_size=16, progress=False,
              model_obj=tiny)
    measure = R.RecallRecorder.measure
    monkeypatch.setattr(R.RecallRecorder, "measure", fail_after(3, measure))  # 2 layers a window: stops in window 1
    with pytest.raises(Interrupt):
        R.run(tmp_path, **kw)
    rows = RowsFile(tmp_path / "recall.csv", R.TEXT_FIELDS).read()
    assert {r["window"] for r in rows} == {0} and len(rows) == 2 * 2  # layers x configs of window 0 only

    resumed = fail_after(100, measure)
    monkeypatch.setattr(R.RecallRecorder, "measure", resumed)
    res = R.run(tmp_path, resume=True, **kw)
    assert resumed.calls == 2 * 2  # windows 1 and 2, two layers each
    assert len(res["rows"]) == 3 * 2 * 2 and res["rows"][:4] == rows
    assert all(r["windows"] == 3 for r in res["summary"])

    fresh = R.run(tmp_path / "fresh", **{**kw, "progress": False})
    for a, b in zip(fresh["summary"], res["summary"]):
        assert a["method"] == b["method"] and a["recall"] == pytest.approx(b["recall"], abs=1e-12)


def test_ppl_interrupted_then_resumed(tiny, tmp_path, monkeypatch):
    kw = dict(selectors=["cab", "streaming"], sparsities=[0.5], windows=2, length=128, block_size=16,
              progress=False, model_obj=tiny)
    job = P._run_job
    monkeypatch.setattr(P, "_run_job", fail_after(2, job))  # dense and cab finish, streaming is interrupted
    with pytest.raises(Interrupt):
        P.run(tmp_path, **kw)
    rows = RowsFile(tmp_path / "ppl_windows.csv", P.TEXT_FIELDS).read()
    assert [(r["method"], r["window"]) for r in rows] == [("dense", 0), ("dense", 1), ("cab", 0), ("cab", 1)]

    resumed = fail_after(100, job)
    monkeypatch.setattr(P, "_run_job", resumed)
    res = P.run(tmp_path, resume=True, **kw)
    assert resumed.calls == 1
    fresh = P.run(tmp_path / "fresh", **kw)
    assert [r["method"] for r in res["results"]] == ["cab", "streaming"]
    for a, b in zip([fresh["dense"]] + fresh["results"], [res["dense"]] + res["results"]):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-9) and a["density"] == b["density"]
