"""The benchmark command line on CPU: refusal without CUDA, the dry-run grid, the CSV, the summary.

No timing is asserted anywhere: CPU host timers say nothing about speed. These tests check that the
commands run, label CPU rows as such, write the agreed columns and case names, merge, skip on budget,
and that the summary marks targets from the data (not measured here).
"""

from __future__ import annotations

import csv

import pytest
import torch

from cab_attention import select_blocks
from cab_eval.benchmark import cli as bench_cli
from cab_eval.benchmark import implementations, inputs, io, nsa_report, speed_report, summary
from cab_eval.benchmark import nsa as bench_nsa
from cab_eval.cli import main as cab_main

TINY = ["--dry-run", "--n", "128", "--batches", "2", "--batch-n", "128", "--sparsities", "0.5",
        "--batch-sparsities", "0.5", "--rep", "1", "--no-plots"]
FIRST_COLUMNS = "case,n,batch,heads,kv_heads,head_dim,sparsity,ms,peak_mb,device,torch,date".split(",")


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("what", ["predictor", "attention", "varlen", "distributed"])
def test_refuses_without_cuda(what, capsys):
    assert cab_main(["bench", what]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--dry-run" in err


def test_cpu_needs_tiny(capsys):
    assert cab_main(["bench", "predictor", "--device", "cpu"]) == 2
    assert "--tiny" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["varlen", "distributed"])
