"""``scripts/gpu_nsa.py --smoke`` on the CPU: every section runs and writes its files (harness only; the
CUDA run is the result)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_nsa_script", ROOT / "scripts" / "gpu_nsa.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_checks_both_selections_and_times_every_method(tmp_path):
    """On the CPU the fast path is the reference, so the coarse FlexAttention layout is not claimed."""
    script = load_script()
    assert script.main(["--smoke", "--skip-train", "--out", str(tmp_path)]) == 0
    with (tmp_path / "correctness.csv").open() as f:
        corr = list(csv.DictReader(f))
    assert {r["selection"] for r in corr} == {"nsa", "cab"}
    assert all(r["pass"] == "True" for r in corr)
    with (tmp_path / "speed.csv").open() as f:
        assert {r["method"] for r in csv.DictReader(f)} == {"dense-math", "nsa", "nsa-cab", "nsa-antidiagonal"}
    log = (tmp_path / "log.txt").read_text()
    assert "correctness (flex bf16 err <= 2x reference bf16 err, vs float64): PASS" in log


def test_skip_speed_writes_no_speed_file(tmp_path):
    script = load_script()
    assert script.main(["--smoke", "--skip-train", "--skip-speed", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "speed.csv").exists() and (tmp_path / "correctness.csv").exists()
    assert "speed: skipped (--skip-speed)" in (tmp_path / "log.txt").read_text()
