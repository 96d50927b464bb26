"""Flow-matching pretraining and the EMA callback."""

import copy

import lightning.pytorch as pl
import torch

from flowmap_lit.analytic import GaussianData
from flowmap_lit.callbacks import EMA
from flowmap_lit.interpolant import interpolate
from flowmap_lit.modules import FlowMatchingModule
from tests.helpers import MLPVelocity


def test_flow_matching_learns_the_exact_gaussian_velocity():
    """Minimizing the FM loss on Gaussian data recovers E[eps - x0 | x_t] (DESIGN.md section 6)."""
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


class _Lin(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3, 1, bias=False)

    def ema_network(self):
        return self.net


def test_ema_update_swap_and_state_roundtrip():
    module = _Lin()
    ema = EMA(decay=0.5, warmup=False)
    with torch.no_grad():
        module.net.weight.fill_(0.0)
    ema.update(module)  # shadow = 0
    with torch.no_grad():
        module.net.weight.fill_(4.0)
    ema.update(module)  # 0.5 * 0 + 0.5 * 4 = 2
    ema.update(module)  # 0.5 * 2 + 0.5 * 4 = 3
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 3), 3.0))
    with ema.averaged(module):
        assert torch.allclose(module.net.weight, torch.full((1, 3), 3.0))
    assert torch.allclose(module.net.weight, torch.full((1, 3), 4.0))

    restored = EMA(decay=0.5, warmup=False)
    restored.load_state_dict(copy.deepcopy(ema.state_dict()))
    assert restored.num_updates == 3
    with restored.averaged(module):
        assert torch.allclose(module.net.weight, torch.full((1, 3), 3.0))
    # Warmup ramps the decay: (1 + n) / (10 + n).
    warm = EMA(decay=0.999)
    assert warm.current_decay() == 0.1
