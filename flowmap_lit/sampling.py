"""Samplers (DESIGN.md section 5).

Velocity functions have the signature ``velocity(x, t) -> v`` with ``t`` a ``(B,)`` tensor; class
labels and guidance are bound by the caller (e.g. with ``functools.partial``). Times run from
``t = 1`` (noise) to ``t = 0`` (data).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from flowmap_lit.interpolant import uniform_schedule

VelocityFn = Callable[[Tensor, Tensor], Tensor]


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
    x = noise.to(torch.float32)
    batch = x.shape[0]
    for i in range(len(times) - 1):
        t_cur, t_next = float(times[i]), float(times[i + 1])
        h = t_next - t_cur
        t_vec = torch.full((batch,), t_cur, device=x.device)
        v_cur = velocity(x, t_vec).float()
        x_euler = x + h * v_cur
        if solver == "euler":
            x = x_euler
        elif solver == "heun":
            v_next = velocity(x_euler, torch.full((batch,), t_next, device=x.device)).float()
            x = x + h * 0.5 * (v_cur + v_next)
        else:
            raise ValueError(f"unknown solver {solver!r}; use 'euler' or 'heun'")
    return x


StudentFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # F(x, t, s): average velocity over [s, t]


@torch.no_grad()
def flowmap_sample(student: StudentFn, noise: Tensor, schedule: Tensor) -> Tensor:
    """Deterministic flow-map chaining ``x <- x + (t_{i+1} - t_i) F(x, t_i, t_{i+1})`` (DESIGN.md 5).

    ``schedule`` is a decreasing list of times ``1 = t_0 > ... > t_N = 0``; N network calls.
    """
    times = torch.as_tensor(schedule, dtype=torch.float64)
    x = noise.to(torch.float32)
    batch = x.shape[0]
    for i in range(len(times) - 1):
        t_cur, t_next = float(times[i]), float(times[i + 1])
        t_vec = torch.full((batch,), t_cur, device=x.device)
        s_vec = torch.full((batch,), t_next, device=x.device)
        x = x + (t_next - t_cur) * student(x, t_vec, s_vec).float()
    return x
