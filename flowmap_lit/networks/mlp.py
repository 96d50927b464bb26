"""MLP backbone for small flattened data (the docs/design.md section 8 reference student: 3 x 768 SiLU).

Each hidden layer adds a projection of the conditioning vector c(t, s, class, guidance):
``h <- SiLU(W h + U c + b)``; with ``modulation="scale_shift"`` it also scales by it,
``h <- SiLU((W h + b) * (1 + A c) + U c)`` (FiLM / adaLN style, ``A`` zero at initialization, so
training starts from the additive network). The output layer is zero-initialized (F = 0 at the start,
or with ``precondition=True`` the exact flow map of Gaussian data: ``F = c_skip(t, s) x + c_out(t)
net(c_in(t) x, ...)``, ``interpolant.flowmap_preconditioning``).
"""

import math

import torch
from torch import nn

from ..interpolant import expand_like, flowmap_preconditioning
from .embeddings import ConditionEmbedding, batch_vector
from .tangent_ops import Linear


class MLP(nn.Module):
    """F(x, t, s) on ``x`` of shape ``(B, C, H, W)`` flattened to ``C * H * W`` features.

    Args:
        img_channels: Channels of x (and of the output).
        img_resolution: Height = width of x, in pixels.
        width: Hidden units per layer.
        depth: Number of hidden layers.
        num_classes: Number of classes (label num_classes is the learned null token of
            classifier-free guidance); 0: unconditional.
        emb_dim: Width of the conditioning vector c(t, s, class, guidance).
        fourier_channels: Width of each Fourier feature vector (of t, t - s and the guidance scale).
        time_min_freq: Lowest angular frequency of the t and t - s embeddings, per unit t.
        time_max_freq: Highest angular frequency of the t and t - s embeddings; keep it low: the
            JVP differentiates through it (docs/design.md section 3, Stability).
        dropout: Dropout probability after each hidden layer.
        modulation: How c enters a layer: "shift" (added) or "scale_shift" (it also scales the
            layer, FiLM / adaLN style, starting from the additive network).
        precondition: F = c_skip(t, s) x + c_out(t) net(c_in(t) x), so that net = 0 is the exact
            flow map of Gaussian data with std sigma_data (docs/design.md section 2).
        sigma_data: Per-element data std that the preconditioning assumes (1 for normalized latents).
    """

    def __init__(
        self,
        img_channels: int = 1,
        img_resolution: int = 8,
        width: int = 768,
        depth: int = 3,
        num_classes: int = 0,
        emb_dim: int = 256,
        fourier_channels: int = 128,
        time_min_freq: float = 0.5,
        time_max_freq: float = 16.0,
        dropout: float = 0.0,
        modulation: str = "shift",
        precondition: bool = False,
        sigma_data: float = 1.0,
    ) -> None:
        super().__init__()
        if modulation not in ("shift", "scale_shift"):
            raise ValueError(f"modulation must be 'shift' or 'scale_shift', got {modulation!r}")
        self.img_channels, self.img_resolution = img_channels, img_resolution
        self.precondition, self.sigma_data = precondition, sigma_data
        dim = img_channels * img_resolution**2
        self.emb = ConditionEmbedding(emb_dim, num_classes, fourier_channels, time_min_freq, time_max_freq)
        self.inputs = nn.ModuleList([Linear(dim if i == 0 else width, width) for i in range(depth)])
        self.conds = nn.ModuleList([Linear(emb_dim, width, bias=False) for _ in range(depth)])
        self.drop = nn.Dropout(dropout)
        self.out = Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        for lin in self.conds:
            nn.init.normal_(lin.weight, std=1 / math.sqrt(emb_dim))
        self.scales = None
        if modulation == "scale_shift":
            self.scales = nn.ModuleList([Linear(emb_dim, width, bias=False) for _ in range(depth)])
            for lin in self.scales:
                nn.init.zeros_(lin.weight)

    def forward(self, x, t, s=None, class_labels=None, guidance=None) -> torch.Tensor:
        t, s = batch_vector(t, x), batch_vector(s, x)
        labels, guidance = batch_vector(class_labels, x), batch_vector(guidance, x)
        c = nn.functional.silu(self.emb(t, s, labels, guidance)).to(self.out.weight.dtype)
        if self.precondition:
            coefs = flowmap_preconditioning(t, t if s is None else s, self.sigma_data)
            c_in, c_skip, c_out = (expand_like(v, x).to(x.dtype) for v in coefs)
            x_in = c_in * x
        else:
            x_in = x
        h = x_in.flatten(1)
        for i, (lin, cond) in enumerate(zip(self.inputs, self.conds)):
            pre = lin(h) if self.scales is None else lin(h) * (1 + self.scales[i](c))
            h = self.drop(nn.functional.silu(pre + cond(c)))
        out = self.out(h).reshape(x.shape)
        return c_skip * x + c_out * out if self.precondition else out

    def zero_init_s_embedding(self) -> None:
        """Zero the s and guidance branches (student initialized from a teacher: F(x,t,s) = v(x,t))."""
        self.emb.zero_init_s_embedding()

    def force_normalize_(self) -> None:
        """No magnitude-preserving layers here; present so every backbone has the same methods."""
