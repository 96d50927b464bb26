"""Old paths keep working after the package was laid out anew.

- every ``class_path`` that configs, stored checkpoints or older configs name resolves to the class
  the new layout defines (the same object);
- checkpoints written by the previous layout (``tests/fixtures/v0``, see its README) load in
  ``sample``, ``evaluate``, ``export`` and as a ``NetworkTeacher``;
- importing an old module gives the new module's objects, and ``python -m OLD`` of a former
  command runs the new command with a note.
"""

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmap_lit._moved import MOVED

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests/fixtures/v0"

#: class paths of the previous layout (configs and checkpoints written before the move) -> new home
OLD_CLASS_PATHS = {
    "flowmap_lit.modules.FlowMapDistillModule": "flowmap_lit.modules.distill.FlowMapDistillModule",
    "flowmap_lit.modules.FlowMatchingModule": "flowmap_lit.modules.pretrain.FlowMatchingModule",
    "flowmap_lit.finetune.AdversarialFinetuneModule": "flowmap_lit.modules.finetune.AdversarialFinetuneModule",
    "flowmap_lit.time_sampling.TimePairSampler": "flowmap_lit.time_pairs.TimePairSampler",
    "flowmap_lit.teachers.external.EDM2Teacher": "flowmap_lit.teachers.edm2.EDM2Teacher",
    "flowmap_lit.teachers.external.DiffusersTeacher": "flowmap_lit.teachers.diffusers_models.DiffusersTeacher",
    "flowmap_lit.teachers.external.SchedulerTeacher": "flowmap_lit.teachers.diffusers_models.SchedulerTeacher",
    "flowmap_lit.teachers.base.Teacher": "flowmap_lit.teachers.base.Teacher",
    "flowmap_lit.teachers.NetworkTeacher": "flowmap_lit.teachers.network.NetworkTeacher",
    "flowmap_lit.teachers.GMMTeacher": "flowmap_lit.teachers.mixture.GMMTeacher",
    "flowmap_lit.pipeline.FlowMapPipeline": "flowmap_lit.diffusers_pipeline.FlowMapPipeline",
    "flowmap_lit.schedule.load_schedules": "flowmap_lit.grids.load_schedules",
    "flowmap_lit.schedule.search_grid": "flowmap_lit.grid_search.search_grid",
    "flowmap_lit.sampling.gamma_sample": "flowmap_lit.solvers.gamma_sample",
    "flowmap_lit.consolidate.load_distributed_checkpoint":
        "flowmap_lit.checkpoints.sharded.load_distributed_checkpoint",
    "flowmap_lit.data.pipeline.ShardError": "flowmap_lit.data.stream.ShardError",
}


def resolve(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("old", sorted(OLD_CLASS_PATHS))
def test_old_class_paths_resolve_to_the_new_objects(old):
    if "diffusers_pipeline" in OLD_CLASS_PATHS[old]:
        pytest.importorskip("diffusers")
    assert resolve(old) is resolve(OLD_CLASS_PATHS[old])


def test_every_moved_module_resolves_and_configs_name_current_paths():
    for old, (targets, _) in MOVED.items():
        if "diffusers_pipeline" in targets:
            continue  # needs diffusers; covered above
        module = importlib.import_module(old)
        assert module.__moved_to__ == targets
    stale = [p for p in ROOT.joinpath("configs").rglob("*.yaml")
             if any(f"class_path: {old}." in p.read_text() for old in MOVED)]
    assert not stale, f"configs naming old module paths: {stale}"


def test_a_module_that_is_no_command_says_where_its_names_went():
    proc = subprocess.run([sys.executable, "-m", "flowmap_lit.time_sampling"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "flowmap_lit.time_pairs" in proc.stderr


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from flowmap_lit.data import prepare_digits

    root = tmp_path_factory.mktemp("digits") / "digits"
    prepare_digits(str(root))
    return root


def test_old_checkpoints_load_as_teacher_and_module():
    from flowmap_lit.checkpoints import load_checkpoint, load_module
    from flowmap_lit.modules import FlowMapDistillModule
    from flowmap_lit.teachers import NetworkTeacher
    from flowmap_lit.time_pairs import TimePairSampler

    ckpt = load_checkpoint(FIXTURES / "distill.ckpt")
    assert ckpt["hyper_parameters"]["time_sampler"]["class_path"] == "flowmap_lit.time_sampling.TimePairSampler"
    teacher = NetworkTeacher(str(FIXTURES / "teacher.ckpt"))
    shadow = load_checkpoint(FIXTURES / "teacher.ckpt")["callbacks"]["EMA"]["shadow"]
    name = next(iter(shadow))
    assert torch.equal(teacher.net.state_dict()[name], shadow[name])  # EMA weights by default
    module = load_module(str(FIXTURES / "distill.ckpt"))  # its teacher path is relative to the repository
    assert isinstance(module, FlowMapDistillModule) and isinstance(module.time_sampler, TimePairSampler)
    x = module.sample(torch.randn(4, 1, 8, 8), torch.arange(4), num_steps=2)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


def test_old_checkpoint_runs_sample_evaluate_and_export(digits, tmp_path, monkeypatch):
    from flowmap_lit.cli import main
    from flowmap_lit.export import load_flowmap

    monkeypatch.chdir(ROOT)  # the checkpoint names its teacher relative to the repository
    ckpt = str(FIXTURES / "distill.ckpt")
    paths = main(["sample", "--ckpt", ckpt, "--steps", "1", "2", "--num", "6", "--out", str(tmp_path / "samples")])
    arrays = np.load(tmp_path / "samples/samples.npz")
    assert set(paths) == {1, 2} and arrays["x_2step"].shape == (6, 1, 8, 8)

    rows = main(["evaluate", "--ckpt", ckpt, "--steps", "1", "--num", "20", "--no-fid", "--reference-steps", "4",
                 "--data", str(digits), "--device", "cpu"])
    assert [r["steps"] for r in rows] == [1] and np.isfinite(rows[0]["flowmap_rel_error"])

    out = main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "exported")])
    flowmap = load_flowmap(out)
    from flowmap_lit.checkpoints import load_module

    module = load_module(ckpt)
    noise, labels = torch.randn(3, 1, 8, 8), torch.arange(3)
    assert torch.equal(flowmap.sample(noise, labels, steps=2), module.sample(noise, labels, num_steps=2))
