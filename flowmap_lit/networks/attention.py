"""The one attention op of the package, and a switch that makes it forward-AD safe.

`F.scaled_dot_product_attention` dispatches to fused kernels (flash on CPU, flash or
memory-efficient on CUDA) that have no forward-AD rule, so `torch.func.jvp` through them
raises NotImplementedError (docs/pitfalls.md, JVP). Inside `forward_ad_safe_attention()` the helper
switches to a form that composes with forward AD; ordinary forwards and backwards keep the fast
kernels. Two forms (docs/design.md section 4, "Attention in the tangent pass"):

- ``"math"``: SDPA with the MATH backend only. Forward AD differentiates it op by op, so the
  tangent pass holds several ``(B, heads, N, N)`` score tensors at once: quadratic memory in the
  token count (at 1024 px, 4096 tokens per image, that is the limit of the tangent pass).
- ``"chunked"``: a custom forward-AD rule (`AttentionWithTangent`). The primal runs on the fused
  SDPA kernel, and the tangent is computed in closed form, query block by query block:

      O = P V,  P = softmax(S),  S = Q K^T / sqrt(d)
      dO = P dV + (P * dS) V - rowsum(P * dS) * O,   dS = (dQ K^T + Q dK^T) / sqrt(d)

  so at most ``chunk_elements`` score entries live at a time, whatever the token count.
"""

import math
import threading
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

AttentionJVP = Literal["math", "chunked"]
DEFAULT_CHUNK_ELEMENTS = 2**26  # score entries per query block of the chunked tangent (256 MiB in fp32)

_state = threading.local()  # per-thread: the forward-AD-safe form in force, or None


def math_only_active() -> bool:
    """True while inside `forward_ad_safe_attention()` (in this thread), whatever its form."""
    return getattr(_state, "mode", None) is not None


def active_form() -> tuple[AttentionJVP | None, int]:
    """The form in force in this thread (None outside the context) and its chunk size."""
    return getattr(_state, "mode", None), getattr(_state, "chunk_elements", DEFAULT_CHUNK_ELEMENTS)


@contextmanager
def forward_ad_safe_attention(enabled: bool = True, form: AttentionJVP = "math",
                              chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
    """Within this context, `attention()` is differentiable by forward AD, in the given ``form``."""
    if form not in ("math", "chunked"):
        raise ValueError(f"attention JVP form must be 'math' or 'chunked', got {form!r}")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    previous = active_form()
    _state.mode, _state.chunk_elements = (form if enabled else None), chunk_elements
    try:
        yield
    finally:
        _state.mode, _state.chunk_elements = previous


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape (B, heads, N, d); returns (B, heads, N, d)."""
    mode, chunk_elements = active_form()
    if mode == "chunked" and dropout_p == 0.0:
        return AttentionWithTangent.apply(q, k, v, chunk_elements)
    if mode is not None:  # math, and the chunked form's fallback for attention dropout
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def attention_tangent(q, k, v, out, tq, tk, tv, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """The directional derivative of ``softmax(q k^T / sqrt(d)) v`` along ``(tq, tk, tv)`` (any of
    them None for a zero tangent), given its value ``out``; computed in at least float32, one block
    of queries at a time so that no more than ``chunk_elements`` score entries are held at once."""
    dtype = q.dtype
    up = (lambda z: z) if dtype == torch.float64 else (lambda z: None if z is None else z.float())
    q, k, v, out, tq, tk, tv = (up(z) for z in (q, k, v, out, tq, tk, tv))
    scale = q.shape[-1] ** -0.5
    *lead, n, _ = q.shape
    m = k.shape[-2]
    rows = max(1, min(n, chunk_elements // max(1, m * math.prod(lead))))
    k_t = k.transpose(-1, -2)
    tk_t = tk.transpose(-1, -2) if tk is not None else None
    d_out = torch.zeros_like(out)
    for i in range(0, n, rows):  # in place where possible: about 3 score blocks alive at a time
        block = slice(i, i + rows)
        p = torch.matmul(q[..., block, :], k_t).mul_(scale).softmax(-1)  # (..., rows, m)
        if tv is not None:
            d_out[..., block, :] = p @ tv
        if tq is not None or tk is not None:
            d_scores = torch.matmul(tq[..., block, :], k_t) if tq is not None else None
            if tk_t is not None:
                extra = torch.matmul(q[..., block, :], tk_t)
                d_scores = extra if d_scores is None else d_scores.add_(extra)
                del extra
            p_ds = d_scores.mul_(p).mul_(scale)  # P * dS, in the buffer of dS
            del p
            d_out[..., block, :] += p_ds @ v - p_ds.sum(-1, keepdim=True) * out[..., block, :]
    return d_out.to(dtype)


class AttentionWithTangent(torch.autograd.Function):
    """Attention on the fused SDPA kernel with a closed-form, chunked forward-AD rule
    (`attention_tangent`); works with `torch.func.jvp` and `torch.autograd.forward_ad`. Its backward
    recomputes the fused forward and differentiates that (the one-pass tangent form needs it)."""

    @staticmethod
    def forward(q, k, v, chunk_elements):
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, chunk_elements = inputs
        ctx.chunk_elements = chunk_elements
        ctx.set_materialize_grads(False)  # absent tangents arrive as None, not zeros
        ctx.save_for_forward(q, k, v, output)
        ctx.save_for_backward(q, k, v)

    @staticmethod
    def jvp(ctx, tq, tk, tv, _):
        q, k, v, out = ctx.saved_tensors
        return attention_tangent(q, k, v, out, tq, tk, tv, ctx.chunk_elements)

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None, None
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            q, k, v = (z.detach().requires_grad_() for z in (q, k, v))
            grads = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), grad_out)
        return (*grads, None)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain einsum attention, the same math as `attention()`; a reference for tests."""
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhnm,bhmd->bhnd", scores.softmax(dim=-1), v)
