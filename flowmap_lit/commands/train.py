"""Training: ``python -m flowmap_lit {fit,validate,test,predict} --config CONFIG.yaml``.

A thin ``LightningCLI``: the model and the data module are chosen by ``class_path`` in the config
(any ``LightningModule`` / ``LightningDataModule``), every constructor argument is reachable from
YAML or the command line, and ``--print_config`` prints a complete config that runs as is.
"""

from __future__ import annotations

import logging
import sys
import traceback
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

# Warnings a user of this CLI cannot act on (each checked against what the code does):
QUIET = [
    # Training "epochs" here are passes over a resampled stream and logging counts global steps,
    # so a short epoch does not lose any log line.
    ".*number of training batches .* is smaller than the logging interval.*",
    # The frozen teacher and guide are in eval mode on purpose (Teacher.train keeps them there).
    ".*module\\(s\\) in eval mode at the start of training.*",
    # A deprecation inside Lightning's own pytree helper (lightning/pytorch/utilities/_pytree.py).
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
    # Two-network modules (manual optimization) checkpoint after their steps, which is what resume needs.
    ".*Using ModelCheckpoint with manual optimization and every_n_train_steps.*",
]


class _DropAdvert(logging.Filter):
    """Drops Lightning's "Tip: try installing litlogger" advertisement printed by every fit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.getMessage())


def quiet_warnings() -> None:
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropAdvert) for f in log.filters):
            log.addFilter(_DropAdvert())


def _step_description(bar, base: str) -> str:
    max_steps = bar.trainer.max_steps
    if max_steps is None or max_steps < 0:
        return base
    return f"Step {bar.trainer.global_step}/{max_steps}"


class StepRichProgressBar(RichProgressBar):
    """Lightning's rich progress bar, labelled with the optimizer step and ``max_steps`` (runs here are
    sized in steps; an "epoch" of a resampled stream means little, and ``max_epochs=-1`` printed as "/-2")."""

    def _get_train_description(self, current_epoch: int) -> str:
        return _step_description(self, super()._get_train_description(current_epoch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=self._get_train_description(0))


class StepTQDMProgressBar(TQDMProgressBar):
    """The tqdm progress bar with the same step label (when rich is not installed)."""

    def on_train_batch_end(self, trainer, *args) -> None:
        super().on_train_batch_end(trainer, *args)
        self.train_progress_bar.set_description(_step_description(self, f"Epoch {trainer.current_epoch}"))


def default_progress_bar() -> ProgressBar:
    try:
        import rich  # noqa: F401
    except ImportError:
        return StepTQDMProgressBar()
    return StepRichProgressBar()


class ConfigError(RuntimeError):
    """A class named in the config refused its arguments: carries that class's own message (which
    says what is wrong and how to fix it) instead of jsonargparse's Union-subtype summary."""


_PACKAGE = Path(__file__).resolve().parents[1]  # flowmap_lit/


def _raised_in_package(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)


def project_error(err: BaseException) -> BaseException | None:
    """The deepest exception in ``err``'s chain that this package raised itself, if any."""
    found, seen = None, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if _raised_in_package(err) and Path(traceback.extract_tb(err.__traceback__)[-1].filename).name != "train.py":
            found = err
        err = err.__cause__ or err.__context__
    return found


def check_checkpoint_path(path: str | None) -> None:
    """A clear error for a ``--ckpt_path`` that is missing or not a checkpoint (truncated or corrupt),
    before Lightning hands it to ``torch.load``. ``last`` / ``best`` / ``hpc`` and sharded checkpoint
    directories pass through."""
    if path is None or str(path) in ("last", "best", "hpc", "registry"):
        return
    import zipfile

    file = Path(path)
    if file.is_dir():
        return
    if not file.is_file():
        raise ConfigError(f"--ckpt_path {path} does not exist: give a checkpoint written by a fit (e.g. "
                          "checkpoints/quickstart/last.ckpt), or 'last' to resume the latest one")
    if not zipfile.is_zipfile(file):
        raise ConfigError(f"--ckpt_path {path} is not a readable checkpoint (truncated or corrupt?): it is not the "
                          "archive torch.save writes. Resume from another checkpoint of the run (ModelCheckpoint "
                          "keeps every_n_train_steps ones) or start without --ckpt_path")


def check_checkpoint_classes(path: str | None, config: dict) -> None:
    """Lightning rebuilds the model from the class paths a ``--ckpt_path`` file stores; a file from elsewhere
    must not choose code to run. Classes of this package and ``torch.optim``, and any path the run's own
    config names, pass (``flowmap_lit.checkpoints.trust``)."""
    if path is None or not Path(path).is_file():
        return
    from flowmap_lit.checkpoints.trust import is_trusted, named_paths

    hparams = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    own = set(named_paths(config))
    refused = [p for p in named_paths(hparams) if p not in own and not is_trusted(p)]
    if refused:
        raise ConfigError(f"--ckpt_path {path} names {refused[0]!r}, which is neither a class of flowmap_lit or "
                          "torch.optim nor named by this run's config; resuming would import and call code the file "
                          "chooses. Name that class in the config if you trust the file.")


class SaveConfigNextToLogs(SaveConfigCallback):
    """Saves the run's config into the logger's run directory, and nowhere when there is no logger
    (Lightning would otherwise write ``config.yaml`` into the working directory on every run)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


class FlowMapCLI(LightningCLI):
    """LightningCLI with subclass mode for models and data, a saved, overwritable config, and a
    step-labelled progress bar (unless the config brings its own or turns the bar off)."""

    def __init__(self, *args, **kwargs) -> None:
        quiet_warnings()
        kwargs.setdefault("model_class", pl.LightningModule)
        kwargs.setdefault("datamodule_class", pl.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", SaveConfigNextToLogs)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"prog": "python -m flowmap_lit", "description": (
            "Train with fit (validate, test, predict) and a config; 'python -m flowmap_lit --help' lists the "
            "other commands.")})
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:  # noqa: BLE001 - re-raised, with the package's own message when there is one
            own = project_error(err)
            if own is None:
                raise
            raise ConfigError(f"{type(own).__name__}: {own}") from err

    def _parse_ckpt_path(self) -> None:  # Lightning reads the checkpoint's hyperparameters here, first
        subcommand = self.config.get("subcommand")
        if subcommand:
            ckpt_path = self.config[subcommand].get("ckpt_path")
            check_checkpoint_path(ckpt_path)
            check_checkpoint_classes(ckpt_path, self.config[subcommand].as_dict())
        super()._parse_ckpt_path()

    def _instantiate_trainer(self, config, callbacks):
        given = list(config.get("callbacks") or []) + list(callbacks)
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, default_progress_bar()]
        return super()._instantiate_trainer(config, callbacks)


def main(argv: list[str] | None = None):
    """``fit``/``validate``/``test``/``predict`` and their arguments (``argv``; None: ``sys.argv[1:]``). A
    config whose objects cannot be built exits with status 2 and the message of the class that refused."""
    try:
        return FlowMapCLI(args=argv)  # None: LightningCLI parses sys.argv itself
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
