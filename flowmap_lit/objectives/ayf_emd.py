"""AYF-EMD: Eulerian map distillation (docs/design.md section 3).

With ``s`` fixed, ``f(x_t, t, s)`` must not change as ``(x_t, t)`` slides along the teacher ODE.
The total derivative of ``F`` along the ODE is one JVP with tangent ``(v, 1, 0)``:

    g = (F- - v) + r (t - s) dF-/dt,        dF/dt = dF/dx . v + dF/dt_partial

which is ``-df/dt`` for ``r = 1``. ``s = t`` gives flow matching, ``s = 0`` consistency distillation.
"""

from __future__ import annotations

import torch

from flowmap_lit.objectives.base import TangentObjective, bcast, fp32


class AYFEMD(TangentObjective):
    """Eulerian map distillation: one teacher velocity at (x_t, t) and one student JVP."""

    def direction(self, teacher, x_t, t, s):
        v = fp32(teacher(x_t, t))
        return {"x": v.to(x_t.dtype), "t": torch.ones_like(t)}, v

    def assemble(self, teacher, x_t, t, s, F_sg, dF, r, v):
        return (F_sg - v) + r * bcast(t - s, F_sg) * dF
