"""Where a flow map is wrong: single-jump errors over a (t, s) grid, and each step's share of the
error along the k-step sampling paths (docs/design.md section 9).

Both compare the student with the teacher's own flow map ``Phi(x, t, s)`` (the ODE solution from
``x`` at ``t`` read at ``s``): the closed form when the teacher has one (``flow_map(x, t, s)``,
e.g. Gaussian data, unguided), else a fine Heun solve of the (guided) teacher ODE.

**Jump grid.** Noise is carried down the teacher's ODE, so ``x_{t_i}`` is an exact sample of the
marginal at every grid time ``t_i`` (the ODE preserves the marginals). For every pair
``t_i > t_j`` the student jumps ``f(x_{t_i}, t_i, t_j) = x + (t_j - t_i) F`` and lands
``f - x_{t_j}`` away from the teacher. Reported per pair: the mean squared error per element, and
that error relative to the jump's own size ``mean ||x_{t_j} - x_{t_i}||^2`` (1 means "as wrong as
not moving at all").

**Path decomposition.** A k-step sample ``x^_0 = noise, x^_{i+1} = f(x^_i, t_i, t_{i+1})`` ends
``x^_k - Phi(noise, 1, 0)`` away from the teacher's sample. With ``y_i = Phi(x^_i, t_i, 0)`` (the
student's state after ``i`` steps, carried to data by the teacher), ``y_0`` is the teacher's sample
and ``y_k = x^_k``, so the final error is exactly the telescoping sum of the per-step
contributions ``y_{i+1} - y_i``: the error step ``i`` adds, carried to ``t = 0`` by the exact flow.
Reported per step: the contribution's mean square relative to the reference's mean square (the
normalization of ``FlowMapError``), and the step's local error before propagation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flowmap_lit.interpolant import edm_schedule, uniform_schedule

StudentFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # F(x, t, s), labels and guidance bound
VelocityFn = Callable[[Tensor, Tensor], Tensor]  # v(x, t), guided, labels bound
FlowMapFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # exact Phi(x, t, s)
Binder = Callable[[Tensor | None, int], StudentFn]  # (labels, n) -> F(x, t, s) for a chunk of n samples


class TeacherFlow:
    """The teacher's flow map ``Phi(x, t, s)``: ``flow_map`` if given, else Heun on a fine grid.

    ``fine`` is a decreasing grid of times from 1 to 0 (default: the EDM schedule with
    ``reference_steps`` steps); a solve from ``t`` to ``s`` steps through the grid's points strictly
    between them, so a jump gets as many steps as the global solve spends on its interval.
    """

    def __init__(self, velocity: VelocityFn, flow_map: FlowMapFn | None = None, reference_steps: int = 256,
                 fine: Tensor | None = None) -> None:
        self.velocity, self.flow_map = velocity, flow_map
        self.fine = edm_schedule(reference_steps) if fine is None else torch.as_tensor(fine, dtype=torch.float64)

    def __call__(self, x: Tensor, t: float, s: float) -> Tensor:
        x = x if x.dtype == torch.float64 else x.float()
        if t == s:
            return x
        if self.flow_map is not None:
            vec = lambda v: torch.full((x.shape[0],), v, dtype=x.dtype, device=x.device)  # noqa: E731
            return self.flow_map(x, vec(t), vec(s)).to(x.dtype)
        inner = [float(g) for g in self.fine if s < float(g) < t]
        times = [t, *inner, s]
        for a, b in zip(times[:-1], times[1:]):
            ta = torch.full((x.shape[0],), a, dtype=x.dtype, device=x.device)
            v_a = self.velocity(x, ta).to(x.dtype)
            x_e = x + (b - a) * v_a
            v_b = self.velocity(x_e, torch.full_like(ta, b)).to(x.dtype)
            x = x + (b - a) * 0.5 * (v_a + v_b)
        return x


def _jump(student: StudentFn, x: Tensor, t: float, s: float) -> Tensor:
    tv = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    sv = torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)
    return x + (s - t) * student(x, tv, sv).to(x.dtype)


def _msq(x: Tensor) -> float:
    """Sum over the batch of the per-sample mean square (divide by the count for the mean)."""
    return x.double().flatten(1).square().mean(1).sum().item()


@dataclass
class JumpGrid:
    """Single-jump errors: entry ``[i, j]`` is the jump from ``times[i]`` to ``times[j]`` (i < j)."""

    times: list[float]
    mse: list[list[float | None]]  # mean squared error per element; None where t <= s
    relative: list[list[float | None]]  # mse / mean square of the teacher's displacement x_s - x_t

    def rows(self) -> list[dict]:
        return [{"t": self.times[i], "s": self.times[j], "mse": self.mse[i][j], "relative": self.relative[i][j]}
                for i in range(len(self.times)) for j in range(len(self.times)) if self.mse[i][j] is not None]


@dataclass
class PathSteps:
    """Each step's share of the k-step sampling error (see the module docstring)."""

    steps: int
    schedule: list[float]
    total_relative: float  # mean ||x^_k - Phi(noise, 1, 0)||^2 / mean ||Phi(noise, 1, 0)||^2
    contribution: list[float] = field(default_factory=list)  # per step: mean ||y_{i+1} - y_i||^2 / same
    local: list[float] = field(default_factory=list)  # per step: mean ||f(x^_i) - Phi(x^_i)||^2 / same

    def rows(self) -> list[dict]:
        return [{"steps": self.steps, "step": i + 1, "t": self.schedule[i], "s": self.schedule[i + 1],
                 "contribution": self.contribution[i], "local": self.local[i]} for i in range(self.steps)]


