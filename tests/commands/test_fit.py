"""``python -m flowmap_lit fit``: the shipped configs train, write what they promise, and refuse bad input
with the project's own message. The quickstart run of the ``quickstart`` fixture is the end-to-end one,
in a fresh process; the others run in this process."""

import os
import re
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import ROOT
from tests.helpers.cli import SMALL_CALLBACKS, cli, cli_in_child

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")


def test_teacher_fit_writes_checkpoint_logs_and_samples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's logs/ and checkpoints/ are relative
    cli("fit", "--config", ROOT / "configs/digits/teacher.yaml", "--trainer.max_steps", "4",
        "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
        "--data.init_args.root", tmp_path / "digits")
    run_dir = tmp_path / "logs/digits/teacher/version_0"
    ckpt_path = tmp_path / "checkpoints/digits/teacher/last.ckpt"
    assert ckpt_path.is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert list((run_dir / "samples").glob("*.png"))
    ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")  # no pickled objects
    assert ckpt["global_step"] == 4
    assert ckpt["hyper_parameters"]["net"]["class_path"] == "flowmap_lit.networks.EDM2UNet"
    shadow = ckpt["callbacks"]["EMA"]["shadow"]
    assert set(shadow) == {k[len("net."):] for k in ckpt["state_dict"] if k.startswith("net.")} | set(shadow)
    assert len(shadow) > 10


def test_print_config_runs_as_is_and_bad_keys_fail_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = ROOT / "configs/digits/teacher.yaml"
    with pytest.raises(SystemExit) as exit_:
        cli("fit", "--config", cfg, "--print_config")
    assert not exit_.value.code
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    assert "flowmap_lit.networks.EDM2UNet" in printed and "time_max_freq" in printed
    cli("fit", "--config", tmp_path / "printed.yaml", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.limit_val_batches", "1", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
        "--data.init_args.root", tmp_path / "digits")

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli("fit", "--config", cfg, "--model.init_args.lable_dropout", "0.2")
    err = capsys.readouterr().err
    assert exit_.value.code != 0
    assert "lable_dropout" in err and "Traceback" not in err


def test_quickstart_config_runs_and_prints_flow_map_error_and_fid(quickstart):
    """(The FID classifier is in place before this fit; its training on first use: tests/callbacks/test_fid.py.)"""
    out = quickstart.log  # the console of `python -m flowmap_lit fit` in a fresh process
    assert "Flow-map error at step 3" in out and "relative_error" in out
    for noise in ("smaller than the logging interval", "module(s) in eval mode", "LeafSpec", "litlogger", "/-2",
                  "manual optimization and every_n_train_steps"):
        assert noise not in out, noise  # warnings and labels a user cannot act on stay off the console
    assert "FID (digits features, 100 samples" in out and "teacher, 4-step Heun ODE: FID" in out
    assert "Single jumps" in out  # FlowMapDiagnostics
    assert any(re.fullmatch(r"fid_ref_.*_train\.pt", f) for f in quickstart.digits_after_fit)  # cached statistics
    ckpt = torch.load(quickstart.ckpt, weights_only=True, map_location="cpu")
    assert not any(k.startswith(("teacher.", "guide.")) for k in ckpt["state_dict"])
    assert ckpt["data_info"]["shape"] == [1, 8, 8]


