"""A diffusers ``AutoencoderKL`` from a local directory: the one VAE loader of the package (latent
datasets encode with it, evaluation and the exported pipeline decode with it)."""

from __future__ import annotations

import os

import torch


def load_vae(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers ``AutoencoderKL`` from a local directory (``save_pretrained`` layout); never downloads."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as exn:
        raise ImportError("encoding images needs diffusers: pip install 'flowmap_lit[vae]'") from exn
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"--vae {path!r} is not a local diffusers AutoencoderKL directory (config.json + weights). Download it "
            "once where there is internet, e.g. `huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir "
            "/models/sd-vae-ft-mse`, and pass that folder; flowmap_lit never downloads weights."
        )
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)
