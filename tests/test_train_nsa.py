"""``cab train nsa`` end to end on a tiny configuration (a few steps), and its argument checks."""

from __future__ import annotations

import csv

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from cab_eval import train_nsa  # noqa: E402


def test_tiny_run_writes_every_output(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "out"
    rc = train_nsa.main([
        "--corpus", str(corpus), "--out", str(out), "--variants", "dense,nsa,nsa-cab", "--seeds", "0,1",
        "--steps", "2", "--seq-len", "64", "--batch", "2", "--block-size", "8", "--num-selected", "3", "--window", "8",
        "--hidden", "16", "--heads", "2", "--kv-heads", "1", "--layers", "1", "--eval-every", "1", "--eval-windows", "2",
        "--no-progress",
    ])
    assert rc == 0
    for name in ("steps.csv", "summary.csv", "summary.md", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    steps = list(csv.DictReader((out / "steps.csv").open()))
    assert len(steps) == 3 * 2 * 2
    summary = {r["variant"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert set(summary) == {"dense", "nsa", "nsa-cab"}
    assert summary["nsa-cab"]["diff_vs_nsa"] != "" and summary["nsa"].get("diff_vs_nsa", "") == ""


def test_t_interval_and_variants():
    mean, lo, hi = train_nsa.t_interval([1.0, 3.0])
    assert mean == 2.0 and lo == pytest.approx(2.0 - 12.706) and hi == pytest.approx(2.0 + 12.706)
    assert train_nsa.variant_selection("nsa-antidiagonal") == "antidiagonal"
    assert train_nsa.variant_selection("dense") is None
    for bad in ("nsa-dense", "sparse", "nsa-nsa"):
        with pytest.raises(ValueError, match="variant must be one of"):
            train_nsa.variant_selection(bad)


@pytest.mark.parametrize("argv, match", [
    (["--steps", "0"], "--steps"),
    (["--hidden", "10", "--heads", "4"], "--hidden"),
    (["--variants", "dense,bogus"], "variant"),
    (["--corpus", "/nonexistent/x.txt"], "--corpus"),
    (["--flex-block-size", "24"], "flex_block_size"),
    (["--flex-block-size", "32"], "on CUDA"),
    (["--num-selected", "1"], "num_selected"),
])
def test_bad_arguments(argv, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        train_nsa.main(argv + ["--out", str(tmp_path)])
