"""The benchmark scripts run end to end with tiny settings and print one JSON object (no timing asserts).

Each script's ``main(argv)`` runs in this process; the last line it prints must be the JSON of what it
returns."""

import importlib.util
import json
import sys

import pytest

from tests.helpers import ROOT


def load_benchmark(name: str):
    """``benchmarks/NAME`` as a module (its directory importable, as when it runs as a script)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name.removesuffix('.py')}", ROOT / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_script(monkeypatch, capsys):
    """``python benchmarks/NAME ARGS`` in this process: the JSON object it prints last (equal to what ``main``
    returns). ``cwd`` is the working directory of the run (the isolation fixture restores it)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # for the processes a script starts itself

    def run(name, *args, cwd=None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / name), *args])
        capsys.readouterr()
        returned = load_benchmark(name).main(list(args))
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert printed == json.loads(json.dumps(returned))
        return printed

    return run


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_step_cost(arch, run_script):
    out = run_script("step_cost.py", "--arch", arch, "--batch", "4", "--repeats", "1", "--warmup", "1")
    assert {r["step"] for r in out["steps"]} == {"ayf_emd", "ayf_lmd", "scd"}
    assert all(r["ms"] > 0 and r["sum_of_parts_ms"] > 0 for r in out["steps"])
    passes = {(r["jvp_backend"], r["tangent_pass"]) for r in out["steps"]}
    assert passes == {("forward_ad", "two_pass"), ("forward_ad", "one_pass"), ("func", "two_pass"),
                      ("func", "one_pass"), ("finite_difference", "two_pass")}
    defaults = [(r["step"], r["jvp_backend"], r["tangent_pass"]) for r in out["steps"] if r["default"]]
    assert ("ayf_emd", "forward_ad", "one_pass") in defaults and len(defaults) == 3  # CPU: one pass
    mem = {(r["step"], r["jvp_backend"], r["tangent_pass"]): r["saved_for_backward_mib"] for r in out["steps"]}
    assert all(v > 0 for v in mem.values())
    # the two-pass step saves exactly the grad forward's activations, whatever the JVP backend
    assert mem[("ayf_emd", "func", "two_pass")] == mem[("ayf_emd", "finite_difference", "two_pass")]


def test_step_cost_compiled_rows(run_script):
    out = run_script("step_cost.py", "--arch", "mlp", "--batch", "4", "--repeats", "1", "--warmup", "1",
                     "--backends", "func", "--compile")
    compiled = [r for r in out["steps"] if r["compiled"]]
    assert [(r["step"], r["jvp_backend"]) for r in compiled] == [("ayf_emd", "func")]
    assert compiled[0]["over_compiled_flow_matching"] > 0 and compiled[0]["over_sum_of_parts"] > 0
    assert "flow_matching_step[compiled]" in out["median_ms"]


def test_eval_cost_script_on_tiny_networks(run_script):
    out = run_script("eval_cost.py", "--tiny", "--resolution", "64", "--batch", "2", "--repeats", "1")
    assert set(out["ms_per_sample"]) == {"vae_decode", "inception", "dinov2"} and out["samples_per_s"] > 0


def test_data_throughput(run_script):
    out = run_script("data_throughput.py", "--num-samples", "200", "--shards", "2", "--batch", "16", "--batches", "3",
                     "--workers", "0", "2", "--shape", "2", "8", "8")
    assert [r["workers"] for r in out["streams"]] == [0, 2] and all(r["samples_per_s"] > 0 for r in out["streams"])


def test_data_throughput_digits(run_script):
    out = run_script("data_throughput.py", "--digits", "--epochs", "1", "--workers", "0")
    assert [(r["workers"], r["cache_mb"]) for r in out["streams"]] == [(0, 64.0), (0, 0.0)]
    assert all(r["batches_per_s"] > 0 for r in out["streams"])


def test_ablation_runner(tmp_path, run_script):
    """Two seeds of a 2-step quickstart through the ablation runner: per-step mean and spread."""
    import shutil

    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs/quickstart.yaml", tmp_path / "configs/quickstart.yaml")
    small = tmp_path / "small.yaml"
    small.write_text("trainer:\n  callbacks:\n    - class_path: flowmap_lit.callbacks.FlowMapError\n"
                     "      init_args: {step_counts: [1, 2], num_samples: 20, reference_steps: 4}\n")
    out = run_script("ablation.py", "--seeds", "0", "1", "--max-steps", "2", "--variant", f"base=--config {small}",
                     cwd=tmp_path)
    rel = out["variants"]["base"]["rel"]
    assert set(rel) == {"1", "2"} and len(rel["1"]["values"]) == 2 and rel["1"]["std"] >= 0


