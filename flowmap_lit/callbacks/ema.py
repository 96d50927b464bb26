"""Exponential moving average of the trained network's weights, as a Lightning callback.

The averaged weights live in the callback (on the module's device, one copy of each trained
tensor, sharded like the parameters under FSDP2: each rank averages its own shard) and are saved
in checkpoints under ``callbacks["EMA"]`` (gathered to whole tensors only while saving). Validation, sampling callbacks
and teacher loading use them; training always steps the raw weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from flowmap_lit.distributed import full_tensor, like


def _ema_target(pl_module: pl.LightningModule) -> nn.Module:
    """The network whose weights are averaged: ``pl_module.ema_network()`` (student or net)."""
    if not hasattr(pl_module, "ema_network"):
        raise TypeError(
            f"{type(pl_module).__name__} has no ema_network() method; the EMA callback needs one "
            "that returns the nn.Module to average"
        )
    return pl_module.ema_network()


def _tracked(module: nn.Module) -> dict[str, Tensor]:
    """The floating-point tensors of ``module``'s state dict (parameters, persistent buffers)."""
    return {k: v for k, v in module.state_dict(keep_vars=True).items() if v.is_floating_point()}


class EMA(pl.Callback):
    """Weight EMA: ``ema <- beta * ema + (1 - beta) * theta`` after every ``update_every`` steps.

    ``beta = decay``, or, with ``warmup=True``, ``min(decay, (1 + n) / (10 + n))`` after ``n``
    updates so that early averages are not dominated by the random initialization.

    Args:
        decay: EMA decay beta per update, in [0, 1); the half-life is about ln 2 / (1 - decay)
            updates.
        warmup: Ramp the decay as min(decay, (1 + n) / (10 + n)) over the first updates n.
        update_every: Optimizer steps (trainer.global_step) between EMA updates.
        validate_with_ema: Swap the EMA weights in during validation, test and predict.
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = True,
        update_every: int = 1,
        validate_with_ema: bool = True,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.update_every = update_every
        self.validate_with_ema = validate_with_ema
        self.num_updates = 0
        self.shadow: dict[str, Tensor] | None = None
        self._pending: dict[str, Tensor] | None = None
        self._backup: dict[str, Tensor] | None = None
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return "EMA"

    # --- state -----------------------------------------------------------------------------------
    def _ensure_shadow(self, pl_module: pl.LightningModule) -> None:
        if self.shadow is not None:
            return
        tracked = _tracked(_ema_target(pl_module))
        if self._pending is not None:
            missing = set(tracked) - set(self._pending)
            if missing:
                raise RuntimeError(
                    f"the checkpoint's EMA state lacks {sorted(missing)[:5]}; was it saved for a "
                    "different network? Remove the EMA callback state or use a matching config."
                )
            self.shadow = {k: like(self._pending[k], v.detach()) for k, v in tracked.items()}
            self._pending = None
        else:
            self.shadow = {k: v.detach().clone() for k, v in tracked.items()}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_shadow(pl_module)

    def state_dict(self) -> dict:
        shadow = self.shadow if self.shadow is not None else self._pending
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": {k: full_tensor(v.detach()).cpu() for k, v in (shadow or {}).items()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.num_updates = int(state_dict["num_updates"])
        self._pending = dict(state_dict["shadow"]) or None
        self.shadow = None

    # --- updates ---------------------------------------------------------------------------------
    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, pl_module: pl.LightningModule) -> None:
        self._ensure_shadow(pl_module)
        beta = self.current_decay()
        for name, value in _tracked(_ema_target(pl_module)).items():
            self.shadow[name].lerp_(value.detach().to(self.shadow[name].dtype), 1.0 - beta)
        self.num_updates += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step counts optimizer steps; skip accumulation micro-batches.
        if trainer.global_step == 0 or trainer.global_step % self.update_every != 0:
            return
        if self._last_step == trainer.global_step:
            return
        self._last_step = trainer.global_step
        self.update(pl_module)

    # --- swapping --------------------------------------------------------------------------------
    @contextmanager
    def averaged(self, pl_module: pl.LightningModule) -> Iterator[nn.Module]:
        """Context in which the EMA target network holds the averaged weights."""
        self._swap_in(pl_module)
        try:
            yield _ema_target(pl_module)
        finally:
            self._swap_out(pl_module)

    @torch.no_grad()
    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        self._ensure_shadow(pl_module)
        if self._backup is not None:
            return
        tracked = _tracked(_ema_target(pl_module))
        self._backup = {k: v.detach().clone() for k, v in tracked.items()}
        for k, v in tracked.items():
            v.copy_(self.shadow[k])

    @torch.no_grad()
    def _swap_out(self, pl_module: pl.LightningModule) -> None:
        if self._backup is None:
            return
        for k, v in _tracked(_ema_target(pl_module)).items():
            v.copy_(self._backup[k])
        self._backup = None

    def _maybe_swap_in(self, trainer, pl_module) -> None:
        if self.validate_with_ema and (self.shadow is not None or self._pending is not None):
            self._swap_in(pl_module)

    def _maybe_swap_out(self, trainer, pl_module) -> None:
        self._swap_out(pl_module)

    on_validation_start = _maybe_swap_in
    on_validation_end = _maybe_swap_out
    on_test_start = _maybe_swap_in
    on_test_end = _maybe_swap_out
    on_predict_start = _maybe_swap_in
    on_predict_end = _maybe_swap_out

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self._backup is not None:
            raise RuntimeError(
                "a checkpoint was requested while the EMA weights were swapped in; the raw weights "
                "would be lost. Save checkpoints outside EMA.averaged()."
            )


@contextmanager
def evaluation_mode(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Eval mode, the EMA weights when the trainer has an ``EMA`` callback, and a forked RNG.

    Evaluation callbacks run inside it, so they never change the module's weights or mode, nor
    shift the training RNG stream (adding a callback never changes a training run).
    """
    ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
    was_training = pl_module.training
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        pl_module.eval()
        try:
            if ema is not None:
                with ema.averaged(pl_module):
                    yield
            else:
                yield
        finally:
            pl_module.train(was_training)
