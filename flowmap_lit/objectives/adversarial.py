"""Relativistic pairing GAN loss (RpGAN) with R1 and R2 gradient penalties, for the adversarial finetune.

Each real sample ``x_r`` is paired with one generated sample ``x_f`` (same position in the batch,
same class); with ``d = D(x_f) - D(x_r)``:

- discriminator: ``softplus(d)`` (it wants real above fake), plus
  ``R1 = gamma/2 ||grad_x D(x_r)||^2`` and ``R2 = gamma/2 ||grad_x D(x_f)||^2`` (gradients of the
  discriminator at the real and at the fake points, both with create_graph so they are trained);
- generator: ``softplus(-d)``.

``softplus(d) = -log sigmoid(-d)``: the logistic loss of the pair. The penalties keep the
discriminator smooth around both distributions, which is what makes the relativistic loss
converge locally (Huang et al., "The GAN is dead; long live the GAN!", 2024).

Nothing here knows about Lightning: ``flowmap_lit.modules.AdversarialFinetuneModule`` calls it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flowmap_lit.objectives.base import fp32

DiscriminatorFn = Callable[[Tensor], Tensor]  # x -> (B,) logits, class labels already bound


def gradient_penalty(d: DiscriminatorFn, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(D(x), ||grad_x D(x)||^2)`` per sample, the penalty differentiable w.r.t. D's parameters."""
    x = x.detach().requires_grad_(True)
    logits = d(x)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return logits, fp32(grad).square().flatten(1).sum(1)


class RpGAN(nn.Module):
    """Relativistic pairing GAN losses with R1 (real) and R2 (fake) gradient penalties.

    Args:
        r1_gamma: Weight gamma of the R1 penalty gamma/2 ||grad_x D(real)||^2 (>= 0; 0: off).
        r2_gamma: Weight gamma of the R2 penalty gamma/2 ||grad_x D(fake)||^2 (>= 0; 0: off).
        penalty_every: Apply the R1/R2 penalties on every this many discriminator steps only,
            scaled up by the same factor (lazy regularization); 1: every step.
    """

    def __init__(
        self,
        r1_gamma: float = 1.0,
        r2_gamma: float = 1.0,
        penalty_every: int = 1,
    ) -> None:
        super().__init__()
        if r1_gamma < 0 or r2_gamma < 0:
            raise ValueError(f"r1_gamma and r2_gamma must be >= 0, got {r1_gamma}, {r2_gamma}")
        if penalty_every < 1:
            raise ValueError(f"penalty_every must be >= 1, got {penalty_every}")
        self.r1_gamma, self.r2_gamma, self.penalty_every = r1_gamma, r2_gamma, penalty_every

    def discriminator_loss(self, d: DiscriminatorFn, real: Tensor, fake: Tensor,
                           step: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-pair discriminator loss ``softplus(D(f) - D(r)) + R1 + R2`` and stats (detached)."""
        fake = fake.detach()
        penalize = step % self.penalty_every == 0
        if penalize and self.r1_gamma > 0:
            d_real, r1 = gradient_penalty(d, real)
        else:
            d_real, r1 = d(real), real.new_zeros(real.shape[0]).float()
        if penalize and self.r2_gamma > 0:
            d_fake, r2 = gradient_penalty(d, fake)
        else:
            d_fake, r2 = d(fake), fake.new_zeros(fake.shape[0]).float()
        scale = 0.5 * self.penalty_every
        loss = F.softplus(fp32(d_fake) - fp32(d_real)) + scale * (self.r1_gamma * r1 + self.r2_gamma * r2)
        stats = {"d_real": fp32(d_real.detach()).mean(), "d_fake": fp32(d_fake.detach()).mean()}
        if penalize:
            stats.update(r1=r1.detach().mean(), r2=r2.detach().mean())
        return loss, stats

    def generator_loss(self, d: DiscriminatorFn, real: Tensor, fake: Tensor) -> Tensor:
        """Per-pair generator loss ``softplus(D(r) - D(f))``; gradients flow into ``fake`` only."""
        with torch.no_grad():
            d_real = d(real.detach())
        return F.softplus(fp32(d_real) - fp32(d(fake)))
