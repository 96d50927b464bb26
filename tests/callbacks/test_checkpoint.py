"""Nothing lost: a stopped fit saves the step it reached and resumes exactly; runs never overwrite each other."""

import multiprocessing
import os
import signal
import sys
import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from flowmap_lit.callbacks.checkpoint import claim_version
from flowmap_lit.cli import main
from tests.helpers import ROOT

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")


class SignalAt(pl.Callback):
    """Sends this process ``signum`` right after optimizer step ``step`` (as a scheduler or Ctrl-C would)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.fixture(autouse=True)
def probe_module(monkeypatch):
    module = types.ModuleType("flowmap_probe")
    module.SignalAt = SignalAt
    monkeypatch.setitem(sys.modules, "flowmap_probe", module)


def fit(tmp_path: Path, ckpt_dir: Path, steps: int, *extra: str, stop_at: int | None = None, signum=signal.SIGTERM):
    """The quickstart config, shrunk, with EMA and a ``RunCheckpoint`` into ``ckpt_dir``."""
    callbacks = [{"class_path": "flowmap_lit.callbacks.EMA", "init_args": {"decay": 0.9}},
                 {"class_path": "flowmap_lit.callbacks.RunCheckpoint",
                  "init_args": {"dirpath": str(ckpt_dir), "every_n_train_steps": 100}}]
    if stop_at is not None:
        callbacks.append({"class_path": "flowmap_probe.SignalAt",
                          "init_args": {"step": stop_at, "signum": int(signum)}})
    digits = str(tmp_path / "digits")
    args = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.max_steps", str(steps),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.val_check_interval", "1000",
            "--trainer.callbacks", str(callbacks).replace("'", '"'),
            "--model.init_args.student.init_args.width", "32", "--model.init_args.student.init_args.depth", "1",
            "--model.init_args.teacher.init_args.data_root", digits,
            "--model.init_args.guide.init_args.data_root", digits,
            "--data.init_args.root", digits, "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "32",
            *extra]
    main(args)


def weights(path: Path) -> dict:
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    return {"step": ckpt["global_step"], **{f"net.{k}": v for k, v in ckpt["state_dict"].items()},
            **{f"ema.{k}": v for k, v in ckpt["callbacks"]["EMA"]["shadow"].items()},
            **{f"adam.{i}": s["exp_avg"] for i, s in ckpt["optimizer_states"][0]["state"].items()}}


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """An uninterrupted 6-step run; returns its working directory (the dataset is shared)."""
    work = tmp_path_factory.mktemp("whole")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        module = types.ModuleType("flowmap_probe")
        sys.modules.setdefault("flowmap_probe", module)
        fit(work, work / "whole", 6)
    finally:
        os.chdir(cwd)
    return work


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_fit_saves_its_step_and_resumes_exactly(whole, tmp_path, monkeypatch, signum):
    tmp_path = whole / f"signal_{int(signum)}"
    tmp_path.mkdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").symlink_to(whole / "digits")
    legacy = tmp_path / "stopped/last.ckpt"  # what an unversioned run left: kept, not overwritten
    legacy.parent.mkdir()
    legacy.write_bytes(b"an unversioned run's file")
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a shell's background job
    with pytest.raises(SystemExit):
        fit(tmp_path, tmp_path / "stopped", 6, stop_at=3, signum=signum)
    assert torch.load(tmp_path / "stopped/last.ckpt", weights_only=True)["global_step"] == 3  # nothing lost
    assert signal.getsignal(signal.SIGINT) is before  # the handler was put back
    fit(tmp_path, tmp_path / "stopped", 6, "--ckpt_path", "last")
    resumed, reference = weights(tmp_path / "stopped/last.ckpt"), weights(whole / "whole/last.ckpt")
    assert resumed["step"] == reference["step"] == 6
    assert resumed.keys() == reference.keys()
    different = [k for k in reference if k != "step" and not torch.equal(resumed[k], reference[k])]
    assert not different, different  # bit for bit
    # Two runs of one config: each kept its own files, and last.ckpt links the newest.
    assert torch.load(tmp_path / "stopped/version_0/last.ckpt", weights_only=True)["global_step"] == 3
    assert os.path.realpath(tmp_path / "stopped/last.ckpt") == str(tmp_path / "stopped/version_1/last.ckpt")
    assert (tmp_path / "stopped/last-unversioned.ckpt").read_bytes() == b"an unversioned run's file"


def _claim(root: str) -> int:
    return claim_version(root)


def test_concurrent_runs_claim_distinct_versions(tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        versions = pool.map(_claim, [str(tmp_path)] * 16)
    assert sorted(versions) == list(range(16))
    assert claim_version(str(tmp_path), preferred=3) == 16 and claim_version(str(tmp_path), preferred=20) == 20
