"""The distribution-matching corrector against closed forms (Gaussian data, an affine 1-step student whose
samples are Gaussian, and the fake velocity of the student's distribution in closed form): its direction is
the difference of the two posterior means (Tweedie), it vanishes when the student's distribution is the
teacher's, one small step on a perturbed student lowers the distance between the two Gaussians, and a learned
fake velocity trained on the exact teacher's samples approaches the teacher's velocity."""

import pytest
import torch
from torch import nn

from flowmap_lit.objectives import DistributionMatching
from flowmap_lit.teachers.analytic import GaussianData

MU = torch.tensor([0.7, -0.4], dtype=torch.float64)
C = torch.tensor([0.5, 1.3], dtype=torch.float64)


def posterior_mean(mu: torch.Tensor, c: torch.Tensor, x_r: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_r] of data N(mu, diag(c^2)) under x_r = (1 - r) x0 + r eps (Gaussian conditioning)."""
    r = r[:, None]
    var = (1 - r) ** 2 * c**2 + r**2
    return mu + (1 - r) * c**2 / var * (x_r - (1 - r) * mu)


class AffineStudent(nn.Module):
    """1-step samples x_hat = a * z + b: N(b, diag(a^2))."""

    def __init__(self, a, b):
        super().__init__()
        self.a = nn.Parameter(torch.as_tensor(a, dtype=torch.float64).clone())
        self.b = nn.Parameter(torch.as_tensor(b, dtype=torch.float64).clone())

    def forward(self, z):
        return self.a * z + self.b

    def fake(self):
        """The exact velocity of the student's distribution (the ideal fake velocity)."""
        return GaussianData(self.b.detach(), self.a.detach().abs()).velocity

    def w2(self):
        return ((self.b - MU).square().sum() + (self.a.abs() - C).square().sum()).sqrt().item()


def corrector_grads(student, dm, n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x_hat = student(z)
    r, eps = dm.draw(x_hat, g)
    loss, _ = dm.student_loss(student.fake(), GaussianData(MU, C).velocity, x_hat, r, eps)
    student.zero_grad()
    loss.mean().backward()
    return student.a.grad.clone(), student.b.grad.clone()


def test_the_direction_is_the_difference_of_the_posterior_means():
    dm = DistributionMatching(normalize="none")
    g = torch.Generator().manual_seed(0)
    b, a = torch.tensor([0.2, 0.3], dtype=torch.float64), torch.tensor([0.9, 0.8], dtype=torch.float64)
    x_hat = b + a * torch.randn(512, 2, generator=g, dtype=torch.float64)
    r, eps = dm.draw(x_hat, g)
    grad, _ = dm.gradient(GaussianData(b, a).velocity, GaussianData(MU, C).velocity, x_hat, r, eps)
    x_r = (1 - r[:, None]) * x_hat + r[:, None] * eps
    expected = posterior_mean(b, a, x_r, r) - posterior_mean(MU, C, x_r, r)  # x0_fake - x0_real
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("normalize", ["dmd2", "none"])
@pytest.mark.parametrize("distribution", ["uniform", "logit_normal"])
def test_zero_at_the_teacher_and_a_small_step_lowers_the_distance(normalize, distribution):
    dm = DistributionMatching(distribution=distribution, normalize=normalize)
    exact = AffineStudent(C, MU)
    ga, gb = corrector_grads(exact, dm)
    assert ga.abs().max() < 1e-12 and gb.abs().max() < 1e-12

    perturbed = AffineStudent(C * torch.tensor([1.4, 0.7], dtype=torch.float64), MU + torch.tensor([0.3, -0.5]))
    before = perturbed.w2()
    ga, gb = corrector_grads(perturbed, dm)
    step = 0.05 / max(ga.abs().max().item(), gb.abs().max().item())
    with torch.no_grad():
        perturbed.a -= step * ga
        perturbed.b -= step * gb
    assert perturbed.w2() < before - 1e-3, (before, perturbed.w2())
    # the gradient points at the teacher in every coordinate
    assert torch.all(torch.sign(gb) == torch.sign(MU + torch.tensor([0.3, -0.5]) - MU))
    assert torch.all(torch.sign(ga) == torch.sign(torch.tensor([1.4, 0.7]) - 1))


def test_gradient_descent_on_the_corrector_alone_reaches_the_teacher():
    dm = DistributionMatching()
    student = AffineStudent(C * 1.5, MU - 0.5)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    start = student.w2()
    for i in range(150):
        corrector_grads(student, dm, n=4096, seed=i)
        opt.step()
    assert student.w2() < 0.05 * start, (start, student.w2())


class Velocity(nn.Module):
    def __init__(self, width=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2))

    def forward(self, x, r):
        return self.net(torch.cat([x, r[:, None].to(x.dtype)], 1))


def test_a_learned_fake_velocity_approaches_the_teacher_velocity():
    torch.manual_seed(0)
    teacher = GaussianData(MU.float(), C.float())
    fake, dm = Velocity(), DistributionMatching(r_min=0.05, r_max=0.95)
    opt = torch.optim.Adam(fake.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1200)
    g = torch.Generator().manual_seed(1)

    def error():
        x0 = teacher.sample(4096, generator=g)
        r, eps = dm.draw(x0, g)
        x_r = (1 - r[:, None]) * x0 + r[:, None] * eps
        with torch.no_grad():
            v = teacher.velocity(x_r, r)
            return ((fake(x_r, r) - v).square().mean() / v.square().mean()).sqrt().item()

    start = error()
    for _ in range(1200):
        x_hat = teacher.sample(512, generator=g)  # samples of a student that equals the teacher
        r, eps = dm.draw(x_hat, g)
        loss = dm.fake_loss(fake, x_hat, r, eps).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    end = error()
    assert end < 0.12 and end < 0.12 * start, (start, end)  # from 1.01 to 0.10 (seeded)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="r_min <= r_max"):
        DistributionMatching(r_min=0.5, r_max=0.2)
    with pytest.raises(ValueError, match="distribution"):
        DistributionMatching(distribution="beta")
    with pytest.raises(ValueError, match="normalize"):
        DistributionMatching(normalize="l2")
