"""Loss weighting ``w(t, s)`` (docs/design.md section 3, Weighting and Weighting of short jumps)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmap_lit.networks.embeddings import FourierTimeEmbedding


class Weighting(nn.Module):
    """``(t - s)^power * L``, or with ``adaptive=True`` the learned log-variance form
    ``exp(-u(t, s)) * (t - s)^power * L + u(t, s)`` (sCM / EDM2 style; ``L`` is already a mean over
    the ``D`` elements). ``u`` is a small MLP on Fourier features of ``t`` and ``t - s``, zero at
    initialization so training starts from the uniform weighting.

    Args:
        power: Exponent of (t - s) in the weight (t - s)^power; 0: uniform, 2: the literal
            continuous-time limit in f-space (docs/design.md section 3).
        adaptive: Learn the log-variance u(t, s) (its parameters join the student's optimizer).
        hidden: Width of the hidden layer of u (adaptive only).
        fourier_channels: Fourier features of each time input of u, t and t - s (angular
            frequencies 0.5 to 16 per unit t; adaptive only).
    """

    def __init__(
        self,
        power: float = 0.0,
        adaptive: bool = False,
        hidden: int = 128,
        fourier_channels: int = 64,
    ) -> None:
        super().__init__()
        self.power = power
        self.adaptive = adaptive
        if adaptive:
            self.fourier = FourierTimeEmbedding(fourier_channels, 0.5, 16.0)
            self.u = nn.Sequential(nn.Linear(2 * fourier_channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))
            nn.init.zeros_(self.u[-1].weight)
            nn.init.zeros_(self.u[-1].bias)

    def time_weight(self, t: Tensor, s: Tensor) -> Tensor:
        if self.power == 0:
            return torch.ones_like(t)
        return (t - s).clamp(min=0) ** self.power

    def log_variance(self, t: Tensor, s: Tensor) -> Tensor:
        feats = torch.cat([self.fourier(t.float()), self.fourier((t - s).float())], 1)
        return self.u(feats).squeeze(1).to(t.dtype)

    def forward(self, loss: Tensor, t: Tensor, s: Tensor) -> Tensor:
        weighted = self.time_weight(t, s).to(loss.dtype) * loss
        if not self.adaptive:
            return weighted
        u = self.log_variance(t, s)
        return torch.exp(-u) * weighted + u
