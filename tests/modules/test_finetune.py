"""The adversarial finetune (flowmap_lit.modules.finetune): the two-optimizer step checked against the plain
distillation step, the adaptive weight, starting from a distilled checkpoint, the config from the command
line with exact resume, and the strategy it needs under DDP."""

import math

import lightning.pytorch as pl
import pytest
import torch

from flowmap_lit.modules import AdversarialFinetuneModule, FlowMapDistillModule
from flowmap_lit.modules.finetune import last_layer_weight
from flowmap_lit.networks import Discriminator
from flowmap_lit.objectives import AYFEMD
from flowmap_lit.teachers import NetworkTeacher
from tests.helpers import ROOT, MLPVelocity
from tests.helpers.cli import straight_and_resumed


class Batches(torch.utils.data.Dataset):
    def __init__(self, n=8, shape=(1, 4, 4), num_batches=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = [{"x": torch.randn(n, *shape, generator=g), "label": torch.randint(0, 3, (n,), generator=g)}
                      for _ in range(num_batches)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _modules(adv_weight=0.1, **kw):
    torch.manual_seed(0)
    teacher = NetworkTeacher(net=MLPVelocity((1, 4, 4)))
    student = MLPVelocity((1, 4, 4))
    common = dict(objective=AYFEMD(), student=student, init_student_from_teacher=False, warmup_steps=0,
                  optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), noise_seed=3)
    disc = Discriminator(img_channels=1, img_resolution=4, channels=[8], num_classes=3)
    ft = AdversarialFinetuneModule(teacher=teacher, discriminator=disc, adv_weight=adv_weight, num_classes=3,
                                   discriminator_optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), **common, **kw)
    plain = FlowMapDistillModule(teacher=NetworkTeacher(net=MLPVelocity((1, 4, 4))), num_classes=3,
                                 **{**common, "student": MLPVelocity((1, 4, 4))})
    plain.student.load_state_dict(ft.student.state_dict())
    plain.teacher.load_state_dict(ft.teacher.state_dict())
    return ft, plain


def _fit(module, max_steps, batches=None):
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader(batches or Batches(), batch_size=None)
    trainer.fit(module, loader)
    return trainer


def test_generator_step_with_zero_gan_weight_is_the_distillation_step():
    ft, plain = _modules(adv_weight=0.0)
    d_before = [p.detach().clone() for p in ft.discriminator.parameters()]
    trainer = _fit(ft, max_steps=2)  # one batch: a discriminator step and a student step
    assert trainer.global_step == 2
    _fit(plain, max_steps=1)
    for (name, a), b in zip(ft.student.named_parameters(), plain.student.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(d_before, ft.discriminator.parameters()))


def test_gan_term_changes_the_student_and_the_adaptive_weight_is_the_gradient_ratio():
    ft, plain = _modules(adv_weight=0.5)
    _fit(ft, max_steps=2)
    _fit(plain, max_steps=1)
    assert any(not torch.equal(a, b) for a, b in zip(ft.student.parameters(), plain.student.parameters()))

    ft, _ = _modules(adv_weight=0.5, adaptive_weight=True, adaptive_weight_max=1e6)
    name, weight = last_layer_weight(ft.student)
    assert name == "body.4.weight"
    x = torch.randn(4, 1, 4, 4)
    out = ft.student(x, torch.rand(4), torch.zeros(4))
    a, b = out.square().mean(), out.sum()
    ga, gb = torch.autograd.grad(a, weight, retain_graph=True)[0], torch.autograd.grad(b, weight, retain_graph=True)[0]
    torch.testing.assert_close(ft.balance(a, b), 0.5 * ga.norm() / (gb.norm() + 1e-8))
    with pytest.raises(ValueError, match="not a parameter"):
        last_layer_weight(ft.student, "nope")


def test_init_checkpoint_loads_the_distilled_student(tmp_path):
    _, plain = _modules()
    with torch.no_grad():
        for p in plain.student.parameters():
            p.add_(1.0)
    ema = {k: v + 2.0 for k, v in plain.student.state_dict().items()}
    path = tmp_path / "distilled.ckpt"
    torch.save({"state_dict": {f"student.{k}": v for k, v in plain.student.state_dict().items()},
                "callbacks": {"EMA": {"shadow": ema, "num_updates": 1, "decay": 0.9}}}, path)
    for use_ema, expected in ((True, ema), (False, plain.student.state_dict())):
        ft, _ = _modules(init_checkpoint=str(path), init_use_ema=use_ema)
        for k, v in ft.student.state_dict().items():
            torch.testing.assert_close(v, expected[k])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _modules(init_checkpoint=str(tmp_path / "missing.ckpt"))
    torch.save({"state_dict": {"student.other.weight": torch.zeros(1)}}, tmp_path / "wrong.ckpt")
    with pytest.raises(RuntimeError, match="does not match the student"):
        _modules(init_checkpoint=str(tmp_path / "wrong.ckpt"), init_use_ema=False)
    with pytest.raises(ValueError, match="adv_times"):
        _modules(adv_times=[0.0])


