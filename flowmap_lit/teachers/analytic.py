"""Exact velocities and flow maps of Gaussian and Gaussian-mixture data (docs/design.md section 6).

Under ``x_t = (1 - t) x0 + t eps`` a Gaussian component ``N(mu, Sigma)`` of the data becomes
``N((1 - t) mu, C_t)`` with ``C_t = (1 - t)^2 Sigma + t^2 I``, and

    E[eps - x0 | x_t] = -mu + U diag((t - (1 - t) lam) / ((1 - t)^2 lam + t^2)) U^T (x_t - (1 - t) mu)

where ``Sigma = U diag(lam) U^T``. A mixture's velocity is the posterior-weighted average of its
components' velocities. These are the exact teachers of tests and of the quickstart.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from flowmap_lit.interpolant import expand_like


class GaussianData(nn.Module):
    """Data ``N(mu, diag(c^2))``: closed-form velocity and flow map (docs/design.md section 6)."""

    def __init__(self, mu: Tensor, c: Tensor) -> None:
        super().__init__()
        self.register_buffer("mu", torch.as_tensor(mu))
        self.register_buffer("c", torch.as_tensor(c))

    def moments(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """``m_t = (1 - t) mu`` and ``sigma_t = sqrt((1 - t)^2 c^2 + t^2)``, broadcast like ``x``."""
        tt = expand_like(t, x)
        mu, c = self.mu.to(x.dtype), self.c.to(x.dtype)
        return (1 - tt) * mu, torch.sqrt((1 - tt) ** 2 * c**2 + tt**2)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """``v = -mu + (sigma_t' / sigma_t) (x - m_t)``, ``sigma_t' = (t - (1 - t) c^2) / sigma_t``."""
        m_t, s_t = self.moments(t, x)
        tt = expand_like(t, x)
        ds_t = (tt - (1 - tt) * self.c.to(x.dtype) ** 2) / s_t
        return -self.mu.to(x.dtype) + ds_t / s_t * (x - m_t)

    def flow_map(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """``f(x, t, s) = m_s + (sigma_s / sigma_t) (x - m_t)``."""
        m_t, s_t = self.moments(t, x)
        m_s, s_s = self.moments(s, x)
        return m_s + s_s / s_t * (x - m_t)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn((n, *self.mu.shape), generator=generator, dtype=self.mu.dtype)
        return self.mu + self.c * z


class GaussianMixture(nn.Module):
    """Full-covariance Gaussian mixture over flattened data, optionally class-conditional.

    Args:
        weights: ``(K,)`` mixture weights.
        means: ``(K, D)`` component means.
        covariances: ``(K, D, D)`` component covariances.
        component_classes: ``(K,)`` class of each component, or ``None`` for an unconditional
            mixture. A label ``c`` restricts the mixture to components of class ``c``; the null
            label ``num_classes`` (and ``None``) uses all of them.
        shape: the data shape ``(C, H, W)`` the flattened ``D`` reshapes to.
    """

    def __init__(self, weights: Tensor, means: Tensor, covariances: Tensor,
                 shape: tuple[int, ...], component_classes: Tensor | None = None) -> None:
        super().__init__()
        covariances = torch.as_tensor(covariances, dtype=torch.float64)
        covariances = 0.5 * (covariances + covariances.transpose(-1, -2))
        lam, basis = torch.linalg.eigh(covariances)
        self.shape = tuple(shape)
        self.register_buffer("log_weights", torch.as_tensor(weights, dtype=torch.float64).log())
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float64))
        self.register_buffer("eigvals", lam.clamp(min=0.0))
        self.register_buffer("eigvecs", basis)
        classes = component_classes if component_classes is not None else torch.full((len(lam),), -1)
        self.register_buffer("component_classes", torch.as_tensor(classes, dtype=torch.long))
        self.num_classes = int(self.component_classes.max()) + 1 if component_classes is not None else 0

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def velocity(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Exact ``E[eps - x0 | x_t = x, class]``, computed in float64 and returned in x's dtype."""
        b = x.shape[0]
        xf = x.reshape(b, -1).double()
        tt = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(b)[:, None, None]  # (B,1,1)
        lam = self.eigvals[None]  # (1,K,D)
        var = (1 - tt) ** 2 * lam + tt**2  # eigenvalues of C_t, (B,K,D)
        resid = xf[:, None, :] - (1 - tt) * self.means[None]  # (B,K,D)
        proj = torch.einsum("bkd,kde->bke", resid, self.eigvecs)  # U^T r
        log_prob = -0.5 * ((proj**2 / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        logits = log_prob + self.log_weights[None]
        if class_labels is not None and self.num_classes > 0:
            labels = class_labels.to(x.device).long()[:, None]
            keep = (self.component_classes[None] == labels) | (labels == self.num_classes)
            logits = logits.masked_fill(~keep, float("-inf"))
        post = torch.softmax(logits, dim=-1)  # (B,K)
        gain = (tt - (1 - tt) * lam) / var
        v_k = torch.einsum("bke,kde->bkd", gain * proj, self.eigvecs) - self.means[None]
        v = (post[..., None] * v_k).sum(1)
        return v.reshape(x.shape).to(x.dtype)

    def sample(self, n: int, class_labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Exact samples of the mixture (per-class when labels are given)."""
        logits = self.log_weights.expand(n, -1).clone()
        if class_labels is not None and self.num_classes > 0:
            keep = (self.component_classes[None] == class_labels[:, None]) | (class_labels[:, None] == self.num_classes)
            logits = logits.masked_fill(~keep, float("-inf"))
        k = torch.multinomial(logits.softmax(-1).float(), 1, generator=generator).squeeze(1)
        z = torch.randn((n, self.dim), generator=generator, dtype=torch.float64)
        x = self.means[k] + torch.einsum("bde,be->bd", self.eigvecs[k], self.eigvals[k].sqrt() * z)
        return x.reshape(n, *self.shape).float()

    @classmethod
    def fit(cls, data: np.ndarray, labels: np.ndarray | None, num_components: int,
            shape: tuple[int, ...], covariance_scale: float = 1.0, reg_covar: float = 1e-3,
            seed: int = 0) -> GaussianMixture:
        """Fit with scikit-learn's EM; ``labels`` given: ``num_components`` per class.

        ``covariance_scale > 1`` widens every component: a natural weak guide for autoguidance.
        """
        from sklearn.mixture import GaussianMixture as SkGMM

        data = np.asarray(data, dtype=np.float64).reshape(len(data), -1)
        groups = [(None, data)] if labels is None else [(c, data[labels == c]) for c in np.unique(labels)]
        weights, means, covs, classes = [], [], [], []
        for c, xs in groups:
            gm = SkGMM(num_components, covariance_type="full", reg_covar=reg_covar, random_state=seed).fit(xs)
            frac = len(xs) / len(data)
            weights.append(gm.weights_ * frac)
            means.append(gm.means_)
            covs.append(gm.covariances_ * covariance_scale)
            classes.append(np.full(num_components, -1 if c is None else int(c)))
        return cls(torch.from_numpy(np.concatenate(weights)), torch.from_numpy(np.concatenate(means)),
                   torch.from_numpy(np.concatenate(covs)), shape,
                   None if labels is None else torch.from_numpy(np.concatenate(classes)))
