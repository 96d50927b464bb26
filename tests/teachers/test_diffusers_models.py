"""Teachers from diffusers models (flowmap_lit.teachers.diffusers_models) convert exactly to our velocity.

Exact oracles: on Gaussian data ``N(mu, diag(c^2))`` every parameterization (diffusers epsilon / v / sample
prediction at a VP timestep, flow-matching velocity) is known in closed form, so the converted teacher must
reproduce ``GaussianData.velocity`` (docs/design.md section 6) to round-off. Then loading a diffusers
pipeline directory, and the DiT distillation config from the command line.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from flowmap_lit.interpolant import expand_like
from flowmap_lit.teachers.analytic import GaussianData
from flowmap_lit.teachers.diffusers_models import (
    DiffusersTeacher,
    DiscreteVPConvention,
    FlowMatchConvention,
    SchedulerTeacher,
    convention_from_scheduler,
)
from tests.helpers import ROOT
from tests.helpers.cli import cli

diffusers = pytest.importorskip("diffusers")

DATA = GaussianData(torch.tensor([[[1.0, -0.5], [0.3, 2.0]]], dtype=torch.float64),
                    torch.tensor([[[0.5, 1.0], [0.2, 0.8]]], dtype=torch.float64))
SCHEDULERS = {  # the beta schedules diffusers offers, with the scheduler classes that use them
    "ddpm_linear": lambda: diffusers.DDPMScheduler(beta_schedule="linear"),
    "ddim_scaled_linear": lambda: diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                          beta_end=0.012),
    "ddpm_cosine": lambda: diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


class ExactDiffusersModel(nn.Module):
    """The exact prediction of Gaussian data, called like a diffusers model.

    VP (``scheduler`` has ``alphas_cumprod``): at timestep ``k`` the input is
    ``x = alpha x0 + s eps`` with ``sigma_k = s / alpha = sqrt((1 - abar_k) / abar_k)``; then
    ``E[eps | x] = s / V (x - alpha mu)`` and ``E[x0 | x] = mu + alpha c^2 / V (x - alpha mu)``,
    ``V = alpha^2 c^2 + s^2``. A fractional ``k`` reads ``log sigma`` linearly interpolated in ``k``
    (the continuous schedule a float timestep means). Flow matching: ``t = k / N`` and the output is
    the velocity itself. ``data_scale`` scales the data (the model's data is ``a * x0``).
    """

    def __init__(self, scheduler, prediction: str, learned_sigma: bool = False, data_scale: float = 1.0):
        super().__init__()
        self.prediction, self.learned_sigma = prediction, learned_sigma
        self.data = GaussianData(DATA.mu * data_scale, DATA.c * data_scale)
        self.flow = not hasattr(scheduler, "alphas_cumprod")
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        if not self.flow:
            abar = scheduler.alphas_cumprod.double()
            self.log_sigma_of_step = 0.5 * torch.log((1 - abar) / abar)

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        k = torch.as_tensor(timestep, dtype=torch.float64).expand(sample.shape[0])
        if self.flow:
            out = self.data.velocity(sample, k / self.num_train_timesteps)
        else:
            lo = k.floor().clamp(0, len(self.log_sigma_of_step) - 2).long()
            table = self.log_sigma_of_step
            sigma = torch.exp(table[lo] + (k - lo) * (table[lo + 1] - table[lo]))
            alpha = expand_like(1 / torch.sqrt(1 + sigma**2), sample)
            s = expand_like(sigma, sample) * alpha
            mu, c2 = self.data.mu.to(sample.dtype), self.data.c.to(sample.dtype) ** 2
            var = alpha**2 * c2 + s**2
            resid = sample - alpha * mu
            eps, x0 = s / var * resid, mu + alpha * c2 / var * resid
            out = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - s * x0}[self.prediction]
        if self.learned_sigma:  # DiT-style: variance channels after the mean prediction
            out = torch.cat([out, torch.full_like(out, 7.0)], 1)
        return SimpleNamespace(sample=out) if return_dict else (out,)


def inputs(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64) * 2, g


def table_times(scheduler, steps):
    abar = scheduler.alphas_cumprod.double()[steps]
    sigma = torch.sqrt((1 - abar) / abar)
    return sigma / (1 + sigma)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_vp_model_inputs_match_diffusers_add_noise(name):
    sched = SCHEDULERS[name]()
    conv = convention_from_scheduler(sched)
    steps = torch.tensor([0, 1, 10, 250, 500, 900, 998, 999])
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(len(steps), 4, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = table_times(sched, steps)
    x_t = (1 - expand_like(t, x0)) * x0 + expand_like(t, x0) * noise
    x_in, timestep = conv.model_inputs(x_t, t)
    assert rel_err(x_in, sched.add_noise(x0, noise, steps)) < 1e-12
    assert (timestep - steps.double()).abs().max().item() < 1e-8


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_vp_predictions_convert_to_the_exact_velocity(name, prediction):
    sched = SCHEDULERS[name]()
    x, g = inputs()
    conv = DiscreteVPConvention(sched.alphas_cumprod, prediction)
    teacher = SchedulerTeacher(ExactDiffusersModel(sched, prediction), conv)
    # Integer timesteps: t_k from the table, the model reads abar_k directly.
    t = table_times(sched, torch.randint(0, 1000, (len(x),), generator=g))
    assert rel_err(teacher.velocity(x, t), DATA.velocity(x, t)) < 1e-10
    # Fractional timesteps: the model reads log sigma interpolated in k, the convention finds k by
    # interpolating k in log sigma. Not circular: the two interpolations run in opposite directions
    # (so this checks they are inverse), and the output conversion uses our exact sigma = t / (1 - t),
    # never the timestep, so a wrong output formula is still caught.
    t = conv.t_min + (conv.t_max - conv.t_min) * torch.rand(len(x), generator=g, dtype=torch.float64)
    exact = DATA.velocity(x, t)
    assert rel_err(teacher.velocity(x, t), exact) < 1e-10
    wrong_type = {"epsilon": "v_prediction", "v_prediction": "sample", "sample": "epsilon"}[prediction]
    wrong = SchedulerTeacher(ExactDiffusersModel(sched, prediction),
                             DiscreteVPConvention(sched.alphas_cumprod, wrong_type))
    assert rel_err(wrong.velocity(x, t), exact) > 1e-2


def test_vp_clamps_time_to_the_table_and_drops_learned_sigma_channels():
    sched = SCHEDULERS["ddpm_linear"]()
    conv = convention_from_scheduler(sched)
    assert conv.t_min == pytest.approx(0.01 / 1.01, rel=1e-3) and 0.99 < conv.t_max < 0.995
    teacher = SchedulerTeacher(ExactDiffusersModel(sched, "epsilon", learned_sigma=True), conv)
    x, _ = inputs(8)
    for t, edge in ((1.0, conv.t_max), (1e-4, conv.t_min)):
        t_b = torch.full((8,), t, dtype=torch.float64)
        assert rel_err(teacher.velocity(x, t_b), DATA.velocity(x, torch.full_like(t_b, edge))) < 1e-10
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DiscreteVPConvention(sched.alphas_cumprod, "v")


def test_flow_match_convention_is_ours():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)  # shift moves only the sampling grid
    conv = convention_from_scheduler(sched)
    assert isinstance(conv, FlowMatchConvention)
    g = torch.Generator().manual_seed(2)
    idx = torch.tensor([0, 3, 400, 999])
    x0 = torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sigma = sched.sigmas[idx].double()
    x_t = (1 - expand_like(sigma, x0)) * x0 + expand_like(sigma, x0) * noise
    x_in, timestep = conv.model_inputs(x_t, sigma)
    for i in range(4):  # diffusers' own noising at its own timesteps
        ref = sched.scale_noise(x0[i:i + 1], sched.timesteps[idx[i]].reshape(1), noise[i:i + 1])
        assert rel_err(x_in[i:i + 1], ref) < 1e-6
    assert torch.allclose(timestep, sched.timesteps[idx].double(), atol=1e-3)
    x, g = inputs()
    t = torch.rand(len(x), generator=g, dtype=torch.float64)
    exact = DATA.velocity(x, t)
    teacher = SchedulerTeacher(ExactDiffusersModel(sched, "flow"), conv)
    assert rel_err(teacher.velocity(x, t), exact) < 1e-12
    misread = SchedulerTeacher(ExactDiffusersModel(sched, "flow"),
                               DiscreteVPConvention(SCHEDULERS["ddpm_linear"]().alphas_cumprod, "epsilon"))
    assert rel_err(misread.velocity(x, t.clamp(0.05, 0.95)), exact) > 1e-2


@pytest.mark.parametrize("kind", ["flow", "epsilon"])
def test_data_scale_is_an_exact_change_of_time(kind):
    """A teacher trained on ``a * x0`` (e.g. SD-VAE latents times 0.18215) gives our data's velocity."""
    a = 0.18215
    sched = diffusers.FlowMatchEulerDiscreteScheduler() if kind == "flow" else SCHEDULERS["ddpm_linear"]()
    model = ExactDiffusersModel(sched, kind, data_scale=a)
    teacher = SchedulerTeacher(model, convention_from_scheduler(sched), data_scale=a)
    x, g = inputs()
    t = 0.05 + 0.9 * torch.rand(len(x), generator=g, dtype=torch.float64)
    assert rel_err(teacher.velocity(x, t), DATA.velocity(x, t)) < 1e-10
    unscaled = SchedulerTeacher(model, convention_from_scheduler(sched))
    assert rel_err(unscaled.velocity(x, t), DATA.velocity(x, t)) > 1e-1


def tiny_dit(num_classes=10):
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes,
                                           norm_num_groups=1)


