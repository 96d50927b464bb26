"""Flow-matching pretraining (flowmap_lit.modules.pretrain) and the learning-rate schedules of
flowmap_lit.modules.common."""

import math

import pytest
import torch

from flowmap_lit.interpolant import interpolate
from flowmap_lit.modules import FlowMapDistillModule, FlowMatchingModule
from flowmap_lit.modules.common import warmup_then_decay
from flowmap_lit.objectives import AYFEMD
from flowmap_lit.teachers import MixtureTeacher
from flowmap_lit.teachers.analytic import GaussianData
from tests.helpers import MLPVelocity, small_mixture


def test_flow_matching_learns_the_exact_gaussian_velocity():
    """Minimizing the FM loss on Gaussian data recovers E[eps - x0 | x_t] (docs/design.md section 6)."""
    torch.manual_seed(0)
    data = GaussianData(torch.tensor([[[1.0, -0.5], [0.3, 2.0]]]), torch.tensor([[[0.5, 1.0], [0.2, 0.8]]]))
    module = FlowMatchingModule(MLPVelocity((1, 2, 2), 128), t_distribution="uniform")
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1000, 1500], 0.1)
    t_eval = torch.rand(512) * 0.9 + 0.05
    x_eval = interpolate(data.sample(512), torch.randn(512, 1, 2, 2), t_eval)  # on the marginal of x_t
    exact = data.velocity(x_eval, t_eval)

    def error():
        with torch.no_grad():
            return ((module.net(x_eval, t_eval) - exact).square().mean() / exact.square().mean()).item()

    before = error()
    for step in range(2000):
        loss = module.training_step({"x": data.sample(256), "label": torch.zeros(256, dtype=torch.long)}, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    after = error()
    assert before > 0.5
    assert after < 0.02, (before, after)
    print(f"relative velocity error {before:.3f} -> {after:.4f}")


def test_label_dropout_and_cfg():
    torch.manual_seed(0)

    class Recorder(MLPVelocity):
        def forward(self, x, t, s=None, class_labels=None, guidance=None):
            self.labels = class_labels
            return torch.zeros_like(x) + (class_labels.float() if class_labels is not None else 0).reshape(-1, 1, 1, 1)

    module = FlowMatchingModule(Recorder(), num_classes=10, label_dropout=0.5)
    labels = torch.randint(0, 10, (4000,))
    module.training_step({"x": torch.zeros(4000, 1, 2, 2), "label": labels}, 0)
    dropped = module.net.labels == 10
    assert abs(dropped.float().mean().item() - 0.5) < 0.03
    assert (module.net.labels[~dropped] == labels[~dropped]).all()
    # CFG: v_u + w (v_c - v_u) with the recorder's velocity = label value; null label 10.
    v = module.velocity(torch.zeros(2, 1, 2, 2), torch.rand(2), torch.tensor([3, 4]), guidance=2.0)
    assert torch.allclose(v[:, 0, 0, 0], torch.tensor([10 + 2 * (3 - 10), 10 + 2 * (4 - 10)]).float())


def test_learning_rate_schedules():
    def factors(**kw):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = warmup_then_decay(opt, **kw)
        out = []
        for _ in range(kw.get("total_steps") or 10):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert factors(warmup_steps=4) == [0.25, 0.5, 0.75] + [1.0] * 7  # the constant schedule, unchanged
    cos = factors(warmup_steps=0, kind="cosine", total_steps=100)
    assert cos[0] == 1.0 and cos[50] == pytest.approx(0.5)
    assert cos[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))
    lin = factors(warmup_steps=10, kind="linear", total_steps=100, decay_start=0.5, min_ratio=0.1)
    assert lin[9] == 1.0 and lin[50] == 1.0 and lin[75] == pytest.approx(0.1 + 0.9 * 0.5) and min(lin) >= 0.1
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        factors(warmup_steps=0, kind="cosine", total_steps=None)
    with pytest.raises(ValueError, match="lr_schedule must be"):
        factors(warmup_steps=0, kind="step")
    with pytest.raises(ValueError, match="lr_min_ratio"):  # refused at construction, not at fit
        FlowMapDistillModule(MixtureTeacher(small_mixture()), AYFEMD(), student=MLPVelocity(),
                             init_student_from_teacher=False, lr_schedule="cosine", lr_min_ratio=2.0)