def test_finetune_config_runs_from_a_distilled_checkpoint_and_resumes_exactly(quickstart, tmp_path, monkeypatch,
                                                                             lightning_log):
    # checkpoints every 2 batches (4 optimizer steps), all kept
    monkeypatch.chdir(tmp_path)
    logged = len(lightning_log())
    a, b = straight_and_resumed(ROOT / "configs/digits/finetune_adversarial.yaml", quickstart, tmp_path, 8, 4)
    assert lightning_log()[logged:].count("Flow-map error at step") >= 3  # every run evaluated
    assert a["global_step"] == b["global_step"] == 8  # 4 batches, 2 optimizer steps each
    assert any(k.startswith("discriminator.") for k in a["state_dict"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for key, value in a["callbacks"]["EMA"]["shadow"].items():
        assert torch.equal(value, b["callbacks"]["EMA"]["shadow"][key]), key
    assert len(a["optimizer_states"]) == 2
    assert math.isfinite(float(a["optimizer_states"][1]["state"][0]["exp_avg"].norm()))


def test_plain_ddp_is_refused_with_the_strategy_to_use():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    ft, _ = _modules()
    ft._trainer = SimpleNamespace(strategy=DDPStrategy(), datamodule=None)
    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
        ft.setup("fit")
    ft._trainer = SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True), datamodule=None)
    ft.setup("fit")


