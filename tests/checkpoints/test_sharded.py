"""Sharded (FSDP2) checkpoint directories (flowmap_lit.checkpoints.sharded) are read wherever a checkpoint
file is read: consolidated, they equal the file a single process writes; ``load_checkpoint``, the teacher,
sample, evaluate and the finetune's init read the directory and the file alike, weights only unless
pickles are allowed. The checkpoints come from the ``two_process`` fixture (2-process FSDP2 fits)."""

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from flowmap_lit.checkpoints import load_checkpoint, load_module
from flowmap_lit.checkpoints.sharded import consolidate
from flowmap_lit.generate import generate
from flowmap_lit.modules.finetune import load_student_state
from flowmap_lit.teachers import NetworkTeacher
from tests.helpers import assert_same, relative_error
from tests.helpers.cli import cli
from tests.helpers.two_process import FixedDigitsBatch


def test_consolidated_distillation_equals_the_single_process_file(two_process):
    assert two_process["distill"].is_dir() and two_process["teacher"].is_dir() and two_process["single"].is_file()
    out = two_process["tmp"] / "distill.ckpt"
    consolidate(two_process["distill"], out)
    got = torch.load(out, map_location="cpu", weights_only=True)
    ref = torch.load(two_process["single"], map_location="cpu", weights_only=True)
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


def test_load_checkpoint_of_a_directory_is_its_consolidated_file(two_process, tmp_path):
    for name in ("teacher", "distill"):
        out = tmp_path / f"{name}.ckpt"
        consolidate(two_process[name], out)
        assert_same(load_checkpoint(two_process[name]), torch.load(out, map_location="cpu", weights_only=True))


def test_consolidated_file_resumes_in_one_process(two_process, tmp_path):
    """A plain single-device fit restores the name-keyed optimizer state of a consolidated file."""
    import lightning.pytorch as pl

    from flowmap_lit.callbacks import EMA

    out = tmp_path / "distill.ckpt"
    ckpt = consolidate(two_process["distill"], out)
    module = load_module(str(out), use_ema=False)
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


def test_network_teacher_reads_the_directory_and_the_file_alike(two_process, tmp_path):
    out = tmp_path / "teacher.ckpt"
    consolidate(two_process["teacher"], out)
    g = torch.Generator().manual_seed(0)
    x, t, labels = torch.randn(6, 1, 8, 8, generator=g), torch.rand(6, generator=g), torch.arange(6)
    for use_ema in (True, False):
        a, b = NetworkTeacher(str(two_process["teacher"]), use_ema=use_ema), NetworkTeacher(str(out), use_ema=use_ema)
        assert a.num_classes == b.num_classes == 10
        assert_same(a.net.state_dict(), b.net.state_dict())
        assert torch.equal(a.velocity(x, t, labels), b.velocity(x, t, labels))
    teacher = str(two_process["teacher"])
    ema, raw = NetworkTeacher(teacher).net, NetworkTeacher(teacher, use_ema=False).net
    assert not torch.equal(ema.out_conv.weight, raw.out_conv.weight)  # the EMA weights are the callback's


def test_sample_evaluate_and_finetune_read_the_directory_and_the_file_alike(two_process, tmp_path):
    out = tmp_path / "distill.ckpt"
    consolidate(two_process["distill"], out)
    a, b = load_module(str(two_process["distill"])), load_module(str(out))
    assert a.data_info == b.data_info == {"shape": [1, 8, 8], "num_classes": 10, "normalize": False,
                                          "mean": [], "std": []}
    assert a.checkpoint_hparams == b.checkpoint_hparams
    assert_same(a.state_dict(), b.state_dict())
    _, _, xa = generate(a, 6, [1, 2], seed=3)
    _, _, xb = generate(b, 6, [1, 2], seed=3)
    assert_same(xa, xb)

    args = ["--steps", "1", "2", "--num", "6", "--reference-steps", "4", "--device", "cpu"]
    rows_a, rows_b = cli("evaluate", "--ckpt", two_process["distill"], *args), cli("evaluate", "--ckpt", out, *args)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra.keys() == rb.keys() and ra["flowmap_rel_error"] > 0
        assert all(ra[k] == rb[k] for k in ra if k != "samples_per_s")  # all but the timing

    for use_ema in (True, False):
        assert_same(load_student_state(str(two_process["distill"]), use_ema), load_student_state(str(out), use_ema))


class _Alarm:
    """A pickled object that would create a file when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_directory_is_read_weights_only_unless_pickles_are_allowed(two_process, tmp_path):
    """An object pickled in the shard index, in a non-tensor entry of the shards, or in meta.pt is refused."""
    import torch.distributed.checkpoint as dcp

    alarm = tmp_path / "code_ran"
    index = tmp_path / "index"
    shutil.copytree(two_process["teacher"], index)
    with open(index / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    metadata.storage_meta = _Alarm(alarm)
    with open(index / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    meta = tmp_path / "meta"
    shutil.copytree(two_process["teacher"], meta)
    extra = torch.load(meta / "meta.pt", weights_only=True)
    torch.save({**extra, "note": _Alarm(alarm)}, meta / "meta.pt")
    entry = tmp_path / "entry"
    ckpt = load_checkpoint(two_process["teacher"])
    (opt,) = ckpt["optimizer_states"]
    groups = [{**opt["param_groups"][0], "note": _Alarm(alarm)}]
    dcp.save({"state_dict": ckpt["state_dict"], "optimizer_0": {**opt, "param_groups": groups}},
             checkpoint_id=entry, no_dist=True)
    shutil.copy(two_process["teacher"] / "meta.pt", entry)
    for crafted in (index, entry, meta):
        with pytest.raises(RuntimeError, match="allow_pickle"):
            NetworkTeacher(str(crafted))
        assert not alarm.exists()
    load_checkpoint(entry, allow_pickle=True)  # trusted: read as it is
    assert alarm.exists()
