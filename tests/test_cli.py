"""End-to-end: ``python -m flowmap_lit fit --config ...`` in a fresh directory, via subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "flowmap_lit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_teacher_fit_writes_checkpoint_logs_and_samples(tmp_path):
    cfg = ROOT / "configs/digits/teacher.yaml"
    proc = _run(["fit", "--config", str(cfg), "--trainer.max_steps", "20", "--trainer.val_check_interval", "10",
                 "--data.init_args.root", str(tmp_path / "digits")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "logs/digits/teacher/version_0"
    ckpt_path = tmp_path / "checkpoints/digits/teacher/last.ckpt"
    assert ckpt_path.is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert list((run_dir / "samples").glob("*.png"))
    ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")  # no pickled objects
    assert ckpt["global_step"] == 20
    assert ckpt["hyper_parameters"]["net"]["class_path"] == "flowmap_lit.networks.EDM2UNet"
    shadow = ckpt["callbacks"]["EMA"]["shadow"]
    assert set(shadow) == {k[len("net."):] for k in ckpt["state_dict"] if k.startswith("net.")} | set(shadow)
    assert len(shadow) > 10


def test_print_config_runs_as_is_and_bad_keys_fail_clearly(tmp_path):
    cfg = ROOT / "configs/digits/teacher.yaml"
    proc = _run(["fit", "--config", str(cfg), "--print_config"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = tmp_path / "printed.yaml"
    printed.write_text(proc.stdout)
    assert "flowmap_lit.networks.EDM2UNet" in proc.stdout and "time_max_freq" in proc.stdout
    proc = _run(["fit", "--config", str(printed), "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
                 "--trainer.callbacks", "[]", "--data.init_args.root", str(tmp_path / "digits")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc = _run(["fit", "--config", str(cfg), "--model.init_args.lable_dropout", "0.2"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "lable_dropout" in proc.stderr and "Traceback" not in proc.stderr


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
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_quickstart_checkpoint(tmp_path, steps=4) -> Path:
    """A tiny quickstart run (FID and flow-map error callbacks included); returns last.ckpt."""
    small = tmp_path / "small.yaml"
    small.write_text(SMALL_CALLBACKS % (tmp_path / "ckpt") + FID_CALLBACK % (tmp_path / "digits/classifier.pt"))
    proc = _run(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(small),
                 "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "2",
                 "--model.init_args.teacher.init_args.data_root", str(tmp_path / "digits"),
                 "--model.init_args.guide.init_args.data_root", str(tmp_path / "digits"),
                 "--data.init_args.root", str(tmp_path / "digits")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "fit.log").write_text(proc.stdout + proc.stderr)
    return tmp_path / "ckpt/last.ckpt"


def test_quickstart_config_runs_and_prints_flow_map_error_and_fid(tmp_path):
    ckpt_path = make_quickstart_checkpoint(tmp_path)
    out = (tmp_path / "fit.log").read_text()
    assert "Flow-map error at step 4" in out and "relative_error" in out
    for noise in ("smaller than the logging interval", "module(s) in eval mode", "LeafSpec", "litlogger", "/-2"):
        assert noise not in out, noise  # warnings and labels a user cannot act on stay off the console
    assert "FID (digits features, 100 samples" in out and "teacher, 4-step Heun ODE: FID" in out
    assert (tmp_path / "digits/classifier.pt").is_file()
    assert list((tmp_path / "digits").glob("fid_ref_*_train.pt"))  # cached reference statistics
    ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
    assert not any(k.startswith(("teacher.", "guide.")) for k in ckpt["state_dict"])
    assert ckpt["data_info"]["shape"] == [1, 8, 8]

    # The sample command: PNG grids and an npz from the checkpoint.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "flowmap_lit", "sample", "--ckpt", str(ckpt_path), "--steps", "1", "2",
                           "--num", "20", "--out", str(tmp_path / "samples")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arrays = np.load(tmp_path / "samples/samples.npz")
    assert arrays["x_1step"].shape == (20, 1, 8, 8) and arrays["labels"].tolist() == [i % 10 for i in range(20)]
    assert (tmp_path / "samples/samples_2step.png").is_file()

    # The evaluation command: one row per step count with NFE, FID, flow-map error and speed.
    proc = subprocess.run([sys.executable, "-m", "flowmap_lit", "evaluate", "--ckpt", str(ckpt_path), "--steps", "1", "2",
                           "--num", "100", "--reference-steps", "8", "--json", str(tmp_path / "eval.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert [r["nfe"] for r in rows] == [1, 2]
    assert all(r["fid"] > 0 and 0 < r["flowmap_rel_error"] and r["samples_per_s"] > 0 for r in rows)
    assert "flowmap_rel_error" in proc.stdout

    # The same evaluation by 2 processes (torchrun, gloo): each its own share, sums all-reduced.
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "flowmap_lit", "evaluate", "--run-dir", str(ckpt_path.parent),
                           "--out-dir", str(tmp_path / "eval2"), "--steps", "1", "2", "--num-samples", "100",
                           "--reference-steps", "8"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "eval2/last.json").read_text())
    assert two["processes"] == 2 and (tmp_path / "eval2/distance_versus_steps.png").is_file()
    for one_row, two_row in zip(rows, two["rows"]):
        for key in ("fid", "flowmap_rel_error"):
            assert abs(two_row[key] - one_row[key]) <= 1e-6 * abs(one_row[key]), (key, one_row, two_row)

    # The diagnostics command: jump-error table, per-step decomposition, heatmap and JSON.
    proc = subprocess.run([sys.executable, "-m", "flowmap_lit", "diagnose", "--ckpt", str(ckpt_path), "--steps", "1", "2",
                           "--num", "30", "--times", "1", "0.5", "0", "--reference-steps", "8",
                           "--out", str(tmp_path / "diag")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "diag/diagnostics.json").read_text())
    assert result["grid"]["times"] == [1.0, 0.5, 0.0] and len(result["paths"]) == 2
    assert len(result["paths"][1]["contribution"]) == 2 and (tmp_path / "diag/jump_error.png").is_file()
    assert "contribution" in proc.stdout and "Single jumps" in out


def test_digits_distillation_configs_run_from_teacher_and_guide_checkpoints(tmp_path):
    digits = str(tmp_path / "digits")
    for name in ("teacher", "guide"):
        proc = _run(["fit", "--config", str(ROOT / f"configs/digits/{name}.yaml"), "--trainer.max_steps", "2",
                     "--trainer.val_check_interval", "2", "--trainer.callbacks", "[]",
                     "--trainer.logger", "false",
                     "--data.init_args.root", digits, "--trainer.default_root_dir", str(tmp_path / name)],
                    cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not (tmp_path / "config.yaml").exists()  # no logger: no config written into the working directory
    # Lightning's default checkpoint (no ModelCheckpoint in the list) lands under default_root_dir.
    teacher = next((tmp_path / "teacher").rglob("*.ckpt"))
    guide = next((tmp_path / "guide").rglob("*.ckpt"))
    small = tmp_path / "small.yaml"
    small.write_text(SMALL_CALLBACKS % (tmp_path / "ckpt"))
    for objective in ("ayf_emd", "ayf_lmd", "scd"):
        proc = _run(["fit", "--config", str(ROOT / f"configs/digits/distill_{objective}.yaml"), "--config", str(small),
                     "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                     "--model.init_args.teacher.init_args.checkpoint", str(teacher),
                     "--model.init_args.guide.init_args.checkpoint", str(guide),
                     "--data.init_args.root", digits], cwd=tmp_path)
        assert proc.returncode == 0, (objective, proc.stderr[-3000:])
        assert "Flow-map error at step 2" in proc.stdout + proc.stderr


def test_end_of_fit_evaluation_reaches_tensorboard_at_the_final_step(tmp_path):
    """3 steps with validation every 2: the callbacks evaluate again at step 3 and log it there."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_quickstart_checkpoint(tmp_path, steps=3)
    events = EventAccumulator(str(tmp_path / "logs/quickstart/version_0"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "diagnostics/jump_error" in events.Tags()["images"]
    assert "diagnostics/2step/contribution_2" in tags
    for tag in ("flowmap_rel_error/1step", "flowmap_error/8step", "fid/1step", "fid/8step"):
        assert tag in tags, (tag, tags)
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == 2 and steps[-1] == 3, (tag, steps)  # the validation at step 2, then the end of fit


def test_bad_inputs_get_the_projects_own_message_and_write_nothing(tmp_path):
    """Each probe exits with status 2 and one message naming the problem and the fix (no traceback)."""
    digits = str(tmp_path / "digits")
    base = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.max_steps", "1",
            "--trainer.logger", "false", "--trainer.callbacks", "[]", "--data.init_args.root", digits,
            "--model.init_args.teacher.init_args.data_root", digits, "--model.init_args.guide.init_args.data_root", digits]
    garbage = tmp_path / "bad.ckpt"
    garbage.write_bytes(b"\x80\x02not a checkpoint" * 10)
    missing_teacher = ["fit", "--config", str(ROOT / "configs/digits/distill_ayf_emd.yaml"), "--trainer.logger", "false",
                       "--model.init_args.teacher.init_args.checkpoint", str(tmp_path / "nope.ckpt")]
    probes = [
        (missing_teacher, "checkpoint .*nope.ckpt does not exist. Train it first"),
        (base + ["--ckpt_path", str(garbage)], "bad.ckpt is not a readable checkpoint \\(truncated or corrupt\\?\\)"),
        (base + ["--model.init_args.guide.init_args.data_root", str(tmp_path / "digts")],
         "no dataset at .*digts .*Fix data_root"),
        (base + ["--model.init_args.guide.init_args.covariance_scale", "-1"], "covariance_scale must be > 0"),
    ]
    import re

    for args, message in probes:
        extra = args[-2:]
        proc = _run(args, cwd=tmp_path)
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        assert re.search(message, proc.stderr), (extra, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "Union subtypes" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "digts").exists()  # the mistyped path was not filled with the digits
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "checkpoints").exists()
