"""Small networks shared by the tests (same forward signature as the package's backbones)."""

import torch
from torch import nn


class MLPVelocity(nn.Module):
    """``F(x, t, s)`` on flattened data: an MLP of ``[x, t, t - s]`` (tests only)."""

    def __init__(self, shape=(1, 2, 2), width: int = 64) -> None:
        super().__init__()
        self.shape = tuple(shape)
        d = int(torch.tensor(shape).prod())
        self.body = nn.Sequential(nn.Linear(d + 2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, d))

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


def tiny_vae(sample_size: int = 32):
    """A tiny randomly initialized diffusers ``AutoencoderKL`` (4 latent channels, 4x downsampling)."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=sample_size)
