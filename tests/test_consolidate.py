"""Sharded (FSDP2) checkpoint directories are read wherever a checkpoint file is read, and
``python -m flowmap_lit consolidate`` turns one into the file a single process writes.

    python tests/test_consolidate.py CONFIG [CONFIG ...]

fits each config in turn from the CLI under ``configs/strategies/fsdp2.yaml`` with 2 CPU processes
(Lightning launches the second rank by running this file again). The tests run it once: a tiny
flow-matching teacher, then its distillation, whose teacher and guide are read from the teacher's
checkpoint directory; both write sharded checkpoint directories. The data is the fixed global batch
of ``tests/distributed_step.py``, so the 2-process distillation computes the single-process steps
(``test_distributed.py``), and the same config run in one process gives the reference file.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from distributed_step import FixedBatch  # noqa: E402
from test_distributed import relative_error  # noqa: E402

from flowmap_lit.cli import main as cli_main  # noqa: E402
from flowmap_lit.commands import evaluate, sample  # noqa: E402
from flowmap_lit.checkpoints.sharded import consolidate  # noqa: E402
from flowmap_lit.commands.consolidate import main as consolidate_main  # noqa: E402
from flowmap_lit.modules.finetune import load_student_state  # noqa: E402
from flowmap_lit.checkpoints import load_checkpoint  # noqa: E402
from flowmap_lit.teachers import NetworkTeacher


class FixedDigitsBatch(FixedBatch):
    """``FixedBatch`` with the data description that checkpoints record for sampling (``data_info``)."""

    stats = {"shape": [1, 8, 8], "num_classes": 10}


COMMON = """\
seed_everything: 0
trainer:
  max_steps: 2
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  callbacks:
    - class_path: flowmap_lit.callbacks.EMA
      init_args: {decay: 0.9, warmup: false}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: %s, save_last: true, save_top_k: 0, every_n_train_steps: 2}
data:
  class_path: test_consolidate.FixedDigitsBatch
"""

TEACHER = COMMON + """\
model:
  class_path: flowmap_lit.modules.FlowMatchingModule
  init_args:
    num_classes: 10
    optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.01}}
    net:
      class_path: flowmap_lit.networks.EDM2UNet
      init_args: {img_channels: 1, img_resolution: 8, model_channels: 16, channel_mult: [1, 2], num_blocks: 1,
                  attn_resolutions: [4], num_classes: 10}
"""

DISTILL = COMMON + """\
model:
  class_path: flowmap_lit.modules.FlowMapDistillModule
  init_args:
    teacher: {class_path: flowmap_lit.teachers.NetworkTeacher, init_args: {checkpoint: %s}}
    guide: {class_path: flowmap_lit.teachers.NetworkTeacher, init_args: {checkpoint: %s, use_ema: false}}
    objective:  # (the one-pass tangent of tangent_pass: auto on CPU does not run through FSDP2's hooks)
      class_path: flowmap_lit.objectives.AYFEMD
      init_args: {jvp_backend: func, tangent_pass: two_pass}
    guidance: autoguidance
    guidance_min: 1.0
    guidance_max: 2.0
    condition_on_guidance: true
    eval_guidance: 1.5
    num_classes: 10
    warmup_steps: 0
    optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.1, momentum: 0.9}}
"""


def fit_with_fsdp2(configs: list[str]) -> None:
    """``python -m flowmap_lit fit`` of each config in turn, FSDP2 over 2 processes (this file's ``__main__``)."""
    for config in configs:
        cli_main(["fit", "--config", config, "--config", str(ROOT / "configs/strategies/fsdp2.yaml"),
                  "--trainer.devices", "2"])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the networks are tiny, and two threads on a shared CPU mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Sharded checkpoint directories of a 2-process teacher and distillation, and the single-process
    distillation's checkpoint file."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    teacher_dir = tmp / "teacher/last.ckpt"
    configs = {"teacher": TEACHER % (tmp / "teacher"),
               "distill": DISTILL % (tmp / "distill", teacher_dir, teacher_dir),
               "single": DISTILL % (tmp / "single", teacher_dir, teacher_dir)}
    for name, text in configs.items():
        (tmp / f"{name}.yaml").write_text(text)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(tmp / "teacher.yaml"), str(tmp / "distill.yaml")],
                          capture_output=True, text=True, timeout=600, cwd=tmp, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # LightningCLI warns about pytest's own arguments
        cli_main(["fit", "--config", str(tmp / "single.yaml"), "--trainer.devices", "1"])
    return {"tmp": tmp, "teacher": teacher_dir, "distill": tmp / "distill/last.ckpt",
            "single": tmp / "single/last.ckpt"}


