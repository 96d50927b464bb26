"""Flow-matching distillation: the ``s = t`` limit of the flow map (docs/design.md section 3).

``F(x_t, t, t)`` regresses the (guided) teacher velocity, ``mean((F - v(x_t, t))^2)``. Its gradient
equals AYF-EMD's at ``s = t`` without tangent normalization (tested).
"""

from __future__ import annotations

import torch

from flowmap_lit.objectives.base import Objective, ObjectiveOutput, fp32, per_sample_mean
from flowmap_lit.objectives.weighting import Weighting


class FlowMatching(Objective):
    """Velocity regression onto the teacher at ``s = t``.

    Args:
        weighting: The loss weighting (flowmap_lit.objectives.Weighting), evaluated at s = t, where
            (t - s)^power is 0: only power 0 (optionally adaptive) is meaningful here; None: uniform.
    """

    s_override = "t"

    def __init__(self, weighting: Weighting | None = None) -> None:
        super().__init__()
        self.weighting = weighting if weighting is not None else Weighting()

    def forward(self, student, teacher, x_t, t, s, r=1.0) -> ObjectiveOutput:
        F = student(x_t, t, t)
        with torch.no_grad():
            v = fp32(teacher(x_t, t))
        loss = per_sample_mean((fp32(F) - v) ** 2)
        return ObjectiveOutput(self.weighting(loss, t, t), {})