def save_pipeline(root, model, scheduler, sub):
    model.save_pretrained(root / sub)
    scheduler.save_pretrained(root / "scheduler")
    return root


def direct_velocity(model, conv, x, t, labels, channels=4):
    x_in, timestep = conv.model_inputs(x, t)
    out = model(x_in, timestep.float(), class_labels=labels).sample[:, :channels]
    return conv.to_velocity(out, x, t)


def test_diffusers_dit_pipeline_directory(tmp_path):
    model = tiny_dit()
    root = save_pipeline(tmp_path / "dit", model, diffusers.DDIMScheduler(beta_schedule="linear"), "transformer")
    teacher = DiffusersTeacher(str(root))
    assert teacher.num_classes == 10 and teacher.network is None and not teacher.net.training
    assert all(not p.requires_grad for p in teacher.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.05, 0.3, 0.6, 0.9, 1.0])
    labels = torch.tensor([0, 3, 9, 10, 2, 10])  # 10 = the null class of CFG
    conv = convention_from_scheduler(diffusers.DDIMScheduler(beta_schedule="linear"))
    with torch.no_grad():
        ref = direct_velocity(model.eval(), conv, x, conv.clamp_time(t), labels)
        assert rel_err(teacher.velocity(x, t, labels), ref) < 1e-5
    # A DiT saved under the older class name loads as a DiT too.
    cfg = root / "transformer/config.json"
    cfg.write_text(cfg.read_text().replace('"DiTTransformer2DModel"', '"Transformer2DModel"'))
    with torch.no_grad():
        assert rel_err(DiffusersTeacher(str(root)).velocity(x, t, labels), ref) < 1e-5


