"""A run that diverges or meets bad inputs says so: the output-RMS guard and the non-finite-loss stop."""


import pytest
import torch
from torch import nn

from flowmap_lit.cli import main
from flowmap_lit.modules import FlowMapDistillModule
from flowmap_lit.objectives import AYFEMD
from flowmap_lit.teachers import GaussianData, GaussianTeacher
from tests.helpers import ROOT

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning",
                                        "ignore:.*self.log.*:UserWarning")


class Scaled(nn.Module):
    """``scale * x``: a student whose output RMS is set by hand."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x, t, s=None, class_labels=None, guidance=None):
        return self.scale * x


def module(scale: float = 1.0, **kw) -> FlowMapDistillModule:
    teacher = GaussianTeacher(GaussianData(torch.zeros(1, 2, 2), torch.ones(1, 2, 2)))
    return FlowMapDistillModule(teacher, AYFEMD(), student=Scaled(scale), init_student_from_teacher=False,
                                max_bad_steps=3, **kw)


def test_the_objective_reports_the_output_and_tangent_norms():
    m = module(scale=1000.0)
    per_sample, stats = m.step_loss({"x": torch.randn(16, 1, 2, 2), "label": torch.zeros(16, dtype=torch.long)},
                                    torch.Generator().manual_seed(0))
    assert 300 < float(stats["student_rms"]) < 1500  # scale * RMS of x_t (of order 1 here)
    assert float(stats["tangent_norm_normalized"]) <= 1.0 < float(stats["tangent_norm"])
    assert float(per_sample.mean()) <= 1.0  # the bounded loss that hides the divergence


def test_the_guard_stops_only_a_lasting_explosion():
    m = module()
    for _ in range(2):
        m.check_divergence({"student_rms": torch.tensor(1e4)})
    m.check_divergence({"student_rms": torch.tensor(1.3)})  # a spike that recovers resets the count
    for _ in range(2):
        m.check_divergence({"student_rms": torch.tensor(1e4)})
    with pytest.raises(RuntimeError, match="diverging: its output RMS was 1e\\+04.*Lower the learning rate"):
        m.check_divergence({"student_rms": torch.tensor(1e4)})
    module(max_output_rms=None).check_divergence({"student_rms": torch.tensor(1e30)})


def test_the_nonfinite_stop_says_whether_the_inputs_were_finite():
    m = module()
    nan = torch.tensor(float("nan"))
    bad = {"x": torch.full((2, 1, 2, 2), float("nan")), "label": torch.zeros(2, dtype=torch.long)}
    good = {"x": torch.zeros(2, 1, 2, 2), "label": torch.zeros(2, dtype=torch.long)}
    for _ in range(2):
        assert m.skip_nonfinite(nan, batch=bad)
    with pytest.raises(RuntimeError, match="batch held NaN or infinite inputs: the data is at fault"):
        m.skip_nonfinite(nan, batch=bad)
    m.bad_steps = 0
    for _ in range(2):
        m.skip_nonfinite(nan, batch=good)
    with pytest.raises(RuntimeError, match="inputs were finite. Lower the learning rate"):
        m.skip_nonfinite(nan, batch=good)


def test_a_huge_learning_rate_stops_the_quickstart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    digits = str(tmp_path / "digits")
    with pytest.raises(RuntimeError, match="the student is diverging"):
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.max_steps", "40",
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
              "--trainer.val_check_interval", "1000", "--model.init_args.optimizer.init_args.lr", "1e9",
              "--model.init_args.student.init_args.width", "64", "--model.init_args.teacher.init_args.data_root",
              digits, "--model.init_args.guide.init_args.data_root", digits, "--data.init_args.root", digits,
              "--data.init_args.num_workers", "0"])
