"""The Speed-II sections of `cab bench summary` on synthetic CSV rows (no timing measured here).

Every figure the page shows must come from the rows: the tests change a row and check the page follows.
"""

from __future__ import annotations

import csv

import pytest

from cab_eval.benchmark import io, speed_report as S, summary

N = 131072


def mk(case, n, ms, *, s=0.95, kept=None, peak=None, status="ok", date="2026-12-04", device="NVIDIA H200"):
    return {"case": case, "n": str(n), "batch": "1", "heads": "32", "kv_heads": "8", "head_dim": "128",
            "sparsity": "" if s is None else str(s), "ms": "" if ms is None else str(ms),
            "peak_mb": "" if peak is None else str(peak), "device": device, "torch": "2.11.0", "date": date,
            "block_size": "64", "density": "", "tflops": "", "status": status, "triton": "3.6.0",
            "backend": "triton" if "triton" in case else "", "kept_tflops": "" if kept is None else str(kept)}


def today_rows(kept64=410.0, e2e64=16.0):
    r = [mk("attention:sdpa-cudnn", N, 260.0, s=None),
         mk("attention:cab-sparse", N, 34.0, kept=208.8), mk("attention:cab-sparse[triton]", N, 17.7, kept=kept64),
         mk("attention:cab-sparse@bs128", N, 18.0, kept=400.0),
         mk("attention:cab-sparse[triton]@bs128", N, 16.1, kept=444.9),
         mk("predictor:cab-default[triton]", N, 2.0, peak=900.0), mk("predictor:cab-default[triton]@bs128", N, 0.6, peak=300.0),
         mk("predictor:antidiagonal[triton]", N, 13.0, peak=1700.0),
         mk("total:cab-default[triton]+triton", N, e2e64), mk("total:cab-default[triton]+triton@bs128", N, 12.0),
         mk("total:antidiagonal[triton]+triton", N, 31.0),
         mk("predictor:cab[triton]", N, 3.0), mk("predictor:cab[triton]:coarsen", N, 0.3, s=None),
         mk("predictor:cab[triton]:score", N, 1.0, s=None), mk("predictor:cab[triton]:select", N, 1.5),
         mk("predictor:cab[triton]:mask", N, 0.2), mk("total:cab[triton]", N, 40.0), mk("total:cab[triton]+triton", N, 21.0)]
    for n, dense, tot in ((4096, 0.30, 0.40), (8192, 1.0, 0.6)):
        r += [mk("attention:sdpa-cudnn", n, dense, s=None), mk("total:cab-default[triton]+triton", n, tot)]
    return r


