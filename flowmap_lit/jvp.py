"""Jacobian-vector products of the student (docs/design.md section 4).

``jvp(fn, primals, tangents)`` returns the directional derivative ``d/de fn(primals + e * tangents)``
at ``e = 0`` without building an autograd graph: the objectives use it under stop-gradient, next
to a separate grad-enabled forward whose detached output is ``F-`` (with the RNG forked so both
passes draw the same dropout masks). Backends:

- ``"forward_ad"``: ``torch.autograd.forward_ad`` dual tensors (the default), with the package's
  lean tangent rules for convolutions and linear layers (``networks/tangent_ops.py``: no product
  with the weights' zero tangent);
- ``"func"``: ``torch.func.jvp`` (the same numbers; PyTorch's own rules, since ``torch.func``
  wraps every custom rule in per-call machinery that costs more than it saves on small layers);
- ``"finite_difference"``: central difference ``(fn(p + h u) - fn(p - h u)) / (2 h)`` (two
  forwards) for kernels or wrappers without forward AD (e.g. FSDP); inputs are cast to
  ``fd_dtype`` when given (float64 needs a float64 ``fn``), else kept in the primals' dtype.

``primal_and_tangent`` is the one-pass form: a grad-enabled forward-mode pass (dual tensors, lean
rules) whose primal is the trained output and whose tangent is the JVP (the objectives'
``tangent_pass: one_pass``).

Attention inside runs in a forward-AD-safe form (``attention``: the SDPA math kernel, or the
chunked closed-form tangent on the fused kernel; flash kernels have no forward-AD rule), and
autocast is switched off inside, so the JVP is computed in the parameters' precision (fp32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.autograd import forward_ad

from flowmap_lit.networks.attention import AttentionJVP, forward_ad_safe_attention
from flowmap_lit.networks.tangent_ops import lean_tangents

JVPBackend = Literal["func", "forward_ad", "finite_difference"]


class RNGState:
    """A snapshot of the CPU (and the given CUDA device's) RNG, restorable any number of times.

    Restoring it before the tangent pass and again before the grad forward gives both passes the
    same dropout masks, so ``dF/dt`` is the derivative of the very ``F`` that is trained.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda_device = device if device.type == "cuda" else None
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.cuda_device) if self.cuda_device is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.cuda_device)


def jvp(
    fn: Callable[..., Tensor],
    primals: Sequence[Tensor],
    tangents: Sequence[Tensor],
    backend: JVPBackend = "forward_ad",
    fd_step: float = 1e-3,
    fd_dtype: torch.dtype | None = None,
    rng: RNGState | None = None,
    attention: AttentionJVP = "math",
) -> Tensor:
    """``J_fn(primals) @ tangents`` under ``torch.no_grad()``.

    ``rng``: restored before every forward the backend runs (dropout masks match across passes).
    ``attention``: the form of the package's attention op inside (``networks/attention.py``).
    """
    primals, tangents = tuple(primals), tuple(tangents)
    if rng is not None:
        inner = fn

        def fn(*args):
            rng.restore()
            return inner(*args)

    # The tangent pass always runs in full precision: under bf16 autocast (``precision: bf16-mixed``)
    # the grad forward/backward stay in bf16 while the JVP, whose error bf16 would amplify, does not.
    no_autocast = torch.autocast(primals[0].device.type, enabled=False)
    with torch.no_grad(), forward_ad_safe_attention(form=attention), no_autocast:
        if backend == "func":
            return torch.func.jvp(fn, primals, tangents)[1]
        if backend == "forward_ad":
            with lean_tangents(), forward_ad.dual_level():
                duals = [forward_ad.make_dual(p, u) for p, u in zip(primals, tangents)]
                out = forward_ad.unpack_dual(fn(*duals))
                return out.tangent
        if backend == "finite_difference":
            return _central_difference(fn, primals, tangents, fd_step, fd_dtype)
    raise ValueError(f"unknown JVP backend {backend!r}; use 'func', 'forward_ad' or 'finite_difference'")


def primal_and_tangent(student: Callable[..., Tensor], x_t: Tensor, t: Tensor, s: Tensor,
                       tangents: dict[str, Tensor], attention: AttentionJVP = "math") -> tuple[Tensor, Tensor]:
    """``(F, dF)``: the student's output (grad-enabled, at the caller's precision) and its derivative
    along ``tangents`` (detached), from one forward-mode pass (docs/design.md section 4)."""
    inputs = dict(x=x_t, t=t, s=s)
    with forward_ad_safe_attention(form=attention), lean_tangents(), forward_ad.dual_level():
        for name, u in tangents.items():
            inputs[name] = forward_ad.make_dual(inputs[name], u)
        out = forward_ad.unpack_dual(student(inputs["x"], inputs["t"], inputs["s"]))
        F, dF = out.primal, out.tangent
        if dF is None:  # the output does not depend on the tangent inputs
            dF = torch.zeros_like(F)
        return F, dF.detach()


def _central_difference(fn, primals, tangents, h: float, dtype: torch.dtype | None) -> Tensor:
    cast = (lambda z: z.to(dtype)) if dtype is not None else (lambda z: z)
    plus = fn(*[cast(p) + h * cast(u) for p, u in zip(primals, tangents)])
    minus = fn(*[cast(p) - h * cast(u) for p, u in zip(primals, tangents)])
    return ((plus - minus) / (2 * h)).to(primals[0].dtype)
