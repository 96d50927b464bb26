"""EDM2 teachers (flowmap_lit.teachers.edm2): pickles (opt-in) and state dicts of an EDM2 preconditioned
denoiser convert exactly to our velocity per class, with a data scale; missing source modules say how to
get them; and the EDM2-pickles distillation config runs from the command line."""

import pickle
import sys

import numpy as np
import pytest
import torch

from flowmap_lit.teachers.analytic import GaussianData
from flowmap_lit.teachers.edm2 import EDM2Teacher
from tests.helpers import ROOT
from tests.helpers.cli import cli
from tests.helpers.edm2_fake import GaussianEDM2Denoiser

DATA = GaussianData(torch.tensor([[[1.0, -0.5], [0.3, 2.0]]], dtype=torch.float64),
                    torch.tensor([[[0.5, 1.0], [0.2, 0.8]]], dtype=torch.float64))

def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def inputs(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64) * 2, g



MUS = torch.tensor([[[[1.0, -0.5], [0.3, 2.0]]], [[[-1.0, 0.5], [0.0, 1.0]]], [[[0.2, 0.2], [-2.0, 0.0]]]],
                   dtype=torch.float64)  # (3 classes, 1, 2, 2)


def write_edm2_pickle(tmp_path):
    path = tmp_path / "network-snapshot-0000001-0.100.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": GaussianEDM2Denoiser(MUS, DATA.c, 3)}, f)
    return path


