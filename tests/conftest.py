"""Fixtures shared across the test folders, and the isolation every test gets.

The expensive artifacts are made once per session and only read by the tests that use them (a test
that writes, writes under its own ``tmp_path``):

- ``digits_classifier``: the digits data and its FID classifier;
- ``quickstart``: a tiny quickstart distillation, fitted by ``python -m flowmap_lit fit`` in a fresh
  process (the console a user sees is checked on it), with the digits data and the FID classifier;
- ``digits_teacher_guide``: briefly trained digits teacher and guide checkpoints (configs/digits/);
- ``two_process``: everything the tests run with 2 processes, in one launch (distributed steps, sharded
  checkpoints of a teacher and its distillation, the digits configs), and a single-process distillation.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import ROOT
from tests.helpers.cli import SHARED, cli, make_quickstart_checkpoint

# Variables a fit, a launcher or a test may set in this process (Lightning's seed, torch.distributed's).
PROCESS_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK",
                     "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def isolated_process_state():
    """Whatever a test (or an in-process fit) changes of the process is put back after it: environment
    variables, the working directory, ``sys.argv``, torch's default dtype, thread count and grad mode.
    (pytest itself restores the warnings filters.)"""
    environ, cwd, argv = dict(os.environ), os.getcwd(), list(sys.argv)
    dtype, threads, grad = torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled()
    yield
    if dict(os.environ) != environ:
        os.environ.clear()
        os.environ.update(environ)
    os.chdir(cwd)
    sys.argv[:] = argv
    torch.set_default_dtype(dtype)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    torch.set_grad_enabled(grad)


@pytest.fixture
def lightning_log():
    """What Lightning's loggers print during the test (``rank_zero_info``: the callbacks' tables), as one
    string from the returned function: capsys does not see a logging handler made before the test."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    yield lambda: "\n".join(records)
    logger.removeHandler(handler)


def pytest_configure(config):
    # A variable left by the shell (e.g. an interactive torchrun session) would turn in-process commands
    # into ranks of a process group that does not exist.
    for name in PROCESS_VARIABLES:
        os.environ.pop(name, None)
    # One intra-op thread, here and in the processes the tests start, unless OMP_NUM_THREADS says otherwise.
    # The tests' tensors are small, and on a shared 2-core machine two threads per process stall each other:
    # an OpenMP region waits for its descheduled thread (with another process busy, tests ran 10-40 times
    # slower with two threads; on a quiet machine two threads save about 10%).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def digits_classifier(tmp_path_factory) -> dict:
    """A fresh digits dataset and the digits FID classifier trained on it for 10 epochs: ``root``, ``path``
    (classifier.pt), ``result`` (of train_digits_classifier), ``train``, ``val``, ``val_labels`` (tensors)."""
    from flowmap_lit.data import prepare_digits, read_split
    from flowmap_lit.metrics import train_digits_classifier

    root = tmp_path_factory.mktemp("digits_classifier") / "digits"
    prepare_digits(str(root))
    path = root / "classifier.pt"
    result = train_digits_classifier(root, path, epochs=10, seed=0)
    train = torch.from_numpy(read_split(str(root), "train", normalize=False)[0])
    val, val_labels = (torch.from_numpy(a) for a in read_split(str(root), "val", normalize=False))
    return dict(root=root, path=path, result=result, train=train, val=val, val_labels=val_labels)


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory, digits_classifier) -> SimpleNamespace:
    """A 3-step quickstart distillation (validation every 2 steps, so the end of the fit evaluates again)
    by ``python -m flowmap_lit fit`` in a fresh process: ``dir``, ``ckpt`` (last.ckpt), ``log`` (its
    console), ``digits`` (the data, the FID classifier and cached reference statistics) and
    ``digits_after_fit`` (what the fit left in ``digits``). The FID classifier is ``digits_classifier``'s,
    put where the config looks for it (training one on first use, 40 epochs, would double the fit's time;
    tests/callbacks/test_fid.py checks that training)."""
    work = tmp_path_factory.mktemp("quickstart")
    (work / "digits").mkdir()
    shutil.copy(digits_classifier["path"], work / "digits/classifier.pt")
    ckpt = make_quickstart_checkpoint(work, steps=3)
    SHARED["quickstart"] = work  # for tests/test_cli.py's make_quickstart_checkpoint
    yield SimpleNamespace(dir=work, ckpt=ckpt, log=(work / "fit.log").read_text(), digits=work / "digits",
                          digits_after_fit=sorted(os.listdir(work / "digits")))
    SHARED.pop("quickstart", None)


@pytest.fixture(scope="session")
def digits_teacher_guide(tmp_path_factory) -> SimpleNamespace:
    """The digits teacher and guide configs fitted for 2 steps each (no logger, no callbacks: Lightning's
    default checkpoint under ``default_root_dir``): ``dir``, ``digits`` (data), ``teacher``, ``guide``
    (checkpoint files)."""
    work = tmp_path_factory.mktemp("digits_teacher_guide")
    digits = work / "digits"
    cwd = os.getcwd()
    os.chdir(work)
    try:
        for name in ("teacher", "guide"):
            cli("fit", "--config", ROOT / f"configs/digits/{name}.yaml", "--trainer.max_steps", "2",
                "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.callbacks", "[]",
                "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                "--data.init_args.root", digits, "--trainer.default_root_dir", work / name)
    finally:
        os.chdir(cwd)
    assert not (work / "config.yaml").exists()  # no logger: no config written into the working directory
    return SimpleNamespace(dir=work, digits=digits, teacher=next((work / "teacher").rglob("*.ckpt")),
                           guide=next((work / "guide").rglob("*.ckpt")))


@pytest.fixture(scope="session")
def two_process(tmp_path_factory, digits_teacher_guide) -> dict:
    """Everything the tests run with 2 processes, in one launch (tests/helpers/two_process.py): one
    distillation step under DDP and FSDP2 (``steps``: their results); sharded checkpoint directories of a
    tiny FSDP2 teacher and its distillation (``teacher``, ``distill``) and the single-process distillation's
    file (``single``); the digits guide pretrained (``guide_root``); the digits distillation config
    (``digits``), resumed once; the same config with a grid search at its validation (``schedule``: its
    checkpoint directory); each part's log (``logs``)."""
    from tests.helpers.two_process import two_process_runs

    return two_process_runs(tmp_path_factory.mktemp("two_process"), digits_teacher_guide)
