"""The ImageNet-512 config: prints a runnable config, and builds its EDM2-S student/teacher and
EDM2-XS guide (on the meta device: no memory, no weights) with the published parameter counts."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from flowmap_lit.cli import FlowMapCLI
from flowmap_lit.networks import build_network

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/imagenet512/distill_ayf_emd_s.yaml"


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_print_config_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "flowmap_lit", "fit", "--config", str(CONFIG), "--print_config"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ModelParallelStrategy" in proc.stdout and "precision: bf16-mixed" in proc.stdout
    fid = proc.stdout[proc.stdout.index("flowmap_lit.callbacks.FewStepFID"):]
    fid = fid[:fid.index("class_path", 10)]
    for setting in ("- inception", "- dinov2", "vae: /models/sd-vae-ft-mse", "num_samples: 10000"):
        assert setting in fid, setting  # decoding and both feature networks


RANDOM_WEIGHTS = """\
model:
  init_args:
    teacher: {init_args: {checkpoint: null}}
    guide: {init_args: {checkpoint: null}}
"""


def test_models_instantiate_on_the_meta_device_with_edm2_sizes(tmp_path):
    # Random-weight teacher and guide (checkpoint: null), CPU trainer: only the model sizes are checked here.
    (tmp_path / "random.yaml").write_text(RANDOM_WEIGHTS)
    args = ["--config", str(CONFIG), "--config", str(tmp_path / "random.yaml"), "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.logger", "false"]
    with torch.device("meta"):
        cli = FlowMapCLI(args=args, run=False)
    module = cli.model
    teacher, guide, student = count(module.teacher), count(module.guide), count(module.student)
    with torch.device("meta"):
        assert teacher == count(build_network("unet", "s")) and guide == count(build_network("unet", "xs"))
    assert round(teacher / 1e6, 1) == 282.3 and student == teacher  # EDM2-S (280M published)
    assert round(guide / 1e6, 1) == 125.6  # EDM2-XS (125M published)
    assert all(p.is_meta for p in module.parameters())
    assert module.activation_checkpointing and module.shard_teacher
    assert cli.datamodule.batch_size == 32 and cli.datamodule.expected_shape == (4, 64, 64)
