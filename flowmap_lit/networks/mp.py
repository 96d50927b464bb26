"""Magnitude-preserving (MP) building blocks, after Karras et al. 2024 ("Analyzing and
Improving the Training Dynamics of Diffusion Models", EDM2), section 3.

Every op here keeps unit-variance inputs at unit variance. Weights are normalized
*functionally* inside `forward` (never rewritten in place there), so `torch.func.jvp`
can trace the module (docs/pitfalls.md, JVP). The forced weight normalization of the paper
(eq. 6, applied after each optimizer step) is the separate method `normalize_weight_()`,
reached through `force_normalize_()` on the networks and called by a callback.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .tangent_ops import conv2d, linear, scale, unscale

SILU_RMS = 0.596  # sqrt(E[silu(z)^2]) for z ~ N(0, 1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32: float64 stays float64, half types are promoted."""
    return torch.promote_types(x.dtype, torch.float32)


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """x / RMS(x), the RMS taken over `dim` (default: all dims but the first).

    The RMS is clamped from below by `eps` (instead of EDM2's `eps + norm`) so the op is
    idempotent: normalize(normalize(w)) == normalize(w) up to rounding.
    """
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=_compute_dtype(x))
    count = norm.numel() / x.numel()  # 1 / number of elements per RMS
    rms = (norm * math.sqrt(count)).clamp_min(eps)
    return x / rms.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU rescaled to unit output RMS for unit-normal input (EDM2 eq. 81)."""
    return unscale(F.silu(x), SILU_RMS)


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Interpolation (1 - t) a + t b, rescaled to unit RMS for independent unit inputs (eq. 88).

    Under autocast one input can be bf16 and the other fp32 (lerp does not promote): the sum is
    taken in the wider dtype.
    """
    dtype = torch.promote_types(a.dtype, b.dtype)
    return unscale(a.to(dtype).lerp(b.to(dtype), t), math.sqrt((1 - t) ** 2 + t**2))


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation along `dim` with relative contributions (1 - t) and t (eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    gain = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    wa = gain / math.sqrt(na) * (1 - t)
    wb = gain / math.sqrt(nb) * t
    return torch.cat([scale(a, wa), scale(b, wb)], dim=dim)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel given) or linear layer (kernel = ()).

    Computes conv(x, gain * normalize(W) / sqrt(fan_in)): each output channel's weight has
    unit norm, so unit-variance input gives unit-variance output (EDM2 eq. 47, 65).
    No bias. `gain` may be a learned scalar tensor (e.g. a zero-initialized output gain).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple = ()):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        w = self.weight.to(_compute_dtype(self.weight))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))  # out of place: JVP-safe
        w = w.to(x.dtype)
        if w.ndim == 2:
            return linear(x, w)
        return conv2d(x, w, padding=w.shape[-1] // 2)

    @torch.no_grad()
    def normalize_weight_(self) -> None:
        """Forced weight normalization (EDM2 eq. 6): rewrite W to unit RMS per output channel."""
        self.weight.copy_(normalize(self.weight.to(_compute_dtype(self.weight))))


class MPEmbedding(nn.Module):
    """Lookup table whose rows are normalized to unit RMS (an MP linear layer on one-hot input)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_embeddings, embedding_dim))

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return normalize(self.weight.to(_compute_dtype(self.weight)))[index]

    @torch.no_grad()
    def normalize_weight_(self) -> None:
        """Forced weight normalization: rewrite each row to unit RMS."""
        self.weight.copy_(normalize(self.weight.to(_compute_dtype(self.weight))))


def force_normalize_(module: nn.Module) -> None:
    """Apply forced weight normalization to every MP layer inside `module` (no grad)."""
    for m in module.modules():
        if isinstance(m, (MPConv, MPEmbedding)):
            m.normalize_weight_()