def test_sampling(run_script):
    out = run_script("sampling.py", "--num", "16", "--steps", "1", "2", "--teacher-steps", "2", "--repeats", "1")
    assert [r["nfe"] for r in out["student"]] == [1, 2] and out["teacher"]["nfe"] == 8


def test_schedule_gain_scores_every_grid_on_the_evaluation_noise(quickstart, tmp_path, run_script):
    from flowmap_lit.grids import check_grid

    out = run_script("schedule_gain.py", "--ckpt", str(quickstart.ckpt), "--steps", "2", "--seeds", "0", "1",
                     "--budget", "6", "--num", "32", "--eval-num", "64", "--reference-steps", "8",
                     "--json", str(tmp_path / "gain.json"), cwd=tmp_path)
    assert json.loads((tmp_path / "gain.json").read_text()) == out
    row = out["steps"]["2"]
    assert [t["seed"] for t in row["tuned"]] == [0, 1]
    for t in row["tuned"]:
        check_grid(t["grid"], 2)
        assert t["fid"] > 0 and t["flowmap_rel_error"] > 0
    assert row["uniform"]["flowmap_rel_error"] != row["edm"]["flowmap_rel_error"]
    assert row["flowmap_rel_error_ratio_to_uniform"] == pytest.approx(
        row["tuned_flowmap_rel_error_mean"] / row["uniform"]["flowmap_rel_error"])
    # the FID criterion: the search's value is an FID on its own held-out noise, every grid valid
    out = run_script("schedule_gain.py", "--ckpt", str(quickstart.ckpt), "--steps", "2", "--seeds", "0",
                     "--budget", "4", "--num", "64", "--eval-num", "64", "--reference-steps", "8",
                     "--criterion", "fid", "--json", str(tmp_path / "fid.json"), cwd=tmp_path)
    assert json.loads((tmp_path / "fid.json").read_text()) == out and out["criterion"] == "fid"
    (tuned,) = out["steps"]["2"]["tuned"]
    check_grid(tuned["grid"], 2)
    assert tuned["held_out"] > 0 and tuned["held_out"] != tuned["flowmap_rel_error"]


@pytest.mark.slow
def test_quality_tiny_budget(tmp_path, run_script):
    """About 2 minutes: every arm and ablation runs, one JSON object and the plot come out."""
    out = run_script("quality.py", "--budget", "tiny", "--data", str(tmp_path / "digits"),
                     "--out", str(tmp_path / "res"))
    assert len(out["results"]) == 10 and (tmp_path / "res/quality_tiny.png").is_file()
    assert all(len(r["fid"]) == 4 and len(r["flowmap_rel_error"]) == 4 for r in out["results"])
    assert [r["method"] for r in out["summary"]] == [r["method"] for r in out["results"]]


def test_quality_summary_is_the_mean_and_spread_over_seeds():
    quality = load_benchmark("quality.py")
    runs = [{"method": m, "seed": seed, "teacher_fid": 5.0, "fid": [10 + seed, 5, 4, 4 - seed],
             "flowmap_rel_error": [0.1, 0.05, 0.04, 0.03 + 0.01 * seed], "train_seconds": 10.0 * (seed + 1)}
            for seed in (0, 1, 2) for m in ("b", "a")]
    runs[0]["fid_uniform"] = runs[2]["fid_uniform"] = runs[4]["fid_uniform"] = [12, 6, 4, 4]  # a recipe's
    rows = quality.summarize(runs)
    assert [r["method"] for r in rows] == ["b", "a"] and rows[0]["seeds"] == [0, 1, 2]
    assert rows[0]["train_seconds"] == rows[1]["train_seconds"] == 20.0
    assert rows[0]["fid_uniform"] == [12, 6, 4, 4] and rows[0]["fid_uniform_std"] == [0, 0, 0, 0]
    assert "fid_uniform" not in rows[1]
    assert rows[0]["fid"] == [11, 5, 4, 3] and rows[0]["fid_std"] == [1, 0, 0, 1]
    assert abs(rows[1]["flowmap_rel_error"][3] - 0.04) < 1e-12
    assert abs(rows[1]["flowmap_rel_error_std"][3] - 0.01) < 1e-12


