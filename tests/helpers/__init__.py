"""What the tests share: small networks and data with known answers, tiny stand-ins for downloaded models.

Next to this file: ``cli.py`` runs the command line in this process, a forked copy or a fresh one;
``two_process.py`` (with ``distributed_step.py``) and ``fid_two_process.py`` run work in 2 forked gloo
processes; ``resume_probe.py`` and ``edm2_fake.py`` are named by class path in configs and pickles;
``data.py``, ``latents.py`` and ``text.py`` write small datasets; ``clip.py`` makes tiny CLIP text
encoders and tokenizers offline; ``flux.py`` makes tiny FLUX and SD3 transformer folders and LoRA exports;
``batches.py`` records training batches.
"""

from pathlib import Path

import torch
from torch import nn

from flowmap_lit.teachers.analytic import GaussianData, GaussianMixture

ROOT = Path(__file__).resolve().parents[2]


class MLPVelocity(nn.Module):
    """``F(x, t, s)`` on flattened data: an MLP of ``[x, t, t - s]`` (tests only)."""

    def __init__(self, shape=(1, 2, 2), width: int = 64) -> None:
        super().__init__()
        self.shape = tuple(shape)
        d = int(torch.tensor(shape).prod())
        self.body = nn.Sequential(nn.Linear(d + 2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                  nn.Linear(width, d))

    def forward(self, x, t, s=None, class_labels=None, guidance=None):
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(b)
        s = t if s is None else torch.as_tensor(s, dtype=x.dtype, device=x.device).expand(b)
        h = torch.cat([x.reshape(b, -1), t[:, None], (t - s)[:, None]], 1)
        return self.body(h).reshape(x.shape)


class ExactGaussianStudent(nn.Module):
    """The closed-form average velocity ``F = (f(x, t, s) - x) / (s - t)`` of Gaussian data,
    plus ``perturb * sin(3 t) * x`` (0 gives the exact flow map); at ``s = t`` the exact velocity."""

    def __init__(self, data, perturb: float = 0.0) -> None:
        super().__init__()
        self.data = data
        self.perturb = nn.Parameter(torch.tensor(float(perturb), dtype=torch.float64))

    def forward(self, x, t, s=None, class_labels=None, guidance=None):
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=x.dtype).expand(b)
        s = torch.as_tensor(s, dtype=x.dtype).expand(b)
        gap = (s - t).reshape(-1, *([1] * (x.ndim - 1)))
        safe = torch.where(gap == 0, torch.ones_like(gap), gap)
        F = torch.where(gap == 0, self.data.velocity(x, t), (self.data.flow_map(x, t, s) - x) / safe)
        return F + self.perturb * torch.sin(3 * t).reshape(gap.shape) * x


def gaussian(shape=(1, 2, 3), seed: int = 0) -> GaussianData:
    """Gaussian data ``N(mu, diag(c^2))`` with seeded ``mu`` and ``c`` in [0.3, 1.3] (float64)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    c = torch.rand(shape, generator=g, dtype=torch.float64) + 0.3
    return GaussianData(mu, c)


def small_mixture(dim_shape=(1, 2, 2), classes=2, seed=0) -> GaussianMixture:
    """Two full-covariance components per class (float64)."""
    g = torch.Generator().manual_seed(seed)
    d = int(torch.tensor(dim_shape).prod())
    means = 1.5 * torch.randn(2 * classes, d, generator=g, dtype=torch.float64)
    a = 0.3 * torch.randn(2 * classes, d, d, generator=g, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) + 0.05 * torch.eye(d, dtype=torch.float64)
    return GaussianMixture(torch.full((2 * classes,), 1.0 / (2 * classes)), means, covs, dim_shape,
                           component_classes=torch.arange(2 * classes) % classes)


@torch.no_grad()
def randomize_zero_params_(net, include_s_branch=True, scale=0.5):
    """Give zero-initialized tensors (output gains, adaLN-Zero, s/guidance branches) random values,
    so derivatives and the s-dependence are not trivially zero."""
    gen = torch.Generator().manual_seed(1)
    for name, p in net.named_parameters():
        s_branch = ".mlp_s." in name or ".mlp_g." in name
        if s_branch and not include_s_branch:
            continue
        if s_branch or not p.any():
            fan_in = p[0].numel() if p.ndim >= 2 else 1
            p.copy_(scale / fan_in**0.5 * torch.randn(p.shape, generator=gen))
    return net


def tiny_vae(sample_size: int = 32):
    """A tiny randomly initialized diffusers ``AutoencoderKL`` (4 latent channels, 4x downsampling)."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=sample_size)


def tiny_vae_dir(path: Path, sample_size: int = 16) -> Path:
    """``tiny_vae(sample_size)`` saved in the diffusers layout at ``path``."""
    tiny_vae(sample_size).save_pretrained(path)
    return path


def tiny_dinov2(path: Path) -> Path:
    """A small DINOv2 (2 layers, width 32) saved in the transformers layout facebook/dinov2-large uses."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=56)).save_pretrained(path)
    return path


def exact_gaussian_module(perturb: float, shape=(1, 2, 3), c_range=(0.05, 0.6)):
    """A ``FlowMapDistillModule`` of Gaussian data (means in [-1, 1], scales in ``c_range``) whose student is
    ``ExactGaussianStudent(data, perturb)``: the exact flow map when ``perturb`` is 0 (float64 data)."""
    from flowmap_lit.modules import FlowMapDistillModule
    from flowmap_lit.objectives import AYFEMD
    from flowmap_lit.teachers import GaussianTeacher

    n = int(torch.tensor(shape).prod())
    data = GaussianData(torch.linspace(-1, 1, n, dtype=torch.float64).reshape(shape),
                        torch.linspace(*c_range, n, dtype=torch.float64).reshape(shape))
    return FlowMapDistillModule(GaussianTeacher(data), AYFEMD(), student=ExactGaussianStudent(data, perturb),
                                init_student_from_teacher=False)


def relative_error(a: dict, b: dict) -> float:
    """``|a - b| / |b|`` over all tensors of two state dicts with ``b``'s keys (float64)."""
    num = sum((a[k] - b[k]).double().square().sum() for k in b)
    den = sum(b[k].double().square().sum() for k in b)
    return float((num / den).sqrt())


def assert_same(a, b, where: str = "checkpoint") -> None:
    """``a == b`` for nested checkpoint dicts, tensors compared exactly."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (where, a.keys() ^ b.keys())
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, (where, a, b)
