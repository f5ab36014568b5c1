"""`cab bench model --dry-run`: the time-to-first-token harness runs end to end on a tiny config."""

import csv

import pytest

pytest.importorskip("transformers")

from cab_eval.benchmark import model as bench_model


def test_bench_model_dry_run_writes_rows(tmp_path):
    rc = bench_model.main(["--dry-run", "--n", "128", "--layers", "1", "--selectors", "streaming",
                           "--backends", "reference", "--repeats", "1", "--sparsity", "0.5",
                           "--block-size", "32", "--out", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "model.csv").open()))
    variants = [r["variant"] for r in rows]
    assert variants == ["none", "dense:sdpa-cudnn", "dense:sdpa", "sparse:streaming[reference]"]
    assert all(r["status"] == "ok" for r in rows), rows
    sparse = rows[-1]
    # 128 tokens at 32-token blocks: 4 rows with 1..4 valid blocks; at s=0.5 each keeps max(2, ceil(v/2)),
    # capped at v: 1 + 2 + 2 + 2 = 7 of 10 blocks.
    assert float(sparse["density"]) == pytest.approx(0.7)
    assert (tmp_path / "summary.md").read_text().startswith("| N |")


@pytest.mark.parametrize("bad", [["--sparsity", "1.0"], ["--layers", "0"], ["--n", "abc"]])
def test_bench_model_rejects_bad_arguments(bad, tmp_path):
    with pytest.raises(SystemExit):
        bench_model.main(["--dry-run", "--out", str(tmp_path), *bad])
