"""Sample grids written to TensorBoard and to PNG files during training."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from flowmap_lit.callbacks.ema import evaluation_mode


def to_images(x: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Map samples ``(B, C, H, W)`` to uint8 RGB-or-gray images; more than 3 channels keep the first 3."""
    x = x.detach().float().cpu()
    if x.shape[1] > 3:
        x = x[:, :3]
    elif x.shape[1] == 2:
        x = torch.cat([x, x[:, :1]], 1)
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


def make_grid(images: Tensor, nrow: int | None = None, pad: int = 1) -> Tensor:
    """Tile uint8 images ``(B, C, H, W)`` into one ``(C, H', W')`` image with ``pad`` pixel borders."""
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    grid = torch.zeros(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad, dtype=images.dtype)
    for i in range(b):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return grid


def save_png(grid: Tensor, path: str | Path, upscale: int = 1) -> None:
    """Write a ``(C, H, W)`` uint8 grid as PNG (nearest-neighbour upscaled by ``upscale``)."""
    from PIL import Image

    arr = grid.permute(1, 2, 0).numpy()
    arr = arr[..., 0] if arr.shape[-1] == 1 else arr
    img = Image.fromarray(np.ascontiguousarray(arr))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def decode_for_display(trainer: pl.Trainer, x: Tensor) -> Tensor:
    """Undo the data module's normalization when it offers ``denormalize``."""
    dm = getattr(trainer, "datamodule", None)
    return dm.denormalize(x) if dm is not None and hasattr(dm, "denormalize") else x


class SampleGrid(pl.Callback):
    """Every ``every_n_steps`` (and at the end of fit), draw a fixed-noise sample grid.

    Calls ``pl_module.sample(noise, class_labels, num_steps=...)`` with the EMA weights when an
    ``EMA`` callback is present. Grids go to TensorBoard (``samples/{k}step``) and to
    ``{log_dir}/samples/step{global_step:07d}_{k}step.png``.

    Args:
        every_n_steps: Optimizer steps (trainer.global_step) between grids; 0: only at the end of
            fit.
        num_samples: Images per grid.
        num_steps: Sampler step counts k; one grid per entry.
        seed: Seed of the fixed noise, so that grids are comparable over training (the labels
            cycle through the classes).
        value_range: The data range mapped to black..white, after the data module's denormalize
            (and the VAE decoding).
        upscale: Nearest-neighbour upscaling factor of the PNG.
        vae: Local directory of a diffusers AutoencoderKL that decodes latent samples for display;
            None: the samples are shown as images.
        vae_scaling_factor: How the stored latents were scaled: stored = (z - vae_shift_factor) *
            vae_scaling_factor (flowmap_lit.metrics.decode).
        vae_shift_factor: How the stored latents were shifted (see vae_scaling_factor).
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 64,
        num_steps: list[int] = [32],  # noqa: B006 (read, never mutated; --help shows it)
        seed: int = 0,
        value_range: tuple[float, float] = (-1.0, 1.0),
        upscale: int = 4,
        vae: str | None = None,
        vae_scaling_factor: float = 1.0,
        vae_shift_factor: float = 0.0,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.num_steps = list(num_steps)
        self.seed = seed
        self.value_range = value_range
        self.upscale = upscale
        self.vae, self.vae_scaling_factor, self.vae_shift_factor = vae, vae_scaling_factor, vae_shift_factor
        self._decoder = None
        self.last_paths: list[Path] = []  # PNGs written by the latest draw (rank 0)
        self._drawn = -1  # global step of the latest draw

    def _inputs(self, pl_module: pl.LightningModule, shape: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((self.num_samples, *shape), generator=gen)
        num_classes = getattr(pl_module, "num_classes", 0)
        labels = torch.arange(self.num_samples) % num_classes if num_classes else None
        dev = pl_module.device
        return noise.to(dev), (labels.to(dev) if labels is not None else None)

    def _display(self, trainer: pl.Trainer, x: Tensor) -> Tensor:
        x = decode_for_display(trainer, x)
        if self.vae is None:
            return x
        if self._decoder is None:
            from flowmap_lit.metrics.decode import LatentDecoder

            self._decoder = LatentDecoder(self.vae, self.vae_scaling_factor, self.vae_shift_factor).to(x.device)
        return self._decoder(x)

    @torch.no_grad()
    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from flowmap_lit.metrics.few_step import prompt_cond, text_prompts

        noise, labels = self._inputs(pl_module, tuple(trainer.datamodule.shape))
        # text data: grid cell i shows validation prompt i (cycled)
        cond = prompt_cond(text_prompts(trainer.datamodule, self.num_samples), range(self.num_samples),
                           pl_module.device)
        kwargs = {} if cond is None else {"cond": cond}
        self.last_paths = []
        with evaluation_mode(trainer, pl_module):
            for k in self.num_steps:
                x = pl_module.sample(noise, labels, num_steps=k, **kwargs)
                grid = make_grid(to_images(self._display(trainer, x), self.value_range))
                if trainer.is_global_zero:
                    self._write(trainer, grid, k)

    def _write(self, trainer: pl.Trainer, grid: Tensor, k: int) -> None:
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        path = log_dir / "samples" / f"step{trainer.global_step:07d}_{k}step.png"
        save_png(grid, path, self.upscale)
        self.last_paths.append(path)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image(f"samples/{k}step", grid, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._drawn:
            self._drawn = step
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._drawn != trainer.global_step:
            self.draw(trainer, pl_module)
