"""``cab bench nsa``: the CPU dry run writes a row per method and size, a failing method is an error row
and the others go on, an interrupted run keeps its finished rows, the time budget records skips, and bad
arguments are refused naming the argument. Harness tests only: no timing is checked."""

from __future__ import annotations

import csv
import dataclasses
import time

import pytest
import torch

from cab_eval import cli
from cab_eval.benchmark import nsa as bench

FAST = ["--dry-run", "--n", "128,256", "--warmup", "0", "--reps", "1"]


def read(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_dry_run_writes_a_row_for_every_method_and_size(tmp_path):
    out = tmp_path / "b.csv"
    assert bench.main(FAST + ["--out", str(out)]) == 0
    rows = read(out)
    methods = ["dense-math", "nsa", "nsa-cab", "nsa-antidiagonal"]
    assert [(r["N"], r["method"]) for r in rows] == [(n, m) for n in ("128", "256") for m in methods]
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["fwd_ms"]) > 0 and float(r["fwd_bwd_ms"]) > 0
        assert "host timer" in r["device"] and r["dtype"] == "float32" and r["nsa_backend"] == "reference"
    assert out.with_suffix(".png").stat().st_size > 0
    md = out.with_suffix(".md").read_text()
    assert "not a result" in md and md.count("| 256 |") == len(methods)


def test_a_failing_method_is_an_error_row_and_the_others_go_on(tmp_path, monkeypatch):
    real = bench.nsa_module

    def failing(selection, cfg, dev, flex_block=None):
        if selection == "cab" and dev.type != "meta":  # the config check builds modules on meta: let it pass
            raise RuntimeError("no kernel for this shape\nsecond line")
        return real(selection, cfg, dev, flex_block)

    monkeypatch.setattr(bench, "nsa_module", failing)
    monkeypatch.setattr(bench, "time_case", lambda *a, **k: (1.0, 3.0))  # the harness, not the timing
    out = tmp_path / "b.csv"
    assert bench.main(FAST + ["--out", str(out)]) == 0
    rows = read(out)
    assert len(rows) == 8
    for r in rows:
        if r["method"] == "nsa-cab":
            assert r["status"] == "error: RuntimeError: no kernel for this shape" and r["fwd_bwd_ms"] == ""
        else:
            assert r["status"] == "ok" and float(r["fwd_bwd_ms"]) == 3.0


def test_flex_blocks_are_rows_of_their_own_in_order(monkeypatch):
    """Each selection at each FlexAttention block, in the order given; the NSA block keeps the plain label.
    (The flex backend on the CPU: modules are built, the timing is stubbed.)"""
    built = []
    real = bench.nsa_module

    def recording(selection, cfg, dev, flex_block=None):
        m = real(selection, cfg, dev, flex_block)
        if dev.type != "meta":
            built.append((selection, m.flex_block_size, m.backend))
        return m

    monkeypatch.setattr(bench, "nsa_module", recording)
    monkeypatch.setattr(bench, "time_case", lambda *a, **k: (1.0, 3.0))
    cfg = dataclasses.replace(bench.dry_run_config(), lengths=(128,), selections=("nsa", "cab"), backend="flex",
                              flex_blocks=(64, 32))
    rows = bench.speed(cfg, torch.device("cpu"), lambda s: None, deadline=time.time() + 60)
    assert [r["method"] for r in rows] == ["dense-math", "nsa@flex64", "nsa-cab@flex64", "nsa", "nsa-cab"]
    assert built == [("nsa", 64, "flex"), ("cab", 64, "flex"), ("nsa", 32, "flex"), ("cab", 32, "flex")]
    assert bench.method_name("nsa", "cab", 128, 64) == "nsa-cab@flex128" and bench.method_name("nsa", "nsa", 64, 64) == "nsa"


def test_coarse_flex_blocks_need_the_flex_backend(tmp_path, capsys):
    """The dry run's reference path has no FlexAttention blocks: a coarser size there is refused, not labelled."""
    with pytest.raises(ValueError, match="need backend='flex'"):
        dataclasses.replace(bench.dry_run_config(), flex_blocks=(32, 64))
    assert dataclasses.replace(bench.dry_run_config(), flex_blocks=(32,)).nsa_layouts() == (32,)
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--flex-blocks", "64", "--out", str(tmp_path / "b.csv")])
    assert "need backend='flex'" in capsys.readouterr().err


