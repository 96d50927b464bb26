"""Discriminator for the adversarial finetune: a StyleGAN2-style residual conv net on latents or images.

Layout (StyleGAN2's "resnet" discriminator, without equalized learning rate or blur filters):

- ``from_input``: 1x1 conv to ``channels[0]`` features at full resolution;
- one residual block per halving of the resolution down to 4x4: two 3x3 convs with leaky ReLU,
  2x2 average pooling, a 1x1 skip conv, and ``(main + skip) / sqrt(2)``;
- epilogue: minibatch standard deviation (one extra feature map), 3x3 conv, a dense layer, and
  the output ``w . h + <embed(c), h> / sqrt(dim)`` (projection class conditioning; the null label
  ``num_classes`` has its own embedding).

Nothing in it normalizes over the batch except the minibatch-std feature, so the R1 and R2
penalties (``flowmap_lit.objectives.adversarial``) are per-sample gradients. ``input_transform``
(e.g. ``DecodeLatents``) lets it judge decoded images instead of latents; the transform must be
differentiable because the generator's gradient flows through it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.2)


class DiscriminatorBlock(nn.Module):
    """Two 3x3 convs and a 2x downsample, with a 1x1 residual skip."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(cin, cin, 3, padding=1)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        skip = self.skip(F.avg_pool2d(x, 2))
        h = F.avg_pool2d(_lrelu(self.conv1(_lrelu(self.conv0(x)))), 2)
        return (h + skip) / math.sqrt(2)


class MinibatchStd(nn.Module):
    """Appends the mean standard deviation of the features over groups of ``group_size`` samples.

    Groups are contiguous runs of the batch (``gcd(group_size, B)`` samples each), so a batch split
    into per-device parts that are multiples of the group size gets the same groups on any number
    of devices.
    """

    def __init__(self, group_size: int = 4) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        g = math.gcd(self.group_size, b)
        y = x.reshape(b // g, g, c, h, w).float()
        y = (y.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (b // g,)
        y = y.to(x.dtype).repeat_interleave(g).reshape(b, 1, 1, 1).expand(b, 1, h, w)
        return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    """``D(x, class_labels) -> (B,)`` logits; class-conditional by projection when ``num_classes > 0``.

    Args:
        img_channels: Channels of the latents (or images) it judges; with an input_transform, of
            its output.
        img_resolution: Height = width of what it judges, a power of two >= 4; with an
            input_transform, of its output.
        channels: Features of each resolution level, full resolution first, one entry per level
            down to 4x4 (log2(img_resolution) - 1 entries); None: 64, 128, 256, 256, ...
        num_classes: Number of classes (projection conditioning; the null label num_classes has its
            own embedding); 0: unconditional.
        mbstd_group: Group size of the minibatch standard deviation feature; 0 disables it.
        input_transform: Differentiable module applied to x first, e.g. DecodeLatents to judge
            decoded images (the generator's gradient flows through it); None: x itself.
    """

    def __init__(
        self,
        img_channels: int = 4,
        img_resolution: int = 64,
        channels: list[int] | None = None,
        num_classes: int = 0,
        mbstd_group: int = 4,
        input_transform: nn.Module | None = None,
    ) -> None:
        super().__init__()
        levels = int(math.log2(img_resolution)) - 2
        if img_resolution < 4 or 2 ** (levels + 2) != img_resolution:
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        if channels is None:
            channels = [min(64 * 2**i, 256) for i in range(levels + 1)]
        if len(channels) != levels + 1:
            raise ValueError(
                f"channels needs {levels + 1} entries for resolution {img_resolution} (one per level "
                f"{img_resolution} ... 4), got {len(channels)}"
            )
        self.img_channels, self.img_resolution, self.num_classes = img_channels, img_resolution, num_classes
        self.input_transform = input_transform
        self.from_input = nn.Conv2d(img_channels, channels[0], 1)
        self.blocks = nn.ModuleList([DiscriminatorBlock(channels[i], channels[i + 1]) for i in range(levels)])
        self.mbstd = MinibatchStd(mbstd_group)
        last = channels[-1]
        self.conv = nn.Conv2d(last + (1 if mbstd_group > 0 else 0), last, 3, padding=1)
        self.fc = nn.Linear(last * 16, last)
        self.out = nn.Linear(last, 1)
        self.embed = nn.Embedding(num_classes + 1, last) if num_classes > 0 else None

    def forward(self, x: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        if x.shape[1:] != (self.img_channels, self.img_resolution, self.img_resolution):
            raise ValueError(
                f"the discriminator expects inputs of shape (B, {self.img_channels}, {self.img_resolution}, "
                f"{self.img_resolution}), got {tuple(x.shape)}: set its img_channels / img_resolution to the "
                "data (or to the decoded images when an input_transform is used)"
            )
        h = _lrelu(self.from_input(x))
        for block in self.blocks:
            h = block(h)
        if self.mbstd.group_size > 0:
            h = self.mbstd(h)
        h = _lrelu(self.fc(_lrelu(self.conv(h)).flatten(1)))
        logits = self.out(h).squeeze(1)
        if self.embed is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            logits = logits + (self.embed(class_labels) * h).sum(1) / math.sqrt(h.shape[1])
        return logits


class DecodeLatents(nn.Module):
    """Frozen, differentiable latent -> image map, so the discriminator can judge decoded images.

    ``x`` is un-normalized with the dataset's per-channel ``mean``/``std`` (read from the dataset's
    ``stats.json`` when ``stats_root`` is given and the data module normalizes), then decoded by a
    diffusers ``AutoencoderKL`` loaded from a local directory (never downloaded), optionally
    average-pooled by ``downsample`` to keep the discriminator cheap. Its weights are frozen and
    not saved in checkpoints (they are reloaded from ``vae``).

    Args:
        vae: Local directory of a diffusers AutoencoderKL (e.g. an SD-VAE download); never
            downloaded.
        stats_root: Dataset directory whose stats.json mean and std undo the data module's
            normalization; None: the latents are used as they are (data with normalize: false).
        scaling_factor: The latents are divided by it before decoding; 1.0: stored unscaled.
        downsample: Average-pool the decoded image by this factor; 1: full resolution.
    """

    def __init__(
        self,
        vae: str,
        stats_root: str | None = None,
        scaling_factor: float = 1.0,
        downsample: int = 1,
    ) -> None:
        super().__init__()
        from flowmap_lit.checkpoints.vae import load_vae

        vae_model = load_vae(vae)
        vae_model.requires_grad_(False).eval()
        object.__setattr__(self, "vae", vae_model)  # not a submodule: kept out of the state dict
        mean, std = [0.0], [1.0]
        if stats_root is not None:
            stats = json.loads((Path(stats_root) / "stats.json").read_text())
            mean, std = stats["mean"], stats["std"]
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1), persistent=False)
        self.scaling_factor, self.downsample = scaling_factor, downsample

    def _apply(self, fn, recurse=True):  # keep the VAE on the module's device and dtype
        self.vae._apply(fn)
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        z = (x * self.std.to(x.dtype) + self.mean.to(x.dtype)) / self.scaling_factor
        img = self.vae.decode(z.to(next(self.vae.parameters()).dtype)).sample
        return F.avg_pool2d(img, self.downsample) if self.downsample > 1 else img
