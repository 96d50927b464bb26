"""Flow-map distillation with a distribution-matching corrector (docs/design.md section 13).

``DistributionMatchingModule`` is a ``FlowMapDistillModule`` (same teacher, guide, objective,
noise and data-free ``states``) with a *fake velocity* network ``g`` and a second optimizer,
trained by Lightning manual optimization. Each batch:

1. **Student samples.** From noise ``z`` (labels from the batch, or drawn uniformly; guidance
   scales drawn like the distillation's, or ``dm_guidance``) the student makes ``k``-step samples
   ``x_hat``, ``k`` drawn from ``dm_steps``: the first ``k - 1`` jumps without grad (the state it
   reaches is its own), the last jump to ``s = 0`` with grad.
2. **Fake step(s)** (``fake_optimizer``, ``fake_updates`` times): flow matching of ``g(x, r)`` on
   ``x_hat`` (detached) re-noised to ``r`` (``DistributionMatching.fake_loss``), so ``g`` tracks
   the velocity of the student's own distribution.
3. **Student step** (the module's ``optimizer``): ``distill_weight * L_distill + w * L_dm``, where
   ``L_distill`` is the configured objective on its own ``(x_t, t, s)`` draw and ``L_dm`` the
   corrector (``DistributionMatching.student_loss``: the student's samples follow
   ``r (v - g)``, the difference of the teacher's and the fake's data predictions, normalized per
   sample); ``w`` is ``dm_weight`` or, with ``adaptive_weight``, ``dm_weight * ||grad_W L_distill|| /
   ||grad_W L_dm||`` at the student's last layer ``W``.

Two uses: a second stage from a distilled checkpoint (``init_checkpoint``, e.g.
``configs/digits/finetune_corrector.yaml``), or a term mixed into distillation from the start
(``dm_start`` batches of plain distillation first). Resuming with ``--ckpt_path`` restores the
student, the fake velocity and both optimizers. The fake velocity starts as a copy of the
teacher's network (read at ``s = t``, its gap and guidance embeddings zeroed) or of the student.

The fake velocity's optimizer steps through the strategy (and its precision plugin) without counting
in ``trainer.global_step``, so ``global_step`` counts batches, one student step each, as in plain
distillation: ``max_steps``, ``dm_start``, the tangent warmup, the learning-rate schedule,
checkpoint intervals and the EMA's ``update_every`` all count batches.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from flowmap_lit.modules.common import save_plain_hyperparameters
from flowmap_lit.modules.two_player import TwoNetworkModule
from flowmap_lit.objectives.distribution_matching import DistributionMatching


class DistributionMatchingModule(TwoNetworkModule):
    """Distillation objective plus the distribution-matching corrector (see the module docstring).

    Takes every FlowMapDistillModule argument too (teacher, objective, student, guide, states,
    optimizer, ...); its optimizer is the student's, and warmup_steps counts batches.

    Args:
        corrector: The corrector's noise levels and normalization
            (flowmap_lit.objectives.DistributionMatching); None: DistributionMatching(), r uniform
            in [0.02, 0.98] with DMD2's normalization.
        fake: The fake velocity network g(x, t, s, class_labels, guidance, **cond), read at s = t;
            None: a copy of the network fake_init names.
        fake_init: What the fake velocity starts as: "teacher" (a copy of the teacher's network, its
            s and guidance embeddings zeroed: the teacher's velocity), "student" (a copy of the
            student as it is at dm_start, whose F(x, t, t) is the guided velocity it has learned) or
            "auto" (the teacher's network where there is one, else the student).
        fake_optimizer: Optimizer factory (class_path/init_args) of the fake velocity's parameters;
            no learning-rate schedule.
        fake_updates: Fake-velocity steps per student step (a faster fake tracks the student's
            distribution more closely).
        dm_weight: Weight w of the corrector loss in the student's step; with adaptive_weight the
            base that the ratio of gradient norms multiplies.
        adaptive_weight: Scale dm_weight by ||grad_W L_distill|| / ||grad_W L_dm|| at the student's
            last layer W; needs an unsharded student.
        adaptive_weight_max: Upper clamp of the adaptive weight.
        adaptive_weight_param: Name of the student parameter W of the adaptive weight; None: its last
            trainable parameter with at least 2 dimensions.
        distill_weight: Weight of the distillation loss in the student's step; 0: the corrector
            alone (the distillation loss is then not computed).
        dm_steps: Step counts k of the student's sampling paths that the corrector acts on, one
            drawn per batch; the k-step grid is the tuned one of schedules where there is one, else
            uniform. None: [1] (1-step samples).
        dm_guidance: Guidance scale lam of the corrector's samples; None: drawn per sample like the
            distillation's (from [guidance_min, guidance_max]).
        dm_start: Batches of plain distillation before the corrector and the fake velocity start.
        dm_lr_scale: Factor on the student's learning rate from dm_start on (on top of its schedule):
            the corrector moves the samples, and a fake velocity that must keep up with them wants a
            slower student (docs/design.md section 13).
        init_checkpoint: A FlowMapDistillModule checkpoint (file or sharded FSDP2 directory) whose
            student weights the student starts from (a second stage); None: the student as
            FlowMapDistillModule builds it. Resuming with --ckpt_path restores both networks and
            optimizers instead.
        init_use_ema: Take the EMA weights of init_checkpoint when it has them; false: its raw
            student weights.
        allow_pickle: Load init_checkpoint with weights_only=False (trusted files only).
    """

    aux_name = "fake"
    count_aux_steps = False  # global_step counts batches (the student's steps), as in plain distillation
    progress_keys = ("dm",)

    def __init__(
        self,
        corrector: DistributionMatching | None = None,
        fake: nn.Module | None = None,
        fake_init: Literal["auto", "teacher", "student"] = "auto",
        fake_optimizer: OptimizerCallable = torch.optim.Adam,
        fake_updates: int = 1,
        dm_weight: float = 1.0,
        adaptive_weight: bool = False,
        adaptive_weight_max: float = 10.0,
        adaptive_weight_param: str | None = None,
        distill_weight: float = 1.0,
        dm_steps: list[int] | None = None,
        dm_guidance: float | None = None,
        dm_start: int = 0,
        dm_lr_scale: float = 1.0,
        init_checkpoint: str | None = None,
        init_use_ema: bool = True,
        allow_pickle: bool = False,
        **kwargs,  # every FlowMapDistillModule argument (teacher, objective, student, guide, ...)
    ) -> None:
        super().__init__(fake_optimizer, init_checkpoint, init_use_ema, allow_pickle, **kwargs)
        save_plain_hyperparameters(self)
        if fake_updates < 1:
            raise ValueError(f"fake_updates must be >= 1, got {fake_updates}")
        if fake_init not in ("auto", "teacher", "student"):
            raise ValueError(f"fake_init must be 'auto', 'teacher' or 'student', got {fake_init!r}")
        self.dm_steps = [1] if dm_steps is None else [int(k) for k in dm_steps]
        if not self.dm_steps or min(self.dm_steps) < 1:
            raise ValueError(f"dm_steps must be a non-empty list of step counts >= 1, got {dm_steps}")
        if dm_start < 0:
            raise ValueError(f"dm_start must be >= 0 batches, got {dm_start}")
        self.corrector = corrector if corrector is not None else DistributionMatching()
        self.fake_updates, self.dm_weight, self.distill_weight = fake_updates, dm_weight, distill_weight
        self.check_weights(distill_weight, adaptive_weight)
        self.adaptive_weight, self.adaptive_weight_max = adaptive_weight, adaptive_weight_max
        self.adaptive_weight_param = adaptive_weight_param
        if dm_lr_scale <= 0:
            raise ValueError(f"dm_lr_scale must be > 0, got {dm_lr_scale}")
        self.dm_guidance, self.dm_start, self.dm_lr_scale = dm_guidance, dm_start, dm_lr_scale
        self.init_student()
        self.fake = self._build_fake(fake, fake_init).train()
        # a copy of the student starts as the student is when the corrector starts, not as it was built
        self.fake_from_student = fake is None and (fake_init == "student" or self.teacher.network is None)

    def _build_fake(self, fake: nn.Module | None, fake_init: str) -> nn.Module:
        if fake is not None:
            return fake.requires_grad_(True)
        if self.shared_student:
            raise ValueError("a student that shares the teacher's weights (LoRA) has no network of its own to copy "
                             "into the fake velocity: give model.init_args.fake")
        network = self.teacher.network
        if fake_init == "teacher" and network is None:
            raise ValueError(f"fake_init: teacher needs a teacher with a network ({type(self.teacher).__name__} has "
                             "none): use fake_init: student (or auto)")
        if fake_init == "student" or network is None:
            return copy.deepcopy(self.student).requires_grad_(True)
        out = copy.deepcopy(network).requires_grad_(True)
        if hasattr(out, "zero_init_s_embedding"):  # read at s = t: F(x, t, t) = v(x, t) at the start
            out.zero_init_s_embedding()
        return out

    # --- the pieces of a step ----------------------------------------------------------------------
    def fake_fn(self, labels: Tensor | None, lam: Tensor | None, cond: dict[str, Tensor] | None = None):
        """``g(x, r)``: the fake velocity read at ``s = t`` with the student's conditioning bound."""
        lam_in = lam if self.condition_on_guidance else None
        kw = dict(class_labels=self._labels(labels), guidance=lam_in, **(cond or {}))
        return lambda x, r: self.fake(x, r, r, **kw)

    def corrector_inputs(self, template: Tensor, labels: Tensor | None, generator: torch.Generator | None,
                         rank: int, world_size: int) -> tuple[int, Tensor, Tensor | None, Tensor | None]:
        """``(k, z, labels, lam)``: the step count and this rank's part of the global batch's noise,
        labels (the batch's, or drawn) and guidance scales."""
        n = template.shape[0]
        total, part = n * world_size, slice(rank * n, (rank + 1) * n)
        k = self.dm_steps[int(torch.randint(len(self.dm_steps), (1,), generator=generator,
                                            device=template.device))]
        z = torch.randn((total, *template.shape[1:]), device=template.device, generator=generator)[part]
        if labels is None:
            labels = self.draw_labels(n, generator, rank, world_size)
        fixed = self.dm_guidance
        lam = self._guidance(total, fixed, generator)
        return k, z.to(template.dtype), labels, (lam[part] if lam is not None else None)

    def _draw(self, x: Tensor, generator: torch.Generator | None, rank: int, world_size: int):
        """The corrector's ``(r, eps)`` for this rank's part of the global batch."""
        n = x.shape[0]
        r, eps = self.corrector.draw(x.new_empty((n * world_size, *x.shape[1:])), generator)
        part = slice(rank * n, (rank + 1) * n)
        return r[part], eps[part]

    def _skip_nonfinite(self, loss: Tensor, what: str) -> bool:
        return self.skip_nonfinite(loss, f"the {what}", "Lower the learning rates or dm_weight, or raise "
                                   "fake_updates so the fake velocity keeps up with the student.")

    # --- the step ---------------------------------------------------------------------------------
    def corrector_step(self, batch: dict, student_opt, fake_opt, backward, generator: torch.Generator | None = None,
                       rank: int = 0, world_size: int = 1) -> tuple[Tensor, dict] | None:
        """One batch: student samples, the fake step(s), then the student step (module docstring).

        ``backward(loss)`` runs the backward pass (``manual_backward`` under Lightning). Returns the
        student's loss and the stats to log, or None when the student step was skipped (non-finite).
        """
        distill, stats = self.distill_term(batch, generator, rank, world_size)
        dm = torch.zeros((), device=distill.device)
        if self.batches_done() >= self.dm_start:
            if self.batches_done() == self.dm_start and self.dm_start > 0 and self.fake_from_student:
                self.fake.load_state_dict(self.student.state_dict())
            template = self.batch_template(batch)
            k, z, labels, lam = self.corrector_inputs(template, batch.get("label"), generator, rank, world_size)
            cond = batch.get("cond")
            x_hat = self.student_samples(z, k, labels, lam, cond)
            fake = self.fake_fn(labels, lam, cond)
            for _ in range(self.fake_updates):
                r, eps = self._draw(x_hat, generator, rank, world_size)
                fake_loss = self.corrector.fake_loss(fake, x_hat, r, eps).mean()
                fake_opt.zero_grad(set_to_none=True)
                if not self._skip_nonfinite(fake_loss, "fake velocity"):
                    backward(fake_loss)
                    self.sync_aux_grads()
                    self.step_aux(fake_opt)
            r, eps = self._draw(x_hat, generator, rank, world_size)
            dm_per_sample, dm_stats = self.corrector.student_loss(fake, self.teacher_fn(labels, lam, cond), x_hat,
                                                                  r, eps)
            dm = dm_per_sample.mean()
            stats.update(dm_stats, fake_loss=fake_loss.detach(), dm_steps=torch.tensor(float(k)))
        w = self.balance(distill, dm, self.dm_weight, self.adaptive_weight and dm.requires_grad,
                         self.adaptive_weight_max, self.adaptive_weight_param)
        loss = self.distill_weight * distill + w * dm
        if self._skip_nonfinite(loss, "student"):
            return None
        student_opt.zero_grad(set_to_none=True)
        backward(loss)
        student_opt.step()
        stats = {**stats, "loss": distill.detach(), "dm": dm.detach(), "dm_weight": w}
        return loss.detach(), stats

    two_network_step = corrector_step

    def configure_optimizers(self):
        optimizers, schedulers = super().configure_optimizers()
        if self.dm_lr_scale != 1.0:  # the schedule steps once per batch: scale it from batch dm_start on
            scheduler = schedulers[0]["scheduler"]
            base, start, scale = scheduler.lr_lambdas[0], self.dm_start, self.dm_lr_scale
            scheduler.lr_lambdas[0] = lambda step: base(step) * (scale if step >= start else 1.0)
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
        return optimizers, schedulers
