"""Latents -> images for evaluation: a frozen diffusers ``AutoencoderKL`` from a local directory.

The FID machinery takes images in [-1, 1]; a latent dataset's samples (after the data module's
``denormalize``, i.e. the latents as stored in the shards) are decoded first:

    images = clamp(vae.decode(z / scaling_factor + shift_factor), -1, 1)

``scaling_factor`` / ``shift_factor``: how the stored latents were scaled. Shards written by
``flowmap_lit.data.imagenet`` hold the VAE's raw posterior (factors 1 and 0, the defaults); latents
stored the way a diffusers pipeline feeds its denoiser, ``(z - shift) * scale`` (e.g. SD3's
``shift_factor`` 0.0609 and ``scaling_factor`` 1.5305), take the VAE config's factors. Decoding runs
in ``batch_size`` chunks (the decoder's activations at 512 px are large) under ``no_grad``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


class LatentDecoder(nn.Module):
    """Frozen latent decoder; its weights are reloaded from ``vae`` and never enter a checkpoint."""

    def __init__(
        self,
        vae: str,                          # local diffusers AutoencoderKL directory (e.g. stabilityai/sd-vae-ft-mse)
        scaling_factor: float = 1.0,       # stored latents = (z - shift_factor) * scaling_factor
        shift_factor: float = 0.0,
        batch_size: int = 32,              # latents per decoder call
        dtype: str = "float32",            # decoder precision ("float32", "bfloat16", "float16")
    ) -> None:
        super().__init__()
        from flowmap_lit.checkpoints.vae import load_vae
        from flowmap_lit.metrics.features import _weights_digest

        if scaling_factor == 0:
            raise ValueError("scaling_factor must be non-zero (stored latents are (z - shift) * scaling_factor)")
        vae_model = load_vae(vae, dtype=getattr(torch, dtype))
        object.__setattr__(self, "vae", vae_model)  # not a submodule: kept out of state dicts
        self.scaling_factor, self.shift_factor, self.batch_size = float(scaling_factor), float(shift_factor), batch_size
        self.latent_channels = int(vae_model.config.latent_channels)
        self.decoder_id = f"vae-{_weights_digest(Path(vae))}-{scaling_factor:g}-{shift_factor:g}-{dtype}"

    def _apply(self, fn, recurse=True):  # keep the VAE on the module's device
        self.vae._apply(fn)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def forward(self, latents: Tensor) -> Tensor:
        """(N, C, h, w) stored latents -> (N, 3, H, W) float32 images in [-1, 1]."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"LatentDecoder expects latents (N, {self.latent_channels}, h, w) for this VAE, got "
                             f"{tuple(latents.shape)}; is the decoder the one that encoded this dataset?")
        dtype = next(self.vae.parameters()).dtype
        out = []
        for chunk in latents.split(self.batch_size):
            z = chunk.float() / self.scaling_factor + self.shift_factor
            out.append(self.vae.decode(z.to(dtype)).sample.float().clamp(-1, 1))
        return torch.cat(out)
