"""The distribution-matching corrector module (flowmap_lit.modules.corrector) and data-free distillation:
the two-optimizer step against the plain distillation step, the fake velocity's start, the k-step samples'
gradient path, data-free states that read no data, the labels-only data module, and the corrector config
from the command line with exact resume."""

import shutil

import lightning.pytorch as pl
import pytest
import torch

from flowmap_lit.data import PriorDataModule
from flowmap_lit.interpolant import expand_like
from flowmap_lit.modules import DistributionMatchingModule, FlowMapDistillModule
from flowmap_lit.objectives import AYFEMD
from flowmap_lit.teachers import NetworkTeacher
from tests.helpers import ROOT, MLPVelocity
from tests.helpers.cli import cli, straight_and_resumed
from tests.modules.test_finetune import Batches, LabelsOnly

SHAPE = (1, 4, 4)


def _common(**kw):
    return dict(objective=AYFEMD(), init_student_from_teacher=False, warmup_steps=0, num_classes=3,
                optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), noise_seed=3, **kw)


def _modules(dm_weight=0.0, **kw):
    torch.manual_seed(0)
    teacher = NetworkTeacher(net=MLPVelocity(SHAPE))
    kw.setdefault("fake_optimizer", lambda p: torch.optim.Adam(p, lr=1e-3))
    dm = DistributionMatchingModule(teacher=teacher, student=MLPVelocity(SHAPE), dm_weight=dm_weight, **_common(),
                                    **kw)
    plain = FlowMapDistillModule(teacher=NetworkTeacher(net=MLPVelocity(SHAPE)), student=MLPVelocity(SHAPE),
                                 **_common())
    plain.student.load_state_dict(dm.student.state_dict())
    plain.teacher.load_state_dict(dm.teacher.state_dict())
    return dm, plain


def _fit(module, max_steps, loader=None):
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, loader or torch.utils.data.DataLoader(Batches(), batch_size=None))
    return trainer


def test_zero_corrector_weight_gives_the_distillation_step_and_trains_the_fake():
    dm, plain = _modules(dm_weight=0.0)
    fake_before = [p.detach().clone() for p in dm.fake.parameters()]
    trainer = _fit(dm, max_steps=1)  # one batch: a fake step and a student step; global_step counts batches
    assert trainer.global_step == 1
    _fit(plain, max_steps=1)
    for (name, a), b in zip(dm.student.named_parameters(), plain.student.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(fake_before, dm.fake.parameters()))


def test_the_corrector_moves_the_student_and_waits_for_dm_start():
    dm, plain = _modules(dm_weight=1.0)
    _fit(dm, max_steps=1)
    _fit(plain, max_steps=1)
    assert any(not torch.equal(a, b) for a, b in zip(dm.student.parameters(), plain.student.parameters()))

    late, plain = _modules(dm_weight=1.0, dm_start=5, fake_updates=2)
    fake_before = [p.detach().clone() for p in late.fake.parameters()]
    trainer = _fit(late, max_steps=1)  # one batch before dm_start: the fake untouched
    assert trainer.global_step == 1
    _fit(plain, max_steps=1)
    for a, b in zip(late.student.parameters(), plain.student.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(fake_before, late.fake.parameters()))


def test_zero_distill_weight_skips_the_distillation_pass(monkeypatch):
    dm, _ = _modules(dm_weight=1.0, distill_weight=0.0)

    def no_distillation(*args, **kwargs):
        raise AssertionError("distill_weight: 0 computed the distillation loss")

    monkeypatch.setattr(dm, "step_loss", no_distillation)
    before = [p.detach().clone() for p in dm.student.parameters()]
    _fit(dm, max_steps=2)  # the corrector alone moves the student
    assert any(not torch.equal(a, b) for a, b in zip(before, dm.student.parameters()))
    with pytest.raises(ValueError, match="adaptive_weight"):
        _modules(dm_weight=1.0, distill_weight=0.0, adaptive_weight=True)
    with pytest.raises(ValueError, match="distill_weight must be >= 0"):
        _modules(distill_weight=-1.0)


def test_the_fake_velocity_starts_as_the_teacher_or_the_student():
    dm, _ = _modules(fake_init="teacher")
    x, t = torch.randn(5, *SHAPE), torch.rand(5)
    torch.testing.assert_close(dm.fake(x, t, t), dm.teacher.network(x, t, t), rtol=0, atol=0)
    assert dm.fake is not dm.teacher.network and all(p.requires_grad for p in dm.fake.parameters())
    dm, _ = _modules(fake_init="student")
    torch.testing.assert_close(dm.fake(x, t, t), dm.student(x, t, t), rtol=0, atol=0)
    with pytest.raises(ValueError, match="dm_steps"):
        _modules(dm_steps=[0])
    with pytest.raises(ValueError, match="fake_updates"):
        _modules(fake_updates=0)