def test_quality_saved_teachers_load_back_as_the_same_teacher(tmp_path):
    """``--save-teachers`` writes checkpoints that ``--teacher-ckpt``/``--guide-ckpt`` read back exactly."""
    import torch

    from flowmap_lit.networks import build_network
    from flowmap_lit.teachers import NetworkTeacher

    quality = load_benchmark("quality.py")
    for overrides in (quality.TEACHER_ARCH, quality.GUIDE_ARCH):
        torch.manual_seed(0)
        net = build_network("unet", "tiny", **overrides)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
        quality.save_teacher(NetworkTeacher(net=net, num_classes=10), overrides, tmp_path / "t.ckpt")
        loaded = NetworkTeacher(str(tmp_path / "t.ckpt"))
        x, t, labels = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 4, 9])
        assert loaded.num_classes == 10
        expected = NetworkTeacher(net=net, num_classes=10).velocity(x, t, labels)
        assert torch.equal(loaded.velocity(x, t, labels), expected)


def test_the_quality_benchmark_seeds_a_teacher_before_building_its_network(tmp_path, monkeypatch):
    """Whatever the process drew before, ``train_flow_matching`` starts from the same weights."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    quality = load_benchmark("quality.py")
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


def small_neural_arm(tmp_path, digits_classifier):
    """The neural arm's inputs at test size in ``tmp_path``: ``digits/`` (the data and its FID classifier) and
    ``teacher.ckpt`` / ``guide.ckpt`` (small U-Nets, as ``--save-teachers`` writes them); returns quality.py."""
    import shutil

    import torch

    from flowmap_lit.networks import build_network
    from flowmap_lit.teachers import NetworkTeacher

    shutil.copytree(digits_classifier["root"], tmp_path / "digits")
    quality = load_benchmark("quality.py")
    small = {"model_channels": 8}
    torch.manual_seed(0)
    for name in ("teacher", "guide"):
        net = build_network("unet", "tiny", **small)
        quality.save_teacher(NetworkTeacher(net=net, num_classes=10), small, tmp_path / f"{name}.ckpt")
    return quality


def test_quality_recipe_is_one_timed_run_of_base_stage_and_search(tmp_path, run_script, digits_classifier):
    """``--methods recipe recipe_free``: the AYF-LMD base, the GAN stage and the grid search in one run, timed
    in parts (the evaluations not counted); the FID with tuned grids next to the uniform grids' FID."""
    from flowmap_lit.grids import check_grid

    quality = small_neural_arm(tmp_path, digits_classifier)
    out = run_script("quality.py", "--budget", "tiny", "--data", str(tmp_path / "digits"), "--arms", "neural",
                     "--methods", "recipe", "recipe_free", "--recipe-batches", "2", "--recipe-tune-budget", "2",
                     "--recipe-pool", "64", "--out", str(tmp_path / "res"),
                     "--teacher-ckpt", str(tmp_path / "teacher.ckpt"), "--guide-ckpt", str(tmp_path / "guide.ckpt"))
    data, free = out["results"]
    assert data["settings"]["lr"] == quality.RECIPE["lr"] and free["settings"]["lr"] == quality.RECIPE_FREE["lr"]
    assert "pool" not in data["settings"] and free["settings"]["pool"] == 64
    for run in (data, free):
        assert run["settings"]["batches"] == run["settings"]["tune_budget"] == 2
        assert run["settings"]["adv_steps"] == [1, 1, 2]
        parts = run["base_seconds"] + run["stage_seconds"] + run["search_seconds"]
        assert min(run["base_seconds"], run["stage_seconds"], run["search_seconds"]) > 0
        assert abs(run["train_seconds"] - parts) <= 0.2
        assert sorted(run["grids"]) == ["2", "4", "8"]
        for k, grid in run["grids"].items():
            check_grid(grid, int(k))
        # the 1-step grid is not searched: its FID is the uniform evaluation's
        assert run["fid"][0] == run["fid_uniform"][0] and len(run["fid"]) == len(run["fid_uniform"]) == 4
    summary = {row["method"]: row for row in out["summary"]}
    assert summary[data["method"]]["train_seconds"] == data["train_seconds"]
    assert summary[free["method"]]["fid_uniform"] == free["fid_uniform"]


def test_gpu_step_runs_on_cpu_at_tiny_size(run_script):
    out = run_script("gpu_step.py", "--preset", "tiny", "--guide-preset", "tiny", "--batch", "2", "--jvp-batch", "2",
                     "--repeats", "1", "--warmup", "0", "--device", "cpu")
    assert [(r["precision"], r["activation_checkpointing"]) for r in out["step"]] == [
        ("fp32", False), ("bf16-mixed", False), ("fp32", True), ("bf16-mixed", True)]
    jvp = out["jvp"]
    assert jvp["jvp_rel_error_fp32"] < 1e-4 < jvp["jvp_rel_error_bf16"]  # why the tangent pass stays fp32


