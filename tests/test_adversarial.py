"""Adversarial finetune: RpGAN + R1/R2 against closed forms, the discriminator, the two-optimizer
step (checked against the plain distillation step), starting from a checkpoint, and the CLI with exact resume."""

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flowmap_lit.modules.finetune import AdversarialFinetuneModule, last_layer_weight
from flowmap_lit.modules import FlowMapDistillModule
from flowmap_lit.networks import Discriminator
from flowmap_lit.objectives import AYFEMD, RpGAN
from flowmap_lit.teachers import NetworkTeacher
from helpers import MLPVelocity

ROOT = Path(__file__).resolve().parents[1]


class LinearD(nn.Module):
    """D(x) = w . x + b, whose input gradient is w everywhere."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, 1)

    def forward(self, x, class_labels=None):
        return self.lin(x.flatten(1)).squeeze(1)


def test_rpgan_losses_and_penalties_match_the_closed_form():
    torch.manual_seed(0)
    d = LinearD(4)
    real, fake = torch.randn(6, 1, 2, 2), torch.randn(6, 1, 2, 2) + 1.0
    loss, stats = RpGAN(r1_gamma=2.0, r2_gamma=0.5).discriminator_loss(d, real, fake)
    w2 = d.lin.weight.square().sum()
    expected = F.softplus(d(fake) - d(real)) + 0.5 * (2.0 + 0.5) * w2
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["r1"], w2.expand(6).mean())
    # The penalty is trained: d/dw of gamma/2 ||w||^2 is gamma * w.
    d.zero_grad()
    RpGAN(r1_gamma=2.0, r2_gamma=0.0).discriminator_loss(d, real, real.clone())[0].sum().backward()
    # (real == fake: the pair term's gradient sigmoid(0) * (fake - real) vanishes)
    torch.testing.assert_close(d.lin.weight.grad, 6 * 2.0 * d.lin.weight.detach())

    # Generator: the gradient reaches the fakes only, -sigmoid(D(r) - D(f)) * w per sample.
    fake_p = fake.clone().requires_grad_(True)
    RpGAN().generator_loss(d, real, fake_p).sum().backward()
    coef = -torch.sigmoid(d(real) - d(fake)).detach()
    torch.testing.assert_close(fake_p.grad.flatten(1), coef[:, None] * d.lin.weight.detach())


def test_r1_penalty_gradient_matches_finite_differences():
    torch.manual_seed(0)
    d = Discriminator(img_channels=1, img_resolution=8, channels=[8, 8], num_classes=3).double()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    fn = lambda v: d(v, labels)  # noqa: E731
    loss = lambda: RpGAN(r1_gamma=1.0, r2_gamma=0.0).discriminator_loss(fn, x, x)[0].sum()  # noqa: E731
    p = d.conv.weight
    (grad,) = torch.autograd.grad(loss(), p)
    idx, h = (0, 0, 1, 1), 1e-6
    p.data[idx] += h
    up = loss().detach()
    p.data[idx] -= 2 * h
    down = loss().detach()
    p.data[idx] += h
    fd = (up - down) / (2 * h)
    assert abs(grad[idx].item() - fd.item()) < 1e-6 * max(1.0, abs(fd.item()))


def test_discriminator_shapes_conditioning_and_errors():
    d = Discriminator(img_channels=4, img_resolution=16, num_classes=10)
    assert [b.conv1.out_channels for b in d.blocks] == [128, 256]
    x = torch.randn(6, 4, 16, 16)  # 6 is not a multiple of the minibatch-std group (4): group 2
    out = d(x, torch.arange(6))
    assert out.shape == (6,)
    assert not torch.allclose(out, d(x, torch.zeros(6, dtype=torch.long)))  # the class matters
    d(x)  # no labels: the null class
    with pytest.raises(ValueError, match="img_channels"):
        d(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="power of two"):
        Discriminator(img_resolution=12)
    with pytest.raises(ValueError, match="channels needs 3 entries"):
        Discriminator(img_resolution=16, channels=[8, 8])


def test_trained_discriminator_pushes_fakes_toward_the_data():
    torch.manual_seed(0)
    d = Discriminator(img_channels=1, img_resolution=4, channels=[16], mbstd_group=0)
    gan = RpGAN(r1_gamma=0.1, r2_gamma=0.1)
    opt = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.0, 0.99))
    for _ in range(100):
        real, fake = torch.randn(64, 1, 4, 4), torch.randn(64, 1, 4, 4) + 1.5
        opt.zero_grad()
        gan.discriminator_loss(d, real, fake)[0].mean().backward()
        opt.step()
    fake = (torch.randn(256, 1, 4, 4) + 1.5).requires_grad_(True)
    gan.generator_loss(d, torch.randn(256, 1, 4, 4), fake).mean().backward()
    assert fake.grad.mean() > 0  # gradient descent moves the fakes down, toward the data at 0


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


def test_finetune_config_runs_from_a_distilled_checkpoint_and_resumes_exactly(tmp_path):
    from test_cli import SMALL_CALLBACKS, _run, make_quickstart_checkpoint

    # checkpoints every 2 batches (4 optimizer steps), all kept
    callbacks = SMALL_CALLBACKS.replace("save_last: true}", "save_last: true, every_n_train_steps: 4, save_top_k: -1}")
    assert "every_n_train_steps" in callbacks

    distilled = make_quickstart_checkpoint(tmp_path, steps=2)
    digits = str(tmp_path / "digits")
    common = ["fit", "--config", str(ROOT / "configs/digits/finetune_adversarial.yaml"),
              "--model.init_args.init_checkpoint", str(distilled), "--trainer.logger", "false",
              "--trainer.val_check_interval", "4", "--data.init_args.batch_size", "64",
              "--model.init_args.teacher.init_args.data_root", digits,
              "--model.init_args.guide.init_args.data_root", digits, "--data.init_args.root", digits]
    runs = {}
    for name, steps, resume in (("straight", 8, None), ("killed", 4, None), ("killed", 8, "last")):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(callbacks % (tmp_path / name))
        extra = ["--ckpt_path", str(tmp_path / name / "last.ckpt")] if resume else []
        proc = _run(common + ["--config", str(cfg), "--trainer.max_steps", str(steps)] + extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Flow-map error at step" in proc.stdout + proc.stderr
        runs[name] = torch.load(tmp_path / name / "last.ckpt", weights_only=True, map_location="cpu")
    a, b = runs["straight"], runs["killed"]
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


def test_discriminator_on_decoded_images(tmp_path):
    """DecodeLatents: un-normalize with the dataset statistics, decode with a local VAE, and let the
    generator's gradient flow back through the frozen decoder to the latents."""
    import json

    pytest.importorskip("diffusers")
    from flowmap_lit.checkpoints.vae import load_vae
    from flowmap_lit.networks import DecodeLatents
    from helpers import tiny_vae

    tiny_vae(16).save_pretrained(tmp_path / "vae")
    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 1.0, 0.5, 1.5]
    (tmp_path / "stats.json").write_text(json.dumps({"mean": mean, "std": std}))
    decode = DecodeLatents(str(tmp_path / "vae"), stats_root=str(tmp_path), downsample=2)
    d = Discriminator(img_channels=3, img_resolution=8, channels=[8, 8], input_transform=decode)
    assert not any(k.startswith("input_transform.vae") for k in d.state_dict())  # the VAE is not checkpointed
    assert all(p.requires_grad for p in d.parameters())  # only D's own weights are parameters

    x = torch.randn(2, 4, 8, 8, requires_grad=True)  # normalized latents of 16 x 16 images
    ref_vae = load_vae(str(tmp_path / "vae"))
    z = x.detach() * torch.tensor(std).reshape(1, 4, 1, 1) + torch.tensor(mean).reshape(1, 4, 1, 1)
    expected = F.avg_pool2d(ref_vae.decode(z).sample, 2)
    torch.testing.assert_close(decode(x), expected)
    RpGAN().generator_loss(d, torch.randn(2, 4, 8, 8), x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="never downloads"):
        DecodeLatents(str(tmp_path / "missing"))


def test_lazy_penalties_apply_every_n_steps_scaled_up():
    torch.manual_seed(0)
    d = LinearD(4)
    real, fake = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    w2 = d.lin.weight.square().sum()
    pair = F.softplus(d(fake) - d(real))
    gan = RpGAN(r1_gamma=1.0, r2_gamma=1.0, penalty_every=4)
    on, stats_on = gan.discriminator_loss(d, real, fake, step=8)
    off, stats_off = gan.discriminator_loss(d, real, fake, step=9)
    torch.testing.assert_close(on, pair + 0.5 * 4 * (1.0 + 1.0) * w2)  # 4x the weight, every 4th step
    torch.testing.assert_close(off, pair)
    assert "r1" in stats_on and "r1" not in stats_off
    with pytest.raises(ValueError, match="penalty_every"):
        RpGAN(penalty_every=0)
