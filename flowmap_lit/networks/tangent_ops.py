"""Linear layers with a lean forward-AD rule, and scalar scalings that forward AD does not tax.

PyTorch's forward-AD formulas for ``convolution`` and ``mm`` differentiate with respect to every
operand: when only the input carries a tangent (the student's JVP, where weights are constants)
the weight's missing tangent becomes a zero tensor that is still convolved or multiplied, so one
convolution costs three in the tangent pass (primal, input tangent, zero weight tangent) and one
matrix product four. Likewise ``x * c`` or ``x / c`` with a Python number ``c`` gives the number a
zero tangent, and its product with the primal costs about ten times the scaling itself.

Inside ``lean_tangents()`` (entered by the tangent pass, docs/design.md section 4) the package's
networks compute convolutions and linear layers through `ConvWithTangent` / `LinearWithTangent`,
whose rules form only the products of operands that do carry a tangent. Outside it they call the
ordinary kernels. The primal is computed by the very same kernel call in both cases, so outputs are
bitwise equal, and `scale` / `unscale` (``aten::mul.Scalar`` / ``aten::div.Scalar``) give the same
bits as ``x * c`` / ``x / c`` with a tangent rule that is one scaling.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_state = threading.local()


def lean_tangents_active() -> bool:
    """True while inside `lean_tangents()` in this thread."""
    return getattr(_state, "active", False)


@contextmanager
def lean_tangents(enabled: bool = True):
    """Within this context the package's convolutions and linear layers use the lean tangent rules."""
    previous = lean_tangents_active()
    _state.active = enabled
    try:
        yield
    finally:
        _state.active = previous


def scale(x: Tensor, c: float) -> Tensor:
    """``x * c`` for a Python number ``c`` (same bits), with a one-multiply tangent rule."""
    return torch.ops.aten.mul.Scalar(x, c)


def unscale(x: Tensor, c: float) -> Tensor:
    """``x / c`` for a Python number ``c`` (same bits), with a one-divide tangent rule."""
    return torch.ops.aten.div.Scalar(x, c)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else (a if b is None else a + b)


def _sum_to(grad: Tensor, n: int) -> Tensor:
    """Sum a gradient over every dim but the last (the bias's)."""
    return grad.reshape(-1, n).sum(0)


class LinearWithTangent(torch.autograd.Function):
    """``x @ w.T (+ b)`` whose tangent is ``dx @ w.T (+ x @ dw.T) (+ db)``, each term only when that
    operand carries a tangent. Works with `torch.func.jvp` and `torch.autograd.forward_ad`; its
    backward is the ordinary one (the one-pass tangent form trains through it)."""

    @staticmethod
    def forward(x, w, b):
        return F.linear(x, w, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b = inputs
        ctx.has_bias, ctx.out_shape = b is not None, output.shape
        ctx.set_materialize_grads(False)  # absent tangents arrive as None, not zeros
        ctx.save_for_forward(x, w)
        ctx.save_for_backward(x, w)

    @staticmethod
    def jvp(ctx, tx, tw, tb):
        x, w = ctx.saved_tensors
        out = _add(tx @ w.t() if tx is not None else None, x @ tw.t() if tw is not None else None)
        if out is None:
            out = x.new_zeros(ctx.out_shape)
        return out if tb is None else out + tb

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        x, w = ctx.saved_tensors
        gx = grad @ w if ctx.needs_input_grad[0] else None
        gw = grad.reshape(-1, w.shape[0]).t() @ x.reshape(-1, w.shape[1]) if ctx.needs_input_grad[1] else None
        gb = _sum_to(grad, w.shape[0]) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


class ConvWithTangent(torch.autograd.Function):
    """``conv2d(x, w, b)`` whose tangent is ``conv2d(dx, w) (+ conv2d(x, dw)) (+ db)``, each term only
    when that operand carries a tangent; backward through ``aten::convolution_backward``."""

    @staticmethod
    def forward(x, w, b, stride, padding):
        return F.conv2d(x, w, b, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, stride, padding = inputs
        ctx.has_bias, ctx.stride, ctx.padding, ctx.out_shape = b is not None, stride, padding, output.shape
        ctx.set_materialize_grads(False)  # absent tangents arrive as None, not zeros
        ctx.save_for_forward(x, w)
        ctx.save_for_backward(x, w)

    @staticmethod
    def jvp(ctx, tx, tw, tb, _stride, _padding):
        x, w = ctx.saved_tensors
        conv = lambda a, k: F.conv2d(a, k, None, ctx.stride, ctx.padding)  # noqa: E731
        out = _add(conv(tx, w) if tx is not None else None, conv(x, tw) if tw is not None else None)
        if out is None:
            out = x.new_zeros(ctx.out_shape)
        return out if tb is None else out + tb[:, None, None]

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None, None
        x, w = ctx.saved_tensors
        stride = [ctx.stride] * 2 if isinstance(ctx.stride, int) else list(ctx.stride)
        padding = [ctx.padding] * 2 if isinstance(ctx.padding, int) else list(ctx.padding)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, w, [w.shape[0]] if ctx.has_bias else None, stride, padding, [1, 1], False, [0, 0], 1, mask)
        return gx, gw, gb, None, None


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``x @ w.T (+ b)``; with the lean tangent rule inside `lean_tangents()`."""
    if lean_tangents_active():
        return LinearWithTangent.apply(x, w, b)
    return F.linear(x, w, b)


def conv2d(x: Tensor, w: Tensor, b: Tensor | None = None, stride: int = 1, padding: int = 0) -> Tensor:
    """``F.conv2d(x, w, b, stride, padding)``; with the lean tangent rule inside `lean_tangents()`."""
    if lean_tangents_active():
        return ConvWithTangent.apply(x, w, b, stride, padding)
    return F.conv2d(x, w, b, stride, padding)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) with the lean tangent rule in the tangent pass."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (zero padding mode, no dilation or groups) with the lean tangent rule."""

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros" or self.dilation != (1, 1) or self.groups != 1:
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride, self.padding)