def test_diffusers_unet_with_v_prediction_and_class_labels(tmp_path):
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 8),
                                  layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=5)
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    root = save_pipeline(tmp_path / "unet_pipe", model, sched, "unet")
    teacher = DiffusersTeacher(str(root), num_classes=4)  # the 5th embedding is the null class here
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.2, 0.5, 0.8])
    labels = torch.tensor([0, 4, 2])
    conv = convention_from_scheduler(sched)
    assert conv.prediction_type == "v_prediction"
    with torch.no_grad():
        ref = direct_velocity(model.eval(), conv, x, t, labels)
        assert rel_err(teacher.velocity(x, t, labels), ref) < 1e-5
        no_null = DiffusersTeacher(str(root / "unet"), scheduler=str(root / "scheduler/scheduler_config.json"))
        with pytest.raises(ValueError, match="no null class"):
            no_null.velocity(x, t, torch.tensor([0, 5, 2]))


def test_diffusers_missing_directories_say_how_to_get_the_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        DiffusersTeacher(str(tmp_path / "DiT-XL-2-256"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        DiffusersTeacher(str(tmp_path / "empty"))
    tiny_dit().save_pretrained(tmp_path / "only_model/transformer")
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        DiffusersTeacher(str(tmp_path / "only_model"))


def test_distill_dit_config_runs_two_steps_on_a_tiny_dit(tmp_path, monkeypatch):
    from flowmap_lit.data import write_dataset

    save_pipeline(tmp_path / "dit", tiny_dit(), diffusers.DDIMScheduler(beta_schedule="linear"), "transformer")
    rng = np.random.default_rng(0)
    split = (rng.standard_normal((16, 4, 8, 8)).astype(np.float32) * 5, rng.integers(0, 10, 16))
    write_dataset(str(tmp_path / "latents"), {"train": split, "val": split}, num_classes=10, samples_per_shard=8)
    monkeypatch.chdir(tmp_path)
    student = ("{img_channels: 4, img_resolution: 8, patch_size: 2, hidden_size: 32, depth: 1, num_heads: 2, "
               "num_classes: 10, fourier_channels: 32}")
    run = cli(*["fit", "--config", str(ROOT / "configs/diffusers/distill_dit.yaml"),
                "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
                "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                "--model.init_args.teacher.init_args.path", str(tmp_path / "dit"),
                "--model.init_args.student.init_args", student, "--model.init_args.num_classes", "10",
                "--data.init_args.root", str(tmp_path / "latents"), "--data.init_args.expected_shape", "[4, 8, 8]",
                "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"])
    assert run.trainer.global_step == 2
    module = run.model
    assert isinstance(module.teacher, DiffusersTeacher) and module.teacher.data_scale == 0.18215
    assert module.guidance == "cfg" and module.teacher.num_classes == 10