def assert_same(a, b, where: str = "checkpoint") -> None:
    """``a == b`` for nested checkpoint dicts, tensors compared exactly."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (where, a.keys() ^ b.keys())
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, (where, a, b)


def test_consolidated_distillation_equals_the_single_process_file(runs):
    assert runs["distill"].is_dir() and runs["teacher"].is_dir() and runs["single"].is_file()
    out = runs["tmp"] / "distill.ckpt"
    consolidate(runs["distill"], out)
    got = torch.load(out, map_location="cpu", weights_only=True)
    ref = torch.load(runs["single"], map_location="cpu", weights_only=True)
    assert got.keys() == ref.keys()
    for key in ("global_step", "epoch", "hyper_parameters", "data_info", "lr_schedulers", "loops"):
        assert_same(got[key], ref[key], key)
    # The same weights: the frozen teacher and guide are left out, as the single-process file leaves them.
    assert got["state_dict"].keys() == ref["state_dict"].keys()
    assert all(k.startswith("student.") for k in got["state_dict"])
    assert relative_error(got["state_dict"], ref["state_dict"]) < 1e-7  # measured 1e-12
    ema, ema_ref = got["callbacks"]["EMA"]["shadow"], ref["callbacks"]["EMA"]["shadow"]
    assert ema.keys() == ema_ref.keys() and len(ema) > 10
    assert relative_error(ema, ema_ref) < 1e-7
    assert got["callbacks"]["EMA"]["num_updates"] == ref["callbacks"]["EMA"]["num_updates"] == 2
    student = {k[len("student."):]: v for k, v in got["state_dict"].items()}
    assert relative_error(ema, student) > 1e-6  # an average (2e-5 from the weights), not a copy of them
    # The optimizer states, keyed by name here and by number in the file, match parameter for parameter.
    (opt,), (opt_ref,) = got["optimizer_states"], ref["optimizer_states"]
    names = [n for g in opt["param_groups"] for n in g["params"]]
    ids = [i for g in opt_ref["param_groups"] for i in g["params"]]
    assert len(names) == len(ids) == len(ema)
    momentum = {n: opt["state"][n]["momentum_buffer"] for n in names}
    momentum_ref = {n: opt_ref["state"][i]["momentum_buffer"] for n, i in zip(names, ids)}
    assert relative_error(momentum, momentum_ref) < 1e-7
    assert {k: v for k, v in opt["param_groups"][0].items() if k != "params"} == \
           {k: v for k, v in opt_ref["param_groups"][0].items() if k != "params"}


def test_load_checkpoint_of_a_directory_is_its_consolidated_file(runs, tmp_path):
    for name in ("teacher", "distill"):
        out = tmp_path / f"{name}.ckpt"
        consolidate(runs[name], out)
        assert_same(load_checkpoint(runs[name]), torch.load(out, map_location="cpu", weights_only=True))


def test_consolidated_file_resumes_in_one_process(runs, tmp_path):
    """A plain single-device fit restores the name-keyed optimizer state of a consolidated file."""
    import lightning.pytorch as pl

    from flowmap_lit.callbacks import EMA

    out = tmp_path / "distill.ckpt"
    ckpt = consolidate(runs["distill"], out)
    module = sample.load_module(str(out), use_ema=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[EMA(decay=0.9, warmup=False)])
    trainer.fit(module, FixedDigitsBatch(), ckpt_path=str(out))  # restores, then stops: max_steps is reached
    assert trainer.global_step == 2
    names = dict(zip(map(id, module.parameters()), (n for n, _ in module.named_parameters())))
    state = trainer.optimizers[0].state
    restored = {names[id(p)]: state[p]["momentum_buffer"] for g in trainer.optimizers[0].param_groups
                for p in g["params"]}
    saved = {n: s["momentum_buffer"] for n, s in ckpt["optimizer_states"][0]["state"].items()}
    assert_same(restored, saved)


def test_network_teacher_reads_the_directory_and_the_file_alike(runs, tmp_path):
    out = tmp_path / "teacher.ckpt"
    consolidate(runs["teacher"], out)
    g = torch.Generator().manual_seed(0)
    x, t, labels = torch.randn(6, 1, 8, 8, generator=g), torch.rand(6, generator=g), torch.arange(6)
    for use_ema in (True, False):
        a, b = NetworkTeacher(str(runs["teacher"]), use_ema=use_ema), NetworkTeacher(str(out), use_ema=use_ema)
        assert a.num_classes == b.num_classes == 10
        assert_same(a.net.state_dict(), b.net.state_dict())
        assert torch.equal(a.velocity(x, t, labels), b.velocity(x, t, labels))
    ema, raw = NetworkTeacher(str(runs["teacher"])).net, NetworkTeacher(str(runs["teacher"]), use_ema=False).net
    assert not torch.equal(ema.out_conv.weight, raw.out_conv.weight)  # the EMA weights are the callback's


def test_sample_evaluate_and_finetune_read_the_directory_and_the_file_alike(runs, tmp_path):
    out = tmp_path / "distill.ckpt"
    consolidate(runs["distill"], out)
    a, b = sample.load_module(str(runs["distill"])), sample.load_module(str(out))
    assert a.data_info == b.data_info == {"shape": [1, 8, 8], "num_classes": 10, "normalize": False,
                                          "mean": [], "std": []}
    assert a.checkpoint_hparams == b.checkpoint_hparams
    assert_same(a.state_dict(), b.state_dict())
    _, _, xa = sample.generate(a, 6, [1, 2], seed=3)
    _, _, xb = sample.generate(b, 6, [1, 2], seed=3)
    assert_same(xa, xb)

    args = ["--steps", "1", "2", "--num", "6", "--reference-steps", "4", "--device", "cpu"]
    rows_a, rows_b = evaluate.main(["--ckpt", str(runs["distill"]), *args]), evaluate.main(["--ckpt", str(out), *args])
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra.keys() == rb.keys() and ra["flowmap_rel_error"] > 0
        assert all(ra[k] == rb[k] for k in ra if k != "samples_per_s")  # all but the timing

    for use_ema in (True, False):
        assert_same(load_student_state(str(runs["distill"]), use_ema), load_student_state(str(out), use_ema))


def test_consolidate_command_end_to_end_and_its_errors(runs, tmp_path):
    out = tmp_path / "full/last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "flowmap_lit", "consolidate", str(runs["distill"]), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2" in proc.stdout and "EMA weights: yes" in proc.stdout
    assert_same(torch.load(out, map_location="cpu", weights_only=True), load_checkpoint(runs["distill"]))

    def error(*argv) -> str:
        with pytest.raises(SystemExit) as exc:
            consolidate_main([str(a) for a in argv])
        return str(exc.value)

    assert "exists" in error(runs["distill"], out) and "--overwrite" in error(runs["distill"], out)
    assert consolidate_main([str(runs["teacher"]), str(out), "--overwrite"]) == out
    assert "net.out_conv.weight" in torch.load(out, weights_only=True)["state_dict"]
    assert not list(out.parent.glob("*.partial"))

    message = error(tmp_path / "nowhere", tmp_path / "x.ckpt")
    assert "does not exist" in message and ".metadata" in message and "meta.pt" in message
    message = error(runs["tmp"] / "distill", tmp_path / "x.ckpt")  # the directory of checkpoints
    assert "not a sharded checkpoint directory" in message and ".distcp" in message
    assert str(runs["distill"]) in message  # points at the checkpoint inside
    assert "already one checkpoint file" in error(runs["single"], tmp_path / "x.ckpt")
    partial = tmp_path / "partial.ckpt"
    shutil.copytree(runs["distill"], partial)
    (partial / "meta.pt").unlink()
    assert "incomplete" in error(partial, tmp_path / "x.ckpt")
    damaged = tmp_path / "damaged.ckpt"
    shutil.copytree(runs["distill"], damaged)
    shard = damaged / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert "damaged" in error(damaged, tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()


class _Alarm:
    """A pickled object that would create a file when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_directory_is_read_weights_only_unless_pickles_are_allowed(runs, tmp_path):
    """An object pickled in the shard index, in a non-tensor entry of the shards, or in meta.pt is refused."""
    import torch.distributed.checkpoint as dcp

    alarm = tmp_path / "code_ran"
    index = tmp_path / "index"
    shutil.copytree(runs["teacher"], index)
    with open(index / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    metadata.storage_meta = _Alarm(alarm)
    with open(index / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    meta = tmp_path / "meta"
    shutil.copytree(runs["teacher"], meta)
    extra = torch.load(meta / "meta.pt", weights_only=True)
    torch.save({**extra, "note": _Alarm(alarm)}, meta / "meta.pt")
    entry = tmp_path / "entry"
    ckpt = load_checkpoint(runs["teacher"])
    (opt,) = ckpt["optimizer_states"]
    groups = [{**opt["param_groups"][0], "note": _Alarm(alarm)}]
    dcp.save({"state_dict": ckpt["state_dict"], "optimizer_0": {**opt, "param_groups": groups}},
             checkpoint_id=entry, no_dist=True)
    shutil.copy(runs["teacher"] / "meta.pt", entry)
    for crafted in (index, entry, meta):
        with pytest.raises(RuntimeError, match="allow_pickle"):
            NetworkTeacher(str(crafted))
        assert not alarm.exists()
    load_checkpoint(entry, allow_pickle=True)  # trusted: read as it is
    assert alarm.exists()


if __name__ == "__main__":
    fit_with_fsdp2(sys.argv[1:])