def test_attention_jvp_benchmark(run_script):
    """Both attention forms measured per token count; their tangents agree."""
    out = run_script("attention_jvp.py", "--tokens", "32", "--batch", "1", "--heads", "2", "--head-dim", "8",
                     "--repeats", "1", "--chunk-elements", "64")
    (row,) = out["rows"]
    assert row["tokens"] == 32 and row["math"]["ms"] > 0 and row["chunked"]["ms"] > 0
    assert row["math"]["peak_mib"] >= 0 and row["chunked"]["peak_mib"] >= 0
    assert row["tangent_rel_difference"] < 1e-5


def test_second_stage_trains_a_base_then_stages_on_it(tmp_path, run_script, digits_classifier):
    """The neural arm's corrector screen on small U-Nets: the AYF-EMD base is saved, a stage starts from it
    (init_checkpoint) and both the EMA and the raw weights are scored at 1/2/4/8 steps; a saved stage
    is the start of an adversarial stage."""
    import torch

    from flowmap_lit.interpolant import edm_schedule

    small_neural_arm(tmp_path, digits_classifier)
    common = ["--teacher-ckpt", str(tmp_path / "teacher.ckpt"), "--guide-ckpt", str(tmp_path / "guide.ckpt"),
              "--base", str(tmp_path / "base.ckpt"), "--budget", "tiny", "--data", str(tmp_path / "digits")]
    base = run_script("second_stage.py", *common, "--train-base")
    assert (tmp_path / "base.ckpt").is_file() and len(base["fid"]) == 4
    stage = run_script("second_stage.py", *common, "--batches", "2", "--dm-steps", "1", "2", "--raw",
                       "--save", str(tmp_path / "stage.ckpt"))
    for key in ("fid", "fid_raw", "flowmap_rel_error", "flowmap_rel_error_raw"):
        assert len(stage[key]) == 4 and all(v == v and v >= 0 for v in stage[key]), key
    assert stage["teacher_fid"] > 0 and stage["dm_steps"] == [1, 2]
    before, after = (torch.load(tmp_path / f, weights_only=True)["state_dict"] for f in ("base.ckpt", "stage.ckpt"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    common[common.index("--base") + 1] = str(tmp_path / "stage.ckpt")
    adv = run_script("second_stage.py", *common, "--stage", "adversarial", "--batches", "2", "--adv-times", "1",
                     "0.5")
    assert adv["stage"] == "adversarial" and len(adv["fid"]) == 4 and all(v == v for v in adv["fid"])
    # the saved stage evaluated as it is scores what the stage scored; its 2-step grid tuned on held-out FID
    # (a budget of the two starting grids: the better of uniform and EDM)
    saved = run_script("second_stage.py", *common, "--stage", "none", "--tune-steps", "2", "--tune-budget", "2",
                       "--scan-mid", "0.5", "0.3")
    assert saved["fid"] == stage["fid"] and saved["flowmap_rel_error"] == stage["flowmap_rel_error"]
    # the mid-time scan on the uniform grid's mid time is the evaluation's 2-step FID
    assert saved["mid_scan"][0] == [0.5, saved["fid"][1]] and saved["mid_scan"][1][1] != saved["fid"][1]
    starts = [[1.0, 0.5, 0.0], [round(float(t), 4) for t in edm_schedule(2)]]
    assert saved["grids"]["2"] in starts and len(saved["fid_tuned"]) == 4
    assert saved["fid_tuned"][0] == saved["fid"][0] and saved["fid_tuned"][2:] == saved["fid"][2:]
    # the per-batch cost of a base and a stage, timed side by side in one process
    cost = run_script("stage_cost.py", *common, "--batches", "2", "--warmup", "1", "--repeats", "1",
                      "--variant", "base=--train-base", "--variant", "gan=--stage adversarial --adv-steps 1 2")
    base_cost, gan_cost = cost["variants"]["base"], cost["variants"]["gan"]
    assert base_cost["ratio"] == 1.0 and base_cost["timed_batches"] == gan_cost["timed_batches"] == 1
    assert gan_cost["seconds_per_batch"] > 0 and gan_cost["args"] == "--stage adversarial --adv-steps 1 2"
