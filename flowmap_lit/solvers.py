"""Samplers (docs/design.md section 5).

Velocity functions have the signature ``velocity(x, t) -> v`` with ``t`` a ``(B,)`` tensor; class
labels and guidance are bound by the caller (e.g. with ``functools.partial``). Times run from
``t = 1`` (noise) to ``t = 0`` (data).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from flowmap_lit.interpolant import uniform_schedule

VelocityFn = Callable[[Tensor, Tensor], Tensor]


def _at_least_fp32(x: Tensor) -> Tensor:
    """Samplers integrate in float32 (float64 inputs stay float64, for exact tests)."""
    return x if x.dtype == torch.float64 else x.float()


@torch.no_grad()
def ode_sample(
    velocity: VelocityFn,
    noise: Tensor,
    num_steps: int = 32,
    solver: Literal["euler", "heun"] = "heun",
    schedule: Tensor | None = None,
) -> Tensor:
    """Integrate the probability-flow ODE ``dx/dt = v(x, t)`` from ``t = 1`` to ``t = 0``.

    ``heun`` is the explicit trapezoidal rule (2 velocity evaluations per step, second order);
    ``euler`` takes 1 evaluation per step. ``schedule`` is a decreasing list
    of times from 1 to 0 (default: uniform in t with ``num_steps`` steps).
    """
    times = uniform_schedule(num_steps) if schedule is None else torch.as_tensor(schedule, dtype=torch.float64)
    x = _at_least_fp32(noise)
    batch = x.shape[0]
    for i in range(len(times) - 1):
        t_cur, t_next = float(times[i]), float(times[i + 1])
        h = t_next - t_cur
        t_vec = torch.full((batch,), t_cur, device=x.device, dtype=x.dtype)
        v_cur = velocity(x, t_vec).to(x.dtype)
        x_euler = x + h * v_cur
        if solver == "euler":
            x = x_euler
        elif solver == "heun":
            v_next = velocity(x_euler, torch.full((batch,), t_next, device=x.device, dtype=x.dtype)).to(x.dtype)
            x = x + h * 0.5 * (v_cur + v_next)
        else:
            raise ValueError(f"unknown solver {solver!r}; use 'euler' or 'heun'")
    return x


StudentFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # F(x, t, s): average velocity over [s, t]


@torch.no_grad()
def flowmap_sample(student: StudentFn, noise: Tensor, schedule: Tensor) -> Tensor:
    """Deterministic flow-map chaining ``x <- x + (t_{i+1} - t_i) F(x, t_i, t_{i+1})`` (docs/design.md section 5).

    ``schedule`` is a decreasing list of times ``1 = t_0 > ... > t_N = 0``; N network calls.
    """
    times = torch.as_tensor(schedule, dtype=torch.float64)
    x = _at_least_fp32(noise)
    batch = x.shape[0]
    for i in range(len(times) - 1):
        t_cur, t_next = float(times[i]), float(times[i + 1])
        t_vec = torch.full((batch,), t_cur, device=x.device, dtype=x.dtype)
        s_vec = torch.full((batch,), t_next, device=x.device, dtype=x.dtype)
        x = x + (t_next - t_cur) * student(x, t_vec, s_vec).to(x.dtype)
    return x


@torch.no_grad()
def gamma_sample(student: StudentFn, noise: Tensor, schedule: Tensor, gamma: float = 0.0,
                 generator: torch.Generator | None = None) -> Tensor:
    """Flow-map sampling with partial re-noising (CTM-style gamma sampling, docs/design.md section 5).

    Each step jumps with the flow map to ``s~``, where ``sigma(s~) = sqrt(1 - gamma^2) sigma(t_next)``
    and ``sigma(t) = t / (1 - t)``, then adds fresh noise back up to ``t_next``:
    ``x = (1 - t_next) (x~ / (1 - s~) + gamma sigma(t_next) z)``. ``gamma = 0`` is deterministic
    chaining (:func:`flowmap_sample`); ``gamma = 1`` jumps to ``s~ = 0`` and re-noises fully, the
    multistep sampling of consistency models.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if gamma == 0.0:
        return flowmap_sample(student, noise, schedule)
    times = torch.as_tensor(schedule, dtype=torch.float64)
    x = _at_least_fp32(noise)
    batch = x.shape[0]
    for i in range(len(times) - 1):
        t_cur, t_next = float(times[i]), float(times[i + 1])
        sigma_next = t_next / (1 - t_next)
        sigma_jump = (1 - gamma**2) ** 0.5 * sigma_next
        s_jump = sigma_jump / (1 + sigma_jump)
        t_vec = torch.full((batch,), t_cur, device=x.device, dtype=x.dtype)
        s_vec = torch.full((batch,), s_jump, device=x.device, dtype=x.dtype)
        x_jump = x + (s_jump - t_cur) * student(x, t_vec, s_vec).to(x.dtype)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if t_next > 0 else 0.0
        x = (1 - t_next) * (x_jump / (1 - s_jump) + gamma * sigma_next * z)
    return x