def target(table_md, label):
    line = next(l for l in table_md.splitlines() if l.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_issue_targets_follow_the_rows():
    md = S.issue_targets(today_rows())
    row = target(md, "kept-tile rate, Triton kernel, 64-token blocks")
    assert row[2].startswith("410.0 TFLOP/s") and row[3] == "flex 208.8" and row[-1] == "**met**"
    assert target(md, "kept-tile rate, Triton kernel, 128-token blocks")[-1] == "**not met**"  # 444.9 < 470
    row = target(md, "end to end `cab-default[triton]+triton` vs cuDNN, 64-token blocks")
    assert row[2].startswith("16.2x (260.0 / 16.0 ms)") and row[-1] == "**met**"
    row = target(md, "predictor `antidiagonal[triton]` memory beyond the inputs, 64-token blocks")
    assert row[2] == "1700 MiB" and row[-1] == "**not met**"
    row = target(md, "break-even of `cab-default[triton]+triton` against cuDNN")
    assert "4k" in row[2] and "8k" in row[2] and row[-1] == "**not met**"  # slower at 4k, faster at 8k
    # a change in the data changes the page: nothing is hard-coded
    md2 = S.issue_targets(today_rows(kept64=390.0, e2e64=20.0))
    assert target(md2, "kept-tile rate, Triton kernel, 64-token blocks")[-1] == "**not met**"
    assert target(md2, "end to end `cab-default[triton]+triton` vs cuDNN, 64-token blocks")[2].startswith("13.0x")
    # only the predictor implementations present in the rows get target lines
    assert "triton-bf16" not in md
    # an absent case is "not measured", never met
    rows = [r for r in today_rows() if r["case"] != "attention:cab-sparse[triton]"]
    assert target(S.issue_targets(rows), "kept-tile rate, Triton kernel, 64-token blocks")[-1] == "not measured"


def test_failed_rows_never_count():
    rows = today_rows()
    for r in rows:
        if r["case"] == "attention:cab-sparse[triton]":
            r["status"] = "mismatch: 3 rows"
    assert target(S.issue_targets(rows), "kept-tile rate, Triton kernel, 64-token blocks")[-1] == "not measured"


def test_break_even_at_or_below_the_shortest():
    rows = [mk("attention:sdpa-cudnn", 4096, 0.3, s=None), mk("total:x", 4096, 0.2),
            mk("attention:sdpa-cudnn", 8192, 1.0, s=None), mk("total:x", 8192, 0.5)]
    n, note = S.break_even(rows, "total:x")
    assert n == 4096 and "at or below 4k" in note
    rows[1]["ms"] = "0.5"
    n, note = S.break_even(rows, "total:x")
    assert 4096 < n < 8192


def test_regression_table_flags_slower_cases():
    prev = [mk("total:cab[triton]", N, 30.0, date="2026-11-25", device="NVIDIA H100"),
            mk("predictor:cab[triton]", N, 3.0, date="2026-11-25", device="NVIDIA H100"),
            mk("predictor:cab[triton]:score", N, 0.1, s=None, date="2026-11-25")]
    md = S.regression_table(today_rows(), prev)
    assert "2 cases measured in both; 1 slower" in md and "NVIDIA H100, 2026-11-25" in md
    line = next(l for l in md.splitlines() if "`total:cab[triton]`" in l)
    assert "30.0" in line and "40.0" in line and "1.33" in line and "**slower**" in line
    line = next(l for l in md.splitlines() if "`predictor:cab[triton]`" in l)
    assert "1.00" in line and "slower" not in line  # stages are not in the regression table
    assert S.regression_table(today_rows(), []).startswith("No case")


def test_breakdown_kept_rate_and_memory_tables():
    rows = today_rows()
    bd = S.triton_breakdown(rows, "triton")
    line = next(l for l in bd.splitlines() if l.startswith("| 128k"))
    assert [c.strip() for c in line.strip("|").split("|")] == ["128k", "0.300", "1.000", "1.500", "0.200", "34.0",
                                                                 "17.7", "3.000", "40.0", "21.0"]
    kr = S.kept_rate_table(rows)
    assert "| 128k | 64 | 95% | 208.8 (34.0) | 410.0 (17.7) |" in kr
    assert "| 128k | 128 | 95% | 400.0 (18.0) | 444.9 (16.1) |" in kr
    mem = S.memory_table(rows)
    assert "| `predictor:antidiagonal[triton]` | - | - | 1700 |" in mem


def write(path, rows, fieldnames=io.COLUMNS):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames)
        w.writeheader()
        w.writerows(rows)


def test_summary_page_has_the_speed_sections(tmp_path):
    pytest.importorskip("matplotlib")
    folder = tmp_path / "results"
    folder.mkdir()
    write(folder / "nvidia-h100-2026-11-25.csv", [mk("total:cab[triton]", N, 30.0, date="2026-11-25", device="H100")])
    write(folder / "nvidia-h200-2026-12-04.csv", today_rows())
    out = tmp_path / "benchmarks.md"
    assert summary.main(["--csv", str(folder / "nvidia-h200-2026-12-04.csv"), "--out", str(out)]) == 0
    page = out.read_text()
    for want in ("## Issue 9 targets", "## Breakdown with both attention backends", "## Kept-tile rate",
                 "## Peak memory beyond the inputs, 95%", "## Regression", "--previous", "kept-rate.png"):
        assert want in page, want
    assert (folder / "nvidia-h200-2026-12-04-kept-rate.png").exists()
    assert summary.main(["--csv", str(folder / "nvidia-h200-2026-12-04.csv"), "--compact"]) == 0


