"""k-step time grids (flowmap_lit.grids): every search parameter is a valid grid, invalid grids are refused
with the reason, and a schedules file drives a module's sampler."""

import json

import pytest
import torch

from flowmap_lit.grids import check_grid, grid_from_params, load_schedules, params_from_grid, save_schedules
from flowmap_lit.interpolant import edm_schedule, uniform_schedule
from flowmap_lit.modules import FlowMapDistillModule
from flowmap_lit.objectives import AYFEMD
from tests.helpers import ExactGaussianStudent, exact_gaussian_module


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_every_parameter_vector_is_a_valid_grid(k):
    gen = torch.Generator().manual_seed(k)
    for scale in (0.1, 3.0, 1e3, 1e9):
        for _ in range(20):
            grid = grid_from_params(scale * torch.randn(k, generator=gen, dtype=torch.float64))
            check_grid(grid, k)  # strictly decreasing from exactly 1 to exactly 0
    for make in (uniform_schedule, edm_schedule):  # the baselines are reachable exactly (up to rounding)
        assert torch.allclose(grid_from_params(params_from_grid(make(k))), make(k), atol=1e-12)


def test_invalid_grids_are_refused_with_the_reason():
    for bad in ([1.0, 0.5, 0.5, 0.0], [1.0, 0.2, 0.6, 0.0], [0.9, 0.0], [1.0, 0.1]):
        with pytest.raises(ValueError, match="decrease strictly from 1 to 0"):
            check_grid(bad)
    with pytest.raises(ValueError, match="a 2-step grid has 3 times"):
        check_grid([1.0, 0.3, 0.1, 0.0], 2)


def test_schedules_file_drives_the_module_sampler(tmp_path):
    module = exact_gaussian_module(0.2).double()
    grid = torch.tensor([1.0, 0.7, 0.2, 0.0], dtype=torch.float64)
    path = save_schedules(tmp_path / "s.json", {3: grid}, {3: 0.0})
    module.set_schedules(str(path))
    noise = torch.randn(16, 1, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(module.sample(noise, num_steps=3), module.sample(noise, num_steps=3, schedule=grid))
    assert not torch.equal(module.sample(noise, num_steps=3),
                           module.sample(noise, num_steps=3, schedule=uniform_schedule(3)))
    assert torch.equal(module.sample(noise, num_steps=2),
                       module.sample(noise, num_steps=2, schedule=uniform_schedule(2)))
    doc = json.loads(path.read_text())
    doc["grids"]["3"] = [1.0, 0.2, 0.7, 0.0]
    with pytest.raises(ValueError, match="decrease strictly"):
        load_schedules(doc)
    with pytest.raises(ValueError, match="not a schedules file"):
        load_schedules({"grids": {}})
    with pytest.raises(FileNotFoundError, match="flowmap_lit schedule"):
        FlowMapDistillModule(module.teacher, AYFEMD(), student=ExactGaussianStudent(module.teacher.data),
                             init_student_from_teacher=False, schedules=str(tmp_path / "missing.json"))
