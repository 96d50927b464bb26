"""Adversarial finetuning of a distilled flow map: AYF-EMD plus a relativistic GAN loss.

``AdversarialFinetuneModule`` is a ``FlowMapDistillModule`` (same teacher, guide, objective and
noise) with a discriminator and a second optimizer, trained by Lightning manual optimization.
Each batch:

1. **Fakes.** For every data sample ``x0`` (class ``c``) draw a start time ``t`` from
   ``adv_times`` and noise ``z``; the fake is the student's jump to data,
   ``x_f = f(x_t, t, 0)`` with ``x_t = (1 - t) x0 + t z`` (``t = 1``: a 1-step sample from pure
   noise), at the guidance scale ``adv_guidance``. The real partner is ``x0`` itself. With
   ``adv_real: teacher`` no data is read: ``x0`` is the guided teacher's ODE sample
   (``adv_real_steps`` Heun steps) from fresh noise, for the batch's labels (or drawn ones), so the
   discriminator judges the student against the teacher's distribution (``adv_real_pool``: drawn
   from a pool of teacher samples made once, a finite set like a dataset); with a data-free
   ``states`` the whole finetune reads no data (docs/design.md section 13). With ``adv_steps``
   the fakes are the student's own ``k``-step samples from pure noise instead, ``k`` drawn per
   sample from the list (the first ``k - 1`` jumps without grad), so the step counts that the
   student serves are judged on their own paths.
2. **Discriminator step** (``discriminator_optimizer``): RpGAN loss ``softplus(D(x_f) - D(x0))``
   with R1/R2 penalties (``flowmap_lit.objectives.adversarial.RpGAN``).
3. **Generator step** (the module's ``optimizer``):
   ``distill_weight * L_distill + w * softplus(D(x0) - D(x_f))``, where ``L_distill`` is the
   configured objective's loss on its own ``(x_t, t, s)`` draw and ``w`` is ``adv_weight`` or,
   with ``adaptive_weight``, ``adv_weight * ||grad_W L_distill|| / ||grad_W L_adv||`` at the
   student's last layer ``W`` (VQGAN-style balancing, clamped to ``adaptive_weight_max``).

Start from a distilled checkpoint with ``init_checkpoint`` (EMA weights by default); resuming
with ``--ckpt_path`` restores both networks and both optimizers instead.

Lightning counts every ``optimizer.step()`` of manual optimization as a global step, so one batch
advances ``trainer.global_step`` by 2: ``max_steps``, ``every_n_train_steps`` and the EMA's
``update_every`` count both updates (``max_steps: 1000`` is 500 batches). The tangent warmup
``r`` counts batches.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from flowmap_lit.interpolant import expand_like, interpolate
from flowmap_lit.modules.common import save_plain_hyperparameters
from flowmap_lit.modules.two_player import TwoNetworkModule, last_layer_weight, load_student_state
from flowmap_lit.objectives.adversarial import RpGAN
from flowmap_lit.seeding import derive_seed

POOL_SEED_TAG = 0x5EA1  # the teacher-real pool's noise is drawn from derive_seed(noise_seed, POOL_SEED_TAG)

__all__ = ["AdversarialFinetuneModule", "last_layer_weight", "load_student_state"]


class AdversarialFinetuneModule(TwoNetworkModule):
    """Distillation objective plus RpGAN against a discriminator, two optimizers (see module docstring).

    Takes every FlowMapDistillModule argument too (teacher, objective, student, guide, optimizer, ...,
    described there); its optimizer is the student's, and warmup_steps counts batches.

    Args:
        discriminator: The discriminator D(x, class_labels) -> (B,) logits, e.g.
            flowmap_lit.networks.Discriminator; trained by discriminator_optimizer.
        adversarial: The GAN loss with its R1/R2 gradient penalties (flowmap_lit.objectives.RpGAN);
            None: RpGAN() (r1_gamma = r2_gamma = 1).
        discriminator_optimizer: Optimizer factory (class_path/init_args) of the discriminator's
            parameters, stepped once per batch before the student's step; it has no learning-rate
            schedule (the student's optimizer keeps lr_warmup_steps and lr_schedule).
        adv_weight: Weight w of the adversarial loss in the student's step; with adaptive_weight,
            the base that the ratio of gradient norms multiplies.
        adaptive_weight: Scale adv_weight by ||grad_W L_distill|| / ||grad_W L_adv|| at the student's
            last layer W (VQGAN-style balancing); needs an unsharded student (not under FSDP2).
        adaptive_weight_max: Upper clamp of the adaptive weight.
        adaptive_weight_param: Name of the student parameter W of the adaptive weight (as in
            student.named_parameters()); None: its last parameter with at least 2 dimensions.
        distill_weight: Weight of the distillation loss in the student's step; 0: a pure GAN
            finetune (the distillation loss is then not computed).
        adv_times: Start times t in (0, 1] of the fakes f(x_t, t, 0), one drawn uniformly from the
            list per sample; None: [1.0] (1-step samples from pure noise).
        adv_steps: Step counts k of the fakes instead of adv_times: each fake is the student's k-step
            sample from pure noise (k drawn uniformly from the list per sample; the k-step grid is the
            tuned one of schedules where there is one, else uniform; the last jump carries the
            gradient). None: use adv_times. [1] equals adv_times [1.0].
        adv_guidance: Guidance scale lam of the fakes (and of the teacher's reals); None:
            eval_guidance.
        adv_real: What the discriminator takes as real: "data" (the batch's x) or "teacher" (the
            guided teacher's ODE samples at adv_guidance, made each batch from fresh noise; no data
            read, for data-free finetuning with states: student or teacher).
        adv_real_steps: Heun steps (EDM schedule) of the teacher's reals; 2 * steps calls of the
            guided teacher per batch.
        adv_real_pool: With adv_real teacher: above 0, the reals are drawn (uniformly, per batch) from
            a pool of this many teacher samples made once, at the first batch, from noise seeded by
            noise_seed, with balanced labels (sample i of class i % num_classes); made again the same
            way on resume. The pool's cost is that of adv_real_pool / batch_size batches of fresh
            reals; like a dataset, it is a finite set the discriminator sees many times. 0: fresh
            reals every batch.
        init_checkpoint: A FlowMapDistillModule checkpoint (file or sharded FSDP2 directory) whose
            student weights the student starts from; None: the student as FlowMapDistillModule
            builds it. Resuming with --ckpt_path restores both networks and optimizers instead.
        init_use_ema: Take the EMA weights of init_checkpoint when it has them; false: its raw
            student weights.
        allow_pickle: Load init_checkpoint with weights_only=False (trusted files only).
    """

    def __init__(
        self,
        discriminator: nn.Module,
        adversarial: RpGAN | None = None,
        discriminator_optimizer: OptimizerCallable = torch.optim.Adam,
        adv_weight: float = 0.1,
        adaptive_weight: bool = False,
        adaptive_weight_max: float = 10.0,
        adaptive_weight_param: str | None = None,
        distill_weight: float = 1.0,
        adv_times: list[float] | None = None,
        adv_steps: list[int] | None = None,
        adv_guidance: float | None = None,
        adv_real: Literal["data", "teacher"] = "data",
        adv_real_steps: int = 16,
        adv_real_pool: int = 0,
        init_checkpoint: str | None = None,
        init_use_ema: bool = True,
        allow_pickle: bool = False,
        **kwargs,  # every FlowMapDistillModule argument (teacher, objective, student, guide, ...)
    ) -> None:
        super().__init__(discriminator_optimizer, init_checkpoint, init_use_ema, allow_pickle, **kwargs)
        save_plain_hyperparameters(self)
        self.discriminator = discriminator
        self.adversarial = adversarial if adversarial is not None else RpGAN()
        self.adv_weight, self.adaptive_weight = adv_weight, adaptive_weight
        self.adaptive_weight_max, self.adaptive_weight_param = adaptive_weight_max, adaptive_weight_param
        self.distill_weight = distill_weight
        self.check_weights(distill_weight, adaptive_weight)
        self.adv_times = [1.0] if adv_times is None else [float(t) for t in adv_times]
        if not self.adv_times or any(not 0.0 < t <= 1.0 for t in self.adv_times):
            raise ValueError(f"adv_times must be a non-empty list of times in (0, 1], got {adv_times}")
        if adv_steps is not None and adv_times is not None:
            raise ValueError("give adv_times (fakes from noised data) or adv_steps (the student's k-step samples "
                             "from noise), not both")
        if adv_steps is not None and (not adv_steps or min(adv_steps) < 1):
            raise ValueError(f"adv_steps must be a non-empty list of step counts >= 1, got {adv_steps}")
        self.adv_steps = None if adv_steps is None else [int(k) for k in adv_steps]
        self.adv_guidance = adv_guidance
        if adv_real not in ("data", "teacher"):
            raise ValueError(f"adv_real must be 'data' or 'teacher', got {adv_real!r}")
        if adv_real_steps < 1:
            raise ValueError(f"adv_real_steps must be >= 1, got {adv_real_steps}")
        self.adv_real, self.adv_real_steps = adv_real, adv_real_steps
        if adv_real_pool < 0:
            raise ValueError(f"adv_real_pool must be >= 0 (0: fresh teacher reals every batch), got {adv_real_pool}")
        if adv_real_pool and adv_real != "teacher":
            raise ValueError("adv_real_pool is a pool of teacher samples: it needs adv_real: teacher (with adv_real: "
                             "data the reals are the batch's data)")
        self.adv_real_pool = adv_real_pool
        self._real_pool: tuple[Tensor, Tensor | None] | None = None  # (samples, labels), made at the first batch
        self.init_student()

    # --- the pieces of a step ----------------------------------------------------------------------
    aux_name = "discriminator"
    progress_keys = ("adv_g",)

    def adversarial_noise(self, x0: Tensor, generator: torch.Generator | None = None, rank: int = 0,
                          world_size: int = 1) -> tuple[Tensor, Tensor]:
        """``(t, z)`` of this rank's fakes, drawn for the global batch like ``draw_noise``; with
        ``adv_steps``, ``t`` holds each fake's step count ``k``."""
        n = x0.shape[0]
        total, part = n * world_size, slice(rank * n, (rank + 1) * n)
        times = torch.tensor(self.adv_times if self.adv_steps is None else self.adv_steps, device=x0.device)
        t = times[torch.randint(len(times), (total,), device=x0.device, generator=generator)]
        z = torch.randn((total, *x0.shape[1:]), device=x0.device, generator=generator, dtype=x0.dtype)
        return t[part], z[part]

    @torch.no_grad()
    def reals(self, batch: dict, generator: torch.Generator | None = None, rank: int = 0,
              world_size: int = 1) -> tuple[Tensor, Tensor | None]:
        """``(x0, labels)``: the batch's data and labels, or (``adv_real: teacher``) the guided teacher's
        ODE samples from noise drawn for the global batch, for the batch's labels or uniformly drawn ones."""
        if self.adv_real == "data":
            if batch.get("x") is None:
                raise ValueError("the batch holds no data 'x' for the discriminator's reals: set "
                                 "model.init_args.adv_real: teacher to judge against the teacher's samples instead")
            return batch["x"], batch.get("label")
        if batch.get("cond"):
            raise ValueError("adv_real: teacher makes class-conditional reals; text conditioning (batch 'cond') "
                             "is not supported: use adv_real: data")
        template = self.batch_template(batch)
        n = template.shape[0]
        if self.adv_real_pool:
            pool, pool_labels = self.real_pool(tuple(template.shape[1:]), template.dtype)
            idx = torch.randint(len(pool), (n * world_size,), device=template.device,
                                generator=generator)[rank * n:(rank + 1) * n]
            return pool[idx.to(pool.device)], None if pool_labels is None else pool_labels[idx.to(pool.device)]
        labels = batch.get("label")
        if labels is None:
            labels = self.draw_labels(n, generator, rank, world_size)
        z = torch.randn((n * world_size, *template.shape[1:]), device=template.device, generator=generator)
        z = z[rank * n:(rank + 1) * n].to(template.dtype)
        guidance = self.eval_guidance if self.adv_guidance is None else self.adv_guidance
        return self.teacher_sample(z, labels, self.adv_real_steps, guidance), labels

    @torch.no_grad()
    def real_pool(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor | None]:
        """``(samples, labels)``: the ``adv_real_pool`` guided teacher samples (``adv_real_steps`` Heun steps
        from noise seeded by ``noise_seed``; sample ``i`` of class ``i % num_classes``), made on the first
        call. Every rank makes the whole pool from the same noise, so the pools are equal."""
        if self._real_pool is None:
            n = self.adv_real_pool
            gen = torch.Generator().manual_seed(derive_seed(self.noise_seed, POOL_SEED_TAG))
            z = torch.randn((n, *shape), generator=gen).to(self.device, dtype)
            labels = torch.arange(n, device=self.device) % self.num_classes if self.num_classes > 0 else None
            guidance = self.eval_guidance if self.adv_guidance is None else self.adv_guidance
            chunk = 256
            samples = torch.cat([self.teacher_sample(z[i:i + chunk], None if labels is None else labels[i:i + chunk],
                                                     self.adv_real_steps, guidance) for i in range(0, n, chunk)])
            self._real_pool = (samples, labels)
        return self._real_pool

    def fakes(self, x0: Tensor, labels: Tensor | None, t: Tensor, z: Tensor,
              cond: dict[str, Tensor] | None = None) -> Tensor:
        """The student's jump to data from ``x_t = (1 - t) x0 + t z``: ``f(x_t, t, 0)`` (with grad); with
        ``adv_steps`` (``t`` the step counts), its ``t``-step samples from ``z``."""
        lam = self._guidance(x0.shape[0], self.eval_guidance if self.adv_guidance is None else self.adv_guidance)
        if self.adv_steps is not None:
            out = torch.zeros_like(z)
            for k in sorted(set(self.adv_steps)):
                idx = (t == k).nonzero().squeeze(1)
                # a step count that no sample of this rank drew still runs, on one sample that counts zero:
                # every rank then makes the same student passes (FSDP2 gathers the weights in each one)
                part = idx if len(idx) else torch.zeros(1, dtype=torch.long, device=z.device)
                x = self.student_samples(z[part], k, None if labels is None else labels[part],
                                         None if lam is None else lam[part],
                                         None if cond is None else {key: v[part] for key, v in cond.items()})
                out = out.index_put((idx,), x.to(out.dtype)) if len(idx) else out + 0 * x.sum()
            return out
        x_t = interpolate(x0, z, t)
        F = self.student_fn(labels, lam, cond)(x_t, t, torch.zeros_like(t))
        return x_t - expand_like(t, x_t).to(F.dtype) * F

    def discriminator_fn(self, labels: Tensor | None):
        labels = self._labels(labels)
        return lambda x: self.discriminator(x, labels)

    def balance(self, distill: Tensor, adv: Tensor) -> Tensor:
        """The weight ``w`` of the adversarial loss (a detached scalar)."""
        return super().balance(distill, adv, self.adv_weight, self.adaptive_weight, self.adaptive_weight_max,
                               self.adaptive_weight_param)

    def _skip_nonfinite(self, loss: Tensor, what: str) -> bool:
        return self.skip_nonfinite(loss, f"the {what}", "Lower the learning rates or adv_weight, raise "
                                   "r1_gamma/r2_gamma, or set nan_mask: true to drop bad samples of the "
                                   "distillation loss.")

    # --- the step ---------------------------------------------------------------------------------
    def adversarial_step(self, batch: dict, g_opt, d_opt, backward, generator: torch.Generator | None = None,
                         rank: int = 0, world_size: int = 1) -> tuple[Tensor, dict] | None:
        """One batch: fakes, the discriminator step, then the student step (see the module docstring).

        ``backward(loss)`` runs the backward pass (``manual_backward`` under Lightning). Returns the
        student's loss and the stats to log, or None when the student step was skipped (non-finite).
        """
        x0, labels = self.reals(batch, generator, rank, world_size)
        d = self.discriminator_fn(labels)
        distill, stats = self.distill_term(batch, generator, rank, world_size)
        t_adv, z = self.adversarial_noise(x0, generator, rank, world_size)
        fake = self.fakes(x0, labels, t_adv, z, batch.get("cond"))

        # Discriminator step (the fakes are detached inside the loss).
        d_loss, d_stats = self.adversarial.discriminator_loss(d, x0, fake, step=self.batches_done())
        d_loss = d_loss.mean()
        if not self._skip_nonfinite(d_loss, "discriminator"):
            d_opt.zero_grad(set_to_none=True)
            backward(d_loss)
            self.sync_aux_grads()
            self.step_aux(d_opt)

        # Student step against the updated discriminator (whose weights get no gradient here).
        self.discriminator.requires_grad_(False)
        try:
            adv = self.adversarial.generator_loss(d, x0, fake).mean()
        finally:
            self.discriminator.requires_grad_(True)
        w = self.balance(distill, adv)
        loss = self.distill_weight * distill + w * adv
        if self._skip_nonfinite(loss, "generator"):
            return None
        g_opt.zero_grad(set_to_none=True)
        backward(loss)
        g_opt.step()
        stats = {**stats, **d_stats, "loss": distill.detach(), "adv_g": adv.detach(), "adv_weight": w,
                 "d_loss": d_loss.detach()}
        return loss.detach(), stats

    two_network_step = adversarial_step
