"""Tuned k-step grids (flowmap_lit.grids, flowmap_lit.grid_search) and the exported flow map (flowmap_lit.export, flowmap_lit.diffusers_pipeline)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowmap_lit.interpolant import edm_schedule, uniform_schedule
from flowmap_lit.modules import FlowMapDistillModule
from flowmap_lit.objectives import AYFEMD
from flowmap_lit.grid_search import flowmap_error_criterion, search_grid
from flowmap_lit.grids import check_grid, grid_from_params, load_schedules, params_from_grid, save_schedules
from flowmap_lit.teachers import GaussianTeacher
from flowmap_lit.teachers.analytic import GaussianData
from tests.helpers import ExactGaussianStudent

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 2, 3)


def gaussian_module(perturb: float) -> FlowMapDistillModule:
    data = GaussianData(torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(SHAPE),
                        torch.linspace(0.05, 0.6, 6, dtype=torch.float64).reshape(SHAPE))
    return FlowMapDistillModule(GaussianTeacher(data), AYFEMD(), student=ExactGaussianStudent(data, perturb),
                                init_student_from_teacher=False)


def gaussian_noise(n=256, seed=1):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_every_parameter_vector_is_a_valid_grid(k):
    gen = torch.Generator().manual_seed(k)
    for scale in (0.1, 3.0, 1e3, 1e9):
        for _ in range(20):
            grid = grid_from_params(scale * torch.randn(k, generator=gen, dtype=torch.float64))
            check_grid(grid, k)  # strictly decreasing from exactly 1 to exactly 0
    for make in (uniform_schedule, edm_schedule):  # the baselines are reachable exactly (up to rounding)
        assert torch.allclose(grid_from_params(params_from_grid(make(k))), make(k), atol=1e-12)


def test_invalid_grids_are_refused_with_the_reason():
    for bad in ([1.0, 0.5, 0.5, 0.0], [1.0, 0.2, 0.6, 0.0], [0.9, 0.0], [1.0, 0.1]):
        with pytest.raises(ValueError, match="decrease strictly from 1 to 0"):
            check_grid(bad)
    with pytest.raises(ValueError, match="a 2-step grid has 3 times"):
        check_grid([1.0, 0.3, 0.1, 0.0], 2)


def test_search_on_a_mistimed_gaussian_student_beats_uniform_and_never_tries_an_invalid_grid():
    module = gaussian_module(perturb=0.4).double()
    noise = gaussian_noise()
    exact = module.teacher.data.flow_map(noise, torch.ones(()), torch.zeros(()))
    criterion = flowmap_error_criterion(module, noise, None, reference_steps=256)
    # the reference is the teacher's Heun ODE: next to the closed form it is exact to ~1e-9 relative
    ref = module.teacher_sample(noise, num_steps=256)
    assert ((ref - exact).square().mean() / exact.square().mean()) < 1e-8
    seen = []

    def recorded(grid, gamma):
        seen.append(grid.clone())
        check_grid(grid, 4)
        return criterion(grid, gamma)

    res = search_grid(recorded, 4, budget=40, seed=0)
    assert res.evaluations == len(seen) <= 40
    assert res.value <= min(res.baselines.values())
    assert res.value < 0.8 * res.baselines["uniform"]  # a real gain over uniform on this student
    assert res.value == pytest.approx(criterion(res.grid, 0.0), rel=1e-12)
    assert res.history == sorted(res.history, reverse=True)
    again = search_grid(criterion, 4, budget=40, seed=0)  # reproducible with the seed
    assert torch.equal(again.grid, res.grid)
    # the exact flow map has no error on any grid: the search keeps that
    exact_module = gaussian_module(0.0).double()
    res0 = search_grid(flowmap_error_criterion(exact_module, noise, None, 256), 3, budget=12, seed=1)
    assert res0.value < 1e-8


def test_gamma_search_stays_in_range_and_one_step_grids_are_fixed():
    calls = []

    def criterion(grid, gamma):
        calls.append((grid.clone(), gamma))
        return (gamma - 0.3) ** 2

    res = search_grid(criterion, 1, budget=30, seed=0, search_gamma=True)
    assert all(torch.equal(g, torch.tensor([1.0, 0.0], dtype=torch.float64)) for g, _ in calls)
    assert all(0.0 <= gm <= 1.0 for _, gm in calls)
    assert abs(res.gamma - 0.3) < 0.05
    res = search_grid(criterion, 1, budget=30, seed=0)  # nothing to search: the baselines only
    assert res.evaluations == 2


def test_schedules_file_drives_the_module_sampler(tmp_path):
    module = gaussian_module(0.2).double()
    grid = torch.tensor([1.0, 0.7, 0.2, 0.0], dtype=torch.float64)
    path = save_schedules(tmp_path / "s.json", {3: grid}, {3: 0.0})
    module.set_schedules(str(path))
    noise = gaussian_noise(16)
    assert torch.equal(module.sample(noise, num_steps=3), module.sample(noise, num_steps=3, schedule=grid))
    assert not torch.equal(module.sample(noise, num_steps=3),
                           module.sample(noise, num_steps=3, schedule=uniform_schedule(3)))
    assert torch.equal(module.sample(noise, num_steps=2), module.sample(noise, num_steps=2, schedule=uniform_schedule(2)))
    doc = json.loads(path.read_text())
    doc["grids"]["3"] = [1.0, 0.2, 0.7, 0.0]
    with pytest.raises(ValueError, match="decrease strictly"):
        load_schedules(doc)
    with pytest.raises(ValueError, match="not a schedules file"):
        load_schedules({"grids": {}})
    with pytest.raises(FileNotFoundError, match="flowmap_lit schedule"):
        FlowMapDistillModule(module.teacher, AYFEMD(), student=ExactGaussianStudent(module.teacher.data),
                             init_student_from_teacher=False, schedules=str(tmp_path / "missing.json"))


@pytest.fixture(scope="module")
def quickstart_ckpt(tmp_path_factory):
    from test_cli import make_quickstart_checkpoint

    return make_quickstart_checkpoint(tmp_path_factory.mktemp("qs"), steps=2)


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_schedule_command_then_sample_evaluate_and_export_read_its_grids(quickstart_ckpt):
    from flowmap_lit.checkpoints import load_module
    from flowmap_lit.commands import evaluate, export, schedule
    from flowmap_lit.export import load_flowmap

    work = quickstart_ckpt.parents[1]
    out = work / "schedules.json"
    result = schedule.main(["--ckpt", str(quickstart_ckpt), "--steps", "2", "4", "--budget", "10", "--num", "64",
                            "--reference-steps", "16", "--out", str(out)])
    assert result["path"] == str(out)
    scheds = load_schedules(out)
    assert sorted(scheds) == [2, 4]
    report = json.loads(out.read_text())["held_out"]
    for k in ("2", "4"):
        assert report[k]["tuned"] <= min(report[k]["uniform"], report[k]["edm"])

    rows = evaluate.main(["--ckpt", str(quickstart_ckpt), "--steps", "4", "--num", "50", "--no-fid",
                          "--reference-steps", "8", "--schedules", str(out)])
    assert rows[0]["flowmap_rel_error"] > 0
    export.main(["--ckpt", str(quickstart_ckpt), "--out", str(work / "exported"), "--schedules", str(out)])
    from flowmap_lit.commands import diagnose

    diag = diagnose.main(["--ckpt", str(quickstart_ckpt), "--steps", "4", "--num", "16", "--times", "1", "0.5", "0",
                          "--reference-steps", "8", "--schedules", str(out)])
    assert diag["paths"][0]["schedule"] == pytest.approx(scheds[4][0].tolist())  # the tuned path is decomposed
    # the same commands through the entry point
    proc = _cli(["flowmap_lit", "schedule", "--help"], cwd=work)
    assert proc.returncode == 0 and "--criterion" in proc.stdout, proc.stderr[-2000:]

    probe = ("import sys, flowmap_lit; fm = flowmap_lit.load_flowmap(sys.argv[1]); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'jsonargparse')))")
    proc = subprocess.run([sys.executable, "-c", probe, str(work / "exported")], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]  # no Lightning

    module = load_module(str(quickstart_ckpt))
    module.set_schedules(str(out))
    fm = load_flowmap(work / "exported")
    noise = torch.randn(24, *fm.shape, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(24) % 10
    for k in (1, 2, 4, 8):  # tuned grids at 2 and 4, uniform at 1 and 8: bit for bit the checkpoint's samples
        assert torch.equal(fm.sample(noise, labels, steps=k), module.sample(noise, labels, num_steps=k)), k
    for gamma in (0.5, 1.0):  # gamma sampling with the same generator
        a = fm.sample(noise, labels, steps=4, gamma=gamma, generator=torch.Generator().manual_seed(1))
        b = module.sample(noise, labels, num_steps=4, gamma=gamma, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b)
    assert torch.allclose(fm.denormalize(noise), module.data_info["std"][0] * noise + module.data_info["mean"][0])
    with pytest.raises(ValueError, match="class-conditional"):
        fm.sample(noise, None, steps=1)


def test_export_errors_name_the_fix(tmp_path):
    from types import SimpleNamespace

    from flowmap_lit.export import load_flowmap, student_config

    with pytest.raises(FileNotFoundError, match="flowmap_lit.export --ckpt"):
        load_flowmap(tmp_path)
    with pytest.raises(ValueError, match="adapters"):
        student_config(SimpleNamespace(shared_student=True))
    built_in_python = SimpleNamespace(shared_student=False, hparams={}, teacher=SimpleNamespace())
    with pytest.raises(ValueError, match="records no architecture"):
        student_config(built_in_python)
    copied = SimpleNamespace(shared_student=False, hparams={"student": None},
                             teacher=SimpleNamespace(net_config={"class_path": "x.Y", "init_args": {}}))
    assert student_config(copied)["class_path"] == "x.Y"  # a copy of the teacher: the teacher's network


def test_diffusers_pipeline_round_trips_and_samples_like_the_flow_map(tmp_path):
    pytest.importorskip("diffusers")
    import flowmap_lit
    from flowmap_lit.export import FlowMap
    from flowmap_lit.networks import MLP
    from flowmap_lit.diffusers_pipeline import FlowMapPipeline
    from tests.helpers import tiny_vae

    args = dict(img_channels=4, img_resolution=8, width=32, depth=2, num_classes=10)
    torch.manual_seed(0)
    data = {"shape": [4, 8, 8], "normalize": True, "mean": [0.1, -0.2, 0.0, 0.3], "std": [1.5, 0.5, 1.0, 2.0]}
    grid = [1.0, 0.8, 0.3, 0.05, 0.0]
    fm = FlowMap(MLP(**args), 10, True, 1.5, 0.0, load_schedules({"format": "flowmap-lit-schedules/1",
                                                                "grids": {"4": grid}}), data,
                 {"class_path": "flowmap_lit.networks.MLP", "init_args": args})
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    pipe = FlowMapPipeline.from_flowmap(fm, str(tmp_path / "vae"), scaling_factor=0.5)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = pipe(class_labels=[1, 2, 3], num_inference_steps=4, latents=latents, output_type="pt").images
    x = fm.sample(latents, torch.tensor([1, 2, 3]), steps=4)  # the tuned 4-step grid
    expected = (vae.decode(fm.denormalize(x) / 0.5).sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(images, expected, atol=1e-6) and images.shape == (3, 3, 16, 16)

    pipe.save_pretrained(tmp_path / "pipe")
    again = flowmap_lit.FlowMapPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    assert again.scheduler.grid(4)[0].tolist() == grid
    back = again(class_labels=[1, 2, 3], num_inference_steps=4, latents=latents, output_type="pt").images
    assert torch.equal(back, images)
    pil = again(class_labels=[4], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert pil[0].size == (16, 16)


def test_schedule_gain_benchmark_scores_every_grid_on_the_evaluation_noise(quickstart_ckpt, tmp_path):
    work = quickstart_ckpt.parents[1]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/schedule_gain.py"), "--ckpt", str(quickstart_ckpt),
                           "--steps", "2", "--seeds", "0", "1", "--budget", "6", "--num", "32", "--eval-num", "64",
                           "--reference-steps", "8", "--json", str(tmp_path / "gain.json")],
                          cwd=work, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "gain.json").read_text())["steps"]["2"]
    assert [t["seed"] for t in row["tuned"]] == [0, 1]
    for t in row["tuned"]:
        check_grid(t["grid"], 2)
        assert t["fid"] > 0 and t["flowmap_rel_error"] > 0
    assert row["uniform"]["flowmap_rel_error"] != row["edm"]["flowmap_rel_error"]
    assert row["flowmap_rel_error_ratio_to_uniform"] == pytest.approx(
        row["tuned_flowmap_rel_error_mean"] / row["uniform"]["flowmap_rel_error"])
    # the FID criterion: the search's value is an FID on its own held-out noise, every grid valid
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/schedule_gain.py"), "--ckpt", str(quickstart_ckpt),
                           "--steps", "2", "--seeds", "0", "--budget", "4", "--num", "64", "--eval-num", "64",
                           "--reference-steps", "8", "--criterion", "fid", "--json", str(tmp_path / "fid.json")],
                          cwd=work, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "fid.json").read_text())
    assert out["criterion"] == "fid"
    (tuned,) = out["steps"]["2"]["tuned"]
    check_grid(tuned["grid"], 2)
    assert tuned["held_out"] > 0 and tuned["held_out"] != tuned["flowmap_rel_error"]
