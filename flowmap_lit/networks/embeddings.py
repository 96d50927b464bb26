"""Conditioning embeddings: the vector c(t, s, class, guidance) that drives both backbones.

docs/design.md section 2: the network sees t and the gap t - s through float32 embeddings, and
the extra (s and guidance) branches are zero-initialized so a student initialized from a
teacher computes F(x, t, s) = v(x, t) exactly at step 0.
docs/design.md section 3, "Stability": the Fourier frequencies are low (16 rad per unit t by
default, not the usual 1000 t) because the flow-map JVP differentiates through them.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .mp import MPConv, MPEmbedding, mp_silu, mp_sum
from .tangent_ops import linear, scale


def batch_vector(value, x: torch.Tensor) -> torch.Tensor | None:
    """Broadcast a per-sample scalar (Python number, 0-dim or (B,) tensor) to shape (B,)."""
    if value is None:
        return None
    value = torch.as_tensor(value, device=x.device)
    if value.ndim == 0:
        value = value.expand(x.shape[0])
    if value.shape != (x.shape[0],):
        raise ValueError(f"expected a scalar or shape ({x.shape[0]},), got {tuple(value.shape)}")
    return value


class FourierTimeEmbedding(nn.Module):
    """[cos(f_i t), sin(f_i t)], i = 1..num_channels/2, fixed geometric angular frequencies f_i.

    Input t of shape (B,), output (B, num_channels), computed in float32 with autocast off
    (float64 if the module was converted with `.double()`, for finite-difference tests).
    With `zero_at_origin` the cosines become cos(f t) - 1, so the embedding of 0 is exactly 0.
    """

    def __init__(
        self,
        num_channels: int,  # Output width (even): half cosines, half sines.
        min_freq: float = 0.5,  # Lowest angular frequency, radians per unit t.
        max_freq: float = 16.0,  # Highest angular frequency; keep low, the JVP differentiates it.
        zero_at_origin: bool = False,  # Subtract 1 from the cosines: embedding(0) == 0 exactly.
    ):
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"num_channels must be even, got {num_channels}")
        ramp = torch.linspace(0, 1, num_channels // 2, dtype=torch.float64)
        freqs = min_freq * (max_freq / min_freq) ** ramp
        self.register_buffer("freqs", freqs.float(), persistent=False)
        self.zero_at_origin = zero_at_origin

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if self.freqs.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=t.device.type, enabled=False):
            arg = t.to(dtype)[:, None] * self.freqs.to(dtype)[None, :]
            cos = arg.cos() - 1 if self.zero_at_origin else arg.cos()
            return torch.cat([cos, arg.sin()], dim=1)


class _Linear(nn.Linear):
    """nn.Linear computed in its input's dtype (float32/float64), whatever the parameter dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return linear(x, self.weight.to(x.dtype), bias)


class _Branch(nn.Module):
    """Two-layer MLP on Fourier features: in -> dim -> SiLU -> dim, times an output gain.

    Plain mode: nn.Linear layers; a gated branch has a bias-free, zero-initialized last layer.
    MP mode: magnitude-preserving linear layers (no biases) and a learned scalar gain that is
    zero-initialized for a gated branch. A gated branch maps the input 0 to exactly 0.
    """

    def __init__(self, in_dim: int, dim: int, gated: bool, mp: bool):
        super().__init__()
        self.gated, self.mp = gated, mp
        if mp:
            self.fc0, self.fc1 = MPConv(in_dim, dim), MPConv(dim, dim)
            self.gain = nn.Parameter(torch.zeros([1]) if gated else torch.ones([1]))  # 1-D: FSDP2 shards no scalars
        else:
            self.fc0 = _Linear(in_dim, dim, bias=not gated)
            self.fc1 = _Linear(dim, dim, bias=not gated)
        self.zero_init_()

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        if self.mp:
            gain = self.gain.to(e.dtype)
            return self.fc1(mp_silu(self.fc0(scale(e, math.sqrt(2)))), gain=gain)
        return self.fc1(F.silu(self.fc0(e)))

    @torch.no_grad()
    def zero_init_(self) -> None:
        """Make a gated branch output exactly zero (no-op for an ungated branch)."""
        if self.gated:
            (self.gain if self.mp else self.fc1.weight).zero_()


