"""The adversarial objective (flowmap_lit.objectives.RpGAN): relativistic pair losses and R1/R2 penalties
against closed forms and finite differences, lazy penalties, and a trained discriminator's pull."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flowmap_lit.networks import Discriminator
from flowmap_lit.objectives import RpGAN


class LinearD(nn.Module):
    """D(x) = w . x + b, whose input gradient is w everywhere."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, 1)

    def forward(self, x, class_labels=None):
        return self.lin(x.flatten(1)).squeeze(1)


def test_rpgan_losses_and_penalties_match_the_closed_form():
    torch.manual_seed(0)
    d = LinearD(4)
    real, fake = torch.randn(6, 1, 2, 2), torch.randn(6, 1, 2, 2) + 1.0
    loss, stats = RpGAN(r1_gamma=2.0, r2_gamma=0.5).discriminator_loss(d, real, fake)
    w2 = d.lin.weight.square().sum()
    expected = F.softplus(d(fake) - d(real)) + 0.5 * (2.0 + 0.5) * w2
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["r1"], w2.expand(6).mean())
    # The penalty is trained: d/dw of gamma/2 ||w||^2 is gamma * w.
    d.zero_grad()
    RpGAN(r1_gamma=2.0, r2_gamma=0.0).discriminator_loss(d, real, real.clone())[0].sum().backward()
    # (real == fake: the pair term's gradient sigmoid(0) * (fake - real) vanishes)
    torch.testing.assert_close(d.lin.weight.grad, 6 * 2.0 * d.lin.weight.detach())

    # Generator: the gradient reaches the fakes only, -sigmoid(D(r) - D(f)) * w per sample.
    fake_p = fake.clone().requires_grad_(True)
    RpGAN().generator_loss(d, real, fake_p).sum().backward()
    coef = -torch.sigmoid(d(real) - d(fake)).detach()
    torch.testing.assert_close(fake_p.grad.flatten(1), coef[:, None] * d.lin.weight.detach())


def test_r1_penalty_gradient_matches_finite_differences():
    torch.manual_seed(0)
    d = Discriminator(img_channels=1, img_resolution=8, channels=[8, 8], num_classes=3).double()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    fn = lambda v: d(v, labels)  # noqa: E731
    loss = lambda: RpGAN(r1_gamma=1.0, r2_gamma=0.0).discriminator_loss(fn, x, x)[0].sum()  # noqa: E731
    p = d.conv.weight
    (grad,) = torch.autograd.grad(loss(), p)
    idx, h = (0, 0, 1, 1), 1e-6
    p.data[idx] += h
    up = loss().detach()
    p.data[idx] -= 2 * h
    down = loss().detach()
    p.data[idx] += h
    fd = (up - down) / (2 * h)
    assert abs(grad[idx].item() - fd.item()) < 1e-6 * max(1.0, abs(fd.item()))


def test_trained_discriminator_pushes_fakes_toward_the_data():
    torch.manual_seed(0)
    d = Discriminator(img_channels=1, img_resolution=4, channels=[16], mbstd_group=0)
    gan = RpGAN(r1_gamma=0.1, r2_gamma=0.1)
    opt = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.0, 0.99))
    for _ in range(100):
        real, fake = torch.randn(64, 1, 4, 4), torch.randn(64, 1, 4, 4) + 1.5
        opt.zero_grad()
        gan.discriminator_loss(d, real, fake)[0].mean().backward()
        opt.step()
    fake = (torch.randn(256, 1, 4, 4) + 1.5).requires_grad_(True)
    gan.generator_loss(d, torch.randn(256, 1, 4, 4), fake).mean().backward()
    assert fake.grad.mean() > 0  # gradient descent moves the fakes down, toward the data at 0


def test_lazy_penalties_apply_every_n_steps_scaled_up():
    torch.manual_seed(0)
    d = LinearD(4)
    real, fake = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    w2 = d.lin.weight.square().sum()
    pair = F.softplus(d(fake) - d(real))
    gan = RpGAN(r1_gamma=1.0, r2_gamma=1.0, penalty_every=4)
    on, stats_on = gan.discriminator_loss(d, real, fake, step=8)
    off, stats_off = gan.discriminator_loss(d, real, fake, step=9)
    torch.testing.assert_close(on, pair + 0.5 * 4 * (1.0 + 1.0) * w2)  # 4x the weight, every 4th step
    torch.testing.assert_close(off, pair)
    assert "r1" in stats_on and "r1" not in stats_off
    with pytest.raises(ValueError, match="penalty_every"):
        RpGAN(penalty_every=0)
