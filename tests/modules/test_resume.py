"""Runs survive being killed: SIGKILL mid-training, ``fit --ckpt_path last``, and the run continues
exactly (same steps, batches, losses, weights, EMA and tangent warmup as an uninterrupted run); and the
digits configs train with 2 processes under FSDP2 (and DDP, on demand) from the command line."""

import json
import signal

import pytest
import torch

from tests.helpers import ROOT
from tests.helpers.cli import cli, cli_in_child, run_module
from tests.helpers.two_process import digits_distill_args, small_eval

RESUME_CONFIG = """\
trainer:
  max_steps: 11
  logger: false
  val_check_interval: 3
  limit_val_batches: 1
  enable_progress_bar: false
  callbacks:
    - class_path: flowmap_lit.callbacks.EMA
      init_args: {decay: 0.9}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: %s, save_last: true, every_n_train_steps: 4, save_top_k: -1, enable_version_counter: false}
    - class_path: tests.helpers.resume_probe.RecordSteps
model:
  init_args:
    warmup_steps: 8
data:
  init_args:
    batch_size: 32
    num_workers: 2
    train_samples_per_epoch: 160   # 5 batches per epoch: checkpoints land mid-epoch and on its last batch
    return_keys: true
"""


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_killed_run_resumes_exactly(digits_teacher_guide, tmp_path, monkeypatch):
    """The uninterrupted run and the final resumption run in this process; the two runs killed with SIGKILL
    (after step 6, last checkpoint at step 4 mid-epoch; after step 10, last checkpoint at step 8) in forked
    copies of it. All with one intra-op thread, as a forked process runs."""
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)  # (the isolation fixture restores the thread count)
    config, config_straight = tmp_path / "resume.yaml", tmp_path / "straight.yaml"
    config.write_text(RESUME_CONFIG % (tmp_path / "ckpt"))
    config_straight.write_text(RESUME_CONFIG % (tmp_path / "ckpt_straight"))
    straight, killed = tmp_path / "straight.jsonl", tmp_path / "killed.jsonl"
    monkeypatch.setenv("FLOWMAP_PROBE_LOG", str(straight))
    cli("fit", *digits_distill_args(digits_teacher_guide, "--config", config_straight))
    expected = {r["step"]: r for r in records(straight)}
    assert sorted(expected) == list(range(1, 12))

    for kill_at, resume in ((6, []), (10, ["--ckpt_path", "last"])):
        code = cli_in_child("fit", *digits_distill_args(digits_teacher_guide, "--config", config, *resume),
                            env={"FLOWMAP_PROBE_LOG": str(killed), "FLOWMAP_PROBE_KILL_AT": str(kill_at)})
        assert code == -signal.SIGKILL
    monkeypatch.setenv("FLOWMAP_PROBE_LOG", str(killed))
    cli("fit", *digits_distill_args(digits_teacher_guide, "--config", config, "--ckpt_path", "last"))
    got = records(killed)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10, 9, 10, 11]
    for r in got:  # every step, also the replayed ones, is exactly the uninterrupted run's step
        assert r == expected[r["step"]], (r["step"], r, expected[r["step"]])


def test_digits_distillation_fits_with_fsdp2_and_resumes_from_its_sharded_checkpoint(two_process):
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in two_process["logs"]["steps"]  # the launch
    log = two_process["logs"]["digits"]
    assert "fit done: GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert "Flow-map error at step 3" in log
    assert two_process["digits"].is_dir()  # sharded
    resumed = two_process["logs"]["digits_resumed"]
    assert "Restored all states from the checkpoint" in resumed and "fit done: GLOBAL_RANK: 1, MEMBER: 2/2" in resumed


@pytest.mark.slow
def test_digits_distillation_fits_with_ddp(digits_teacher_guide, tmp_path):
    """DDP's two-process step is checked against one process in test_distributed.py; the full fit under DDP
    repeats the FSDP2 one and runs on demand (pytest -m slow)."""
    small = tmp_path / "small.yaml"
    small.write_text(small_eval(tmp_path / "ckpt"))
    args = digits_distill_args(digits_teacher_guide, "--config", ROOT / "configs/strategies/ddp.yaml", "--config",
                               small, "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    proc = run_module(["fit", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out
    assert "Flow-map error at step 3" in out
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    # and it resumes from its own checkpoint
    proc = run_module(["fit", *args, "--trainer.max_steps", "4", "--ckpt_path", "last"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr


def test_a_crash_while_saving_never_corrupts_the_previous_checkpoint(tmp_path, monkeypatch):
    """Lightning writes single-file checkpoints through an fsspec transaction (a temporary file that is
    moved into place when complete), so a crash while saving leaves the old last.ckpt intact."""
    import fsspec.implementations.local as local
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    io, path = TorchCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)

    write = local.LocalFileOpener.write

    def crash(self, data):  # write part of the new checkpoint, then die
        write(self, data[: len(data) // 2])
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(local.LocalFileOpener, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))


def test_teacher_pretraining_fits_with_fsdp2(two_process):
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in two_process["logs"]["steps"]  # the launch
    assert "fit done: GLOBAL_RANK: 1, MEMBER: 2/2" in two_process["logs"]["guide"]
    assert list(two_process["guide_root"].rglob("*.ckpt"))  # a sharded checkpoint directory
