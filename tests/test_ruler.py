"""`cab eval ruler`: task generators, scoring, Wilson intervals, partial writing + resume, and an
end-to-end run on a tiny random Llama with the library enabled (no downloads: a byte tokenizer)."""

from __future__ import annotations

import importlib.util
import re
from collections import Counter

import pytest
import torch

from cab_eval.evaluate import ruler as R
from cab_eval.evaluate import ruler_run as RR


class ByteTokenizer:
    """One token per UTF-8 byte (ids 3..258); 0 pad, 1 BOS, 2 EOS. Enough for the generators and runner."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    add_bos_token = False

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [b + 3 for b in text.encode("utf-8")]}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")


def _pseudo_word(i: int) -> str:
    cons, vow = "bcdfghklmnprstvz", "aeiou"
    out, i = "", i + 17 * 17
    while i:
        i, r = divmod(i, 16 * 5)
        out += cons[r % 16] + vow[r // 16]
    return out + "s"


@pytest.fixture(scope="module")
def builder():
    words = [_pseudo_word(i) for i in range(600)]
    sents, k = [], 0
    for n in range(400):
        length = 4 + n % 9
        sents.append(" ".join(words[(k + j) % len(words)] for j in range(length)).capitalize() + ".")
        k += length
    text = "\n\n".join(" ".join(sents[i : i + 5]) for i in range(0, len(sents), 5))
    return R.RulerBuilder(ByteTokenizer(), bos_id=1, corpus=[("toy", text)])


TOK = ByteTokenizer()


def test_task_specs():
    s = R.parse_task_spec(" variable_tracking:hops=8,chains=2 ")
    assert s.name == "variable_tracking" and s.opts["hops"] == 8 and s.opts["chains"] == 2
    assert s.label == "variable_tracking:chains=2,hops=8"
    assert R.parse_task_spec("cwe").label == "cwe"
    for bad, match in [("nope", "task must be"), ("cwe:colour=1", "options"), ("niah_multikey:keys=1", "keys"),
                       ("fwe:alpha=1", "alpha"), ("cwe:common=2,rare=3", "common"), ("niah_single:haystack=x", "haystack"),
                       ("variable_tracking:hops", "key=value")]:
        with pytest.raises(ValueError, match=match):
            R.parse_task_spec(bad)


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "variable_tracking"])
@pytest.mark.parametrize("length", [1500, 2600])
def test_needle_tasks_exact_length_depth_and_answers(builder, task, length):
    spec = R.parse_task_spec(task)
    for depth in (0.0, 0.5, 1.0):
        p = builder.build(spec, length, depth, sample=0)
        assert len(p.ids) == length and p.ids[0] == 1  # exact length, BOS first
        text = TOK.decode(p.ids)
        for a in p.answers:
            assert R.answer_found(a, text)
        for s, e in p.spans:  # each span holds one inserted statement
            piece = TOK.decode(p.ids[s:e])
            assert ("special magic number" in piece) or piece.strip().startswith("VAR ")
        # Needles sit on sentence boundaries: the sentence gap bounds how far from the asked depth.
        assert p.depth_actual == pytest.approx(depth, abs=130 / length)
        if task.startswith("niah"):
            key = p.meta["key"]
            found = re.findall(rf"special magic numbers for {re.escape(key)} is: (\d+)\.", text)
            assert sorted(found) == sorted(p.answers)
            assert len(re.findall(r"special magic numbers for [\w-]+ is: \d+\.", text)) == spec.opts.get(
                "keys", 1) + spec.opts.get("values", 1) - 1
        assert text.endswith("text is") or text.endswith("text are") or text.endswith("they are:")
    # Seeds: same arguments, same prompt; another sample, another prompt.
    assert builder.build(spec, length, 0.5, 0).ids == builder.build(spec, length, 0.5, 0).ids
    assert builder.build(spec, length, 0.5, 1).answers != builder.build(spec, length, 0.5, 0).answers


@pytest.mark.parametrize("hops,chains", [(1, 1), (4, 1), (6, 3)])
def test_variable_tracking_chains_are_correct(builder, hops, chains):
    spec = R.parse_task_spec(f"variable_tracking:hops={hops},chains={chains},fewshot=false")
    p = builder.build(spec, 1500, 0.3, sample=2)
    text = TOK.decode(p.ids)
    assign = re.findall(r"VAR ([A-Z]{5}) = (VAR ([A-Z]{5})|\d+)\.", text)
    assert len(assign) == chains * (hops + 1)
    value = int(re.search(r"assigned the value (\d+) in the text", text).group(1))
    # Follow the chain in text order: a variable holds the value if it is assigned it or a holder.
    holders, seen = set(), set()
    for name, rhs, src in assign:
        assert name not in seen  # each variable assigned once
        seen.add(name)
        if (src and src in holders) or (not src and int(rhs) == value):
            holders.add(name)
        if src:
            assert src in seen  # a hop comes after the assignment it reads
    assert holders == set(p.answers) and len(p.answers) == hops + 1
    assert p.answers == p.meta["chain"]


def test_cwe_counts(builder):
    for length, (common, rare) in [(1500, (6, 1)), (5000, (30, 3))]:
        p = builder.build(R.parse_task_spec("cwe:fewshot=false"), length, None, 0)
        assert length - 16 <= len(p.ids) <= length and p.depth is None
        text = TOK.decode(p.ids)
        listed = re.search(r"most often\.\n(.*)\nQuestion", text, re.S).group(1)
        items = re.findall(r"(\d+)\. ([a-z]+)", listed)
        assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
        counts = Counter(w for _, w in items)
        assert sorted(w for w, c in counts.items() if c == common) == sorted(p.answers)
        assert len(p.answers) == 10 and set(counts.values()) == {common, rare}
        assert p.meta["rare_words"] == sum(1 for c in counts.values() if c == rare)


def test_fwe_counts(builder):
    p = builder.build(R.parse_task_spec("fwe"), 3000, 0.5, 0)
    assert 3000 - 16 <= len(p.ids) <= 3000 and p.depth is None
    text = TOK.decode(p.ids)
    body = text.split("coded words. ")[-1].split("\nQuestion")[0]
    counts = Counter(body.split())
    ranked = [w for w, _ in counts.most_common()]
    assert ranked[0] == "...." and ranked[1:4] == p.answers
    assert counts[p.answers[2]] > counts[ranked[4]]  # the top 3 are strictly ahead of the 4th word
    assert [counts[w] for w in ["...."] + p.answers + [ranked[4]]] == p.meta["counts"]


def test_noise_haystack_and_length_errors(builder):
    p = builder.build(R.parse_task_spec("niah_single:haystack=noise"), 800, 0.5, 0)
    assert len(p.ids) == 800 and "The grass is green." in TOK.decode(p.ids)
    with pytest.raises(ValueError, match="length"):
        builder.build(R.parse_task_spec("niah_multivalue"), 200, 0.5, 0)
    with pytest.raises(ValueError, match="depth"):
        builder.build(R.parse_task_spec("niah_single"), 800, 1.5, 0)


def test_scoring():
    assert R.answer_found("1234567", "is 1234567.")
    assert not R.answer_found("123456", " 1234567")
    assert R.answer_found("ABCDE", "they are: abcde, FGHIJ")
    assert not R.answer_found("ABCDE", "ABCDEF")
    assert R.score_output(["a1", "b2", "c3", "d4"], "b2 d4 a1") == (0.75, False)
    assert R.score_output(["7"], "The number is 7") == (1.0, True)
    with pytest.raises(ValueError):
        R.score_output([], "x")


def test_wilson_known_values():
    assert R.wilson(3, 4) == pytest.approx((0.3006, 0.9544), abs=1e-4)
    assert R.wilson(0, 10) == pytest.approx((0.0, 3.8415 / 13.8415), abs=1e-4)
    assert R.wilson(10, 10) == pytest.approx((10 / 13.8415, 1.0), abs=1e-4)
    assert R.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    rows = R.aggregate([{"m": "x", "correct": c, "score": s, "density": 0.1, "tokens": 100}
                        for c, s in [(True, 1.0), (False, 0.5), (True, 1.0), (True, 1.0)]], ("m",))
    assert (rows[0]["correct"], rows[0]["total"], rows[0]["score"]) == (3, 4, 0.875)
    assert (rows[0]["ci_low"], rows[0]["ci_high"]) == pytest.approx(R.wilson(3, 4))


def test_decide_bos():
    class T:
        bos_token_id, add_bos_token = 2, False

    assert R.decide_bos(T(), "gemma3_text", 2)[0] is True
    assert R.decide_bos(T(), "llama", 1)[0] is False
    T.add_bos_token = True
    assert R.decide_bos(T(), "llama", 1)[0] is True
    assert R.decide_bos(T(), "gemma3_text", 2, "no")[0] is False
    with pytest.raises(ValueError, match="bos"):
        R.decide_bos(T(), "llama", 1, "maybe")


def test_token_id_file_roundtrip(builder, tmp_path):
    ps = R.build_prompts(builder, [R.parse_task_spec("niah_single"), R.parse_task_spec("fwe")], [1600], [0.5], 2)
    assert [p.uid for p in ps] == ["niah_single|1600|0.5|0", "fwe|1600|-|0", "niah_single|1600|0.5|1", "fwe|1600|-|1"]
    path = R.save_prompts(tmp_path / "p.json.gz", ps, {"check": R.check_sentence_record(TOK)})
    back, meta = R.load_prompts(path)
    assert back == ps and meta["check"]["tokens"] == len(R.CHECK_SENTENCE.encode())
    chk = RR.tokenizer_check(TOK, meta["check"])
    assert chk["tokens_match"] and chk["decode_ok"]
    with pytest.raises(ValueError, match="token-ids"):
        R.load_prompts(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------------------
# Runner on a tiny random Llama
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _prompts(builder):
    tasks = [R.parse_task_spec(t) for t in ("niah_single", "variable_tracking:hops=2,fewshot=false")]
    return R.build_prompts(builder, tasks, [512], [0.25, 0.75], 2)  # 8 prompts of 512 tokens


def test_partial_writing_and_resume(builder, tiny_llama, tmp_path):
    prompts = _prompts(builder)
    methods = RR.build_methods(["dense", "magnitude"], [0.5])
    calls = []

    def stub(model, ids, new, answers, fail_after=None):
        calls.append(ids.shape[0])
        if fail_after is not None and len(calls) > fail_after:
            raise KeyboardInterrupt
        # The first answer of the first row, as tokens: that row scores, any others do not.
        return [TOK(" " + a[0])["input_ids"] if i == 0 else [5] for i, a in enumerate(answers)]

    with pytest.raises(KeyboardInterrupt):
        RR.run_trials(tiny_llama, TOK, prompts, methods, tmp_path, batch=2, progress=False,
                      generate=lambda *a: stub(*a, fail_after=3))
    done = RR.read_trials(tmp_path / RR.TRIALS_CSV)
    assert len(done) == 6  # 3 batches of 2 written before the interrupt
    assert [t["method"] for t in done] == ["dense", "dense", "magnitude@0.5", "magnitude@0.5", "dense", "dense"]
    with pytest.raises(ValueError, match="resume"):
        RR.run_trials(tiny_llama, TOK, prompts, methods, tmp_path, progress=False, generate=stub)
    calls.clear()
    facts = RR.run_trials(tiny_llama, TOK, prompts, methods, tmp_path, batch=2, resume=True, progress=False,
                          generate=stub)
    assert facts["ran"] == 10 and facts["skipped_done"] == 6 and sum(calls) == 10
    trials = RR.read_trials(tmp_path / RR.TRIALS_CSV)
    assert len(trials) == 16 and len({(t["method"], t["uid"]) for t in trials}) == 16
    assert all(t["correct"] == (t["uid"] in {p.uid for p in prompts[::2]} and t["task"] == "niah_single")
               or t["task"] != "niah_single" for t in trials)
    again = RR.rescore(trials, TOK)  # re-decoding the stored output ids gives the same verdicts
    assert [(t["correct"], t["score"], t["output"]) for t in again] == [(t["correct"], t["score"], t["output"]) for t in trials]
    dense = [t for t in trials if t["method"] == "dense"]
    assert all(t["density"] == 1.0 for t in dense) or all(t["density"] != t["density"] for t in dense)
    # time limit: nothing new starts after it
    facts = RR.run_trials(tiny_llama, TOK, prompts, methods, tmp_path / "t", time_limit=0.0, progress=False,
                          generate=stub)
    assert facts["stopped"] and facts["ran"] <= 2


def test_end_to_end_tiny_llama(builder, tiny_llama, tmp_path):
    from cab_attention import hf

    prompts = _prompts(builder)[:4]
    methods = RR.build_methods(["dense", "magnitude", "streaming"], [0.5])
    facts = RR.run_trials(tiny_llama, TOK, prompts, methods, tmp_path, batch=2, max_new_tokens=4, progress=False)
    assert facts["ran"] == 12 and hf.settings_of(tiny_llama) is None  # attention restored
    trials = RR.read_trials(tmp_path / RR.TRIALS_CSV)
    by = {m: [t["density"] for t in trials if t["method"] == m] for m in ("dense", "magnitude@0.5", "streaming@0.5")}
    assert all(d == 1.0 for d in by["dense"])
    # 512 tokens = 8 blocks of 64: every row keeps ceil-ish half of its causal blocks, so density < 1.
    assert all(0.4 < d < 0.8 for d in by["magnitude@0.5"] + by["streaming@0.5"])
    assert all(len(t["output_ids"].split()) <= 4 for t in trials)
    config = {"model": "tiny-llama", "dtype": "float32", "block_size": 64, "backend": "sdpa", "bos": True,
              "bos_reason": "test", "tokenizer_check": RR.tokenizer_check(TOK, R.check_sentence_record(TOK)),
              "run": facts}
    plots = importlib.util.find_spec("matplotlib") is not None
    files = RR.write_outputs(tmp_path, config, trials, plots=plots)
    if plots:
        assert {"heatmap_dense", "heatmap_magnitude", "heatmap_streaming"} <= set(files)
    summary = files["summary"].read_text()
    assert "magnitude" in summary and "density" in summary
    rows = RR.summarize(trials)["results"]
    assert {(r["selector"], r["task"]) for r in rows} >= {("dense", "niah_single"), ("streaming", "variable_tracking:fewshot=False,hops=2")}


def test_cli_rejects_bad_input_before_loading(capsys, tmp_path):
    assert RR.main(["run", "--model", str(tmp_path / "none.gguf")]) == 2
    assert "--model" in capsys.readouterr().err
    assert RR.main(["build", "--model", str(tmp_path), "--tasks", "nope"]) == 2


def test_paired_accuracy_pairs_prompts_and_pools_lengths():
    """Differences are taken on shared prompts only; 'all' pools the lengths; dense is never paired."""
    from cab_eval.evaluate.ruler import paired_accuracy

    def t(sel, sp, length, uid, ok):
        return {"selector": sel, "sparsity": sp, "length": length, "uid": uid, "correct": ok}

    trials = [t("dense", 0.0, 8, "a", True)]
    # length 8: prompts a, b, c; the candidate wins a, loses nothing; c only the reference ran.
    trials += [t("antidiagonal", 0.9, 8, u, ok) for u, ok in (("a", False), ("b", True), ("c", True))]
    trials += [t("x", 0.9, 8, u, ok) for u, ok in (("a", True), ("b", True))]
    # length 16: the candidate loses d.
    trials += [t("antidiagonal", 0.9, 16, "d", True), t("x", 0.9, 16, "d", False)]
    rows = {(r["length"], r["selector"]): r for r in paired_accuracy(trials)}
    assert set(rows) == {(8, "x"), (16, "x"), ("all", "x")}
    r8 = rows[(8, "x")]
    assert (r8["prompts"], r8["a_only"], r8["ref_only"]) == (2, 1, 0) and r8["diff"] == pytest.approx(0.5)
    assert r8["lo"] <= r8["diff"] <= r8["hi"]
    assert rows[(16, "x")]["diff"] == pytest.approx(-1.0)
    pooled = rows[("all", "x")]
    assert pooled["prompts"] == 3 and pooled["diff"] == pytest.approx(0.0)
    assert pooled["lo"] < 0 < pooled["hi"]
