"""`cab demo` (cab_attention.demo)."""

from __future__ import annotations

import json

import pytest
import torch

from cab_attention import SELECTORS, demo
from cab_attention.evaluate.text import format_selector_spec
from cab_attention.selectors import SEED_CAB_OPTIONS


def test_layer_study_on_synthetic_qkv():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 512, 32, generator=g), torch.randn(1, 2, 512, 32, generator=g), torch.randn(1, 2, 512, 32, generator=g)
    rows = demo.layer_study(q, k, v, sparsity=0.75, block_size=64, scale=None, needle_blocks=[3], question_block=7)
    want = list(SELECTORS)
    want.insert(2, "cab (seed)")
    assert [r["selector"] for r in rows] == want
    dense = rows[0]
    assert dense["density"] == 1.0 and dense["rel_error"] < 1e-5 and dense["needle_kept"] == 1.0
    for r in rows[1:]:
        assert r["density"] < 1.0 and r["rel_error"] > 1e-3 and 0.0 <= r["needle_kept"] <= 1.0


def test_demo_rejects_bad_flags(capsys):
    assert demo.main(["--sparsity", "1.5"]) == 2
    assert "--sparsity" in capsys.readouterr().err


@pytest.mark.model
def test_demo_runs_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--length", "256", "--depths", "0.5", "--layer", "3", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| dense | 0 |" in printed and "| streaming | 0.5 |" in printed and "rel_error" in printed
    result = json.loads((out / "demo.json").read_text())
    study = result["layer_study"]
    assert study["layer"] == 3 and [r["selector"] for r in study["rows"]][:3] == ["dense", "cab", "cab (seed)"]
    assert study["rows"][0]["rel_error"] < 1e-5
    assert {r["method"] for r in result["passkey"]["summary"]} == {"dense", "cab", format_selector_spec("cab", SEED_CAB_OPTIONS), "magnitude", "streaming"}
    assert (out / "demo_mask.png").stat().st_size > 10_000
    assert (out / "summary.md").read_text().count("|") > 20