def test_edm2_pickle_needs_opt_in_and_an_existing_file(tmp_path):
    path = write_edm2_pickle(tmp_path)
    with pytest.raises(ValueError, match="allow_pickle: true"):
        EDM2Teacher(str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EDM2Teacher(str(tmp_path / "missing.pkl"), allow_pickle=True)


def test_edm2_teacher_gives_the_exact_velocity_per_class(tmp_path):
    teacher = EDM2Teacher(str(write_edm2_pickle(tmp_path)), allow_pickle=True)
    assert teacher.num_classes == 3 and teacher.network is None
    x, g = inputs(60)
    t = 0.01 + 0.98 * torch.rand(60, generator=g, dtype=torch.float64)
    labels = torch.arange(60) % 3
    v = teacher.velocity(x, t, labels)
    exact = torch.cat([GaussianData(MUS[k], DATA.c).velocity(x[labels == k], t[labels == k]) for k in range(3)])
    order = torch.cat([torch.nonzero(labels == k)[:, 0] for k in range(3)])
    assert rel_err(v[order], exact) < 1e-12
    # The null label num_classes is EDM2's class_labels=None input: the all-zero vector.
    teacher.velocity(x[:2], t[:2], torch.tensor([3, 1]))
    seen = teacher.net.denoiser.last_labels
    assert seen.tolist() == [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def test_edm2_data_scale(tmp_path):
    """A denoiser of ``0.5 * x0`` (EDM2's latent std) gives our data's velocity with data_scale 0.5."""
    path = tmp_path / "scaled.pkl"
    path.write_bytes(pickle.dumps({"ema": GaussianEDM2Denoiser(MUS * 0.5, DATA.c * 0.5, 3)}))
    x, g = inputs(16)
    t = 0.02 + 0.96 * torch.rand(16, generator=g, dtype=torch.float64)
    labels = torch.full((16,), 2)
    exact = GaussianData(MUS[2], DATA.c).velocity(x, t)
    assert rel_err(EDM2Teacher(str(path), allow_pickle=True, data_scale=0.5).velocity(x, t, labels), exact) < 1e-12
    assert rel_err(EDM2Teacher(str(path), allow_pickle=True).velocity(x, t, labels), exact) > 1e-1


def test_edm2_state_dict_with_architecture(tmp_path):
    torch.save({"ema": GaussianEDM2Denoiser(MUS, DATA.c, 3).state_dict()}, tmp_path / "edm2.pt")
    arch = GaussianEDM2Denoiser(torch.zeros_like(MUS), torch.ones_like(DATA.c), 3)
    teacher = EDM2Teacher(str(tmp_path / "edm2.pt"), net=arch)
    x, g = inputs(8)
    t = torch.full((8,), 0.3, dtype=torch.float64)
    v = teacher.velocity(x, t, torch.zeros(8, dtype=torch.long))
    assert rel_err(v, GaussianData(MUS[0], DATA.c).velocity(x, t)) < 1e-12


FAKE_SOURCE = """
import torch

class Denoiser(torch.nn.Module):
    label_dim = 0

    def forward(self, x, sigma, class_labels=None):
        return torch.zeros_like(x)
"""


def test_edm2_missing_source_modules_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    src = tmp_path / "edm2"
    src.mkdir()
    (src / "fake_edm2_training.py").write_text(FAKE_SOURCE)
    sys.path.insert(0, str(src))
    import fake_edm2_training

    path = tmp_path / "net.pkl"
    path.write_bytes(pickle.dumps({"ema": fake_edm2_training.Denoiser()}))
    sys.path.remove(str(src))
    del sys.modules["fake_edm2_training"]
    with pytest.raises(ModuleNotFoundError, match="git clone https://github.com/NVlabs/edm2.*source_dir"):
        EDM2Teacher(str(path), allow_pickle=True)
    teacher = EDM2Teacher(str(path), allow_pickle=True, source_dir=str(src))
    x = torch.ones(2, 1, 2, 2)
    t = torch.tensor([0.5, 0.25])
    assert torch.allclose(teacher.velocity(x, t), x / t.view(-1, 1, 1, 1))  # D = 0: v = x_t / t
    monkeypatch.delitem(sys.modules, "fake_edm2_training")


def test_edm2_pickles_config_runs_two_steps_from_fake_pickles(tmp_path, monkeypatch):
    """configs/imagenet512/distill_edm2_pickles.yaml with its teacher and guide pointed at EDM2-style
    pickles written here (the denoiser class is found through source_dir, as EDM2's would be)."""
    from flowmap_lit.data import write_dataset

    g = torch.Generator().manual_seed(0)
    mus = torch.randn(10, 4, 8, 8, generator=g)
    for name, scale in (("teacher", 1.0), ("guide", 1.5)):
        with open(tmp_path / f"{name}.pkl", "wb") as f:
            pickle.dump({"ema": GaussianEDM2Denoiser(0.5 * mus, 0.5 * scale * torch.ones(4, 8, 8), 10)}, f)
    rng = np.random.default_rng(0)
    split = (rng.standard_normal((16, 4, 8, 8)).astype(np.float32), rng.integers(0, 10, 16))
    write_dataset(str(tmp_path / "latents"), {"train": split, "val": split}, num_classes=10, samples_per_shard=8)
    monkeypatch.chdir(tmp_path)
    student = ("{img_channels: 4, img_resolution: 8, num_classes: 10, model_channels: 16, channel_mult: [1, 2], "
               "num_blocks: 1, attn_resolutions: [4]}")
    args = ["fit", "--config", str(ROOT / "configs/imagenet512/distill_edm2_pickles.yaml"),
            "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.num_nodes", "1", "--trainer.strategy", "auto", "--trainer.precision", "32-true",
            "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--model.init_args.student.init_args", student, "--model.init_args.num_classes", "10",
            "--model.init_args.activation_checkpointing", "false",
            "--data.init_args.root", str(tmp_path / "latents"), "--data.init_args.expected_shape", "[4, 8, 8]",
            "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"]
    for name in ("teacher", "guide"):
        args += [f"--model.init_args.{name}.init_args.path", str(tmp_path / f"{name}.pkl"),
                 f"--model.init_args.{name}.init_args.source_dir", str(ROOT)]  # where tests.helpers.edm2_fake is
    run = cli(*args)
    assert run.trainer.global_step == 2
    module = run.model
    assert isinstance(module.teacher, EDM2Teacher) and isinstance(module.guide, EDM2Teacher)
    assert module.teacher.data_scale == 0.5 and module.guidance == "autoguidance"
