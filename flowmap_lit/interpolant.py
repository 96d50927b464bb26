"""Time convention, parameterization conversions and time schedules (docs/design.md section 1, 5).

Linear (rectified-flow) interpolant: ``x_t = (1 - t) * x0 + t * eps`` with ``t`` in [0, 1];
``t = 0`` is data, ``t = 1`` pure Gaussian noise. The velocity is ``v = eps - x0`` and sampling
integrates ``dx/dt = v(x, t)`` from ``t = 1`` down to ``t = 0``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

T_MIN = 1e-4  # smallest t where a conversion divides by t
T_MAX = 1.0 - 1e-4  # largest t where a conversion divides by (1 - t)


def expand_like(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a per-sample time ``(B,)`` (or a scalar) against ``x`` of shape ``(B, ...)``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def interpolate(x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """``x_t = (1 - t) x0 + t eps`` (docs/design.md section 1)."""
    tt = expand_like(t, x0)
    return (1 - tt) * x0 + tt * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """Conditional velocity ``v = eps - x0``: the flow-matching regression target."""
    return eps - x0


# --- conversions from other teacher parameterizations (docs/design.md section 1) ---------------------


def t_to_sigma(t: Tensor) -> Tensor:
    """EDM noise level of time ``t``: ``sigma = t / (1 - t)``."""
    return t / (1 - t)


def sigma_to_t(sigma: Tensor) -> Tensor:
    """Inverse of :func:`t_to_sigma`: ``t = sigma / (1 + sigma)`` (``sigma = inf`` gives ``t = 1``)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


def x0_to_velocity(x0_hat: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """x0-prediction to velocity: ``v = (x_t - x0_hat) / t`` with ``t`` clamped to ``>= T_MIN``."""
    tt = expand_like(t, x_t).clamp(min=T_MIN)
    return (x_t - x0_hat) / tt


def eps_to_velocity(eps_hat: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """epsilon-prediction to velocity: ``v = (eps_hat - x_t) / (1 - t)`` with ``t <= T_MAX``."""
    tt = expand_like(t, x_t).clamp(max=T_MAX)
    return (eps_hat - x_t) / (1 - tt)


def edm_inputs(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Inputs of an EDM denoiser ``D(x_sigma; sigma)`` at time t: ``x_sigma = x_t / (1 - t)``, ``sigma``."""
    t = t.clamp(T_MIN, T_MAX)
    return x_t / (1 - expand_like(t, x_t)), t_to_sigma(t)


# --- time distributions and schedules ----------------------------------------------------------


def flowmap_preconditioning(t: Tensor, s: Tensor, sigma_data: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """``(c_in, c_skip, c_out)`` for ``F(x_t, t, s) = c_skip x_t + c_out net(c_in x_t, t, s)``
    (docs/design.md section 2).

    For data of per-element variance ``sigma_data^2`` and ``x_t = (1 - t) x0 + t eps``, with
    ``sigma(t)^2 = (1 - t)^2 sigma_data^2 + t^2`` the variance of ``x_t``:

    - ``c_in = 1 / sigma(t)``: the network's input has unit variance at every ``t``;
    - ``c_skip x_t`` is the exact flow map of Gaussian data, ``f = x_t sigma(s) / sigma(t)``, written
      as ``F = (x_t - f) / (t - s)``: ``c_skip = (sigma(t)^2 - sigma(s)^2) / ((t - s) sigma(t) (sigma(t)
      + sigma(s)))``, with the ``(t - s)`` cancelled so that ``s = t`` is exact; there it is the best
      linear predictor of ``v = eps - x0`` from ``x_t``;
    - ``c_out`` is the standard deviation of what that predictor leaves of ``v`` at ``t``
      (``sqrt(sigma_data^2 + 1 - c_skip(t, t)^2 sigma(t)^2)``), so the network's target is of unit scale.

    A zero network is then the Gaussian flow map: the network learns only what is not Gaussian.
    EDM's preconditioning, written for flow maps.
    """
    var_t = (1 - t) ** 2 * sigma_data**2 + t**2
    var_s = (1 - s) ** 2 * sigma_data**2 + s**2
    sig_t, sig_s = var_t.sqrt(), var_s.sqrt()
    c_skip = (sigma_data**2 * (t + s - 2) + t + s) / (sig_t * (sig_t + sig_s))
    c_skip_v = (t - (1 - t) * sigma_data**2) / var_t
    c_out = (sigma_data**2 + 1 - c_skip_v**2 * var_t).clamp(min=0).sqrt()
    return 1 / sig_t, c_skip, c_out


def sample_logit_normal(
    n: int, mean: float, std: float, *, device=None, generator: torch.Generator | None = None
) -> Tensor:
    """``t = sigmoid(N(mean, std^2))``: the logit-normal time distribution (float32)."""
    z = torch.randn(n, device=device, generator=generator)
    return torch.sigmoid(mean + std * z)


def uniform_schedule(num_steps: int) -> Tensor:
    """``1 = t_0 > t_1 > ... > t_N = 0`` evenly spaced in t (float64)."""
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def edm_schedule(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Tensor:
    """EDM rho-schedule in sigma mapped to t by ``t = sigma / (1 + sigma)``.

    Starts at ``t = 1`` (pure noise, sigma = inf) and ends at ``t = 0``; the interior points follow
    Karras et al. (2022), eq. 5, with ``num_steps - 1`` levels from sigma_max to sigma_min.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([1.0, 0.0], dtype=torch.float64)
    i = torch.arange(num_steps - 1, dtype=torch.float64)
    denom = max(num_steps - 2, 1)
    sig = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if num_steps == 2:
        sig = torch.tensor([math.sqrt(sigma_min * sigma_max)], dtype=torch.float64)
    interior = sig / (1 + sig)
    return torch.cat([torch.ones(1, dtype=torch.float64), interior, torch.zeros(1, dtype=torch.float64)])
