"""The ScheduleSearch callback (flowmap_lit.callbacks.ScheduleSearch): during fit it finds the grid that
``python -m flowmap_lit schedule`` finds for the same checkpoint and arguments, the module samples with it
(so the evaluation callbacks measure the tuned sampler), and a resumed run gets it back."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from flowmap_lit.callbacks import ScheduleSearch
from flowmap_lit.grids import schedules_doc
from tests.helpers import ROOT
from tests.helpers.cli import SMALL_CALLBACKS, cli


def test_the_fit_finds_the_grid_the_schedule_command_finds(quickstart, tmp_path):
    # The quickstart fixture's fit (tests/helpers/cli.py: FID criterion, budget 8, 64 held-out noises) validates
    # and saves last.ckpt at step 2 and ends at step 3: a search before the validation and one at the end of
    # training, whose grid is the file's.
    assert "ScheduleSearch at step 2" in quickstart.log and "ScheduleSearch at step 3" in quickstart.log
    written = json.loads((quickstart.dir / "ckpt/schedules.json").read_text())
    assert written["global_step"] == 3 and list(written["grids"]) == ["2"]
    assert written["held_out"]["2"]["evaluations"] == 8
    saved = torch.load(quickstart.ckpt, weights_only=True)
    state = next(v for key, v in saved["callbacks"].items() if key.startswith("ScheduleSearch"))
    assert saved["global_step"] == 2 and state["searches"] == 1  # the search of step 2, on these weights
    out = tmp_path / "schedules.json"
    cli("schedule", "--ckpt", quickstart.ckpt, "--steps", "2", "--criterion", "fid", "--budget", "8", "--num", "64",
        "--data", quickstart.digits, "--out", out)
    command = json.loads(out.read_text())
    assert command["grids"] == state["schedules"]["grids"] and command["held_out"] == state["report"]


def test_the_evaluations_sample_on_the_tuned_grids(digits_classifier, tmp_path, monkeypatch):
    from flowmap_lit.callbacks import FlowMapError
    from flowmap_lit.callbacks.ema import evaluation_mode
    from flowmap_lit.grid_search import HELD_OUT_SEED, flowmap_error_criterion, held_out_inputs

    shutil.copytree(digits_classifier["root"], tmp_path / "digits")
    small = tmp_path / "small.yaml"
    small.write_text(SMALL_CALLBACKS % (tmp_path / "ckpt") + """    - class_path: flowmap_lit.callbacks.ScheduleSearch
      init_args: {step_counts: [2, 4], criterion: flowmap_error, budget: 8, num_samples: 32, reference_steps: 8}
