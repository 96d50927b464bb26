"""``python -m flowmap_lit schedule`` tunes k-step grids of a fitted checkpoint; sample, evaluate, diagnose
and export read them, and the exported flow map samples bit for bit like the checkpoint, without Lightning."""

import json
import subprocess
import sys

import pytest
import torch

from flowmap_lit.grids import load_schedules
from tests.helpers import ROOT
from tests.helpers.cli import cli


def test_schedule_command_then_sample_evaluate_and_export_read_its_grids(quickstart, tmp_path, capsys):
    from flowmap_lit.checkpoints import load_module
    from flowmap_lit.export import load_flowmap

    ckpt = quickstart.ckpt
    out = tmp_path / "schedules.json"
    result = cli("schedule", "--ckpt", ckpt, "--steps", "2", "4", "--budget", "10", "--num", "64",
                 "--reference-steps", "16", "--out", out)
    assert result["path"] == str(out)
    scheds = load_schedules(out)
    assert sorted(scheds) == [2, 4]
    report = json.loads(out.read_text())["held_out"]
    for k in ("2", "4"):
        assert report[k]["tuned"] <= min(report[k]["uniform"], report[k]["edm"])

    rows = cli("evaluate", "--ckpt", ckpt, "--steps", "4", "--num", "50", "--no-fid", "--reference-steps", "8",
               "--schedules", out)
    assert rows[0]["flowmap_rel_error"] > 0
    cli("export", "--ckpt", ckpt, "--out", tmp_path / "exported", "--schedules", out)
    diag = cli("diagnose", "--ckpt", ckpt, "--steps", "4", "--num", "16", "--times", "1", "0.5", "0",
               "--reference-steps", "8", "--schedules", out)
    assert diag["paths"][0]["schedule"] == pytest.approx(scheds[4][0].tolist())  # the tuned path is decomposed
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli("schedule", "--help")
    assert exit_.value.code == 0 and "--criterion" in capsys.readouterr().out

    # Loading an export needs no Lightning: checked in a fresh interpreter, where nothing imported it yet.
    probe = ("import sys, flowmap_lit; fm = flowmap_lit.load_flowmap(sys.argv[1]); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'jsonargparse')))")
    proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "exported")], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]

    module = load_module(str(ckpt))
    module.set_schedules(str(out))
    fm = load_flowmap(tmp_path / "exported")
    noise = torch.randn(24, *fm.shape, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(24) % 10
    for k in (1, 2, 4, 8):  # tuned grids at 2 and 4, uniform at 1 and 8: bit for bit the checkpoint's samples
        assert torch.equal(fm.sample(noise, labels, steps=k), module.sample(noise, labels, num_steps=k)), k
    for gamma in (0.5, 1.0):  # gamma sampling with the same generator
        a = fm.sample(noise, labels, steps=4, gamma=gamma, generator=torch.Generator().manual_seed(1))
        b = module.sample(noise, labels, num_steps=4, gamma=gamma, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b)
    assert torch.allclose(fm.denormalize(noise), module.data_info["std"][0] * noise + module.data_info["mean"][0])
    with pytest.raises(ValueError, match="class-conditional"):
        fm.sample(noise, None, steps=1)