class LabelsOnly(torch.utils.data.Dataset):
    """Batches with labels only: reading them never touches data."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return {"label": torch.tensor([0, 1, 2, 1])}


def test_teacher_reals_make_a_finetune_that_reads_no_data():
    """``adv_real: teacher``: the discriminator's reals are the guided teacher's ODE samples (checked against
    ``teacher_sample`` from the same noise), so with a data-free ``states`` the finetune trains on labels alone;
    a data finetune on a batch without ``x`` names the setting to change."""
    from flowmap_lit.interpolant import edm_schedule
    from flowmap_lit.solvers import ode_sample

    ft, _ = _modules(states="student", sample_shape=[1, 4, 4], adv_real="teacher", adv_real_steps=3)
    batch = {"label": torch.tensor([0, 1, 2, 1])}
    gen = torch.Generator().manual_seed(5)
    x0, labels = ft.reals(batch, gen)
    z = torch.randn((4, 1, 4, 4), generator=torch.Generator().manual_seed(5))
    expected = ode_sample(ft.teacher_fn(labels, None), z, 3, "heun", schedule=edm_schedule(3))
    torch.testing.assert_close(x0, expected)
    assert torch.equal(labels, batch["label"])
    before = [p.detach().clone() for p in ft.student.parameters()]
    trainer = _fit(ft, max_steps=4, batches=LabelsOnly())
    assert trainer.global_step == 4 and any(not torch.equal(a, b) for a, b in zip(before, ft.student.parameters()))

    data_ft, _ = _modules(states="student", sample_shape=[1, 4, 4])
    with pytest.raises(ValueError, match="adv_real: teacher"):
        data_ft.reals(batch)
    with pytest.raises(ValueError, match="adv_real"):
        _modules(adv_real="samples")


def test_a_pool_of_teacher_reals_is_made_once_and_drawn_from(monkeypatch):
    """``adv_real_pool``: the reals are rows of one pool of teacher samples (``teacher_sample`` of noise seeded by
    ``noise_seed``, balanced labels), made at the first call only; a rebuilt module (a resumed run) makes the same
    pool; 2 ranks draw the two halves of the 1-rank draw; the pool needs teacher reals."""
    from flowmap_lit.modules.finetune import POOL_SEED_TAG
    from flowmap_lit.seeding import derive_seed

    ft, _ = _modules(states="student", sample_shape=[1, 4, 4], adv_real="teacher", adv_real_steps=3,
                     adv_real_pool=10)
    calls = []
    real_sample = ft.teacher_sample
    monkeypatch.setattr(ft, "teacher_sample", lambda *a, **k: calls.append(len(a[0])) or real_sample(*a, **k))
    batch = {"label": torch.tensor([0, 1, 2, 1])}
    x0, labels = ft.reals(batch, torch.Generator().manual_seed(5))
    pool, pool_labels = ft.real_pool((1, 4, 4))
    z = torch.randn((10, 1, 4, 4), generator=torch.Generator().manual_seed(derive_seed(3, POOL_SEED_TAG)))
    torch.testing.assert_close(pool, real_sample(z, torch.arange(10) % ft.num_classes, 3, ft.eval_guidance))
    idx = torch.randint(10, (4,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(x0, pool[idx]) and torch.equal(labels, pool_labels[idx])
    ft.reals(batch, torch.Generator().manual_seed(6))
    assert calls == [10]  # made once, at the first call
    halves = [ft.reals({"label": batch["label"][:2]}, torch.Generator().manual_seed(5), rank, 2)[0] for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), x0)
    again, _ = _modules(states="student", sample_shape=[1, 4, 4], adv_real="teacher", adv_real_steps=3,
                        adv_real_pool=10)
    assert torch.equal(again.real_pool((1, 4, 4))[0], pool)
    with pytest.raises(ValueError, match="needs adv_real: teacher"):
        _modules(adv_real_pool=10)
    with pytest.raises(ValueError, match="adv_real_pool must be >= 0"):
        _modules(adv_real="teacher", adv_real_pool=-1)


def test_step_count_fakes_are_the_students_own_k_step_samples():
    """``adv_steps``: each fake is the student's k-step sample (``sample`` from the same noise, its own k per
    sample); [1] equals ``adv_times`` [1.0]; only the last jump carries the gradient; both lists at once are
    refused."""
    ft, _ = _modules(adv_steps=[1, 2, 4])
    x0, labels = torch.randn(12, 1, 4, 4), torch.randint(0, 3, (12,))
    k, z = ft.adversarial_noise(x0, torch.Generator().manual_seed(1))
    assert set(k.tolist()) == {1.0, 2.0, 4.0}
    fake = ft.fakes(x0, labels, k, z)
    with torch.no_grad():
        for steps in (1, 2, 4):
            i = k == steps
            torch.testing.assert_close(fake[i], ft.sample(z[i], labels[i], num_steps=steps), rtol=1e-5, atol=1e-5)
    one, _ = _modules(adv_steps=[1])
    t_one = torch.ones(12)
    steps_fake = one.fakes(x0, labels, t_one, z)
    one.adv_steps = None  # the same module with adv_times [1.0]: a jump from x_t = z at t = 1
    torch.testing.assert_close(steps_fake, one.fakes(x0, labels, t_one, z), rtol=1e-5, atol=1e-5)

    # the gradient reaches the student only through the last jump: a 2-step fake's grad equals the grad of
    # one jump from the (detached) 1st jump's state
    two, _ = _modules(adv_steps=[2])
    k2 = torch.full((12,), 2.0)
    two.fakes(x0, labels, k2, z).square().sum().backward()
    g_fake = [p.grad.clone() for p in two.student.parameters()]
    two.student.zero_grad()
    with torch.no_grad():
        mid = two.sample(z, labels, num_steps=1, schedule=torch.tensor([1.0, 0.5], dtype=torch.float64))
    F = two.student_fn(labels, None)(mid, torch.full((12,), 0.5), torch.zeros(12))
    (mid - 0.5 * F).square().sum().backward()
    for a, p in zip(g_fake, two.student.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)

    # a step count that no sample drew still makes its passes (one sample, counting zero), so that every
    # rank of a sharded student makes the same passes
    calls = []
    mixed, _ = _modules(adv_steps=[1, 2])
    hook = mixed.student.register_forward_hook(lambda *_: calls.append(1))
    only_one = mixed.fakes(x0, labels, torch.ones(12), z)
    hook.remove()
    assert len(calls) == 3  # one 1-step pass, two passes of the 2-step path
    with torch.no_grad():
        torch.testing.assert_close(only_one, mixed.sample(z, labels, num_steps=1), rtol=1e-5, atol=1e-5)
    only_one.sum().backward()
    assert all(p.grad is not None for p in mixed.student.parameters())

    with pytest.raises(ValueError, match="not both"):
        _modules(adv_steps=[1], adv_times=[1.0])
    with pytest.raises(ValueError, match="adv_steps"):
        _modules(adv_steps=[0])

