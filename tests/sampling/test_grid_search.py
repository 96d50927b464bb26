"""Grid search (flowmap_lit.grid_search): on a mistimed Gaussian student the tuned grid beats the uniform
one, every grid tried is valid, the search is reproducible, and the gamma search stays in range."""

import pytest
import torch

from flowmap_lit.grid_search import flowmap_error_criterion, search_grid
from flowmap_lit.grids import check_grid
from tests.helpers import exact_gaussian_module


def gaussian_noise(n=256, seed=1):
    return torch.randn(n, 1, 2, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_search_on_a_mistimed_gaussian_student_beats_uniform_and_never_tries_an_invalid_grid():
    module = exact_gaussian_module(perturb=0.4).double()
    noise = gaussian_noise()
    exact = module.teacher.data.flow_map(noise, torch.ones(()), torch.zeros(()))
    criterion = flowmap_error_criterion(module, noise, None, reference_steps=256)
    # the reference is the teacher's Heun ODE: next to the closed form it is exact to ~1e-9 relative
    ref = module.teacher_sample(noise, num_steps=256)
    assert ((ref - exact).square().mean() / exact.square().mean()) < 1e-8
    seen = []

    def recorded(grid, gamma):
        seen.append(grid.clone())
        check_grid(grid, 4)
        return criterion(grid, gamma)

    res = search_grid(recorded, 4, budget=40, seed=0)
    assert res.evaluations == len(seen) <= 40
    assert res.value <= min(res.baselines.values())
    assert res.value < 0.8 * res.baselines["uniform"]  # a real gain over uniform on this student
    assert res.value == pytest.approx(criterion(res.grid, 0.0), rel=1e-12)
    assert res.history == sorted(res.history, reverse=True)
    again = search_grid(criterion, 4, budget=40, seed=0)  # reproducible with the seed
    assert torch.equal(again.grid, res.grid)
    # the exact flow map has no error on any grid: the search keeps that
    exact_module = exact_gaussian_module(0.0).double()
    res0 = search_grid(flowmap_error_criterion(exact_module, noise, None, 256), 3, budget=12, seed=1)
    assert res0.value < 1e-8


def test_gamma_search_stays_in_range_and_one_step_grids_are_fixed():
    calls = []

    def criterion(grid, gamma):
        calls.append((grid.clone(), gamma))
        return (gamma - 0.3) ** 2

    res = search_grid(criterion, 1, budget=30, seed=0, search_gamma=True)
    assert all(torch.equal(g, torch.tensor([1.0, 0.0], dtype=torch.float64)) for g, _ in calls)
    assert all(0.0 <= gm <= 1.0 for _, gm in calls)
    assert abs(res.gamma - 0.3) < 0.05
    res = search_grid(criterion, 1, budget=30, seed=0)  # nothing to search: the baselines only
    assert res.evaluations == 2
