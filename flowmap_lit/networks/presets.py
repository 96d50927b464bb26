"""Named network sizes: `build_network("unet", "s")`, `build_network("dit", "tiny", num_classes=0)`.

Parameter counts (measured on the meta device; tests/networks/test_networks.py checks them) are within
a few percent of the published models: EDM2-XS 125M, EDM2-S 280M, EDM2-M 498M (Karras et al.
2024, table 2); DiT-S/2 33M, DiT-B/2 130M, DiT-L/2 458M, DiT-XL/2 675M (Peebles & Xie 2023,
table 1). The small extra comes from the zero-initialized t - s and guidance branches.
"""

import torch.nn as nn

from .dit import DiT
from .mlp import MLP
from .unet import EDM2UNet

_DIGITS = dict(img_channels=1, img_resolution=8, num_classes=10)  # sklearn digits, 1x8x8, 10 classes
_LATENT64 = dict(img_channels=4, img_resolution=64, num_classes=1000)  # ImageNet-512 SD-VAE latents
_EDM2 = dict(channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8])

UNET_PRESETS: dict[str, dict] = {
    "tiny": dict(**_DIGITS, model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
    "small": dict(**_DIGITS, model_channels=64, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[4, 2]),
    "xs": dict(**_LATENT64, **_EDM2, model_channels=128),  # EDM2-XS
    "s": dict(**_LATENT64, **_EDM2, model_channels=192),  # EDM2-S
    "m": dict(**_LATENT64, **_EDM2, model_channels=256),  # EDM2-M
}

DIT_PRESETS: dict[str, dict] = {
    "tiny": dict(**_DIGITS, patch_size=2, hidden_size=64, depth=2, num_heads=4),
    "s": dict(**_LATENT64, patch_size=2, hidden_size=384, depth=12, num_heads=6),  # DiT-S/2
    "b": dict(**_LATENT64, patch_size=2, hidden_size=768, depth=12, num_heads=12),  # DiT-B/2
    "l": dict(**_LATENT64, patch_size=2, hidden_size=1024, depth=24, num_heads=16),  # DiT-L/2
    "xl": dict(**_LATENT64, patch_size=2, hidden_size=1152, depth=28, num_heads=16),  # DiT-XL/2
}

MLP_PRESETS: dict[str, dict] = {
    "tiny": dict(**_DIGITS, width=256, depth=3),
    "digits": dict(**_DIGITS, width=768, depth=3),  # the docs/design.md section 8 reference student
}

ARCHITECTURES: dict[str, tuple[type[nn.Module], dict[str, dict]]] = {
    "unet": (EDM2UNet, UNET_PRESETS),
    "dit": (DiT, DIT_PRESETS),
    "mlp": (MLP, MLP_PRESETS),
}


def build_network(arch: str, preset: str, **overrides) -> nn.Module:
    """Construct `arch` ('unet', 'dit' or 'mlp') with the `preset` keyword arguments, then `overrides`."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHITECTURES)}")
    cls, presets = ARCHITECTURES[arch]
    if preset not in presets:
        raise ValueError(f"unknown {arch} preset {preset!r}; choose from {sorted(presets)}")
    return cls(**{**presets[preset], **overrides})