""")
    digits = str(tmp_path / "digits")
    monkeypatch.chdir(tmp_path)
    run = cli("fit", "--config", ROOT / "configs/quickstart.yaml", "--config", small, "--trainer.max_steps", "3",
              "--trainer.val_check_interval", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar",
              "false", "--model.init_args.teacher.init_args.data_root", digits,
              "--model.init_args.guide.init_args.data_root", digits, "--data.init_args.root", digits)
    trainer, module = run.trainer, run.model
    search = next(c for c in trainer.callbacks if isinstance(c, ScheduleSearch))
    errors = next(c for c in trainer.callbacks if isinstance(c, FlowMapError))
    assert search.searches == 2 and sorted(search.tuned) == [2, 4]  # before the validation at 2, at the end (3)
    with evaluation_mode(trainer, module), torch.no_grad():
        noise, labels = held_out_inputs(module, 32, HELD_OUT_SEED, (1, 8, 8))
        criterion = flowmap_error_criterion(module, noise, labels, reference_steps=8)
        noise, labels, reference = errors.reference(trainer, module)
        for k in (2, 4):
            grid, gamma = module.schedules[k]
            assert grid is search.tuned[k][0]
            report = search.report[str(k)]
            assert report["tuned"] <= min(report["uniform"], report["edm"])
            # the value the search reports is the schedule command's criterion of that grid
            assert report["tuned"] == pytest.approx(criterion(grid, gamma), rel=1e-5)
            # the end-of-fit flow-map error row is that of the tuned grid
            x = module.sample(noise, labels, schedule=grid)
            row = next(r for r in errors.results if r["steps"] == k)
            assert row["relative_error"] == pytest.approx(float((x - reference).square().mean()
                                                                / reference.square().mean()), rel=1e-6)
    saved = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=True)
    state = next(v for key, v in saved["callbacks"].items() if key.startswith("ScheduleSearch"))
    assert state["searches"] >= 1 and sorted(state["schedules"]["grids"]) == ["2", "4"]


def test_a_resumed_run_samples_on_the_saved_grids_from_its_first_batch():
    grid = torch.tensor([1.0, 0.6, 0.0], dtype=torch.float64)
    saved = ScheduleSearch(step_counts=[2], criterion="flowmap_error")
    saved.tuned, saved.searches = {2: (grid, 0.25)}, 3
    restored = ScheduleSearch(step_counts=[2], criterion="flowmap_error")
    restored.load_state_dict(saved.state_dict())
    module = SimpleNamespace(schedules={8: (torch.linspace(1, 0, 9, dtype=torch.float64), 0.0)})
    restored.on_fit_start(None, module)
    assert torch.equal(module.schedules[2][0], grid) and module.schedules[2][1] == 0.25 and 8 in module.schedules
    assert restored.searches == 3 and schedules_doc(restored.tuned) == schedules_doc(saved.tuned)


def test_bad_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="criterion must be one of"):
        ScheduleSearch(criterion="lpips")
    with pytest.raises(ValueError, match="integers >= 1"):
        ScheduleSearch(step_counts=[0])
    with pytest.raises(ValueError, match="budget"):
        ScheduleSearch(budget=1)
    module = SimpleNamespace(set_schedules=None, teacher_sample=None)
    with pytest.raises(ValueError, match="add a FewStepFID callback, or use criterion: flowmap_error"):
        ScheduleSearch(criterion="fid").setup(SimpleNamespace(callbacks=[]), module, "fit")
    with pytest.raises(ValueError, match="no free time grid"):
        ScheduleSearch(criterion="flowmap_error").setup(SimpleNamespace(callbacks=[]), SimpleNamespace(), "fit")


def test_the_two_process_search_finds_what_one_process_finds(two_process, tmp_path):
    """The digits distillation config on 2 ranks (FSDP2) with a flow-map-error search at its validation
    (tests/helpers/two_process.py): each rank samples its share of the held-out noise and the criterion is
    reduced over ranks, so the search finds the grid, and reports the values, that the schedule command finds
    in one process on the saved sharded checkpoint."""
    from tests.helpers.two_process import SCHEDULE_SEARCH

    assert "fit done: GLOBAL_RANK: 1, MEMBER: 2/2" in two_process["logs"]["schedule"]
    written = json.loads((two_process["schedule"] / "schedules.json").read_text())
    assert written["global_step"] == 2 and list(written["grids"]) == ["2"]
    assert written["held_out"]["2"]["evaluations"] == SCHEDULE_SEARCH["budget"]
    out = tmp_path / "schedules.json"
    cli("schedule", "--ckpt", two_process["schedule"] / "last.ckpt", "--steps", "2", "--criterion", "flowmap_error",
        "--budget", SCHEDULE_SEARCH["budget"], "--num", SCHEDULE_SEARCH["num_samples"], "--reference-steps", "4",
        "--device", "cpu", "--out", out)
    command = json.loads(out.read_text())
    assert command["grids"]["2"] == pytest.approx(written["grids"]["2"], abs=1e-6)
    for key in ("uniform", "edm", "tuned"):
        assert command["held_out"]["2"][key] == pytest.approx(written["held_out"]["2"][key], rel=1e-5), key
