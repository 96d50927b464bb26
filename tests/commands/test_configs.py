"""The shipped configs: the second-dataset quickstart keeps every setting of the quickstart, and the
ImageNet-512 config prints a runnable config and builds its EDM2-S student/teacher and EDM2-XS guide (on
the meta device: no memory, no weights) with the published parameter counts."""

import sys
from unittest import mock

import pytest
import torch
import yaml

from flowmap_lit.commands.train import FlowMapCLI
from flowmap_lit.networks import build_network
from tests.helpers import ROOT
from tests.helpers.cli import cli

IMAGENET = ROOT / "configs/imagenet512/distill_ayf_emd_s.yaml"

# What names the data (paths, shapes, class count, log/checkpoint names), and nothing else.
DATA_KEYS = {
    "trainer.logger.init_args.name",
    "trainer.callbacks.2.init_args.feature_path",
    "trainer.callbacks.4.init_args.dirpath",
    "model.init_args.teacher.init_args.data_root",
    "model.init_args.guide.init_args.data_root",
    "model.init_args.student.init_args.img_channels",
    "model.init_args.student.init_args.num_classes",
    "model.init_args.num_classes",
    "data.class_path",
    "data.init_args.root",
}


def flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in flatten(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


def test_shapes_quickstart_differs_only_in_the_data():
    base = flatten(yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text()))
    shapes = flatten(yaml.safe_load((ROOT / "configs/shapes/quickstart.yaml").read_text()))
    assert base.keys() == shapes.keys()
    differ = {k for k in base if base[k] != shapes[k]}
    assert differ == DATA_KEYS, sorted(differ ^ DATA_KEYS)
    assert shapes["data.class_path"] == "flowmap_lit.data.ShapesDataModule"


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_imagenet_print_config_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli("fit", "--config", IMAGENET, "--print_config")
    assert not exit_.value.code
    printed = capsys.readouterr().out
    assert "ModelParallelStrategy" in printed and "precision: bf16-mixed" in printed
    fid = printed[printed.index("flowmap_lit.callbacks.FewStepFID"):]
    fid = fid[:fid.index("class_path", 10)]
    for setting in ("- inception", "- dinov2", "vae: /models/sd-vae-ft-mse", "num_samples: 10000"):
        assert setting in fid, setting  # decoding and both feature networks


RANDOM_WEIGHTS = """\
model:
  init_args:
    teacher: {init_args: {checkpoint: null}}
    guide: {init_args: {checkpoint: null}}
"""


def test_imagenet_models_instantiate_on_the_meta_device_with_edm2_sizes(tmp_path):
    # Random-weight teacher and guide (checkpoint: null), CPU trainer: only the model sizes are checked here.
    (tmp_path / "random.yaml").write_text(RANDOM_WEIGHTS)
    args = ["--config", str(IMAGENET), "--config", str(tmp_path / "random.yaml"), "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.logger", "false"]
    with torch.device("meta"), mock.patch.object(sys, "argv", sys.argv[:1]):
        built = FlowMapCLI(args=args, run=False)
    module = built.model
    teacher, guide, student = count(module.teacher), count(module.guide), count(module.student)
    with torch.device("meta"):
        assert teacher == count(build_network("unet", "s")) and guide == count(build_network("unet", "xs"))
    assert round(teacher / 1e6, 1) == 282.3 and student == teacher  # EDM2-S (280M published)
    assert round(guide / 1e6, 1) == 125.6  # EDM2-XS (125M published)
    assert all(p.is_meta for p in module.parameters())
    assert module.activation_checkpointing and module.shard_teacher
    assert built.datamodule.batch_size == 32 and built.datamodule.expected_shape == (4, 64, 64)
