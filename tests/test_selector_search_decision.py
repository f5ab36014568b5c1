"""The selector-search decision in docs/results.md is reproducible: the committed decision.md equals what
scripts/selector_search_decision.py prints from the committed run files, and it names no winner."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "results" / "gpu-2026-12-04-evening"


def test_committed_decision_equals_the_script_output(capsys):
    spec = importlib.util.spec_from_file_location("selector_search_decision", ROOT / "scripts" / "selector_search_decision.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = [f"--recall=gemma3:16384={RUN}/recall-gemma3/16384/recall.csv",
            f"--recall=gemma3:32768={RUN}/recall-gemma3/32768/recall.csv",
            f"--recall=smollm2:8192={RUN}/recall-smollm2/8192/recall.csv",
            f"--ruler=gemma3={RUN}/ruler-gemma3/ruler_trials_rescored.csv",
            f"--ruler=smollm2={RUN}/ruler-smollm2/ruler_trials_rescored.csv"]
    assert mod.main(argv) == 0
    out = capsys.readouterr().out
    assert out == (RUN / "decision.md").read_text()
    assert "Rule 1 winners: none" in out
