"""One AYF-EMD training step under a Lightning strategy, for the distributed parity tests.

``one_step(strategy, backend)``: ``strategy`` is single, ddp or fsdp; ``backend`` a JVP backend, or ``gan``: one
batch of the adversarial finetune (a discriminator step and a student step, ``func`` JVP), which also
returns the discriminator's weights, or ``gan_steps``: the same with the student's own 1- and 2-step samples
as the fakes (``adv_steps``), or ``dm``: one batch of the distribution-matching corrector (a fake-velocity
step and a student step), which also returns the fake velocity's weights.

It builds the same tiny U-Net teacher, guide and student (seeded), trains one SGD step on a fixed global
batch of 8 (rank r of w gets samples [r * 8/w, (r+1) * 8/w)), and returns, on rank 0, the student's weights
before and after, and the EMA weights. ``tests/modules/test_distributed.py`` compares the single-process step
in its own process with the DDP and FSDP2 steps of the ``two_process`` launch (``two_process.py``).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from flowmap_lit.callbacks import EMA
from flowmap_lit.distributed import full_tensor, is_sharded
from flowmap_lit.modules import AdversarialFinetuneModule, DistributionMatchingModule, FlowMapDistillModule
from flowmap_lit.networks import Discriminator, build_network
from flowmap_lit.objectives import AYFEMD
from flowmap_lit.teachers import NetworkTeacher

GLOBAL_BATCH = 8
BACKENDS = ["func", "forward_ad", "finite_difference"]
GAN = "gan"
GAN_STEPS = "gan_steps"
DM = "dm"
AUX = {GAN: "discriminator", GAN_STEPS: "discriminator", DM: "fake"}  # the second network of each two-network module


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)


class FixedBatch(pl.LightningDataModule):
    """This rank's contiguous part of the fixed global batch, as a one-batch loader."""

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        n = GLOBAL_BATCH // world
        x, y = global_batch()
        batch = {"x": x[rank * n:(rank + 1) * n], "label": y[rank * n:(rank + 1) * n]}
        return torch.utils.data.DataLoader([batch], batch_size=None)


def perturbed(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``net`` with seeded noise on every weight (the zero-initialized output gain included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def build_module(backend: str) -> FlowMapDistillModule:
    torch.manual_seed(0)
    teacher = NetworkTeacher(net=perturbed(build_network("unet", "tiny", num_classes=10), 2), num_classes=10)
    guide = NetworkTeacher(net=perturbed(build_network("unet", "tiny", num_classes=10, model_channels=16), 3),
                           num_classes=10)
    common = dict(teacher=teacher, guide=guide, guidance="autoguidance", guidance_min=1.0, guidance_max=2.0,
                  condition_on_guidance=True, num_classes=10, warmup_steps=0, noise_seed=0,
                  optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    if backend in (GAN, GAN_STEPS):  # groups of 4 in the minibatch-std layer: the same groups on 1 and 2 ranks
        disc = Discriminator(img_channels=1, img_resolution=8, channels=[16, 16], num_classes=10, mbstd_group=4)
        # fakes from x_t at t = 1 or 0.5, or the student's own 1- and 2-step samples from noise
        fakes = {"adv_times": [1.0, 0.5]} if backend == GAN else {"adv_steps": [1, 2]}
        return AdversarialFinetuneModule(
            discriminator=disc, objective=AYFEMD(jvp_backend="func"), adv_weight=0.5, **fakes,
            discriminator_optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **common)
    if backend == DM:
        return DistributionMatchingModule(
            objective=AYFEMD(jvp_backend="func"), dm_weight=0.5, dm_steps=[2], fake_init="teacher",
            fake_optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **common)
    return FlowMapDistillModule(objective=AYFEMD(jvp_backend=backend), **common)


def strategy_for(name: str, backend: str = "func"):
    if name == "single":
        return "auto", 1
    if name == "ddp":  # the finetune's two backward passes per step use different parameters
        return ("ddp_find_unused_parameters_true" if backend in AUX else "ddp"), 2
    if name == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), 2
    raise ValueError(name)


def one_step(strategy_name: str, backend: str) -> dict | None:
    """Train one step; returns {before, after, ema} (whole tensors), whether the student was sharded
    and the world size on rank 0; None elsewhere."""
    module = build_module(backend)
    before = {k: v.detach().clone() for k, v in module.student.state_dict().items()}
    aux = getattr(module, AUX[backend]) if backend in AUX else None
    aux_before = {k: v.detach().clone() for k, v in aux.state_dict().items()} if aux is not None else None
    strategy, devices = strategy_for(strategy_name, backend)
    ema = EMA(decay=0.9, warmup=False)
    # the finetune counts both optimizers' steps, the corrector the student's
    steps = 2 if backend in (GAN, GAN_STEPS) else 1
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, use_distributed_sampler=False, callbacks=[ema])
    trainer.fit(module, FixedBatch())
    sharded = any(is_sharded(v) for v in module.student.state_dict().values())
    after = {k: full_tensor(v.detach()).clone() for k, v in module.student.state_dict().items()}
    shadow = ema.state_dict()["shadow"]
    result = {"before": before, "after": after, "ema": shadow, "sharded": sharded, "world_size": trainer.world_size}
    if aux is not None:
        result["aux_before"] = aux_before
        result["aux_after"] = {k: v.detach().clone() for k, v in aux.state_dict().items()}
    return result if trainer.is_global_zero else None