def test_k_step_samples_chain_the_student_and_train_only_the_last_jump():
    dm, _ = _modules(dm_steps=[3])
    z = torch.randn(6, *SHAPE)
    x_hat = dm.student_samples(z, 3, None, None)
    with torch.no_grad():
        x, times = z, [1.0, 2 / 3, 1 / 3, 0.0]
        for t, s in zip(times[:-1], times[1:]):
            tt, ss = torch.full((6,), t), torch.full((6,), s)
            x = x + expand_like(ss - tt, x) * dm.student(x, tt, ss)
    torch.testing.assert_close(x_hat, x, rtol=1e-6, atol=1e-6)
    # the gradient reaches the weights only through the last jump, from the (fixed) 2-step state
    x_hat.sum().backward()
    grads = [p.grad.clone() for p in dm.student.parameters()]
    dm.student.zero_grad()
    with torch.no_grad():
        state = dm.student_samples(z, 3, None, None)  # same values
        x2 = z
        for t, s in zip(times[:2], times[1:3]):
            tt, ss = torch.full((6,), t), torch.full((6,), s)
            x2 = x2 + expand_like(ss - tt, x2) * dm.student(x2, tt, ss)
    t0 = torch.full((6,), 1 / 3)
    last = x2 + expand_like(-t0, x2) * dm.student(x2, t0, torch.zeros(6))
    torch.testing.assert_close(last, state, rtol=1e-6, atol=1e-6)
    last.sum().backward()
    for a, p in zip(grads, dm.student.parameters()):
        torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize("states", ["student", "teacher"])
def test_data_free_states_need_no_data(states):
    torch.manual_seed(0)
    module = FlowMapDistillModule(teacher=NetworkTeacher(net=MLPVelocity(SHAPE)), student=MLPVelocity(SHAPE),
                                  states=states, state_steps=2, sample_shape=list(SHAPE), **_common())
    before = [p.detach().clone() for p in module.student.parameters()]
    _fit(module, max_steps=2, loader=torch.utils.data.DataLoader(LabelsOnly(), batch_size=None))
    assert any(not torch.equal(a, b) for a, b in zip(before, module.student.parameters()))

    data_module = FlowMapDistillModule(teacher=NetworkTeacher(net=MLPVelocity(SHAPE)), student=MLPVelocity(SHAPE),
                                       **_common())
    with pytest.raises(ValueError, match="states: student"):
        data_module.step_loss({"label": torch.tensor([0, 1])})


def test_student_states_are_the_students_jump_from_noise_and_teacher_states_its_euler_ode():
    torch.manual_seed(0)
    teacher = NetworkTeacher(net=MLPVelocity(SHAPE))
    m = FlowMapDistillModule(teacher=teacher, student=MLPVelocity(SHAPE), states="student", **_common())
    z, t = torch.randn(4, *SHAPE), torch.tensor([1.0, 0.7, 0.3, 0.0])
    x_t = m.trajectory_states(z, t, None, None)
    torch.testing.assert_close(x_t[0], z[0])  # t = 1: pure noise
    expected = z + expand_like(t - 1, z) * m.student(z, torch.ones(4), t)
    torch.testing.assert_close(x_t, expected)
    m.states, m.state_steps = "teacher", 3
    x = z.clone()
    for i in range(3):
        a, b = 1 + (t - 1) * i / 3, 1 + (t - 1) * (i + 1) / 3
        x = x + expand_like(b - a, x) * teacher(x, a)
    torch.testing.assert_close(m.trajectory_states(z, t, None, None), x)


def test_prior_data_module_serves_labels_only_and_resumes_its_labels():
    dm = PriorDataModule(shape=[1, 4, 4], num_classes=5, batch_size=7, batches_per_epoch=4, seed=2)
    batches = list(dm.train_dataloader())
    assert len(batches) == 4 and set(batches[0]) == {"label"} and batches[0]["label"].shape == (7,)
    assert int(torch.cat([b["label"] for b in batches]).max()) < 5
    again = list(dm.train_dataloader())
    assert all(torch.equal(a["label"], b["label"]) for a, b in zip(batches, again))
    weighted = PriorDataModule(shape=[1, 4, 4], num_classes=3, class_weights=[0, 1, 0], batch_size=9)
    assert torch.all(next(iter(weighted.train_dataloader()))["label"] == 1)
    assert dm.shape == (1, 4, 4) and dm.stats["num_classes"] == 5
    with pytest.raises(ValueError, match="source data module"):
        PriorDataModule(shape=[1, 4, 4])
    with pytest.raises(ValueError, match="class_weights"):
        PriorDataModule(shape=[1, 4, 4], num_classes=3, class_weights=[1, 1])


def _garbage_digits(digits_teacher_guide, tmp_path):
    """A copy of the digits directory whose every shard is garbage: any read of the data raises."""
    from flowmap_lit.data import read_split

    data = tmp_path / "digits"
    data.mkdir()
    for f in digits_teacher_guide.digits.iterdir():
        if f.name.endswith(".tar"):
            (data / f.name).write_bytes(b"not a tar file: reading this shard fails")
        elif f.is_file():
            shutil.copy(f, data / f.name)
    assert any(f.name.endswith(".tar") for f in data.iterdir())
    with pytest.raises(Exception):  # noqa: B017 (the trap works: reading the data fails)
        read_split(str(data), "train")
    return data


