"""Flow-matching pretraining of teachers and guides (``FlowMatchingModule``)."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from flowmap_lit.distributed import data_parallel_mesh, shard_network
from flowmap_lit.interpolant import interpolate, sample_logit_normal, velocity_target
from flowmap_lit.modules.common import (
    constant_with_warmup,
    data_info,
    resolve_noise_seed,
    save_plain_hyperparameters,
    seeded_rng,
)
from flowmap_lit.seeding import derive_seed
from flowmap_lit.solvers import ode_sample


class FlowMatchingModule(pl.LightningModule):
    """Rectified-flow velocity training: ``|| v_theta(x_t, t, c) - (eps - x0) ||^2``.

    Used to pretrain the teacher and the (weaker) autoguidance guide. Class labels are dropped to
    the null token ``num_classes`` with probability ``label_dropout`` so the same network also
    gives the unconditional velocity for classifier-free guidance.

    Args:
        net: The velocity network v(x, t, s=None, class_labels=None) that is trained (MLP, DiT,
            EDM2UNet, ...); called without s it is a plain velocity model.
        num_classes: Number of classes of the data; label num_classes is the null token. 0 trains
            an unconditional model (the labels are not used).
        label_dropout: Probability of replacing a training label by the null token num_classes, so
            the same network also learns the unconditional velocity of classifier-free guidance.
        t_distribution: Distribution of the training times t: "logit_normal" (sigmoid of
            N(P_mean, P_std)) or "uniform" on (0, 1).
        P_mean: Location of the logit-normal distribution of t (t_distribution: logit_normal).
        P_std: Scale of the logit-normal distribution of t (t_distribution: logit_normal).
        optimizer: Optimizer factory (class_path/init_args, e.g. torch.optim.Adam with lr) of the
            network's parameters.
        lr_warmup_steps: Linear learning-rate warmup, in optimizer steps, then a constant rate; 0:
            none.
        val_times: The validation loss is averaged over this many fixed, evenly spread times t in
            (0, 1) with fixed noise, so that it is comparable across runs.
        sample_steps: Steps of the ODE solver (Heun) of sample() when it is not given num_steps.
        noise_seed: Base seed of the per-step noise (times, noise, label dropout), derived per
            (step, micro-batch, rank); None: the run's seed_everything seed (0 without one).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 0,
        label_dropout: float = 0.1,
        t_distribution: Literal["logit_normal", "uniform"] = "logit_normal",
        P_mean: float = 0.0,
        P_std: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_warmup_steps: int = 0,
        val_times: int = 8,
        sample_steps: int = 32,
        noise_seed: int | None = None,
    ) -> None:
        super().__init__()
        save_plain_hyperparameters(self)
        self.net = net
        self.num_classes = num_classes
        self.label_dropout = label_dropout
        self.t_distribution = t_distribution
        self.P_mean, self.P_std = P_mean, P_std
        self.optimizer_factory = optimizer
        self.lr_warmup_steps = lr_warmup_steps
        self.val_times = val_times
        self.sample_steps = sample_steps
        self.noise_seed = resolve_noise_seed(noise_seed)

    # --- pieces used by callbacks ----------------------------------------------------------------
    def ema_network(self) -> nn.Module:
        return self.net

    def velocity(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        """Velocity, optionally with classifier-free guidance ``v_u + lam (v_c - v_u)``, ``lam = guidance``."""
        if class_labels is None or self.num_classes == 0 or guidance == 1.0:
            return self.net(x, t, class_labels=self._labels(class_labels))
        null = torch.full_like(class_labels, self.num_classes)
        v = self.net(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([class_labels, null]))
        v_c, v_u = v.chunk(2)
        return v_u + guidance * (v_c - v_u)

    @torch.no_grad()
    def sample(self, noise: Tensor, class_labels: Tensor | None = None, num_steps: int | None = None,
               guidance: float = 1.0, solver: Literal["euler", "heun"] = "heun") -> Tensor:
        """Samples by integrating the learned ODE from ``noise`` (t = 1) to data (t = 0), CFG scale ``guidance``."""
        return ode_sample(lambda x, t: self.velocity(x, t, class_labels, guidance), noise,
                          num_steps or self.sample_steps, solver)

    def _labels(self, labels: Tensor | None) -> Tensor | None:
        return None if self.num_classes == 0 else labels

    # --- training --------------------------------------------------------------------------------
    def _sample_t(self, n: int) -> Tensor:
        if self.t_distribution == "logit_normal":
            return sample_logit_normal(n, self.P_mean, self.P_std, device=self.device)
        return torch.rand(n, device=self.device)

    def loss(self, x0: Tensor, labels: Tensor | None, t: Tensor, eps: Tensor) -> Tensor:
        """Per-sample flow-matching loss (mean over elements), computed in float32."""
        x_t = interpolate(x0, eps, t)
        v_pred = self.net(x_t, t, class_labels=self._labels(labels))
        return (v_pred.float() - velocity_target(x0, eps).float()).square().flatten(1).mean(1)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x0, labels = batch["x"], batch["label"]
        with seeded_rng(self, derive_seed(self.noise_seed, self.global_step, batch_idx, self.global_rank)):
            if self.num_classes > 0 and self.label_dropout > 0:
                drop = torch.rand(labels.shape, device=labels.device) < self.label_dropout
                labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
            loss = self.loss(x0, labels, self._sample_t(x0.shape[0]), torch.randn_like(x0)).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        x0, labels = batch["x"], batch["label"]
        gen = torch.Generator(device=x0.device).manual_seed(batch_idx)
        eps = torch.randn(x0.shape, generator=gen, device=x0.device)
        # Fixed, evenly spread times so the validation loss is comparable across runs.
        grid = (torch.arange(self.val_times, device=x0.device) + 0.5) / self.val_times
        t = grid[torch.arange(x0.shape[0], device=x0.device) % self.val_times]
        loss = self.loss(x0, labels, t, eps).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x0.shape[0])
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["data_info"] = data_info(self._trainer)

    def configure_model(self) -> None:
        """FSDP2 sharding of the network, block by block, under ``ModelParallelStrategy``."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:
            shard_network(self.net, data_parallel_mesh(mesh))

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.net.parameters())
        scheduler = constant_with_warmup(optimizer, self.lr_warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
