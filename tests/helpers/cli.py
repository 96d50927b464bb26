"""The command line from the tests: in this process (``cli``); in a forked copy of it (``cli_in_child``) where a
test kills the process; or in a fresh Python (``run_module``) where a fresh interpreter is what a test checks
(the console a user sees, launchers of several processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from unittest import mock

from tests.helpers import ROOT

# Small evaluation callbacks for the tiny fits (the shipped configs evaluate thousands of samples).
SMALL_CALLBACKS = """
trainer:
  callbacks:
    - class_path: flowmap_lit.callbacks.EMA
    - class_path: flowmap_lit.callbacks.FlowMapError
      init_args: {num_samples: 40, reference_steps: 8, batch_size: 40}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: %s, save_last: true}
"""

FID_CALLBACK = """
    - class_path: flowmap_lit.callbacks.FewStepFID
      init_args: {feature_path: %s, train_if_missing: true, num_samples: 100, teacher_steps: 4}
    - class_path: flowmap_lit.callbacks.FlowMapDiagnostics
      init_args: {times: [1.0, 0.5, 0.0], step_counts: [1, 2], num_samples: 20, reference_steps: 8}
    - class_path: flowmap_lit.callbacks.ScheduleSearch
      init_args: {step_counts: [2], criterion: fid, budget: 8, num_samples: 64}
"""


# Runs the session fixtures made (tests/conftest.py), by name: their working directories.
SHARED: dict[str, Path] = {}


def cli(*args):
    """``python -m flowmap_lit ARGS`` in this process: the command's return value (the LightningCLI
    of a fit); errors raise ``SystemExit``. pytest's own arguments are hidden from LightningCLI."""
    from flowmap_lit.cli import main

    with mock.patch.object(sys, "argv", sys.argv[:1]):
        return main([str(a) for a in args])


def cli_in_child(*args, env: dict | None = None) -> int:
    """``python -m flowmap_lit ARGS`` in a forked copy of this process (torch and Lightning already imported), with
    ``env`` added to its environment and one intra-op thread (a forked process must not use the OpenMP threads
    of its parent); returns its exit code, ``-N`` when signal N ended it."""
    import torch

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.environ.update(env or {})
            torch.set_num_threads(1)
            cli(*args)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def run_module(args, cwd, env=None, timeout=600, module="flowmap_lit") -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in a fresh process (the repository and ``tests`` importable)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# A config fragment: only a checkpoint every 2 steps, all kept, in ckpt/ relative to the working directory.
CHECKPOINTS = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: ckpt, save_last: true, every_n_train_steps: 2, save_top_k: -1, enable_version_counter: false}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quickstart_args(work: Path, steps: int) -> list[str]:
    """``fit`` arguments of a tiny quickstart run in ``work`` (FID and flow-map error callbacks, validation every
    2 steps, data and the FID classifier in ``work/digits``, ``last.ckpt`` in ``work/ckpt``)."""
    small = work / "small.yaml"
    small.write_text(SMALL_CALLBACKS % (work / "ckpt") + FID_CALLBACK % (work / "digits/classifier.pt"))
    digits = str(work / "digits")
    return ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(small),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "2",
            "--model.init_args.teacher.init_args.data_root", digits,
            "--model.init_args.guide.init_args.data_root", digits, "--data.init_args.root", digits]


def start_quickstart(work: Path, steps: int = 3) -> subprocess.Popen:
    """Starts a tiny quickstart run in ``work`` (``quickstart_args``) as ``python -m flowmap_lit fit`` in a
    fresh process; ``finish_quickstart`` waits for it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "flowmap_lit", *quickstart_args(Path(work), steps)], cwd=work,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_quickstart(work: Path, proc: subprocess.Popen) -> Path:
    """Waits for ``start_quickstart``'s run: its console (stdout and stderr) in ``work/fit.log``; its ``last.ckpt``."""
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    (Path(work) / "fit.log").write_text(out + err)
    return Path(work) / "ckpt/last.ckpt"


def make_quickstart_checkpoint(work: Path, steps: int = 3, in_process: bool = False) -> Path:
    """A tiny quickstart run in ``work`` (``quickstart_args``); returns its ``last.ckpt``. In a fresh process
    unless ``in_process``, its console (stdout and stderr) kept in ``work/fit.log``."""
    work = Path(work)
    if not in_process:
        return finish_quickstart(work, start_quickstart(work, steps))
    args = quickstart_args(work, steps)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        cli(*args)
    finally:
        os.chdir(cwd)
    return work / "ckpt/last.ckpt"


def straight_and_resumed(config: Path, quickstart, work: Path, steps: int, interval: int) -> tuple[dict, dict]:
    """A second-stage ``config`` started from the ``quickstart`` fixture's checkpoint, run in ``work`` straight for
    ``steps`` steps and killed after ``steps // 2`` then resumed from ``last.ckpt``, checkpoints and validation every
    ``interval`` steps; returns both runs' final checkpoints (straight, resumed), to be compared bit for bit."""
    import torch

    callbacks = SMALL_CALLBACKS.replace("save_last: true}",
                                        f"save_last: true, every_n_train_steps: {interval}, save_top_k: -1}}")
    digits = str(quickstart.digits)
    common = ["fit", "--config", str(config), "--model.init_args.init_checkpoint", str(quickstart.ckpt),
              "--trainer.logger", "false", "--trainer.val_check_interval", str(interval),
              "--trainer.enable_progress_bar", "false", "--data.init_args.batch_size", "16",
              "--model.init_args.teacher.init_args.data_root", digits,
              "--model.init_args.guide.init_args.data_root", digits, "--data.init_args.root", digits]
    runs = {}
    for name, max_steps, resume in (("straight", steps, False), ("killed", steps // 2, False), ("killed", steps, True)):
        cfg = work / f"{name}.yaml"
        cfg.write_text(callbacks % (work / name))
        extra = ["--ckpt_path", str(work / name / "last.ckpt")] if resume else []
        cli(*common, "--config", cfg, "--trainer.max_steps", max_steps, *extra)
        runs[name] = torch.load(work / name / "last.ckpt", weights_only=True, map_location="cpu")
    return runs["straight"], runs["killed"]

