"""`cab demo` (cab_eval.demo)."""

from __future__ import annotations

import json

import pytest
import torch

from cab_attention import SELECTORS
from cab_attention.options import FORMAN_KEEP_LOWEST_MAXL2
from cab_eval import demo
from cab_eval.evaluate.text import format_selector_spec

FORMAN_LABEL = format_selector_spec("cab", FORMAN_KEEP_LOWEST_MAXL2)


def test_layer_study_on_synthetic_qkv(tmp_path):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 512, 32, generator=g), torch.randn(1, 2, 512, 32, generator=g), torch.randn(1, 2, 512, 32, generator=g)
    rows, study = demo.layer_study(q, k, v, sparsity=0.75, block_size=64, scale=None, needle_blocks=[3], question_block=7)
    want = list(SELECTORS)
    want.insert(2, FORMAN_LABEL)
    assert [r["selector"] for r in rows] == want
    dense = rows[0]
    assert dense["density"] == 1.0 and dense["rel_error"] < 1e-5 and dense["needle_kept"] == 1.0
    assert dense["kept_mass"] == pytest.approx(1.0, abs=1e-6) and dense["same_values_as"] == "-"
    by = {r["selector"]: r for r in rows}
    for r in rows[1:]:
        assert r["density"] < 1.0 and r["rel_error"] > 1e-3 and 0.0 <= r["needle_kept"] <= 1.0
        assert 0.0 < r["kept_mass"] < 1.0
        # The oracle keeps the most mass at the same budget.
        assert r["kept_mass"] <= by["oracle"]["kept_mass"] + 1e-9
    # The per-head masses average to the table's figure, and the picture shows the head where the oracle
    # gains most over streaming.
    for label in ("cab", "streaming", "oracle"):
        assert float(study["head_mass"][label].mean()) == pytest.approx(by[label]["kept_mass"])
    head = demo.picture_head(study["head_mass"])
    gap = study["head_mass"]["oracle"] - study["head_mass"]["streaming"]
    assert gap[head] == gap.max()
    png = demo.plot_masks(study, rows, head=head, sparsity=0.75, needle_blocks=[3], question_block=7,
                          path=tmp_path / "m.png")
    assert png.stat().st_size > 10_000


def test_layer_study_flags_selectors_with_the_same_mask(monkeypatch):
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 2, 256, 16, generator=g), torch.randn(1, 1, 256, 16, generator=g), torch.randn(1, 1, 256, 16, generator=g)
    monkeypatch.setattr(demo, "STUDY_METHODS", (("dense", {}), ("streaming", {}), ("streaming", {"share_kv": True}),
                                                ("oracle", {})))
    rows, _ = demo.layer_study(q, k, v, sparsity=0.5, block_size=32, scale=None, needle_blocks=[1], question_block=7)
    assert [r["same_values_as"] for r in rows] == ["-", "-", "streaming", "-"]


def test_demo_rejects_bad_flags(capsys):
    assert demo.main(["--sparsity", "1.5"]) == 2
    assert "--sparsity" in capsys.readouterr().err


@pytest.mark.model
def test_demo_runs_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--length", "256", "--depths", "0.5", "--layer", "3", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| dense | 0 |" in printed and "| streaming | 0.5 |" in printed and "kept_mass" in printed
    result = json.loads((out / "demo.json").read_text())
    study = result["layer_study"]
    assert study["layer"] == 3 and [r["selector"] for r in study["rows"]][:3] == ["dense", "cab", FORMAN_LABEL]
    assert study["rows"][0]["rel_error"] < 1e-5
    assert {r["method"] for r in result["passkey"]["summary"]} == set(demo.PASSKEY_SELECTORS)
    assert result["cpu_seconds"] > 0
    assert (out / "demo_masks.png").stat().st_size > 10_000
    assert (out / "summary.md").read_text().count("|") > 20
