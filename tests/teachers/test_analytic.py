"""Exact references (flowmap_lit.teachers.analytic, docs/design.md section 6): the Gaussian velocity is the
conditional expectation, its flow map solves the ODE and composes, and Gaussian mixtures behave as their
components."""

import torch

from flowmap_lit.interpolant import interpolate
from flowmap_lit.solvers import ode_sample
from flowmap_lit.teachers.analytic import GaussianMixture
from tests.helpers import gaussian


def test_gaussian_velocity_is_conditional_expectation():
    """Monte Carlo E[eps - x0 | x_t] (by regression on exact samples) matches the formula."""
    g = gaussian()
    gen = torch.Generator().manual_seed(1)
    n = 400_000
    x0 = g.sample(n, generator=gen)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.full((n,), 0.37, dtype=torch.float64)
    x_t = interpolate(x0, eps, t)
    # The conditional expectation is affine in x_t per coordinate: fit it by least squares.
    target = (eps - x0).reshape(n, -1)
    xs = x_t.reshape(n, -1)
    exact = g.velocity(x_t, t).reshape(n, -1)
    for d in range(xs.shape[1]):
        a = torch.stack([xs[:, d], torch.ones(n, dtype=torch.float64)], 1)
        coef = torch.linalg.lstsq(a, target[:, d:d + 1]).solution
        pred = a @ coef
        assert (pred.squeeze(1) - exact[:, d]).abs().max() < 0.02


def test_flow_map_solves_the_ode_and_composes():
    g = gaussian()
    x = torch.randn(16, 1, 2, 3, dtype=torch.float64)
    t = torch.full((16,), 0.9, dtype=torch.float64)
    s = torch.full((16,), 0.2, dtype=torch.float64)
    u = torch.full((16,), 0.5, dtype=torch.float64)
    assert torch.allclose(g.flow_map(g.flow_map(x, t, u), u, s), g.flow_map(x, t, s))
    assert torch.allclose(g.flow_map(x, t, t), x)
    # d/ds f(x, t, s) = v(f(x, t, s), s) by central differences.
    h = 1e-6
    ds = (g.flow_map(x, t, s + h) - g.flow_map(x, t, s - h)) / (2 * h)
    assert torch.allclose(ds, g.velocity(g.flow_map(x, t, s), s), atol=1e-7)


def test_gmm_single_component_matches_gaussian_and_mixture_posterior():
    g = gaussian(shape=(1, 2, 2))
    cov = torch.diag_embed(g.c.reshape(1, -1) ** 2)
    gm = GaussianMixture(torch.ones(1), g.mu.reshape(1, -1), cov, (1, 2, 2))
    x = torch.randn(8, 1, 2, 2, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64)
    assert torch.allclose(gm.velocity(x, t), g.velocity(x, t), atol=1e-12)

    # Two well-separated components: far from one of them the velocity is the other's.
    means = torch.stack([torch.full((4,), -5.0), torch.full((4,), 5.0)]).double()
    covs = torch.stack([torch.eye(4), 2 * torch.eye(4)]).double()
    mix = GaussianMixture(torch.tensor([0.5, 0.5]), means, covs, (1, 2, 2), component_classes=torch.tensor([0, 1]))
    only1 = GaussianMixture(torch.ones(1), means[1:], covs[1:], (1, 2, 2))
    x = torch.full((3, 1, 2, 2), 4.0, dtype=torch.float64)
    t = torch.full((3,), 0.3, dtype=torch.float64)
    assert torch.allclose(mix.velocity(x, t), only1.velocity(x, t), atol=1e-6)
    # Class-conditional: label 1 selects component 1 exactly, wherever x is.
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    labels = torch.ones(3, dtype=torch.long)
    assert torch.allclose(mix.velocity(x, t, labels), only1.velocity(x, t), atol=1e-12)


def test_gmm_ode_samples_match_mixture_statistics():
    torch.manual_seed(0)
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    a = torch.tensor([[1.0, 0.5], [0.0, 0.3]], dtype=torch.float64)
    covs = torch.stack([a @ a.T, 0.2 * torch.eye(2, dtype=torch.float64)])
    gm = GaussianMixture(torch.tensor([0.3, 0.7]), means, covs, (2,))
    noise = torch.randn(20000, 2)
    x = ode_sample(lambda x, t: gm.velocity(x, t), noise, 48)
    ref = gm.sample(20000, generator=torch.Generator().manual_seed(1))
    assert (x.mean(0) - ref.mean(0)).abs().max() < 0.05
    assert (x.T.cov() - ref.T.cov()).abs().max() < 0.1
