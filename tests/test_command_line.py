"""One command line: ``python -m flowmap_lit COMMAND`` and ``flowmap-lit COMMAND`` for every command."""

import importlib
import importlib.metadata
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from flowmap_lit.cli import COMMANDS, TRAINING, main

ROOT = Path(__file__).resolve().parents[1]
EVERY = ["fit", "validate", "test", "predict", "sample", "evaluate", "diagnose", "schedule", "export", "consolidate",
         "prepare", "reference", "classifier"]


def test_the_registry_holds_every_command_and_each_module_has_main():
    assert [*TRAINING, *COMMANDS] == EVERY
    for module, _ in COMMANDS.values():
        assert module.startswith("flowmap_lit.commands.") and callable(importlib.import_module(module).main)


def test_both_spellings_are_one_entry_point():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("flowmap-lit") == "flowmap_lit.cli:main"
    assert "from flowmap_lit.cli import main" in (ROOT / "flowmap_lit/__main__.py").read_text()


@pytest.mark.parametrize("spelling", [[sys.executable, "-m", "flowmap_lit"], ["flowmap-lit"]])
def test_help_lists_every_command(spelling):
    try:
        proc = subprocess.run([*spelling, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    except FileNotFoundError:
        pytest.skip("the flowmap-lit script is not on PATH (package not installed)")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert listed == EVERY


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
@pytest.mark.parametrize("command", EVERY)
def test_each_command_has_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out.lower()
    if command in COMMANDS:
        assert f"python -m flowmap_lit {command}" in out  # each command names itself in the one form


def test_unknown_command_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["smaple"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown command 'smaple'" in err and "sample" in err


FORMER = [("flowmap_lit.schedule", "schedule"), ("flowmap_lit.consolidate", "consolidate"),
          ("flowmap_lit.metrics.reference", "reference"), ("flowmap_lit.export", "export"),
          ("flowmap_lit.data.prepare", "prepare"), ("flowmap_lit.metrics.digits_classifier", "classifier")]


@pytest.mark.parametrize("old, command", FORMER)
@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")
def test_former_module_commands_run_the_command_with_a_note(old, command, capsys, monkeypatch):
    """``python -m OLD --help`` as runpy runs it (a moved module, or a module's ``__main__`` block)."""
    monkeypatch.setattr(sys, "argv", [old, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(old, run_name="__main__", alter_sys=False)
    assert exit_.value.code == 0
    out, err = capsys.readouterr()
    assert f"python -m flowmap_lit {command}" in err and f"python -m flowmap_lit {command}" in out