def test_end_of_fit_evaluation_reaches_tensorboard_at_the_final_step(quickstart):
    """3 steps with validation every 2: the callbacks evaluate again at step 3 and log it there."""
    events = EventAccumulator(str(quickstart.dir / "logs/quickstart/version_0"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "diagnostics/jump_error" in events.Tags()["images"]
    assert "diagnostics/2step/contribution_2" in tags
    for tag in ("flowmap_rel_error/1step", "flowmap_error/8step", "fid/1step", "fid/8step"):
        assert tag in tags, (tag, tags)
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == 2 and steps[-1] == 3, (tag, steps)  # the validation at step 2, then the end of fit


def test_two_processes_with_one_seed_fit_identical_teachers(tmp_path, monkeypatch):
    """A seed fixes a run: two processes fitting the digits teacher for 50 steps side by side, as two seeds of a
    sweep would, end with identical weights and EMA (past epoch ends: 11 batches of 128 each). One is a fresh
    interpreter, the other a fork of this one, with whatever it imported and drew before (one intra-op thread
    each)."""
    from flowmap_lit.data import prepare_digits

    prepare_digits(str(tmp_path / "digits"))  # once, so both runs read the same files
    callbacks = ('[{"class_path": "flowmap_lit.callbacks.EMA"}, {"class_path": "flowmap_lit.callbacks.RunCheckpoint", '
                 '"init_args": {"dirpath": "ckpt", "versioned": false}}]')
    args = ["fit", "--config", str(ROOT / "configs/digits/teacher.yaml"), "--trainer.max_steps", "50",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.val_check_interval", "1000", "--trainer.callbacks", callbacks,
            "--model.init_args.net.init_args.model_channels", "8", "--model.init_args.net.init_args.attn_resolutions",
            "[]", "--data.init_args.root", str(tmp_path / "digits")]
    for run in "ab":
        (tmp_path / run).mkdir()
    fresh = subprocess.Popen([sys.executable, "-m", "flowmap_lit", *args], cwd=tmp_path / "a",
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    monkeypatch.chdir(tmp_path / "b")
    assert cli_in_child(*args) == 0
    _, err = fresh.communicate(timeout=600)
    assert fresh.returncode == 0, err[-3000:]
    a, b = (torch.load(tmp_path / run / "ckpt/last.ckpt", weights_only=True, map_location="cpu") for run in "ab")
    assert a["global_step"] == b["global_step"] == 50
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert all(torch.equal(v, b["callbacks"]["EMA"]["shadow"][k]) for k, v in a["callbacks"]["EMA"]["shadow"].items())


@pytest.mark.parametrize("objective", ["ayf_emd", "ayf_lmd", "scd"])
def test_digits_distillation_configs_run_from_teacher_and_guide_checkpoints(objective, digits_teacher_guide,
                                                                           tmp_path, monkeypatch, lightning_log):
    monkeypatch.chdir(tmp_path)
    small = tmp_path / "small.yaml"
    small.write_text(SMALL_CALLBACKS % (tmp_path / "ckpt"))
    cli("fit", "--config", ROOT / f"configs/digits/distill_{objective}.yaml", "--config", small,
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
        "--data.init_args.batch_size", "16",
        "--model.init_args.teacher.init_args.checkpoint", digits_teacher_guide.teacher,
        "--model.init_args.guide.init_args.checkpoint", digits_teacher_guide.guide,
        "--data.init_args.root", digits_teacher_guide.digits)
    assert "Flow-map error at step 2" in lightning_log()
    assert (tmp_path / "ckpt/last.ckpt").is_file()


def test_bad_inputs_get_the_projects_own_message_and_write_nothing(tmp_path, monkeypatch, capsys):
    """Each probe exits with status 2 and one message naming the problem and the fix (no traceback)."""
    monkeypatch.chdir(tmp_path)
    digits = str(tmp_path / "digits")
    base = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.max_steps", "1",
            "--trainer.logger", "false", "--trainer.callbacks", "[]", "--data.init_args.root", digits,
            "--model.init_args.teacher.init_args.data_root", digits,
            "--model.init_args.guide.init_args.data_root", digits]
    garbage = tmp_path / "bad.ckpt"
    garbage.write_bytes(b"\x80\x02not a checkpoint" * 10)
    missing_teacher = ["fit", "--config", str(ROOT / "configs/digits/distill_ayf_emd.yaml"),
                       "--trainer.logger", "false",
                       "--model.init_args.teacher.init_args.checkpoint", str(tmp_path / "nope.ckpt")]
    probes = [
        (missing_teacher, "checkpoint .*nope.ckpt does not exist. Train it first"),
        (base + ["--ckpt_path", str(garbage)], "bad.ckpt is not a readable checkpoint \\(truncated or corrupt\\?\\)"),
        (base + ["--model.init_args.guide.init_args.data_root", str(tmp_path / "digts")],
         "no dataset at .*digts .*Fix data_root"),
        (base + ["--model.init_args.guide.init_args.covariance_scale", "-1"], "covariance_scale must be > 0"),
    ]
    for args, message in probes:
        extra = args[-2:]
        with pytest.raises(SystemExit) as exit_:
            cli(*args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (extra, err[-2000:])
        assert re.search(message, err), (extra, err[-2000:])
        assert "Traceback" not in err and "Union subtypes" not in err, err[-2000:]
    assert not (tmp_path / "digts").exists()  # the mistyped path was not filled with the digits
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "checkpoints").exists()
