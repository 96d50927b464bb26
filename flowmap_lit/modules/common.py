"""What the LightningModules share: plain hyperparameters, seeded noise, data info, shape checks,
learning-rate schedules."""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import lightning.pytorch as pl
import torch
from torch import nn

_PLAIN = (str, int, float, bool, type(None))


def _is_plain(value) -> bool:
    """True for values that a ``weights_only=True`` checkpoint load accepts (no objects)."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def save_plain_hyperparameters(module: pl.LightningModule) -> None:
    """``save_hyperparameters()`` of the caller's ``__init__``, keeping only plain values.

    Under ``LightningCLI`` every argument arrives as a plain ``class_path``/``init_args`` dict and is
    kept, so ``load_from_checkpoint`` and ``--ckpt_path`` can rebuild the module. Objects passed from
    Python (modules, classes, callables) would make the checkpoint unloadable with
    ``weights_only=True``; they are dropped.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
        module.save_hyperparameters(frame=inspect.currentframe().f_back)
    for key in [k for k, v in module.hparams.items() if not _is_plain(v)]:
        module._hparams.pop(key, None)
        module._hparams_initial.pop(key, None)


def data_info(trainer: pl.Trainer | None) -> dict | None:
    """Shape, classes and normalization of the training data, stored in checkpoints so that
    samples can be decoded without the dataset (``flowmap_lit.commands.sample``)."""
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    stats = getattr(dm, "stats", None)
    if not isinstance(stats, dict):
        return None
    return {"shape": list(stats["shape"]), "num_classes": int(stats["num_classes"]),
            "normalize": bool(getattr(dm, "normalize", False)),
            "mean": list(stats.get("mean", [])), "std": list(stats.get("std", []))}


def resolve_noise_seed(noise_seed: int | None) -> int:
    """``noise_seed``, or the run's ``seed_everything`` seed (``PL_GLOBAL_SEED``), or 0."""
    if noise_seed is not None:
        return int(noise_seed)
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


@contextmanager
def seeded_rng(module: pl.LightningModule, seed: int) -> Iterator[None]:
    """Runs the body on the global RNG seeded with ``seed``, then restores the RNG as it was.

    Training and validation steps draw their noise (times, eps, lam, dropout) inside it with a
    seed derived from ``(noise_seed, global_step, micro-batch[, rank])``, so a step's noise depends
    only on where it is in the run: a resumed run draws exactly what the uninterrupted run drew,
    and nothing else (data workers, evaluation callbacks) can shift it.
    """
    device = module.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def check_network_shape(net: nn.Module, datamodule, key: str) -> None:
    """A clear error before the first step when ``net`` (with ``img_channels`` / ``img_resolution``, as
    every backbone here has) does not fit the data module's ``shape`` (C, H, W); silent otherwise."""
    shape = getattr(datamodule, "shape", None)
    channels, resolution = getattr(net, "img_channels", None), getattr(net, "img_resolution", None)
    if shape is None or channels is None or resolution is None or len(shape) != 3:
        return
    c, h, w = (int(v) for v in shape)
    if (channels, resolution, resolution) != (c, h, w):
        raise ValueError(
            f"{type(net).__name__} ({key}) takes {channels} x {resolution} x {resolution} inputs but the data is "
            f"{c} x {h} x {w}: set {key}.init_args.img_channels: {c} and img_resolution: {h}"
            + ("" if h == w else " (the backbones take square inputs)"))


def constant_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int):
    """Linear learning-rate warmup over ``warmup_steps`` optimizer steps, then constant."""
    return warmup_then_decay(optimizer, warmup_steps)


def warmup_then_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, kind: str = "constant",
                      total_steps: int | None = None, decay_start: float = 0.0, min_ratio: float = 0.0):
    """Learning-rate factor per optimizer step: a linear warmup over ``warmup_steps``, then
    ``kind`` = "constant", or "cosine" / "linear" decay to ``min_ratio`` at ``total_steps``,
    starting after the fraction ``decay_start`` of the run (docs/design.md section 10)."""
    if kind not in ("constant", "cosine", "linear"):
        raise ValueError(f"lr_schedule must be 'constant', 'cosine' or 'linear', got {kind!r}")
    if kind != "constant" and (total_steps is None or total_steps <= 0):
        raise ValueError(f"a {kind} learning-rate decay needs the run's length: set trainer.max_steps")
    if not 0.0 <= decay_start < 1.0 or not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"lr_decay_start must be in [0, 1) and lr_min_ratio in [0, 1], got {decay_start}, {min_ratio}")

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if kind == "constant":
            return warm
        start = max(warmup_steps, int(decay_start * total_steps))
        progress = min(1.0, max(0.0, (step - start) / max(1, total_steps - start)))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
        return warm * (min_ratio + (1 - min_ratio) * shape)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