def test_model_section_follows_the_model_csv(tmp_path):
    """`--model-csv` adds the time-to-first-token section; its figures are the CSV's; a failed row is listed."""
    folder = tmp_path / "results"
    folder.mkdir()
    write(folder / "nvidia-h200-2026-12-04.csv", today_rows())
    base = {"date": "2026-12-04", "device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "n": str(N),
            "layers": "4", "selector": "", "backend": "", "impl": "", "block_size": "64", "density": "",
            "attention_ms": "", "attention_share": "", "speedup_forward": "", "speedup_attention": "",
            "peak_gib": "18.2", "status": "ok"}
    model = [dict(base, variant="none", sparsity="0.0", ms="445.263"),
             dict(base, variant="dense:sdpa-cudnn", sparsity="0.0", ms="1484.482", attention_ms="1039.219",
                  attention_share="0.7001", speedup_forward="1.0", speedup_attention="1.0"),
             dict(base, variant="sparse:cab[triton]/triton", sparsity="0.95", density="0.0505", ms="588.865",
                  attention_ms="143.602", attention_share="0.2439", speedup_forward="2.521", speedup_attention="7.237"),
             dict(base, variant="sparse:cab[flex]/triton", sparsity="0.95", ms="", status="failed: OOM")]
    write(folder / "model-nvidia-h200-2026-12-04.csv", model, list(base) + ["variant", "sparsity", "ms"])
    out = tmp_path / "benchmarks.md"
    argv = ["--csv", str(folder / "nvidia-h200-2026-12-04.csv"), "--out", str(out), "--no-plots",
            "--model-csv", str(folder / "model-nvidia-h200-2026-12-04.csv")]
    assert summary.main(argv) == 0
    page = out.read_text()
    assert "## Time to first token" in page and "--model-csv" in page
    assert "| 128k | `sparse:cab[triton]/triton` | 95% | 0.0505 | 588.9 | 143.6 | 24.4% | 2.52 | 7.24 |" in page
    assert "| 128k | `dense:sdpa-cudnn` | - | - | 1484 | 1039 | 70.0% |" in page
    assert "failed: OOM" in page
    model[2]["speedup_forward"] = "2.4"
    write(folder / "model-nvidia-h200-2026-12-04.csv", model, list(base) + ["variant", "sparsity", "ms"])
    assert summary.main(argv) == 0
    assert "| 2.40 | 7.24 |" in out.read_text()
    assert summary.main(argv[:-1] + [str(folder / "absent.csv")]) == 2


def test_recorder_writes_after_every_row_and_marks_mismatches(tmp_path):
    """A run killed mid-group keeps every finished case; a failed output check is not an ok row."""
    from types import SimpleNamespace

    from cab_eval.benchmark.timing import Budget

    cfg = SimpleNamespace(heads=1, kv_heads=1, head_dim=8, cuda=False, warmup=1, rep=1, budget=Budget(None),
                          env={"device": "cpu host timer", "torch": "x", "triton": "y", "date": "d"})
    rec = io.CaseRecorder(cfg, log=lambda s: None)
    seen = []
    rec.on_row = lambda: seen.append(len(rec.rows))
    rec.measure("a", 1, 1, lambda: (lambda: 1), kept_flops=4e12, backend="triton")
    rec.measure("b", 1, 1, lambda: (lambda: 1), check=lambda out: "2 rows differ")
    rec.skip("c", 1, 1, "budget")
    assert seen == [1, 2, 3]
    assert rec.rows[0]["status"] == "ok" and rec.rows[0]["backend"] == "triton" and rec.rows[0]["triton"] == "y"
    assert rec.rows[0]["kept_tflops"] != ""
    assert rec.rows[1]["status"] == "mismatch: 2 rows differ"
