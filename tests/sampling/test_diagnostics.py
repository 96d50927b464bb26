"""Flow-map diagnostics (flowmap_lit.diagnostics) against closed-form Gaussian flow maps."""

import math

import pytest
import torch

from flowmap_lit.diagnostics import TeacherFlow, bind_module, diagnose, jump_grid, path_steps
from flowmap_lit.interpolant import uniform_schedule
from flowmap_lit.modules import FlowMapDistillModule
from flowmap_lit.teachers.analytic import GaussianData
from tests.helpers import exact_gaussian_module

SHAPE = (1, 2, 3)


def gaussian_module(perturb: float) -> tuple[FlowMapDistillModule, GaussianData]:
    module = exact_gaussian_module(perturb, SHAPE, c_range=(0.2, 1.5))
    return module, module.teacher.data


def noise(n=64):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_exact_student_has_zero_error_everywhere():
    module, _ = gaussian_module(0.0)
    grid, paths = diagnose(module, noise(), step_counts=[1, 2, 4, 8])
    assert len(grid.rows()) == 9 * 8 // 2
    assert max(r["mse"] for r in grid.rows()) < 1e-24
    for path in paths:
        assert path.total_relative < 1e-24 and max(path.contribution) < 1e-24 and max(path.local) < 1e-24


def expected_jump_mse(data, z, perturb, t, s):
    """F + p sin(3t) x misses the exact jump by (s - t) p sin(3t) x_t."""
    x_t = data.flow_map(z, torch.ones(len(z), dtype=z.dtype), torch.full((len(z),), t, dtype=z.dtype))
    return (((s - t) * perturb * math.sin(3 * t)) * x_t).square().mean().item()


@pytest.mark.parametrize("exact", [True, False])
def test_perturbed_student_reports_its_known_jump_error(exact):
    module, data = gaussian_module(0.3)
    z = noise()
    student, flow = bind_module(module, reference_steps=512)
    if not exact:  # the same through a fine Heun solve of the teacher ODE
        flow_exact = flow
        flow = lambda labels, n: TeacherFlow(flow_exact(labels, n).velocity, None, 512)  # noqa: E731
    times = [1.0, 0.7, 0.4, 0.1, 0.0]
    grid = jump_grid(student, flow, z, times=times)
    tol = 1e-10 if exact else 2e-3
    for row in grid.rows():
        want = expected_jump_mse(data, z, 0.3, row["t"], row["s"])
        assert row["mse"] == pytest.approx(want, rel=tol, abs=1e-14), row
    x1 = grid.rows()[0]  # (1 -> 0.7): relative to the teacher's displacement
    x_t, x_s = (data.flow_map(z, torch.ones(64, dtype=z.dtype), torch.full((64,), v, dtype=z.dtype))
                for v in (1.0, 0.7))
    assert x1["relative"] == pytest.approx(x1["mse"] / (x_s - x_t).square().mean().item(), rel=tol)


def test_path_contributions_telescope_to_the_sampling_error():
    module, data = gaussian_module(0.3)
    z = noise()
    student, flow = bind_module(module)
    ref = data.flow_map(z, torch.ones(64, dtype=z.dtype), torch.zeros(64, dtype=z.dtype))
    for k in (1, 2, 4):
        path = path_steps(student, flow, z, None, uniform_schedule(k))
        x = module.sample(z, num_steps=k)
        assert path.total_relative == pytest.approx(((x - ref).square().mean() / ref.square().mean()).item(), rel=1e-10)
        assert len(path.contribution) == len(path.local) == k
        if k == 1:
            assert path.contribution[0] == pytest.approx(path.total_relative) == pytest.approx(path.local[0])
        # Per-step local errors are the jump errors at the student's own states; the last step's
        # contribution is its local error (nothing is left to carry it through).
        assert path.contribution[-1] == pytest.approx(path.local[-1], rel=1e-10)
        # The contribution vectors sum to the final error: check on one sample by hand.
    one = z[:1]
    path = path_steps(student, flow, one, None, uniform_schedule(4))
    phi = flow(None, 1)
    xs, y = [one], []
    for a, b in zip(uniform_schedule(4)[:-1].tolist(), uniform_schedule(4)[1:].tolist()):
        tv, sv = torch.full((1,), a, dtype=one.dtype), torch.full((1,), b, dtype=one.dtype)
        xs.append(xs[-1] + (b - a) * module.student(xs[-1], tv, sv))
    y = [phi(x, t, 0.0) for x, t in zip(xs, uniform_schedule(4).tolist())]
    contributions = [y[i + 1] - y[i] for i in range(4)]
    torch.testing.assert_close(sum(contributions), xs[-1] - phi(one, 1.0, 0.0))
    ref_sq = phi(one, 1.0, 0.0).square().mean().item()
    assert path.contribution == pytest.approx([c.square().mean().item() / ref_sq for c in contributions], rel=1e-9)


def test_velocity_limit_is_where_many_step_sampling_converges():
    """The student's own velocity F(x, t, t) integrated finely (FlowMapError's velocity limit) is
    the exact flow for the exact student, and what k-step flow-map sampling tends to as k grows
    for a perturbed one."""
    from types import SimpleNamespace

    from flowmap_lit.callbacks import FlowMapError

    z = noise(256)
    ones, zeros = torch.ones(len(z), dtype=z.dtype), torch.zeros(len(z), dtype=z.dtype)
    module, data = gaussian_module(0.0)
    exact = data.flow_map(z, ones, zeros)
    assert (module.velocity_sample(z, None, num_steps=256) - exact).square().mean() < 1e-7  # Heun: second order
    module, data = gaussian_module(0.3)
    limit = module.velocity_sample(z, None, num_steps=256)
    errors = [(module.sample(z, None, num_steps=k) - limit).square().mean().item() for k in (2, 8, 32, 128)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3 * errors[0]
    assert (limit - exact).square().mean() > 1e-3  # the perturbation survives at s = t
    trainer = SimpleNamespace(datamodule=SimpleNamespace(shape=SHAPE), callbacks=[])
    module.double()
    cb = FlowMapError(step_counts=[1, 8], num_samples=128, reference_steps=64, velocity_limit_steps=64)
    cb.evaluate(trainer, module)
    noise_cb, _, ref = cb.reference(trainer, module)
    direct = (module.velocity_sample(noise_cb, None, num_steps=64) - ref).square().mean() / ref.square().mean()
    assert cb.velocity_limit["steps"] == 64 and cb.velocity_limit["relative_error"] == pytest.approx(direct.item())
