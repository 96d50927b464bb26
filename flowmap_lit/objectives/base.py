"""The interface every distillation objective implements, and the shared tangent machinery.

An objective maps a batch of noisy points ``x_t`` with time pairs ``(t, s)`` to a per-sample loss.
It sees the student only as ``student(x, t, s) -> F`` (class labels and guidance already bound)
and the teacher only as ``teacher(x, t) -> v`` (guided velocity, no grad). It knows nothing about
Lightning, devices or logging: the module calls it and logs what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from flowmap_lit.jvp import JVPBackend, RNGState
from flowmap_lit.objectives.weighting import Weighting

StudentFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # F(x, t, s)
TeacherFn = Callable[[Tensor, Tensor], Tensor]  # v(x, t), guided, under no_grad


@dataclass
class ObjectiveOutput:
    loss: Tensor  # (B,) per-sample loss, float32, weighting applied
    stats: dict[str, Tensor] = field(default_factory=dict)  # scalars to log (detached)


class Objective(nn.Module):
    """Base class: ``forward(student, teacher, x_t, t, s, r) -> ObjectiveOutput``.

    ``r`` is the tangent warmup coefficient of the regularized tangent warmup (docs/design.md section 3);
    objectives without a tangent ignore it. Subclasses may hold trainable parameters (adaptive
    weighting); the module optimizes them with the student.
    """

    #: How the objective chooses s given the sampled pair: None keeps it; "zero" (sCD), "t" (FM).
    s_override: Literal["zero", "t"] | None = None

    def select_s(self, t: Tensor, s: Tensor) -> Tensor:
        if self.s_override == "zero":
            return torch.zeros_like(t)
        if self.s_override == "t":
            return t.clone()
        return s

    def forward(self, student: StudentFn, teacher: TeacherFn, x_t: Tensor, t: Tensor, s: Tensor,
                r: float = 1.0) -> ObjectiveOutput:
        raise NotImplementedError


def fp32(x: Tensor) -> Tensor:
    """``x`` in at least float32 (bf16/fp16 are promoted; float64 stays, for exact tests)."""
    return x if x.dtype == torch.float64 else x.float()


def per_sample_mean(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension, in at least float32."""
    return fp32(x).flatten(1).mean(1)


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a ``(B,)`` tensor to broadcast against ``x``."""
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class TangentObjective(Objective):
    """Shared part of AYF-EMD, AYF-LMD and sCD (docs/design.md section 3).

    The subclass supplies the tangent ``g`` (under stop-gradient); this class normalizes it,
    ``g <- g / (||g|| + c)``, and returns ``w(t, s) * mean((F_theta - sg(F- - g))^2)`` per sample,
    whose gradient is ``2 w g . dF_theta/dtheta / D``.
    """

    def __init__(
        self,
        tangent_norm: Literal["l2", "rms", "none"] = "l2",  # ||g|| per sample: L2, L2/sqrt(D), or off
        norm_const: float = 0.1,  # c in g / (||g|| + c)
        jvp_backend: JVPBackend = "func",  # "func" | "forward_ad" | "finite_difference"
        fd_step: float = 1e-3,  # finite-difference step along the tangent
        weighting: Weighting | None = None,  # w(t, s); None: uniform
    ) -> None:
        super().__init__()
        if tangent_norm not in ("l2", "rms", "none"):
            raise ValueError(f"tangent_norm must be 'l2', 'rms' or 'none', got {tangent_norm!r}")
        self.tangent_norm = tangent_norm
        self.norm_const = norm_const
        self.jvp_backend = jvp_backend
        self.fd_step = fd_step
        self.weighting = weighting if weighting is not None else Weighting()

    def tangent(self, student: StudentFn, teacher: TeacherFn, x_t: Tensor, t: Tensor, s: Tensor,
                F_sg: Tensor, r: float, rng: RNGState) -> Tensor:
        """The un-normalized tangent ``g`` (at least float32), computed without grad."""
        raise NotImplementedError

    def normalize(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """``(g / (||g|| + c), ||g||)`` per sample, as configured."""
        norm = g.flatten(1).norm(dim=1)
        if self.tangent_norm == "rms":
            norm = norm / g[0].numel() ** 0.5
        if self.tangent_norm == "none":
            return g, norm
        return g / bcast(norm + self.norm_const, g), norm

    def forward(self, student, teacher, x_t, t, s, r=1.0) -> ObjectiveOutput:
        rng = RNGState(x_t.device)  # the JVP passes replay the dropout masks of this forward
        F = student(x_t, t, s)  # the only grad-enabled pass; F- = sg(F)
        F_sg = fp32(F.detach())
        with torch.no_grad():
            g, g_norm = self.normalize(fp32(self.tangent(student, teacher, x_t, t, s, F_sg, r, rng)))
            target = F_sg - g
        loss = per_sample_mean((fp32(F) - target) ** 2)
        return ObjectiveOutput(self.weighting(loss, t, s), {"tangent_norm": g_norm.mean()})
