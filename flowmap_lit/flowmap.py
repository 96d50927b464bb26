"""The flow map at inference: a network and its sampler, free of Lightning (docs/design.md section 11).

:func:`flowmap_lit.export.load_flowmap` returns a :class:`FlowMap`; the diffusers pipeline wraps one.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor, nn

from flowmap_lit.checkpoints.trust import check_trusted
from flowmap_lit.grids import check_grid
from flowmap_lit.interpolant import uniform_schedule
from flowmap_lit.solvers import gamma_sample


def denormalize(x: Tensor, info: dict | None) -> Tensor:
    """Undo the per-channel normalization recorded with the data (``data_info``; identity without it)."""
    if not info or not info.get("normalize"):
        return x
    mean = torch.tensor(info["mean"], dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(info["std"], dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x * std + mean


def instantiate(config, source: str = "the network config", trust_code: bool = False):
    """Build ``{"class_path": ..., "init_args": {...}}`` (nested ones too) without jsonargparse.

    Only classes of this package and of ``torch.optim`` are built unless ``trust_code``
    (``flowmap_lit.checkpoints.trust``); ``source`` names the file in the refusal."""
    check_trusted(config, source, trust_code, option="trust_code=True")
    return _build(config)


def _build(config):
    if isinstance(config, dict) and "class_path" in config:
        module_name, _, cls_name = config["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), cls_name)
        return cls(**{k: _build(v) for k, v in (config.get("init_args") or {}).items()})
    if isinstance(config, dict):
        return {k: _build(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_build(v) for v in config]
    return config


class FlowMap(nn.Module):
    """A flow map ``F(x, t, s)`` with its sampler: what a distilled student needs outside training.

    ``guidance`` is the scale the student is fed when it was trained conditioned on it (None: the
    student takes none); ``schedules`` maps a step count to its tuned ``(grid, gamma)``. A
    text-conditioned flow map (an exported LoRA student) takes its keyword conditioning, e.g.
    ``{"encoder_hidden_states", "pooled_projections"}``, as ``cond``; its ``base_config`` is the
    teacher that holds the base model (``{"class_path", "init_args"}`` with the model's local path).
    """

    def __init__(self, net: nn.Module, num_classes: int = 0, condition_on_guidance: bool = False,
                 guidance: float | None = None, sample_gamma: float = 0.0,
                 schedules: dict[int, tuple[Tensor, float]] | None = None, data: dict | None = None,
                 network_config: dict | None = None, base_config: dict | None = None) -> None:
        super().__init__()
        self.net = net.eval()
        self.network_config = network_config  # {"class_path", "init_args"} that rebuilds ``net``
        self.base_config = base_config  # an adapter student's teacher (its base model's path), else None
        self.num_classes, self.condition_on_guidance = num_classes, condition_on_guidance
        self.guidance, self.sample_gamma = guidance, sample_gamma
        self.schedules = dict(schedules or {})
        self.data = dict(data or {})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.get("shape") or ())

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, x: Tensor, t: Tensor, s: Tensor, class_labels: Tensor | None = None,
                guidance: Tensor | None = None, **cond: Tensor) -> Tensor:
        return self.net(x, t, s, class_labels=class_labels, guidance=guidance, **cond)

    def grid(self, steps: int) -> tuple[Tensor, float]:
        """The ``steps``-step grid (tuned where the export has one, else uniform) and its gamma."""
        return self.schedules.get(steps, (uniform_schedule(steps), self.sample_gamma))

    @torch.no_grad()
    def sample(self, noise: Tensor, labels: Tensor | None = None, steps: int = 1, guidance: float | None = None,
               gamma: float | None = None, schedule: Tensor | None = None,
               generator: torch.Generator | None = None, cond: dict[str, Tensor] | None = None) -> Tensor:
        """k-step samples from ``noise`` (normalized data space; :meth:`denormalize` maps to data);
        ``cond``: keyword conditioning, one row per sample (text embeddings)."""
        grid, tuned_gamma = self.grid(steps) if schedule is None else (check_grid(schedule), self.sample_gamma)
        gamma = tuned_gamma if gamma is None else gamma
        lam = None
        scale = self.guidance if guidance is None else guidance
        if self.condition_on_guidance and scale is not None:
            lam = torch.full((noise.shape[0],), float(scale), device=noise.device)
        if self.num_classes == 0:
            labels = None
        elif labels is None:
            raise ValueError(f"this flow map is class-conditional ({self.num_classes} classes): pass labels")
        cond = cond or {}
        return gamma_sample(lambda x, t, s: self(x, t, s, labels, lam, **cond), noise, grid, gamma, generator)

    def denormalize(self, x: Tensor) -> Tensor:
        """Undo the per-channel normalization of the training data (identity without one)."""
        return denormalize(x, self.data)