def test_profile_writes_a_table_per_nsa_case(tmp_path):
    out = tmp_path / "b.csv"
    assert bench.main(FAST[:2] + ["128", "--reps", "1", "--warmup", "0", "--selections", "nsa", "--profile",
                                  "--out", str(out)]) == 0
    prof = tmp_path / "b-profile" / "nsa-128.txt"
    text = prof.read_text()
    assert "# by host time" in text and "aten::" in text
    assert sorted(p.name for p in prof.parent.iterdir()) == ["nsa-128.txt"]  # none for the dense row


def test_an_interrupted_run_keeps_its_finished_rows(tmp_path, monkeypatch):
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return 1.0, 2.0

    monkeypatch.setattr(bench, "time_case", interrupted)
    out = tmp_path / "b.csv"
    with pytest.raises(KeyboardInterrupt):
        bench.main(FAST + ["--selections", "nsa", "--out", str(out)])
    assert [(r["N"], r["method"], r["status"]) for r in read(out)] == [("128", "dense-math", "ok"), ("128", "nsa", "ok")]


def test_past_the_time_budget_every_length_is_recorded_as_skipped():
    cfg = dataclasses.replace(bench.dry_run_config(), lengths=(128, 256))
    seen = []
    rows = bench.speed(cfg, torch.device("cpu"), lambda s: None, deadline=time.time() - 1, on_row=seen.append)
    assert rows == seen == [{"N": n, "method": "all", "status": "skipped (time budget)"} for n in (128, 256)]


@pytest.mark.parametrize("argv, named", [
    (["--n", "8q"], "--n"),
    (["--heads", "0"], "--heads"),
    (["--reps", "x"], "--reps"),
    (["--selections", "nsa,bogus"], "--selections"),
    (["--dense", "cudnn,fast"], "--dense"),
    (["--dtype", "fp8"], "--dtype"),
    (["--time-budget", "-5"], "--time-budget"),
    (["--heads", "6", "--kv-heads", "4"], "kv_heads"),
    (["--block-size", "48"], "block_size"),
    (["--num-selected", "1"], "num_selected"),
    (["--flex-blocks", "48"], "flex_block_size"),
    (["--flex-blocks", "32,32"], "flex_blocks"),
    (["--flex-blocks", "x"], "--flex-blocks"),
])
def test_bad_arguments_are_refused_naming_the_argument(argv, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--dry-run", "--out", str(tmp_path / "b.csv")] + argv)
    assert e.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "b.csv").exists()


def test_config_refuses_bad_values_with_value_error():
    base = bench.dry_run_config()
    with pytest.raises(ValueError, match="kv_heads"):
        dataclasses.replace(base, heads=6, kv_heads=4)
    with pytest.raises(ValueError, match="dense_backends"):
        dataclasses.replace(base, dense_backends=("CUDNN",))
    with pytest.raises(ValueError, match="selections"):
        dataclasses.replace(base, selections=("dense",))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_only_the_dry_run_runs(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--out", str(tmp_path / "b.csv")])


def test_bench_help_names_nsa(capsys):
    assert cli.main(["bench", "--help"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.split()[:2] == ["bench", "nsa"])
    assert "NSA" in line and "SDPA" in line


def test_gpu_preset_measures_128_token_flex_blocks_first_and_follows_the_block_size():
    parse = bench.build_parser().parse_args
    assert bench.config_from_args(parse([])).nsa_layouts() == (128, 64)
    assert bench.config_from_args(parse(["--block-size", "128"])).nsa_layouts() == (128,)
    assert bench.config_from_args(parse(["--block-size", "32"])).nsa_layouts() == (128, 32)
    assert bench.config_from_args(parse(["--block-size", "256"])).nsa_layouts() == (256,)
    assert bench.config_from_args(parse(["--block-size", "32", "--flex-blocks", "32"])).nsa_layouts() == (32,)
