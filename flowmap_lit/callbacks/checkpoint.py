"""Checkpoints that lose nothing and never overwrite another run's: ``RunCheckpoint``.

Lightning's ``ModelCheckpoint`` with a fixed ``dirpath`` lets a second run of the same config (or two
seeds started side by side) replace the first run's files, and a run stopped by SIGTERM or Ctrl-C
keeps only its last periodic checkpoint. ``RunCheckpoint`` is a ``ModelCheckpoint`` that

- writes each fit into its own ``DIRPATH/version_N/`` (N claimed with an atomic ``mkdir``, the
  logger's version when free), so concurrent runs keep all their files;
- keeps ``DIRPATH/last.ckpt`` as a link to the newest ``last.ckpt`` of any run, so commands can keep
  naming ``checkpoints/quickstart/last.ckpt``; ``--ckpt_path last`` resumes the newest one;
- saves the step it reached when the run is stopped: SIGTERM (what schedulers send before a time
  limit or a pre-emption) and a first Ctrl-C both stop the run at the end of the current optimizer
  step, which is then written as ``last.ckpt`` (a second Ctrl-C aborts at once). The resumed run
  (``--ckpt_path last``) continues exactly from there.

Under SLURM, Lightning's ``SLURMEnvironment`` still handles the requeue signal (``#SBATCH
--signal=SIGUSR1@90``): it saves an ``hpc_ckpt`` and requeues the job, which resumes from it.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

LAST = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION


def claim_version(root: str, preferred: int | None = None) -> int:
    """The smallest free ``version_N`` under ``root`` (``preferred`` when free), created atomically."""
    os.makedirs(root, exist_ok=True)
    taken = {int(name[8:]) for name in os.listdir(root) if name.startswith("version_") and name[8:].isdigit()}
    version = preferred if preferred is not None and preferred not in taken else (max(taken, default=-1) + 1)
    while True:
        try:
            os.mkdir(os.path.join(root, f"version_{version}"))
            return version
        except FileExistsError:  # another run took it between the listing and now
            version += 1


def link_last(root: str, target: str) -> None:
    """Points ``root/last.ckpt`` at ``target`` (replaced atomically). A regular file or directory left
    there by an unversioned run is kept, renamed ``last-unversioned.ckpt``."""
    link = os.path.join(root, LAST)
    if os.path.lexists(link) and not os.path.islink(link):
        keep = os.path.join(root, "last-unversioned" + ModelCheckpoint.FILE_EXTENSION)
        if not os.path.lexists(keep):
            os.replace(link, keep)
            rank_zero_info(f"{link} was a checkpoint of an unversioned run: kept as {keep}")
        else:
            return
    temporary = f"{link}.{os.getpid()}.tmp"
    os.symlink(os.path.relpath(target, root), temporary)
    os.replace(temporary, link)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with one directory per run, a stable ``last.ckpt`` link and a save on stop.

    Takes every argument of Lightning's ``ModelCheckpoint`` and:

    Args:
        save_last: Keep ``last.ckpt`` of the run (here True by default: the stop saves it, and the
            ``dirpath/last.ckpt`` link names it).
        versioned: Write each fit into ``dirpath/version_N/`` and keep ``dirpath/last.ckpt`` as a link
            to the newest run's ``last.ckpt``; False writes into ``dirpath`` itself, as ModelCheckpoint does.
        save_on_stop: On SIGTERM or a first Ctrl-C, finish the current optimizer step, write it as
            ``last.ckpt`` and exit (a second Ctrl-C aborts without saving).
    """

    def __init__(self, *args, save_last: bool | None = True, versioned: bool = True, save_on_stop: bool = True,
                 **kwargs) -> None:
        super().__init__(*args, save_last=save_last, **kwargs)
        self.versioned, self.save_on_stop = versioned, save_on_stop
        self.run_root: str | None = None
        self._previous_sigint = None
        self._stopping = False

    # ------------------------------------------------------------------ one directory per run
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():  # the root holds the other runs by design
            warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
            super().setup(trainer, pl_module, stage)
        if stage != "fit" or not self.versioned or self.dirpath is None or self.run_root is not None:
            return
        self.run_root = str(self.dirpath)
        version = None
        if trainer.is_global_zero:
            logger_version = getattr(trainer.logger, "version", None) if trainer.logger is not None else None
            version = claim_version(self.run_root, logger_version if isinstance(logger_version, int) else None)
        version = trainer.strategy.broadcast(version)
        self.dirpath = os.path.join(self.run_root, f"version_{version}")
        rank_zero_info(f"Checkpoints of this run: {self.dirpath} (newest last.ckpt of any run: "
                       f"{os.path.join(self.run_root, LAST)})")

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.run_root is not None and os.path.basename(filepath) == LAST and trainer.is_global_zero:
            link_last(self.run_root, filepath)

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """``--ckpt_path last``: the ``last.ckpt`` of every run under the root (Lightning takes the newest)."""
        found = super()._find_last_checkpoints(trainer)
        root = self.run_root or (str(self.dirpath) if self.dirpath is not None else None)
        if self.versioned and root is not None and os.path.isdir(root):
            for name in os.listdir(root):
                candidate = os.path.join(root, name, LAST)
                if name.startswith("version_") and os.path.exists(candidate):
                    found.add(os.path.normpath(candidate))
            found.discard(os.path.normpath(os.path.join(root, LAST)))  # the link: its target is listed
        return found

    def load_state_dict(self, state_dict: dict) -> None:
        with warnings.catch_warnings():  # a resumed run writes into a new version directory by design
            warnings.filterwarnings("ignore", message=".*The dirpath has changed from.*")
            super().load_state_dict(state_dict)

    # ------------------------------------------------------------------ save on stop
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_on_stop and threading.current_thread() is threading.main_thread():
            self._stopping = False
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint(trainer))

    def _on_sigint(self, trainer: pl.Trainer):
        def handler(signum, frame) -> None:
            if self._stopping:  # second Ctrl-C: abort now, as without this callback
                self._restore_sigint()
                raise KeyboardInterrupt
            self._stopping = True
            print("\nStopping at the end of this step and saving it (Ctrl-C again to abort without saving) ...",
                  flush=True)
            trainer._signal_connector.received_sigterm = True  # Lightning stops at the next step boundary

        return handler

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        stopped = isinstance(exception, SIGTERMException)
        if (stopped and self.save_on_stop and self.save_last and self.dirpath is not None
                and not trainer.sanity_checking and trainer.global_step > 0):
            if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            rank_zero_info(f"Stopped at step {trainer.global_step}: saved {self.last_model_path}. Continue with "
                           "--ckpt_path last (the same command).")
        super().on_exception(trainer, pl_module, exception)
