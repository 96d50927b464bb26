"""The distribution-matching corrector (docs/design.md section 13).

A flow map trained only on local conditions (AYF-EMD, AYF-LMD) accumulates error along its long
jumps: its 1-step samples land near, not on, the teacher's distribution. The corrector measures
that miss on the samples themselves. An online *fake velocity* ``g(x, r)`` is fitted by plain flow
matching to the student's samples ``x_hat`` re-noised to ``x_r = (1 - r) x_hat + r eps``, so
``g`` is the velocity of the student's distribution and ``v`` (the guided teacher) that of the
teacher's. Their data predictions ``x_r - r g`` and ``x_r - r v`` differ by ``r (v - g)``, which
is, up to a positive factor ``r^2 / (1 - r)``, the difference of the two scores at ``x_r``: the
gradient of ``KL(student || teacher)`` with respect to the sample (DMD, VSD). The student
descends it through ``x_hat``:

    grad = (x0_fake - x0_real) / mean|x_hat - x0_real|,   x0_fake - x0_real = r (v - g)
    loss = 0.5 * mean((x_hat - sg(x_hat - grad))^2),       d loss / d x_hat = grad / D

The per-sample normalization by ``mean|x_hat - x0_real|`` (DMD2) makes the step size independent
of the noise level and of the data's scale. When the student's distribution is the teacher's,
``g = v`` and the gradient is zero.

This class is the math only (no networks of its own, no optimizers); ``DistributionMatchingModule``
(flowmap_lit/modules/corrector.py) trains the fake velocity and mixes the corrector into distillation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from flowmap_lit.interpolant import expand_like, interpolate, velocity_target
from flowmap_lit.objectives.base import fp32, per_sample_mean

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # v(x, r)


class DistributionMatching:
    """The corrector's two losses and its noise levels (see the module docstring).

    Args:
        distribution: How the re-noising level r of the student's samples is drawn: "uniform"
            (U[r_min, r_max]) or "logit_normal" (sigmoid(N(P_mean, P_std)) clamped to [r_min, r_max]).
        r_min: Lowest re-noising level; near 0 the two velocities differ only by the samples' fine
            detail.
        r_max: Highest re-noising level; near 1 the re-noised samples are almost pure noise and the
            two velocities agree.
        P_mean: Location of the logit-normal r (above 0 favours high noise, as FreeFlow's corrector).
        P_std: Scale of the logit-normal r.
        normalize: Divide the gradient per sample by mean|x_hat - x0_real| (DMD2): "dmd2"; or take it
            as it is: "none".
    """

    def __init__(
        self,
        distribution: Literal["uniform", "logit_normal"] = "uniform",
        r_min: float = 0.02,
        r_max: float = 0.98,
        P_mean: float = 0.0,
        P_std: float = 1.0,
        normalize: Literal["dmd2", "none"] = "dmd2",
    ) -> None:
        if distribution not in ("uniform", "logit_normal"):
            raise ValueError(f"distribution must be 'uniform' or 'logit_normal', got {distribution!r}")
        if not 0.0 < r_min <= r_max < 1.0:
            raise ValueError(f"the re-noising range needs 0 < r_min <= r_max < 1, got [{r_min}, {r_max}]")
        if normalize not in ("dmd2", "none"):
            raise ValueError(f"normalize must be 'dmd2' or 'none', got {normalize!r}")
        self.distribution, self.r_min, self.r_max = distribution, r_min, r_max
        self.P_mean, self.P_std, self.normalize = P_mean, P_std, normalize

    def draw(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(r, eps)`` for the samples ``x``: re-noising levels ``(B,)`` and noise like ``x``."""
        n = x.shape[0]
        if self.distribution == "uniform":
            u = torch.rand(n, device=x.device, generator=generator)
            r = self.r_min + (self.r_max - self.r_min) * u
        else:
            z = torch.randn(n, device=x.device, generator=generator)
            r = torch.sigmoid(self.P_mean + self.P_std * z).clamp(self.r_min, self.r_max)
        eps = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
        return r.to(x.dtype), eps

    def fake_loss(self, fake: VelocityFn, x_hat: Tensor, r: Tensor, eps: Tensor) -> Tensor:
        """Per-sample flow-matching loss of the fake velocity on the (detached) student samples."""
        x_hat = x_hat.detach()
        target = velocity_target(x_hat, eps)
        return per_sample_mean((fp32(fake(interpolate(x_hat, eps, r), r)) - fp32(target)) ** 2)

    def gradient(self, fake: VelocityFn, teacher: VelocityFn, x_hat: Tensor, r: Tensor,
                 eps: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The descent direction on the samples (``grad`` of the module docstring; no grad) and stats."""
        with torch.no_grad():
            x_hat = fp32(x_hat.detach())
            x_r = interpolate(x_hat, fp32(eps), r.to(x_hat.dtype))
            v_fake, v_real = fp32(fake(x_r, r)), fp32(teacher(x_r, r))
            rr = expand_like(r, x_r).to(x_hat.dtype)
            grad = rr * (v_real - v_fake)  # x0_fake - x0_real
            stats = {"dm_gap": grad.flatten(1).pow(2).mean(1).sqrt().mean()}
            if self.normalize == "dmd2":
                x0_real = x_r - rr * v_real
                scale = (x_hat - x0_real).abs().flatten(1).mean(1).clamp(min=1e-6)
                grad = grad / expand_like(scale, grad)
        return grad, stats

    def student_loss(self, fake: VelocityFn, teacher: VelocityFn, x_hat: Tensor, r: Tensor,
                     eps: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-sample surrogate ``0.5 mean((x_hat - sg(x_hat - grad))^2)`` whose gradient through
        ``x_hat`` (which carries the student's graph) is ``grad / D``; and stats to log."""
        grad, stats = self.gradient(fake, teacher, x_hat, r, eps)
        target = (fp32(x_hat) - grad).detach()
        return 0.5 * per_sample_mean((fp32(x_hat) - target) ** 2), stats
