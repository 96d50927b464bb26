"""Flow-map backbones F(x, t, s, class_labels, guidance) -> tensor shaped like x.

- `EDM2UNet`: magnitude-preserving U-Net (EDM2); `DiT`: Diffusion Transformer; `MLP`: small flat data.
- `Discriminator` (StyleGAN2-style, for the adversarial finetune) and `DecodeLatents` (judge decoded images).
- `build_network(arch, preset, **overrides)`: named sizes (see presets.py).
- `attention`, `forward_ad_safe_attention`: the package's attention op and its JVP-safe mode.
- `FourierTimeEmbedding`, `ConditionEmbedding`: low-frequency float32 conditioning.
"""

from .attention import attention, forward_ad_safe_attention, math_only_active
from .discriminator import DecodeLatents, Discriminator
from .dit import DiT
from .embeddings import ConditionEmbedding, FourierTimeEmbedding, batch_vector
from .mlp import MLP
from .mp import force_normalize_
from .presets import ARCHITECTURES, DIT_PRESETS, UNET_PRESETS, build_network
from .unet import EDM2UNet

__all__ = [
    "ARCHITECTURES",
    "DIT_PRESETS",
    "UNET_PRESETS",
    "ConditionEmbedding",
    "DecodeLatents",
    "Discriminator",
    "DiT",
    "EDM2UNet",
    "MLP",
    "FourierTimeEmbedding",
    "attention",
    "batch_vector",
    "build_network",
    "force_normalize_",
    "forward_ad_safe_attention",
    "math_only_active",
]
