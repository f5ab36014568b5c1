"""The ``cab`` command line: help lists every command, unknown commands exit 2, and the old import
paths of the measurement code still work (deprecated)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cab_eval import cli

ROOT = Path(__file__).resolve().parents[1]


def all_commands():
    return [f"{g} {name}".strip() for g, cmds in cli.COMMANDS.items() for name in cmds]


def test_help_lists_every_command_with_a_line(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for full in all_commands():
        line = next(ln for ln in out.splitlines() if ln.split()[: len(full.split())] == full.split())
        assert len(line.split()) > len(full.split()) + 2, line  # a description follows the name
    assert set(all_commands()) >= {"demo", "eval bridge", "eval passkey", "eval recall", "eval ppl",
                                   "bench predictor", "bench attention", "bench nsa"}


@pytest.mark.parametrize("group", ["eval", "bench"])
def test_group_help_lists_its_commands(group, capsys):
    assert cli.main([group, "--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, desc) in cli.COMMANDS[group].items():
        assert f"{group} {name}" in out and desc in out
    others = [g for g in cli.COMMANDS if g not in ("", group)]
    assert not any(f"{g} {n}" in out for g in others for n in cli.COMMANDS[g])


@pytest.mark.parametrize("argv", [[], ["nope"], ["eval"], ["eval", "nope"], ["bench", "predictr"]])
def test_unknown_or_missing_command_exits_2_with_the_list(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: cab" in err and ("eval passkey" in err or "bench predictor" in err)
    if argv[-1:] in (["nope"], ["predictr"]):
        assert f"unknown command {argv[-1]!r}" in err


def test_command_help_comes_from_the_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "passkey", "--help"])
    assert e.value.code == 0 and "--resume" in capsys.readouterr().out


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "cab_eval.cli", "eval", "--help"], capture_output=True, text=True,
                       cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert r.returncode == 0 and "eval recall" in r.stdout


def test_old_import_paths_are_deprecated_aliases_of_the_same_modules():
    code = (
        "import warnings, sys\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "import cab_attention\n"
        "assert 'cab_eval' not in sys.modules and 'matplotlib' not in sys.modules\n"
        "for old in ('cab_attention.evaluate', 'cab_attention.benchmark', 'cab_attention.demo', 'cab_attention.cli'):\n"
        "    try:\n"
        "        __import__(old)\n"
        "    except DeprecationWarning as e:\n"
        "        assert 'cab_eval' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit(old + ' did not warn')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert r.returncode == 0, r.stderr

    with pytest.warns(DeprecationWarning) if "cab_attention.evaluate" not in sys.modules else _nothing():
        import cab_attention.evaluate.passkey as old_passkey
    import cab_attention.benchmark.summary as old_summary
    import cab_eval.benchmark.summary as new_summary
    import cab_eval.evaluate.passkey as new_passkey
    from cab_attention.cli import main as old_main
    from cab_attention.evaluate.report import wilson

    assert old_passkey is new_passkey and old_summary is new_summary and old_main is cli.main
    assert new_passkey.__spec__.name == "cab_eval.evaluate.passkey"  # the real module keeps its own spec
    assert wilson(1, 2) == pytest.approx(new_passkey.wilson(1, 2))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