class ConditionEmbedding(nn.Module):
    """c = MLP_t(fourier(t)) + MLP_s(fourier(t - s)) + class_emb(label) + MLP_g(fourier(lam - 1)).

    - s=None means s = t (a plain velocity model); the s branch sees t - s through features
      that vanish at 0, so F(x, t, t) never depends on it.
    - class_labels: LongTensor (B,) in [0, num_classes]; num_classes is the null token
      (classifier-free-guidance dropout); None means all-null. Ignored when num_classes == 0.
    - guidance: the guidance scale lam (B,); None means lam = 1 (unguided).
    The s and guidance branches end zero-initialized (see `zero_init_s_embedding`), so they
    start as exact no-ops. Output (B, emb_dim) in float32 (float64 after `.double()`), autocast off.
    In MP mode (EDM2 U-Net) the branches are magnitude-preserving and the class vector is
    merged with mp_sum (EDM2 eq. 105 and its label branch).
    """

    def __init__(
        self,
        emb_dim: int,  # Width of the conditioning vector c.
        num_classes: int = 0,  # Number of classes; 0 = unconditional (no class embedding).
        fourier_channels: int = 256,  # Width of each Fourier feature vector.
        time_min_freq: float = 0.5,  # Lowest angular frequency for t and t - s (rad per unit t).
        time_max_freq: float = 16.0,  # Highest angular frequency for t and t - s; keep low.
        guidance_min_freq: float = 0.1,  # Lowest angular frequency for lam - 1.
        guidance_max_freq: float = 4.0,  # Highest angular frequency for lam - 1.
        magnitude_preserving: bool = False,  # Use EDM2 MP layers (for the U-Net) instead of nn.Linear.
        label_balance: float = 0.5,  # MP mode: weight of the class vector in mp_sum.
    ):
        super().__init__()
        mp = magnitude_preserving
        self.num_classes, self.mp, self.label_balance = num_classes, mp, label_balance
        self.fourier_t = FourierTimeEmbedding(fourier_channels, time_min_freq, time_max_freq)
        self.fourier_gap = FourierTimeEmbedding(fourier_channels, time_min_freq, time_max_freq, True)
        self.fourier_g = FourierTimeEmbedding(fourier_channels, guidance_min_freq, guidance_max_freq, True)
        self.mlp_t = _Branch(fourier_channels, emb_dim, gated=False, mp=mp)
        self.mlp_s = _Branch(fourier_channels, emb_dim, gated=True, mp=mp)
        self.mlp_g = _Branch(fourier_channels, emb_dim, gated=True, mp=mp)
        self.class_emb = None  # row num_classes is the learned null (unconditional) token
        if num_classes > 0 and mp:
            self.class_emb = MPEmbedding(num_classes + 1, emb_dim)
        elif num_classes > 0:
            self.class_emb = nn.Embedding(num_classes + 1, emb_dim)
            nn.init.normal_(self.class_emb.weight, std=0.02)

    def forward(self, t, s=None, class_labels=None, guidance=None) -> torch.Tensor:
        t_dtype = self.fourier_t.freqs.dtype
        dtype = torch.float64 if t_dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=t.device.type, enabled=False):
            t = t.to(dtype)
            gap = torch.zeros_like(t) if s is None else t - s.to(dtype)
            lam1 = torch.zeros_like(t) if guidance is None else guidance.to(dtype) - 1
            c = self.mlp_t(self.fourier_t(t))
            c = c + self.mlp_s(self.fourier_gap(gap))
            c = c + self.mlp_g(self.fourier_g(lam1))
            if self.class_emb is not None:
                if class_labels is None:
                    class_labels = torch.full(t.shape, self.num_classes, device=t.device, dtype=torch.long)
                y = self.class_emb(class_labels.long()).to(dtype)
                c = mp_sum(c, y, self.label_balance) if self.mp else c + y
        return c

    def zero_init_s_embedding(self) -> None:
        """Re-zero the last layer (or gain) of the s and guidance branches: they become exact no-ops."""
        self.mlp_s.zero_init_()
        self.mlp_g.zero_init_()
        self.mlp_g.zero_init_()
