"""Runs survive being killed: SIGKILL mid-training, ``fit --ckpt_path last``, and the run continues
exactly (same steps, batches, losses, weights, EMA and tangent warmup as an uninterrupted run);
and the digits distillation config trains with 2 processes under DDP and FSDP2 from the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RESUME_CONFIG = """\
trainer:
  max_steps: 11
  logger: false
  val_check_interval: 3
  limit_val_batches: 1
  callbacks:
    - class_path: flowmap_lit.callbacks.EMA
      init_args: {decay: 0.9}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: %s, save_last: true, every_n_train_steps: 4, save_top_k: -1, enable_version_counter: false}
    - class_path: resume_probe.RecordSteps
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


def _run(args, cwd, env=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "flowmap_lit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def digits_checkpoints(tmp_path_factory):
    """A briefly trained digits teacher and guide, and the digits data."""
    tmp = tmp_path_factory.mktemp("digits")
    for name in ("teacher", "guide"):
        proc = _run(["fit", "--config", str(ROOT / f"configs/digits/{name}.yaml"), "--trainer.max_steps", "2",
                     "--trainer.val_check_interval", "2", "--trainer.callbacks", "[]", "--trainer.logger", "false",
                     "--data.init_args.root", str(tmp / "digits"), "--trainer.default_root_dir", str(tmp / name)],
                    cwd=tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, next((tmp / "teacher").rglob("*.ckpt")), next((tmp / "guide").rglob("*.ckpt"))


def distill_args(digits_checkpoints, *extra):
    tmp, teacher, guide = digits_checkpoints
    return ["fit", "--config", str(ROOT / "configs/digits/distill_ayf_emd.yaml"), *extra,
            "--model.init_args.teacher.init_args.checkpoint", str(teacher),
            "--model.init_args.guide.init_args.checkpoint", str(guide), "--data.init_args.root", str(tmp / "digits")]


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_killed_run_resumes_exactly(digits_checkpoints, tmp_path):
    config, config_straight = tmp_path / "resume.yaml", tmp_path / "straight.yaml"
    config.write_text(RESUME_CONFIG % (tmp_path / "ckpt"))
    config_straight.write_text(RESUME_CONFIG % (tmp_path / "ckpt_straight"))
    straight = tmp_path / "straight.jsonl"
    proc = _run(distill_args(digits_checkpoints, "--config", str(config_straight)), tmp_path,
                {"FLOWMAP_PROBE_LOG": str(straight)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {r["step"]: r for r in records(straight)}
    assert sorted(expected) == list(range(1, 12))

    killed = tmp_path / "killed.jsonl"
    # killed after step 6 (last checkpoint: step 4, mid-epoch), then after step 10 (last: step 8)
    for kill_at, resume in ((6, []), (10, ["--ckpt_path", "last"]), (None, ["--ckpt_path", "last"])):
        env = {"FLOWMAP_PROBE_LOG": str(killed)}
        if kill_at is not None:
            env["FLOWMAP_PROBE_KILL_AT"] = str(kill_at)
        proc = _run(distill_args(digits_checkpoints, "--config", str(config), *resume), tmp_path, env)
        if kill_at is None:
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL
    got = records(killed)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10, 9, 10, 11]
    for r in got:  # every step, also the replayed ones, is exactly the uninterrupted run's step
        assert r == expected[r["step"]], (r["step"], r, expected[r["step"]])


SMALL_EVAL = """\
trainer:
  max_steps: 3
  val_check_interval: 3
  limit_val_batches: 1
  logger: false
  callbacks:
    - class_path: flowmap_lit.callbacks.EMA
    - class_path: flowmap_lit.callbacks.FlowMapError
      init_args: {num_samples: 16, reference_steps: 4, batch_size: 16, step_counts: [1, 2]}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: %s, save_last: true}
data:
  init_args: {batch_size: 16, num_workers: 1}
"""


# DDP's two-process step is checked against one process in test_distributed.py; the full fit under
# DDP repeats the FSDP2 one and runs on demand (pytest -m slow).
@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp2"])
def test_digits_distillation_fits_with_two_processes(strategy, digits_checkpoints, tmp_path):
    small = tmp_path / "small.yaml"
    small.write_text(SMALL_EVAL % (tmp_path / "ckpt"))
    proc = _run(distill_args(digits_checkpoints, "--config", str(ROOT / f"configs/strategies/{strategy}.yaml"),
                             "--config", str(small), "--trainer.devices", "2", "--trainer.accelerator", "cpu"),
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out
    assert "Flow-map error at step 3" in out
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_dir() if strategy == "fsdp2" else last.is_file()
    # and it resumes from its own (sharded) checkpoint
    proc = _run(distill_args(digits_checkpoints, "--config", str(ROOT / f"configs/strategies/{strategy}.yaml"),
                             "--config", str(small), "--trainer.devices", "2", "--trainer.accelerator", "cpu",
                             "--trainer.max_steps", "4", "--ckpt_path", "last"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr


def test_a_crash_while_saving_never_corrupts_the_previous_checkpoint(tmp_path, monkeypatch):
    """Lightning writes single-file checkpoints through an fsspec transaction (a temporary file that is
    moved into place when complete), so a crash while saving leaves the old last.ckpt intact."""
    import fsspec.implementations.local as local
    import torch
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


def test_teacher_pretraining_fits_with_fsdp2(tmp_path):
    proc = _run(["fit", "--config", str(ROOT / "configs/digits/guide.yaml"), "--config",
                 str(ROOT / "configs/strategies/fsdp2.yaml"), "--trainer.devices", "2", "--trainer.accelerator", "cpu",
                 "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                 "--trainer.callbacks", "[]", "--trainer.logger", "false", "--data.init_args.root",
                 str(tmp_path / "digits"), "--trainer.default_root_dir", str(tmp_path / "guide")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr
    assert list((tmp_path / "guide").rglob("*.ckpt"))  # a sharded checkpoint directory