def test_cpu_is_for_the_dry_run_only(what, capsys):
    assert cab_main(["bench", what, "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == f"cab bench {what}: --device cpu is for --dry-run only (host timers)"


def test_dry_run_writes_labelled_csv_and_merges(tmp_path):
    out = tmp_path / "res.csv"
    args = TINY + ["--csv", str(out), "--out-dir", str(tmp_path), "--selectors", "cab,magnitude,antidiagonal"]
    assert cab_main(["bench", "predictor", *args, "--block-sizes", "64,128"]) == 0
    rows = read(out)
    with open(out) as f:
        assert f.readline().strip().split(",")[: len(FIRST_COLUMNS)] == FIRST_COLUMNS
    cases = {r["case"] for r in rows}
    for want in ("predictor:cab[torch]", "predictor:cab[torch]:coarsen", "predictor:cab[torch]:score",
                 "predictor:cab[torch]:select", "predictor:cab[torch]:mask", "predictor:cab[torch]@bs128",
                 "predictor:magnitude[torch]", "predictor:antidiagonal[torch]"):
        assert want in cases, want
    # The Triton predictor never runs on CPU here, and no row pretends it did.
    assert not any("triton" in c for c in cases)
    for r in rows:
        assert "host timer" in r["device"] and r["device"].startswith("cpu")
        assert r["status"] == "ok", r
        assert float(r["ms"]) >= 0 and r["peak_mb"] == ""
        assert r["torch"] == torch.__version__
    assert {int(r["batch"]) for r in rows} == {1, 2}

    assert cab_main(["bench", "attention", *args, "--block-sizes", "64"]) == 0
    rows2 = read(out)
    cases2 = {r["case"] for r in rows2}
    assert cases <= cases2  # merged, not overwritten
    for want in ("attention:sdpa-cpu", "attention:cab-sparse[reference]", "total:cab[torch]",
                 "total:magnitude[torch]", "total:antidiagonal[torch]"):
        assert want in cases2, want
    sparse = [r for r in rows2 if r["case"] == "attention:cab-sparse[reference]"]
    assert sparse and all(0 < float(r["density"]) <= 1 for r in sparse)

    # Running again replaces rows with the same key instead of duplicating them.
    assert cab_main(["bench", "attention", *args, "--block-sizes", "64"]) == 0
    keys = [tuple(r[c] for c in io.KEY) for r in read(out)]
    assert len(keys) == len(set(keys))


def test_budget_skips_are_logged(tmp_path):
    out = tmp_path / "b.csv"
    assert cab_main(["bench", "predictor", *TINY, "--csv", str(out), "--budget-s", "0", "--selectors", "cab"]) == 0
    rows = read(out)
    assert rows and all(r["status"].startswith("skipped: budget") and r["ms"] == "" for r in rows)


def test_summary_marks_targets_from_data(tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert cab_main(["bench", "attention", *TINY, "--csv", str(out), "--selectors", "cab", "--block-sizes", "64"]) == 0
    md = tmp_path / "docs" / "benchmarks.md"
    assert summary.main(["--csv", str(out), "--out", str(md), "--no-plots"]) == 0
    text = md.read_text()
    assert "## Targets" in text and "CPU dry run" in text
    # Nothing at 128k was measured, so no target can be met or missed.
    assert "**met**" not in text and "**not met**" not in text and text.count("not measured") >= 4
    assert summary.main(["--csv", str(out), "--compact"]) == 0
    assert "targets:" in capsys.readouterr().out


def test_summary_break_even_and_targets_on_synthetic_rows():
    def r(case, n, ms, s="", peak=""):
        return {"case": case, "n": str(n), "batch": "1", "sparsity": s, "ms": str(ms), "peak_mb": str(peak),
                "status": "ok", "device": "test", "torch": "x", "date": "d"}

    rows = []
    for n, dense, total in ((1024, 1.0, 3.0), (2048, 2.0, 2.5), (4096, 4.0, 2.0), (8192, 8.0, 1.0)):
        rows += [r("attention:sdpa-cudnn", n, dense), r("total:cab[torch]", n, total, "0.95")]
    n, interp, note = summary.break_even(rows, "total:cab[torch]", 0.95)
    assert n == 4096 and 2048 < interp < 4096 and "4k" in note
    rows += [r("attention:sdpa-cudnn", 131072, 100.0), r("total:cab[torch]", 131072, 20.0, "0.95"),
             r("predictor:cab[torch]", 131072, 2.0, "0.95", peak=512)]
    got = {t[0]: t[3] for t in summary.targets(rows)}
    assert got["predictor at 128k (coarsen to BlockMask, B=1, 95%)"] is False  # 2.0 > 1.5
    assert got["CAB end to end at 95% vs cuDNN SDPA at 128k"] is False  # 5x < 10x
    assert got["break-even of CAB (95%) vs cuDNN"] is True  # 4k <= 8k
    assert got["predictor memory at 128k beyond the inputs"] is True  # 512 < 1024


def test_tile_flops_counts_kept_tiles_exactly():
    b, hq, hkv, n, d, bs = 1, 2, 1, 256, 16, 64
    q = torch.randn(b, hq, n, d)
    k = torch.randn(b, hkv, n, d)
    dense = select_blocks(q, k, selector="dense", block_size=bs)
    m = n // bs
    # m diagonal tiles at half, m (m - 1) / 2 full tiles, per query head.
    assert inputs.tile_flops(dense) == 4 * bs * bs * d * hq * (m * (m - 1) / 2 + m / 2)
    sel = select_blocks(q, k, selector="cab", sparsity=0.5, block_size=bs)
    kept = int(sel.kv_num_blocks.sum())
    assert inputs.tile_flops(sel) == 4 * bs * bs * d * (kept - 0.5 * hq * m)


def test_merge_selection_is_a_superset_at_twice_the_block():
    q = torch.randn(1, 2, 512, 16)
    k = torch.randn(1, 1, 512, 16)
    sel = select_blocks(q, k, selector="cab", sparsity=0.8, block_size=64)
    merged = implementations.merge_selection(sel, 2)
    assert merged.block_size == 128 and merged.mask.shape[-1] == 4
    up = merged.mask.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert bool((up | ~sel.mask).all())  # every chosen 64-block lies in a kept 128-tile
    assert torch.equal(merged.kv_num_blocks, merged.mask.sum(-1).int())


def test_sizes_and_impls_parse():
    assert bench_cli.parse_sizes("1k,2k,4096") == [1024, 2048, 4096]
    with pytest.raises(Exception):
        bench_cli.parse_sizes("12q")
    impls, notes = implementations.predictor_impls("auto", "cpu")
    assert impls == ["torch"] and "not run" in notes["triton"]


@pytest.mark.parametrize("selector", ["cab", "magnitude"])
def test_torch_stage_breakdown_times_the_librarys_own_selection(selector):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 512, 32, generator=g), torch.randn(1, 2, 512, 32, generator=g)
    st = implementations.stage_fns("torch", q, k, sparsity=0.8, block_size=64, selector=selector)
    sel = st["select"](st["score"](st["coarsen"]()))
    ref = select_blocks(q, k, selector=selector, sparsity=0.8, block_size=64, **implementations.bench_options(selector))
    assert torch.equal(sel.mask, ref.mask) and torch.equal(sel.kv_num_blocks, ref.kv_num_blocks)
    assert st["mask"](sel) is not None


def test_docs_benchmarks_page_is_what_its_command_generates(monkeypatch):
    """docs/benchmarks.md equals the page its stated command renders from the committed CSV (plots not redrawn)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "benchmarks.md").read_text()
    command = page.split("Generated by `", 1)[1].split("`", 1)[0]
    args = command.split()
    assert args[:3] == ["cab", "bench", "summary"]
    opts = dict(zip(args[3::2], args[4::2]))
    csv_path, plots_dir = Path(opts["--csv"]), Path(opts["--plots-dir"])
    assert opts["--out"] == "docs/benchmarks.md"
    previous = Path(opts["--previous"]) if "--previous" in opts else None
    model_csv = Path(opts["--model-csv"]) if "--model-csv" in opts else None
    nsa_csv = Path(opts["--nsa-csv"]) if "--nsa-csv" in opts else None
    stem = csv_path.stem
    plots = [plots_dir / f"{stem}-latency.png", plots_dir / f"{stem}-breakdown.png"]
    for p in [csv_path, *plots, *[x for x in (previous, model_csv, nsa_csv) if x is not None]]:
        assert (root / p).is_file(), p
    monkeypatch.chdir(root)
    # The kept-rate plot is not redrawn either: the committed PNG stands in (absent -> no link -> a mismatch).
    monkeypatch.setattr(speed_report, "kept_rate_plot", lambda rows, out_path, s=0.95: out_path if out_path.is_file() else None)
    rendered = summary.render(io.read_csv(csv_path), csv_path, plots, Path("docs/benchmarks.md"), command,
                              io.read_csv(previous) if previous else None, plots_dir,
                              io.read_csv(model_csv) if model_csv else None, model_csv,
                              nsa_report.read_nsa_csv(nsa_csv) if nsa_csv else None, nsa_csv)
    assert rendered == page


def test_nsa_csv_section_shows_measured_and_skipped_rows(tmp_path):
    """--nsa-csv adds the NSA section: measured rows with their figures and the ratio to dense cuDNN,
    skipped rows with their status and no numbers; without it the page has no such section; a CSV
    lacking columns is refused naming the file and the columns."""
    assert set(nsa_report.REQUIRED) <= set(bench_nsa.FIELDS)
    bench = tmp_path / "bench.csv"  # one dense row is enough for the rest of the page
    io.write_results(bench, [dict(case="attention:sdpa-cudnn", n=1024, batch=1, heads=4, kv_heads=2, head_dim=64,
                                  sparsity="", ms=1.0, peak_mb=1.0, device="GPU X", torch="2.0", date="2026-01-01",
                                  status="ok")], fresh=True)
    shape = dict(date="2026-01-01", device="GPU X", torch="2.0", triton="3.0", dtype="bfloat16", N="8192", heads="4",
                 kv_heads="2", head_dim="64", block_size="64", num_selected="4", window="128", nsa_backend="flex",
                 warmup="1", reps="3", wall_s="")
    nsa_csv = tmp_path / "nsa.csv"
    with nsa_csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=bench_nsa.FIELDS)
        w.writeheader()
        w.writerow({**shape, "method": "dense-cudnn_attention", "fwd_ms": "1.0", "fwd_bwd_ms": "2.0", "peak_gib": "0.5", "status": "ok"})
        w.writerow({**shape, "method": "nsa", "fwd_ms": "3.0", "fwd_bwd_ms": "5.0", "peak_gib": "0.75", "status": "ok"})
        w.writerow({**shape, "method": "nsa-cab", "fwd_ms": "", "fwd_bwd_ms": "", "peak_gib": "", "status": "skipped (time budget)"})
    plain, with_nsa = tmp_path / "plain.md", tmp_path / "nsa.md"
    assert cab_main(["bench", "summary", "--csv", str(bench), "--out", str(plain), "--no-plots", "--previous", "none"]) == 0
    assert cab_main(["bench", "summary", "--csv", str(bench), "--out", str(with_nsa), "--no-plots", "--previous", "none",
                     "--nsa-csv", str(nsa_csv)]) == 0
    page = with_nsa.read_text()
    assert "NSA training attention" not in plain.read_text()
    assert f"--nsa-csv {nsa_csv}" in page and "## NSA training attention (forward + backward)" in page
    assert "4 query heads over 2 KV heads, head_dim 64, bfloat16" in page and "window 128" in page
    assert "| `nsa` | 3.000 | 5.000 | 2.50x | 0.75 | ok |" in page
    assert "| `nsa-cab` | - | - | - | - | skipped (time budget) |" in page
    assert "@flex" not in page  # the coarse-block sentence only where such rows are
    rows = nsa_report.read_nsa_csv(nsa_csv)
    coarse = [{**r, "method": r["method"] + "@flex128"} for r in rows if r["method"].startswith("nsa")]
    section = nsa_report.nsa_section(rows + coarse, nsa_csv, str)
    assert "`<method>@flex<size>` is the same module" in section and "from 128 tokens on" in section and "| `nsa@flex128` | 3.000 | 5.000 | 2.50x |" in section
    bad = tmp_path / "bad.csv"
    bad.write_text("date,device,N,method\n2026-01-01,GPU X,8192,nsa\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*missing columns: torch, dtype, heads"):
        nsa_report.read_nsa_csv(bad)
