"""AYF-LMD: Lagrangian map distillation (docs/design.md section 3).

With ``(x_t, t)`` fixed, the end point must move with the teacher velocity at the predicted point,
``df/ds = v(f(x_t, t, s), s)``. With ``f = x_t + (s - t) F`` this is
``F - (t - s) dF/ds = v(x_hat_s, s)``, so

    g = (F- - v(x_hat_s, s)) - r (t - s) dF-/ds,        x_hat_s = x_t + (s - t) F-

one JVP with tangent ``(0, 0, 1)`` and one teacher call at the student's predicted point.
"""

from __future__ import annotations

import torch

from flowmap_lit.objectives.base import TangentObjective, bcast, fp32


class AYFLMD(TangentObjective):
    """Lagrangian map distillation: one teacher velocity at (x_hat_s, s) and one student JVP."""

    def direction(self, teacher, x_t, t, s):
        return {"s": torch.ones_like(s)}, None

    def assemble(self, teacher, x_t, t, s, F_sg, dF, r, aux):
        x_hat_s = fp32(x_t) + bcast(s - t, F_sg) * F_sg
        v_s = fp32(teacher(x_hat_s.to(x_t.dtype), s))
        return (F_sg - v_s) - r * bcast(t - s, F_sg) * dF