QUIET = ["--trainer.callbacks", "[]", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", 0]


def test_data_free_fit_reads_no_shard(digits_teacher_guide, tmp_path, monkeypatch):
    """configs/digits/distill_data_free.yaml through the command line on a digits directory whose every shard is
    garbage (any read raises): the run trains, so distillation read no shard."""
    data = _garbage_digits(digits_teacher_guide, tmp_path)
    monkeypatch.chdir(tmp_path)
    result = cli("fit", "--config", str(ROOT / "configs/digits/distill_data_free.yaml"), *QUIET,
                 "--trainer.max_steps", 4,
                 "--data.init_args.batch_size", 8, "--data.init_args.source.init_args.root", data,
                 "--model.init_args.teacher.init_args.checkpoint", digits_teacher_guide.teacher,
                 "--model.init_args.guide.init_args.checkpoint", digits_teacher_guide.guide)
    assert result.trainer.global_step == 4
    assert result.model.sample_shape == (1, 8, 8)


def test_data_free_gan_stage_reads_no_shard(digits_teacher_guide, tmp_path, monkeypatch):
    """configs/digits/finetune_adversarial_lmd.yaml with the data-free overrides of its header, on garbage
    shards: the discriminator's reals are drawn from a pool of the teacher's samples and the states are the
    student's, so it trains."""
    data = _garbage_digits(digits_teacher_guide, tmp_path)
    monkeypatch.chdir(tmp_path)
    result = cli("fit", "--config", str(ROOT / "configs/digits/finetune_adversarial_lmd.yaml"), *QUIET,
                 "--trainer.max_steps", 4, "--model.init_args.init_checkpoint", "null",
                 "--model.init_args.states", "student", "--model.init_args.adv_real", "teacher",
                 "--model.init_args.adv_real_steps", 2, "--model.init_args.adv_real_pool", 16,
                 "--data", "flowmap_lit.data.PriorDataModule", "--data.init_args.source",
                 "flowmap_lit.data.DigitsDataModule", "--data.init_args.source.init_args.root", data,
                 "--data.init_args.batch_size", 8,
                 "--model.init_args.teacher.init_args.checkpoint", digits_teacher_guide.teacher,
                 "--model.init_args.guide.init_args.checkpoint", digits_teacher_guide.guide)
    assert result.trainer.global_step == 4  # 2 batches: a discriminator and a student step each
    assert result.model.adv_real == "teacher" and result.model.sample_shape == (1, 8, 8)
    pool = result.model._real_pool  # made by the fit's first batch
    assert pool is not None and pool[0].shape == (16, 1, 8, 8) and pool[1].tolist() == [i % 10 for i in range(16)]


def test_corrector_config_runs_from_a_distilled_checkpoint_and_resumes_exactly(quickstart, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = straight_and_resumed(ROOT / "configs/digits/finetune_corrector.yaml", quickstart, tmp_path, 6, 3)
    assert a["global_step"] == b["global_step"] == 6  # 6 batches: the fake velocity's steps are not counted
    assert any(k.startswith("fake.") for k in a["state_dict"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for key, value in a["callbacks"]["EMA"]["shadow"].items():
        assert torch.equal(value, b["callbacks"]["EMA"]["shadow"][key]), key
    assert len(a["optimizer_states"]) == 2


def test_the_learning_rate_schedule_counts_batches():
    from types import SimpleNamespace

    from tests.modules.test_finetune import _modules as finetune_modules

    dm, plain = _modules(fake_updates=3, lr_schedule="linear")
    ft, _ = finetune_modules()
    for module in (dm, plain, ft):
        module._trainer = SimpleNamespace(max_steps=40)
    # the corrector's fake steps are not counted in global_step; the finetune's discriminator steps are
    assert dm.schedule_length() == 40 and plain.schedule_length() == 40 and ft.schedule_length() == 20


def test_dm_lr_scale_lowers_the_students_learning_rate_from_dm_start():
    from types import SimpleNamespace

    dm, _ = _modules(dm_start=2, dm_lr_scale=0.1, lr_warmup_steps=0)
    dm._trainer = SimpleNamespace(max_steps=10)
    (student_opt, _), (sched,) = dm.configure_optimizers()
    lrs = []
    for _ in range(4):
        lrs.append(student_opt.param_groups[0]["lr"])
        sched["scheduler"].step()
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    with pytest.raises(ValueError, match="dm_lr_scale"):
        _modules(dm_lr_scale=0.0)


def test_a_student_copy_fake_starts_as_the_student_is_at_dm_start():
    dm, plain = _modules(dm_start=1, fake_init="student", fake_optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    _fit(dm, max_steps=2)  # batch 0: plain distillation; batch 1: the fake is copied, then the corrector runs
    _fit(plain, max_steps=1)  # the student after batch 0
    for (name, a), b in zip(dm.fake.named_parameters(), plain.student.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
