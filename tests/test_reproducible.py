"""A seed fixes a run: two processes fitting the digits teacher with one seed end with identical weights,
and the benchmark's teachers are seeded before their networks are built."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_with_one_seed_fit_identical_teachers(tmp_path):
    from flowmap_lit.data import prepare_digits

    prepare_digits(str(tmp_path / "digits"))  # once, so both runs read the same files
    callbacks = ('[{"class_path": "flowmap_lit.callbacks.EMA"}, {"class_path": "flowmap_lit.callbacks.RunCheckpoint", '
                 '"init_args": {"dirpath": "ckpt", "versioned": false}}]')
    procs = []
    for run in ("a", "b"):  # side by side, as two seeds of a sweep would be
        (tmp_path / run).mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "flowmap_lit", "fit", "--config", str(ROOT / "configs/digits/teacher.yaml"),
             "--trainer.max_steps", "50", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
             "--trainer.val_check_interval", "1000", "--trainer.callbacks", callbacks,
             "--model.init_args.net.init_args.model_channels", "8", "--model.init_args.net.init_args.attn_resolutions",
             "[]", "--data.init_args.root", str(tmp_path / "digits")],
            cwd=tmp_path / run, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)}))
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    a, b = (torch.load(tmp_path / run / "ckpt/last.ckpt", weights_only=True, map_location="cpu") for run in "ab")
    assert a["global_step"] == b["global_step"] == 50
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert all(torch.equal(v, b["callbacks"]["EMA"]["shadow"][k]) for k, v in a["callbacks"]["EMA"]["shadow"].items())


def test_the_benchmark_seeds_a_teacher_before_building_its_network(tmp_path, monkeypatch):
    """Whatever the process drew before, ``train_flow_matching`` starts from the same weights."""
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks/quality.py")
    quality = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec.loader.exec_module(quality)
    built = []

    def make_net():
        built.append(quality.build_network("unet", "tiny", model_channels=8))
        return built[-1]

    initial = []
    monkeypatch.setattr(quality, "trainer", lambda *a, **k: type("T", (), {"fit": lambda self, m, dm: None})())
    for draws in (0, 1000):
        torch.rand(draws)  # another amount of the global RNG used before
        quality.train_flow_matching(make_net, 1, None, tmp_path, seed=0)
        initial.append({k: v.clone() for k, v in built[-1].state_dict().items()})
    assert all(torch.equal(initial[0][k], initial[1][k]) for k in initial[0])
