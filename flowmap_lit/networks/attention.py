"""The one attention op of the package, and a switch that makes it forward-AD safe.

`F.scaled_dot_product_attention` dispatches to fused kernels (flash on CPU, flash or
memory-efficient on CUDA) that have no forward-AD rule, so `torch.func.jvp` through them
raises NotImplementedError (PITFALLS.md, JVP). Inside `forward_ad_safe_attention()` the helper
runs SDPA with the MATH backend only, which composes with forward AD. The JVP code wraps its
call in that context; ordinary forwards and backwards keep the fast kernels.
"""

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_state = threading.local()  # per-thread flag: is the math-only mode on?


def math_only_active() -> bool:
    """True while inside `forward_ad_safe_attention()` (in this thread)."""
    return getattr(_state, "math_only", False)


@contextmanager
def forward_ad_safe_attention(enabled: bool = True):
    """Within this context, `attention()` uses only the SDPA MATH backend (forward-AD capable)."""
    previous = math_only_active()
    _state.math_only = enabled
    try:
        yield
    finally:
        _state.math_only = previous


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape (B, heads, N, d); returns (B, heads, N, d)."""
    if math_only_active():
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain einsum attention, the same math as `attention()`; a reference for tests."""
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhnm,bhmd->bhnd", scores.softmax(dim=-1), v)
