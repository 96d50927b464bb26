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


FIXTURE = ROOT / "tests/fixtures/v0/distill.ckpt"  # guidance-conditioned on lam in [1, 2]


@pytest.mark.parametrize("command", [["sample", "--steps", "0"], ["sample", "--num", "0"],
                                     ["evaluate", "--num-samples", "0"], ["evaluate", "--num", "1"],
                                     ["diagnose", "--steps", "2", "-1"], ["schedule", "--steps", "x"]])
def test_numbers_out_of_range_are_refused_with_the_projects_message(command, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--ckpt", str(FIXTURE)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert ("is below" in err or "is not a step count" in err) and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_guidance_outside_the_trained_range_warns_with_the_range(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the fixture names its teacher relative to the repository
    main(["sample", "--ckpt", str(FIXTURE), "--steps", "1", "--num", "2", "--guidance", "7.5",
          "--out", str(tmp_path / "out")])
    assert "--guidance 7.5 is outside [1, 2]" in capsys.readouterr().err
    main(["sample", "--ckpt", str(FIXTURE), "--steps", "1", "--num", "2", "--guidance", "1.5",
          "--out", str(tmp_path / "in")])
    assert "outside" not in capsys.readouterr().err


def test_a_corrupt_export_names_the_file_and_the_fix(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    from flowmap_lit.export import WEIGHTS, load_flowmap

    monkeypatch.chdir(ROOT)
    out = main(["export", "--ckpt", str(FIXTURE), "--out", str(tmp_path / "exported")])
    (out / WEIGHTS).write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=f"{WEIGHTS} is not a readable safetensors file.*python -m flowmap_lit export"):
        load_flowmap(out)
