"""(t, s) pair samplers for flow-map training (docs/design.md section 3, "(t, s) sampling", open).

Every option is configurable because none is settled: logit-normal or uniform pairs, plus
fractions of ``s = t`` (flow matching), ``s = 0`` (consistency), ``t = 1`` with a uniform ``s``
(the first jump of every sampling path), and sampling-grid pairs ``(t_i, t_{i+1})`` of the k-step
schedules the student will be sampled with (including ``t = 1``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from flowmap_lit.interpolant import edm_schedule, uniform_schedule


class TimePairSampler:
    """Draws ``(t, s)`` with ``1 >= t >= s >= 0``, all float32 ``(n,)`` tensors.

    Each pair is drawn from ``distribution``, or, for the fractions of the batch that the
    ``*_fraction`` arguments give (each >= 0, together <= 1), replaced by one of the special kinds.

    Args:
        distribution: The base pair distribution: "logit_normal" (two times sigmoid(N(P_mean,
            P_std)), t the larger) or "uniform" (two times U(0, 1), t the larger).
        P_mean: Location of the logit-normal distribution that both times are drawn from; below 0
            puts more pairs near the data (t = 0).
        P_std: Scale of the logit-normal distribution.
        diagonal_fraction: Fraction of the pairs with s = t (flow matching: the student's own
            velocity F(x, t, t), which k-step sampling tends to as k grows; docs/design.md section 10).
        zero_fraction: Fraction of the pairs with s = 0 (consistency: jumps to the data).
        grid_fraction: Fraction of the pairs (t_i, t_{i+1}) taken from the k-step sampling grids of
            grid_steps (the first jumps from t = 1 among them).
        one_fraction: Fraction of the pairs with t = 1 and s ~ U(0, 1) (every sampling path's first
            jump).
        grid_steps: Step counts k whose sampling grids make the grid pairs (all their jumps, drawn
            uniformly).
        grid_schedule: Schedule of those grids: "uniform" (t_i = 1 - i / k) or "edm" (the EDM
            rho-schedule).
    """

    def __init__(
        self,
        distribution: Literal["logit_normal", "uniform"] = "logit_normal",
        P_mean: float = -0.8,
        P_std: float = 1.0,
        diagonal_fraction: float = 0.0,
        zero_fraction: float = 0.0,
        grid_fraction: float = 0.0,
        one_fraction: float = 0.0,
        grid_steps: list[int] = [1, 2, 4, 8],  # noqa: B006 (read, never mutated; --help shows it)
        grid_schedule: Literal["uniform", "edm"] = "uniform",
    ) -> None:
        fractions = (diagonal_fraction, zero_fraction, grid_fraction, one_fraction)
        if min(fractions) < 0 or sum(fractions) > 1:
            raise ValueError(f"pair fractions must be >= 0 and sum to <= 1, got {fractions}")
        if distribution not in ("logit_normal", "uniform"):
            raise ValueError(f"distribution must be 'logit_normal' or 'uniform', got {distribution!r}")
        self.distribution = distribution
        self.P_mean, self.P_std = P_mean, P_std
        self.fractions = fractions
        make = uniform_schedule if grid_schedule == "uniform" else edm_schedule
        with torch.device("cpu"):  # a small table (moved to the batch's device when used), also under meta init
            pairs = [(float(sch[i]), float(sch[i + 1])) for k in grid_steps for sch in [make(k)] for i in range(k)]
            self.grid = torch.tensor(pairs, dtype=torch.float32) if pairs else torch.zeros(0, 2)

    def base_pairs(self, n: int, device, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        if self.distribution == "logit_normal":
            z = torch.randn(2, n, generator=generator, device=device)
            a = torch.sigmoid(self.P_mean + self.P_std * z)
        else:
            a = torch.rand(2, n, generator=generator, device=device)
        return a.max(0).values, a.min(0).values

    def __call__(self, n: int, device=None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        t, s = self.base_pairs(n, device, generator)
        u = torch.rand(n, generator=generator, device=device)
        f_diag, f_zero, f_grid, f_one = self.fractions
        diag = u < f_diag
        zero = (u >= f_diag) & (u < f_diag + f_zero)
        grid = (u >= f_diag + f_zero) & (u < f_diag + f_zero + f_grid)
        s = torch.where(diag, t, torch.where(zero, torch.zeros_like(s), s))
        if f_one > 0:  # drawn only when used, so that the other options' pairs stay as they were
            one = (u >= f_diag + f_zero + f_grid) & (u < f_diag + f_zero + f_grid + f_one)
            s = torch.where(one, torch.rand(n, generator=generator, device=device), s)
            t = torch.where(one, torch.ones_like(t), t)
        if grid.any() and len(self.grid):
            idx = torch.randint(len(self.grid), (n,), generator=generator, device=device)
            pairs = self.grid.to(device)[idx]
            t = torch.where(grid, pairs[:, 0], t)
            s = torch.where(grid, pairs[:, 1], s)
        return t, s
