"""The interface every distillation objective implements, and the shared tangent machinery.

An objective maps a batch of noisy points ``x_t`` with time pairs ``(t, s)`` to a per-sample loss.
It sees the student only as ``student(x, t, s) -> F`` (class labels and guidance already bound)
and the teacher only as ``teacher(x, t) -> v`` (guided velocity, no grad). It knows nothing about
Lightning, devices or logging: the module calls it and logs what it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from flowmap_lit.jvp import JVPBackend, RNGState, jvp, primal_and_tangent
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

    The subclass supplies the tangent ``g`` (under stop-gradient) in two parts: ``direction``, the
    input tangent ``(dx, dt, ds)`` along which the student is differentiated (only its non-zero
    entries), and ``assemble``, which turns ``F-`` and that directional derivative ``dF`` into
    ``g``. This class normalizes it, ``g <- g / (||g|| + c)``, and returns
    ``w(t, s) * mean((F_theta - sg(F- - g))^2)`` per sample, whose gradient is
    ``2 w g . dF_theta/dtheta / D``.

    ``tangent_pass`` says how ``F`` and ``dF`` are computed (docs/design.md section 4):

    - ``"two_pass"``: a grad-enabled forward for ``F`` and a separate no-grad JVP (``jvp_backend``)
      for ``dF``, with the RNG replayed so both see the same dropout masks; the JVP runs in fp32
      even under bf16 autocast;
    - ``"one_pass"``: one grad-enabled forward-mode pass (``torch.autograd.forward_ad``) whose
      primal is the trained ``F`` and whose tangent is ``dF``: the same loss and gradient with one
      student forward fewer. Needs a forward-AD backend (``func``/``forward_ad``), and the tangent
      is computed at the forward's precision (under bf16 autocast: in bf16);
    - ``"auto"`` (the default): ``one_pass`` on CPU where it is exact (a forward-AD backend, no
      autocast) and the student is neither compiled nor checkpointed nor sharded, else ``two_pass``.

    ``attention_jvp`` says how the package's attention op is differentiated in the tangent pass
    (docs/design.md section 4): ``"math"`` (SDPA math kernel; quadratic memory in the tokens),
    ``"chunked"`` (fused kernel plus a closed-form tangent in query blocks), or ``"auto"``:
    chunked on CUDA, math elsewhere. Both give the same tangent (tests/networks/test_attention.py).

    Why ``auto`` decides so (``benchmarks/step_cost.py``, docs/design.md section 4): on CPU the one
    pass is as fast or faster (tiny U-Net and DiT at batch 64), but it keeps the tangent's graph
    alive through the backward (2.5-2.8x the saved activations), and on accelerators memory, not
    time, bounds the batch; a compiled student trains its compiled forward only in two passes.

    Args:
        tangent_norm: The per-sample norm ||g|| of the tangent normalization g / (||g|| + c)
            (docs/design.md section 3): "l2" (the L2 norm), "rms" (L2 / sqrt(D), D the elements per
            sample) or "none" (no normalization; ||g|| is still logged as train/tangent_norm).
        norm_const: The constant c of the tangent normalization g / (||g|| + c).
        jvp_backend: How the JVP of the two-pass tangent is computed (docs/design.md section 4):
            "forward_ad" (torch.autograd.forward_ad), "func" (torch.func.jvp) or "finite_difference"
            (a central difference with step fd_step; two_pass only).
        fd_step: Step h of the central finite difference along the tangent (jvp_backend:
            finite_difference only).
        weighting: The loss weighting w(t, s) (flowmap_lit.objectives.Weighting: (t - s)^power,
            optionally adaptive); None: Weighting(), uniform.
        tangent_pass: How F and its derivative dF are computed: "one_pass" (one forward-mode pass
            that trains F), "two_pass" (a grad-enabled forward, then a no-grad JVP) or "auto"
            (one_pass on CPU without autocast for an uncompiled, unsharded student without
            activation checkpointing, else two_pass); docs/design.md section 4.
        attention_jvp: How the package's attention op is differentiated in the tangent pass: "math"
            (SDPA math kernel, memory quadratic in the tokens), "chunked" (fused kernel plus a
            closed-form tangent in query blocks) or "auto" (chunked on CUDA, math elsewhere).
    """

    def __init__(
        self,
        tangent_norm: Literal["l2", "rms", "none"] = "l2",
        norm_const: float = 0.1,
        jvp_backend: JVPBackend = "forward_ad",
        fd_step: float = 1e-3,
        weighting: Weighting | None = None,
        tangent_pass: Literal["auto", "one_pass", "two_pass"] = "auto",
        attention_jvp: Literal["auto", "math", "chunked"] = "auto",
    ) -> None:
        super().__init__()
        if tangent_norm not in ("l2", "rms", "none"):
            raise ValueError(f"tangent_norm must be 'l2', 'rms' or 'none', got {tangent_norm!r}")
        if jvp_backend not in ("func", "forward_ad", "finite_difference"):
            raise ValueError(f"jvp_backend must be 'func', 'forward_ad' or 'finite_difference', got {jvp_backend!r}")
        if tangent_pass not in ("auto", "one_pass", "two_pass"):
            raise ValueError(f"tangent_pass must be 'auto', 'one_pass' or 'two_pass', got {tangent_pass!r}")
        if tangent_pass == "one_pass" and jvp_backend == "finite_difference":
            raise ValueError("tangent_pass: one_pass needs forward-mode AD; use jvp_backend: func (or forward_ad), "
                             "or tangent_pass: two_pass with finite differences")
        if attention_jvp not in ("auto", "math", "chunked"):
            raise ValueError(f"attention_jvp must be 'auto', 'math' or 'chunked', got {attention_jvp!r}")
        self.tangent_norm = tangent_norm
        self.attention_jvp = attention_jvp
        self.norm_const = norm_const
        self.jvp_backend = jvp_backend
        self.fd_step = fd_step
        self.weighting = weighting if weighting is not None else Weighting()
        self.tangent_pass = tangent_pass

    def direction(self, teacher: TeacherFn, x_t: Tensor, t: Tensor, s: Tensor) -> tuple[dict[str, Tensor], object]:
        """The input tangent ``{"x": dx, "t": dt, "s": ds}`` (non-zero entries only, in ``x_t``'s and
        the times' dtypes) and whatever ``assemble`` needs from this step (e.g. the teacher velocity)."""
        raise NotImplementedError

    def assemble(self, teacher: TeacherFn, x_t: Tensor, t: Tensor, s: Tensor, F_sg: Tensor, dF: Tensor,
                 r: float, aux: object) -> Tensor:
        """The un-normalized tangent ``g`` from ``F-`` and the student's derivative ``dF`` along ``direction``."""
        raise NotImplementedError

    def tangent(self, student: StudentFn, teacher: TeacherFn, x_t: Tensor, t: Tensor, s: Tensor,
                F_sg: Tensor, r: float, rng: RNGState) -> Tensor:
        """The un-normalized tangent ``g`` (at least float32) by a separate JVP, without grad."""
        with torch.no_grad():
            tangents, aux = self.direction(teacher, x_t, t, s)
            dF = jvp(_restricted(eager(student), x_t, t, s, tangents), [dict(x=x_t, t=t, s=s)[k] for k in tangents],
                     list(tangents.values()), backend=self.jvp_backend, fd_step=self.fd_step, rng=rng,
                     attention=self.attention_form(x_t))
            return self.assemble(teacher, x_t, t, s, F_sg, fp32(dF), r, aux)

    def attention_form(self, x_t: Tensor) -> str:
        if self.attention_jvp != "auto":
            return self.attention_jvp
        return "chunked" if x_t.device.type == "cuda" else "math"

    def uses_one_pass(self, x_t: Tensor, student: StudentFn | None = None) -> bool:
        """Whether ``forward`` computes ``F`` and ``dF`` in one pass (see ``tangent_pass``); ``student``
        may say it takes two only (``BoundStudent.two_pass_only``: compiled or checkpointed)."""
        if getattr(student, "checkpointed", False) and self.tangent_pass == "one_pass":
            raise ValueError("tangent_pass: one_pass cannot run through activation checkpointing or FSDP2 "
                             "sharding (the backward's recomputation has no tangents; the shards' forward hooks "
                             "return views); use tangent_pass: auto or two_pass, or activation_checkpointing: false")
        if self.tangent_pass != "auto":
            return self.tangent_pass == "one_pass"
        return (x_t.device.type == "cpu" and self.jvp_backend != "finite_difference"
                and not getattr(student, "two_pass_only", False) and not torch.is_autocast_enabled(x_t.device.type))

    def normalize(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """``(g / (||g|| + c), ||g||)`` per sample, as configured."""
        norm = g.flatten(1).norm(dim=1)
        if self.tangent_norm == "rms":
            norm = norm / g[0].numel() ** 0.5
        if self.tangent_norm == "none":
            return g, norm
        return g / bcast(norm + self.norm_const, g), norm

    def forward(self, student, teacher, x_t, t, s, r=1.0) -> ObjectiveOutput:
        if self.uses_one_pass(x_t, student):
            with torch.no_grad():
                tangents, aux = self.direction(teacher, x_t, t, s)
            F, dF = primal_and_tangent(eager(student), x_t, t, s, tangents, self.attention_form(x_t))  # dF detached
            F_sg = fp32(F.detach())
            with torch.no_grad():
                g = self.assemble(teacher, x_t, t, s, F_sg, fp32(dF), r, aux)
        else:
            rng = RNGState(x_t.device)  # the JVP pass replays the dropout masks of this forward
            F = student(x_t, t, s)  # the only grad-enabled pass; F- = sg(F)
            F_sg = fp32(F.detach())
            g = self.tangent(student, teacher, x_t, t, s, F_sg, r, rng)
        with torch.no_grad():
            g, g_norm = self.normalize(fp32(g))
            target = F_sg - g
            stats = {"tangent_norm": g_norm.mean(), "tangent_norm_normalized": g.flatten(1).norm(dim=1).mean(),
                     "student_rms": F_sg.flatten(1).pow(2).mean(dim=1).sqrt().mean()}
        loss = per_sample_mean((fp32(F) - target) ** 2)
        return ObjectiveOutput(self.weighting(loss, t, s), stats)


def eager(student: StudentFn) -> StudentFn:
    """The student's uncompiled form for the tangent pass (``BoundStudent.eager``), else itself."""
    return getattr(student, "eager", student)


def _restricted(student: StudentFn, x_t: Tensor, t: Tensor, s: Tensor, tangents: dict[str, Tensor]):
    """``student`` as a function of only the inputs that carry a tangent (the others held fixed)."""
    names = list(tangents)

    def fn(*args):
        inputs = dict(x=x_t, t=t, s=s)
        inputs.update(zip(names, args))
        return student(inputs["x"], inputs["t"], inputs["s"])

    return fn

