"""Discrete-time Eulerian map distillation, used to check the continuous limit (docs/design.md section 3).

    mean((f_theta(x_t, t, s) - f_theta-(x_t', t', s))^2),   t' = t + delta (s - t),
    x_t' = x_t + (t' - t) v(x_t, t)  (one Euler step of the teacher ODE)

Its gradient divided by ``delta (t - s)^2`` tends, as ``delta -> 0``, to the gradient of AYF-EMD with
``r = 1`` and no tangent normalization (tested): the ``(t - s)^2`` is the f-space weighting.
"""

from __future__ import annotations

import torch

from flowmap_lit.jvp import RNGState
from flowmap_lit.objectives.base import Objective, ObjectiveOutput, bcast, fp32, per_sample_mean
from flowmap_lit.objectives.weighting import Weighting


class DiscreteEMD(Objective):
    """Consistency-style discrete loss between the student at (x_t, t) and at (x_t', t').

    Args:
        delta: The step from t toward s as a fraction of (t - s): t' = t + delta (s - t), reached
            by one Euler step of the teacher ODE; the continuous limit is delta -> 0.
        weighting: The loss weighting w(t, s) (flowmap_lit.objectives.Weighting); None: uniform.
    """

    def __init__(
        self,
        delta: float = 0.01,
        weighting: Weighting | None = None,
    ) -> None:
        super().__init__()
        self.delta = delta
        self.weighting = weighting if weighting is not None else Weighting()

    def forward(self, student, teacher, x_t, t, s, r=1.0) -> ObjectiveOutput:
        rng = RNGState(x_t.device)
        f = x_t + bcast(s - t, x_t) * student(x_t, t, s)
        with torch.no_grad():
            t2 = t + self.delta * (s - t)
            x2 = x_t + bcast(t2 - t, x_t) * teacher(x_t, t).to(x_t.dtype)
            rng.restore()
            f2 = x2 + bcast(s - t2, x2) * student(x2, t2, s)
        loss = per_sample_mean((fp32(f) - fp32(f2)) ** 2)
        return ObjectiveOutput(self.weighting(loss, t, s), {})