def _chunks(noise: Tensor, labels: Tensor | None, batch_size: int):
    for i in range(0, noise.shape[0], batch_size):
        yield noise[i:i + batch_size], (labels[i:i + batch_size] if labels is not None else None)


@torch.no_grad()
def jump_grid(student: Binder, flow: Callable[[Tensor | None, int], TeacherFlow],
              noise: Tensor, labels: Tensor | None = None, times: list[float] | None = None,
              batch_size: int = 1000) -> JumpGrid:
    """Errors of single jumps ``f(x_t, t, s)`` over all pairs of ``times`` (default: 0, 1/8, ..., 1).

    ``student(labels, n)`` and ``flow(labels, n)`` bind a chunk's labels (and the guidance scale) for
    a chunk of ``n`` samples (``bind_module`` makes both for a ``FlowMapDistillModule``).
    """
    grid = sorted({float(v) for v in (times if times is not None else uniform_schedule(8).tolist())}, reverse=True)
    g = len(grid)
    err = torch.zeros(g, g, dtype=torch.float64)
    size = torch.zeros(g, g, dtype=torch.float64)
    n = 0
    for x, lab in _chunks(noise, labels, batch_size):
        phi, F = flow(lab, x.shape[0]), student(lab, x.shape[0])
        states = [phi(x, 1.0, grid[0])]  # the marginal at every grid time, along the teacher's ODE
        for a, b in zip(grid[:-1], grid[1:]):
            states.append(phi(states[-1], a, b))
        for i in range(g):
            for j in range(i + 1, g):
                land = _jump(F, states[i].to(x.dtype), grid[i], grid[j])
                err[i, j] += _msq(land - states[j])
                size[i, j] += _msq(states[j] - states[i])
        n += x.shape[0]
    mse = [[(err[i, j] / n).item() if j > i else None for j in range(g)] for i in range(g)]
    rel = [[(err[i, j] / size[i, j]).item() if j > i and size[i, j] > 0 else None for j in range(g)] for i in range(g)]
    return JumpGrid(grid, mse, rel)


