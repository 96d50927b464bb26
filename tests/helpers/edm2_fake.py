"""A stand-in for an EDM2 preconditioned denoiser, importable by reference so tests can pickle it.

``D(x_sigma; sigma, one_hot)`` is the exact denoiser ``E[x0 | x0 + sigma n]`` of Gaussian data
``N(mu_k, diag(c^2))`` of class ``k`` (``mu = one_hot @ mus``; a zero vector gives ``mu = 0``).
Like EDM2's ``Precond`` it has ``label_dim``, ``img_channels``, ``img_resolution`` and ``sigma_data``.
"""

import torch
from torch import nn


class GaussianEDM2Denoiser(nn.Module):
    def __init__(self, mus: torch.Tensor, c: torch.Tensor, label_dim: int) -> None:
        super().__init__()
        self.register_buffer("mus", torch.as_tensor(mus))  # (label_dim or 1, C, H, W)
        self.register_buffer("c", torch.as_tensor(c))  # (C, H, W)
        self.label_dim, self.sigma_data = label_dim, 0.5
        self.img_channels, self.img_resolution = self.c.shape[0], self.c.shape[-1]
        self.last_labels = None

    def forward(self, x, sigma, class_labels=None):
        self.last_labels = class_labels
        if self.label_dim == 0:
            mu = self.mus[0].to(x.dtype).expand_as(x)
        else:
            mu = torch.einsum("bk,k...->b...", class_labels.to(x.dtype), self.mus.to(x.dtype))
        c2 = self.c.to(x.dtype) ** 2
        sigma2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1) ** 2
        return mu + c2 / (c2 + sigma2) * (x - mu)
