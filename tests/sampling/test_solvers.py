"""Samplers (flowmap_lit.solvers) against closed forms (docs/design.md sections 5 and 6): the Heun ODE
sampler converges at second order, few-step flow-map and gamma sampling with the exact flow map give the
exact ODE solution and the data distribution; and the time schedules of flowmap_lit.interpolant."""

import pytest
import torch

from flowmap_lit.interpolant import edm_schedule, sigma_to_t, uniform_schedule
from flowmap_lit.solvers import flowmap_sample, gamma_sample, ode_sample
from tests.helpers import ExactGaussianStudent, MLPVelocity, gaussian


def test_heun_sampler_converges_to_exact_flow_map():
    g = gaussian()
    noise = torch.randn(32, 1, 2, 3)
    exact = g.flow_map(noise.double(), torch.ones(32, dtype=torch.float64), torch.zeros(32, dtype=torch.float64))
    vel = lambda x, t: g.velocity(x.double(), t.double()).float()  # noqa: E731
    errs = {n: (ode_sample(vel, noise, n, "heun").double() - exact).abs().max().item() for n in (8, 16, 32)}
    assert errs[32] < 2e-3
    assert errs[16] / errs[32] > 3.0, errs  # second order: ~4x per halving
    euler = (ode_sample(vel, noise, 32, "euler").double() - exact).abs().max().item()
    assert euler > errs[32]


@pytest.mark.parametrize("schedule", [uniform_schedule(1), uniform_schedule(4), edm_schedule(8),
                                      torch.tensor([1.0, 0.9, 0.3, 0.05, 0.0], dtype=torch.float64)])
def test_exact_student_returns_the_exact_ode_solution_for_any_schedule(schedule):
    data = gaussian()
    student = ExactGaussianStudent(data)
    noise = torch.randn(64, 1, 2, 3, dtype=torch.float64)
    exact = data.flow_map(noise, torch.ones(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64))
    assert torch.allclose(flowmap_sample(student, noise, schedule), exact, atol=1e-12)
    assert torch.allclose(gamma_sample(student, noise, schedule, gamma=0.0), exact, atol=1e-12)


def test_gamma_one_is_consistency_multistep_sampling():
    torch.manual_seed(0)
    student = MLPVelocity((1, 2, 3), 32)
    noise = torch.randn(16, 1, 2, 3)
    schedule = uniform_schedule(4)
    got = gamma_sample(student, noise, schedule, gamma=1.0, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    x = noise
    for t_cur, t_next in zip(schedule[:-1].tolist(), schedule[1:].tolist()):
        t_vec, zero = torch.full((16,), t_cur), torch.zeros(16)
        x0 = x - t_cur * student(x, t_vec, zero)  # f(x, t, 0), the consistency function
        z = torch.randn(x.shape, generator=gen) if t_next > 0 else torch.zeros_like(x)
        x = (1 - t_next) * x0 + t_next * z
    assert torch.allclose(got, x, atol=1e-5)


@pytest.mark.parametrize("gamma", [0.3, 1.0])
def test_gamma_sampling_with_the_exact_map_samples_the_data_distribution(gamma):
    data = gaussian()
    noise = torch.randn(40000, 1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = gamma_sample(ExactGaussianStudent(data), noise, uniform_schedule(4), gamma,
                     generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x.mean(0), data.mu, atol=0.03)
    assert torch.allclose(x.std(0), data.c, rtol=0.03)


def test_schedules():
    u = uniform_schedule(4)
    assert torch.allclose(u, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    for n in (1, 2, 4, 8):
        e = edm_schedule(n)
        assert len(e) == n + 1 and e[0] == 1.0 and e[-1] == 0.0
        assert (e[1:] < e[:-1]).all()
    e = edm_schedule(8, sigma_min=0.002, sigma_max=80.0)
    assert torch.isclose(e[1], sigma_to_t(torch.tensor(80.0)).double())
    assert torch.isclose(e[-2], sigma_to_t(torch.tensor(0.002)).double())