@torch.no_grad()
def path_steps(student: Binder, flow: Callable[[Tensor | None, int], TeacherFlow],
               noise: Tensor, labels: Tensor | None, schedule: Tensor, batch_size: int = 1000,
               reference: Tensor | None = None) -> PathSteps:
    """The per-step decomposition of one k-step sampling path (``schedule``: 1 = t_0 > ... > t_k = 0).

    ``reference``: the teacher's samples ``Phi(noise, 1, 0)`` if already computed (shared by paths).
    """
    times = [float(v) for v in torch.as_tensor(schedule, dtype=torch.float64)]
    k = len(times) - 1
    contrib, local = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    total = ref_sq = 0.0
    for c, (x, lab) in enumerate(_chunks(noise, labels, batch_size)):
        phi, F = flow(lab, x.shape[0]), student(lab, x.shape[0])
        x = x if x.dtype == torch.float64 else x.float()
        if reference is not None:
            teacher_sample = reference[c * batch_size:c * batch_size + x.shape[0]].to(x.dtype)
        else:
            teacher_sample = phi(x, times[0], times[-1])
        y_prev = teacher_sample  # y_0
        ref_sq += _msq(teacher_sample)
        for i in range(k):
            x_next = _jump(F, x, times[i], times[i + 1])
            local[i] += _msq(x_next - phi(x, times[i], times[i + 1]))
            y = x_next if i == k - 1 else phi(x_next, times[i + 1], times[-1])  # y_{i+1}
            contrib[i] += _msq(y - y_prev)
            y_prev, x = y, x_next
        total += _msq(x - teacher_sample)
    return PathSteps(k, times, total / ref_sq, (contrib / ref_sq).tolist(), (local / ref_sq).tolist())


def bind_module(module, guidance: float | None = None, reference_steps: int = 256):
    """``(student, flow)`` binders of a ``FlowMapDistillModule`` at the guidance scale ``guidance``
    (default: its ``eval_guidance``): the student ``F`` and the guided teacher's flow map, exact when
    the teacher has ``flow_map(x, t, s, class_labels)`` and no guidance is applied."""
    scale = module.eval_guidance if guidance is None else guidance
    exact = getattr(module.teacher, "flow_map", None) if module.guidance == "none" else None

    def student(labels, n):
        return module.student_fn(labels, module._guidance(n, scale))

    def flow(labels, n):
        fm = None if exact is None else (lambda x, t, s: exact(x, t, s, module._labels(labels)))
        return TeacherFlow(module.teacher_fn(labels, module._guidance(n, scale)), fm, reference_steps)

    return student, flow


@torch.no_grad()
def diagnose(module, noise: Tensor, labels: Tensor | None = None, step_counts: Sequence[int] = (1, 2, 4, 8),
             times: list[float] | None = None, guidance: float | None = None, reference_steps: int = 256,
             batch_size: int = 1000) -> tuple[JumpGrid, list[PathSteps]]:
    """The jump grid and the path decomposition for each step count, of a module (on the module's
    tuned grid for k where it has one, ``set_schedules``; else uniform)."""
    student, flow = bind_module(module, guidance, reference_steps)
    grid = jump_grid(student, flow, noise, labels, times, batch_size)
    reference = torch.cat([flow(lab, x.shape[0])(x, 1.0, 0.0) for x, lab in _chunks(noise, labels, batch_size)])
    tuned = getattr(module, "schedules", {})
    paths = [path_steps(student, flow, noise, labels, tuned[k][0] if k in tuned else uniform_schedule(k), batch_size,
                        reference) for k in step_counts]
    return grid, paths


def heatmap_figure(grid: JumpGrid, title: str = "single-jump relative error"):
    """A matplotlib figure of ``grid.relative`` (log color scale; rows t, columns s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    g = len(grid.times)
    values = np.array([[np.nan if v is None else v for v in row] for row in grid.relative], dtype=float)
    fig, ax = plt.subplots(figsize=(0.55 * g + 2.2, 0.5 * g + 1.2))
    finite = values[np.isfinite(values) & (values > 0)]
    norm = matplotlib.colors.LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size else None
    im = ax.imshow(values, cmap="viridis", norm=norm)
    labels = [f"{t:.3g}" for t in grid.times]
    ax.set(xticks=range(g), yticks=range(g), xlabel="s (jump to)", ylabel="t (jump from)", title=title)
    ax.set_xticklabels(labels, rotation=90)
    ax.set_yticklabels(labels)
    for i in range(g):
        for j in range(g):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2g}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig
