"""Flow-map distillation (``FlowMapDistillModule``): student, frozen teacher and guide, a selectable
objective (docs/design.md section 7)."""

from __future__ import annotations

import copy
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from flowmap_lit.distributed import apply_activation_checkpointing, data_parallel_mesh, is_sharded, shard_network
from flowmap_lit.interpolant import edm_schedule, expand_like, interpolate, uniform_schedule
from flowmap_lit.modules.common import (
    check_network_shape,
    data_info,
    resolve_noise_seed,
    save_plain_hyperparameters,
    seeded_rng,
    warmup_then_decay,
)
from flowmap_lit.objectives import Objective
from flowmap_lit.seeding import derive_seed
from flowmap_lit.solvers import gamma_sample, ode_sample
from flowmap_lit.teachers import Teacher, guided_velocity
from flowmap_lit.time_pairs import TimePairSampler


class BoundStudent:
    """``F(x, t, s)``: the student with its conditioning (labels, guidance, keyword inputs) bound.

    ``eager`` is the same function on the uncompiled network: the tangent pass differentiates that
    one, because ``torch.compile`` silently drops the custom forward-AD rules of an
    ``autograd.Function`` (docs/pitfalls.md; the chunked attention tangent is one) and falls back to eager
    under ``torch.func.jvp`` anyway.

    ``checkpointed``: the network recomputes its activations in the backward (activation
    checkpointing), or is sharded by FSDP2 (whose per-block forward hooks return views that a
    custom forward-AD rule cannot pass on): a one-pass tangent cannot go through either (the
    recomputation runs outside the forward-AD level). ``two_pass_only`` tells the objectives to
    take two passes: with a compiled network (only the two-pass form trains the compiled forward)
    or a checkpointed or sharded one.
    """

    def __init__(self, net: nn.Module, eager_net: nn.Module, kwargs: dict, checkpointed: bool = False) -> None:
        self.net, self.eager_net, self.kwargs, self.checkpointed = net, eager_net, kwargs, checkpointed

    def __call__(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        return self.net(x, t, s, **self.kwargs)

    @property
    def eager(self) -> BoundStudent:
        if self.net is self.eager_net:
            return self
        return BoundStudent(self.eager_net, self.eager_net, self.kwargs, self.checkpointed)

    @property
    def two_pass_only(self) -> bool:
        return self.checkpointed or self.net is not self.eager_net


class _CompileCache(dict):
    """Holds the compiled student; neither copied nor pickled with the module (rebuilt on first use)."""

    def __deepcopy__(self, memo) -> _CompileCache:
        return _CompileCache()

    def __reduce__(self):
        return (_CompileCache, ())


class FlowMapDistillModule(pl.LightningModule):
    """Distills a frozen (guided) teacher into a flow map ``f(x, t, s) = x + (s - t) F(x, t, s)``.

    One training step (docs/design.md sections 1-3): draw ``(t, s)`` from ``time_sampler`` (the
    objective may pin ``s``), noise the data, ``x_t = (1 - t) x0 + t eps``, draw the guidance scale
    ``lam`` per sample, and hand ``student(x, t, s)`` and the guided ``teacher(x, t)`` to the
    objective, with the tangent warmup ``r = min(r_max, step / warmup_steps)``.

    Args:
        teacher: The frozen velocity model v(x, t) that is distilled (NetworkTeacher,
            GMMTeacher, EDM2Teacher, DiffusersTeacher, SD3Teacher, ...). It is put in eval
            mode without grads and left out of the single-file checkpoints (rebuilt from its own source).
        objective: The distillation loss (flowmap_lit.objectives): AYFEMD, AYFLMD, SCD,
            FlowMatching or DiscreteEMD (docs/design.md section 3). Its trainable parameters
            (an adaptive weighting) are optimized with the student.
        student: The flow-map network F(x, t, s, class_labels, guidance, **cond) that is trained
            (MLP, DiT, EDM2UNet, LoRAFlowMap, ...). None: a copy of the teacher's network.
        guide: The weaker model of autoguidance (e.g. a NetworkTeacher of a smaller or less trained
            network, or a GMMTeacher with fewer or wider components), frozen like the teacher;
            required by guidance: autoguidance, unused otherwise.
        guidance: How the teacher velocity is guided (docs/design.md section 1): "autoguidance"
            (lam v_teacher + (1 - lam) v_guide), "cfg" (classifier-free guidance against the teacher
            at the null label, or at the empty prompt's embedding for text data) or "none" (the teacher
            alone; lam is not used).
        guidance_min: Lower end of the guidance scale lam, drawn per training sample from
            U[guidance_min, guidance_max]; equal ends give a fixed scale.
        guidance_max: Upper end of the range of lam (must be >= guidance_min); a range wider than
            one value needs condition_on_guidance: true.
        condition_on_guidance: Feed lam to the student as an input, so that one student covers the
            whole range and the scale is chosen again at sampling time (eval_guidance).
        eval_guidance: The guidance scale lam of sample() and of the evaluation callbacks when
            they give none; None: guidance_min.
        sample_gamma: Re-noising of the k-step sampler (gamma sampling, docs/design.md section 5), in
            [0, 1]: 0 is deterministic flow-map chaining, 1 the multistep sampling of consistency
            models (jump to the data, re-noise fully). A tuned schedule's own gamma takes precedence.
        num_classes: Number of classes of the data; labels reach the student and the teacher only
            when > 0. 0: unconditional.
        time_sampler: Sampler of the training time pairs (t, s) (TimePairSampler: logit-normal or
            uniform pairs plus fractions of s = t, s = 0, t = 1 and sampling-grid pairs,
            docs/design.md section 3); the objective may then pin s (SCD: s = 0, FlowMatching:
            s = t). None: TimePairSampler(), logit-normal pairs with P_mean -0.8 and P_std 1.
        warmup_steps: Length of the regularized tangent warmup in optimizer steps: the tangent
            coefficient r = min(r_max, step / warmup_steps) ramps linearly from 0 (docs/design.md
            section 3); 0: r = r_max from the first step. AdversarialFinetuneModule counts batches
            here (two optimizer steps each).
        r_max: Cap of the tangent warmup coefficient r; 1 - r_max keeps a pull toward the
            teacher velocity for the whole run.
        init_student_from_teacher: Copy the teacher network's weights into the given student (same
            architecture) and zero its s and guidance embeddings, so that F(x, t, s) = v(x, t)
            at step 0 (docs/design.md section 2); false: the student keeps its own initialization.
            A student with shares_teacher_weights (LoRAFlowMap) wraps the teacher's network
            instead, and a student of None is always such a copy.
        optimizer: Optimizer factory (class_path/init_args, e.g. torch.optim.Adam with
            lr) of the student's trainable parameters and the objective's; under
            AdversarialFinetuneModule the optimizer of the student (generator) step.
        lr_warmup_steps: Linear learning-rate warmup, in optimizer steps (batches under the
            two-network modules); 0: none.
        lr_schedule: The learning rate after the warmup (docs/design.md section 10): "constant", or a
            "cosine" or "linear" decay to lr_min_ratio at trainer.max_steps (which a decay needs).
        lr_decay_start: Fraction of the run, in [0, 1), after which the decay starts (not before the
            end of the warmup).
        lr_min_ratio: Learning rate at the last step of a decay, as a fraction of the optimizer's, in
            [0, 1].
        nan_mask: Drop only the samples whose loss is not finite (when some are finite) instead of
            skipping the whole step; the dropped fraction is logged as train/nonfinite_fraction.
        max_bad_steps: Consecutive steps with a non-finite loss (each one skipped) after which
            training stops with an error that says what to change (and whether the batch's inputs
            were finite); also how many consecutive steps over max_output_rms stop a run.
        max_output_rms: Divergence guard. The normalized tangent bounds the loss, so a student whose
            outputs explode still shows a small loss; its output RMS (logged as train/student_rms, with
            train/grad_norm and the raw and normalized tangent norms) does show it. Above this value
            for max_bad_steps consecutive steps training stops with an error. A flow map's output is
            an average velocity, of the order of the data's scale (about 1.4 for normalized data).
            None: no guard.
        noise_seed: Base seed of the per-step noise (times, noise, guidance scales, dropout), derived
            per (step, micro-batch) so a resumed run draws what the uninterrupted run drew; None: the
            run's seed_everything seed (0 without one).
        activation_checkpointing: Recompute the student's block activations in the backward pass
            (less memory, more compute); the objectives then take the tangent in two passes
            (tangent_pass: one_pass is refused).
        shard_teacher: Under ModelParallelStrategy (FSDP2), shard the frozen teacher and guide
            over the data-parallel ranks like the student; false: every rank holds them whole.
        schedules: A schedules file of tuned k-step time grids and gammas (written by python -m
            flowmap_lit schedule, docs/design.md section 11), used by sample() for the step
            counts it covers; None: uniform grids.
        compile_student: torch.compile the student's grad-enabled forward (and so its backward) in
            training; the tangent (JVP) pass stays eager, and tangent_pass: auto takes two passes
            (only they train the compiled forward).
        compile_options: Keyword arguments of torch.compile (mode, dynamic, fullgraph,
            ...); None: its defaults.
        states: Where the noisy points x_t of the objective come from (docs/design.md section 13):
            "data" (x_t = (1 - t) x0 + t eps from the batch's data), or data-free from noise z alone:
            "student" (x_t = f(z, 1, t), the student's own path, without grad) or "teacher" (the
            teacher's ODE from z at t = 1 down to t in state_steps Euler steps). The data-free
            states read no data: the batch needs only labels or text conditioning (or nothing),
            e.g. from flowmap_lit.data.PriorDataModule.
        state_steps: Euler steps of the teacher's ODE per sample for states: teacher.
        sample_shape: Shape [C, H, W] of one sample for data-free states; None: the data
            module's shape.
    """

    def __init__(
        self,
        teacher: Teacher,
        objective: Objective,
        student: nn.Module | None = None,
        guide: Teacher | None = None,
        guidance: Literal["autoguidance", "cfg", "none"] = "none",
        guidance_min: float = 1.0,
        guidance_max: float = 1.0,
        condition_on_guidance: bool = False,
        eval_guidance: float | None = None,
        sample_gamma: float = 0.0,
        num_classes: int = 0,
        time_sampler: TimePairSampler | None = None,
        warmup_steps: int = 1000,
        r_max: float = 0.99,
        init_student_from_teacher: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine", "linear"] = "constant",
        lr_decay_start: float = 0.0,
        lr_min_ratio: float = 0.0,
        nan_mask: bool = False,
        max_bad_steps: int = 10,
        max_output_rms: float | None = 100.0,
        noise_seed: int | None = None,
        activation_checkpointing: bool = False,
        shard_teacher: bool = True,
        schedules: str | None = None,
        compile_student: bool = False,
        compile_options: dict | None = None,
        states: Literal["data", "student", "teacher"] = "data",
        state_steps: int = 8,
        sample_shape: list[int] | None = None,
    ) -> None:
        super().__init__()
        save_plain_hyperparameters(self)
        if guidance_max < guidance_min:
            raise ValueError(f"guidance_max ({guidance_max}) < guidance_min ({guidance_min})")
        if guidance_max > guidance_min and not condition_on_guidance:
            raise ValueError(
                f"lam drawn from [{guidance_min}, {guidance_max}] needs condition_on_guidance: true "
                "(an unconditioned student cannot know which lam it is distilling); set "
                "guidance_max = guidance_min for a fixed scale"
            )
        if guidance == "autoguidance" and guide is None:
            raise ValueError("guidance: autoguidance needs a guide model (e.g. a NetworkTeacher of a weaker "
                             "checkpoint)")
        self.teacher = teacher.freeze()
        self.guide = guide.freeze() if guide is not None else None
        self.shared_student = bool(getattr(student, "shares_teacher_weights", False))
        copy_teacher = not self.shared_student and (student is None or init_student_from_teacher)
        if copy_teacher and teacher.network is None:
            raise ValueError(
                f"{type(teacher).__name__} has no network weights to initialize the student from: give a "
                "student network and set init_student_from_teacher: false"
            )
        if self.shared_student:  # adapters on the teacher's own network (no copy); it sets what trains
            student.attach(teacher)
        elif student is None:
            student = copy.deepcopy(teacher.network)
        elif copy_teacher:
            student.load_state_dict(teacher.network.state_dict())
        if copy_teacher:  # F(x, t, s) = v(x, t) exactly at step 0 (docs/design.md section 2)
            student.zero_init_s_embedding()
        if not self.shared_student:
            for p in student.parameters():
                p.requires_grad_(True)
        self.student = student.train()
        self.null_cond: dict[str, Tensor] | None = None  # CFG null of keyword conditioning (from the data, setup())
        self.objective = objective
        self.guidance = guidance
        self.guidance_min, self.guidance_max = guidance_min, guidance_max
        self.condition_on_guidance = condition_on_guidance
        self.eval_guidance = guidance_min if eval_guidance is None else eval_guidance
        self.sample_gamma = sample_gamma
        self.num_classes = num_classes
        self.time_sampler = time_sampler if time_sampler is not None else TimePairSampler()
        self.warmup_steps, self.r_max = warmup_steps, r_max
        self.optimizer_factory = optimizer
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_schedule, self.lr_decay_start, self.lr_min_ratio = lr_schedule, lr_decay_start, lr_min_ratio
        warmup_then_decay(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), lr_warmup_steps,
                          lr_schedule, 1, lr_decay_start, lr_min_ratio)  # bad values fail here, not at fit
        self.nan_mask, self.max_bad_steps, self.max_output_rms = nan_mask, max_bad_steps, max_output_rms
        self.bad_steps = self.exploding_steps = 0
        self.noise_seed = resolve_noise_seed(noise_seed)
        self.activation_checkpointing, self.shard_teacher = activation_checkpointing, shard_teacher
        self.schedules: dict[int, tuple[Tensor, float]] = {}
        self.set_schedules(schedules)
        self.compile_student, self.compile_options = compile_student, dict(compile_options or {})
        self._compiled = _CompileCache()
        if states not in ("data", "student", "teacher"):
            raise ValueError(f"states must be 'data', 'student' or 'teacher', got {states!r}")
        if state_steps < 1:
            raise ValueError(f"state_steps must be >= 1, got {state_steps}")
        self.states, self.state_steps = states, state_steps
        self.sample_shape = None if sample_shape is None else tuple(int(v) for v in sample_shape)

    def set_schedules(self, source: str | dict | None) -> None:
        """Use the tuned grids (and gammas) of a schedules file for the step counts it covers
        (docs/design.md section 11); other step counts stay uniform. None: uniform everywhere."""
        from flowmap_lit.grids import load_schedules

        self.schedules = {} if source is None else load_schedules(source)

    # --- the pieces of a step ----------------------------------------------------------------------
    def ema_network(self) -> nn.Module:
        return self.student

    def tangent_warmup(self, step: int | None = None) -> float:
        """``r = min(r_max, step / warmup_steps)`` (regularized tangent warmup, docs/design.md section 3)."""
        step = self.global_step if step is None else step
        return self.r_max if self.warmup_steps <= 0 else min(self.r_max, step / self.warmup_steps)

    def _labels(self, labels: Tensor | None) -> Tensor | None:
        return labels if self.num_classes > 0 else None

    def _guidance(self, n: int, fixed: float | None = None, generator: torch.Generator | None = None) -> Tensor | None:
        if self.guidance == "none":
            return None
        if fixed is not None:
            return torch.full((n,), float(fixed), device=self.device)
        u = torch.rand(n, device=self.device, generator=generator)
        return self.guidance_min + (self.guidance_max - self.guidance_min) * u

    def student_fn(self, labels: Tensor | None, lam: Tensor | None, cond: dict[str, Tensor] | None = None,
                   compiled: bool = False) -> BoundStudent:
        """``F(x, t, s)`` with labels, (if the student is conditioned on it) lam, and the keyword
        conditioning ``cond`` (``batch["cond"]``, e.g. text embeddings) bound; ``compiled``: through
        the ``torch.compile``d student when ``compile_student`` is on (its ``eager`` stays plain)."""
        lam_in = lam if self.condition_on_guidance else None
        kw = dict(class_labels=self._labels(labels), guidance=lam_in, **(cond or {}))
        net = self.compiled_student() if compiled and self.compile_student else self.student
        sharded = is_sharded(next(self.student.parameters(), None))  # FSDP2 shards every parameter or none
        return BoundStudent(net, self.student, kw, checkpointed=self.activation_checkpointing or sharded)

    def compiled_student(self) -> nn.Module:
        """``torch.compile(student, **compile_options)``, built on first use (after sharding and the move
        to the device) and kept outside the module's state (checkpoints hold the plain student)."""
        if "student" not in self._compiled:
            self._compiled["student"] = torch.compile(self.student, **self.compile_options)
        return self._compiled["student"]

    def teacher_fn(self, labels: Tensor | None, lam: Tensor | None, cond: dict[str, Tensor] | None = None):
        """Guided teacher velocity ``v(x, t)`` with labels, lam and ``cond`` bound (no grad); CFG of
        keyword conditioning guides with ``null_cond`` (the dataset's empty-prompt embedding)."""
        labels = self._labels(labels)
        return lambda x, t: guided_velocity(self.teacher, self.guide, x, t, labels, lam, self.guidance,
                                            cond=cond, null_cond=self.null_cond)

    def batch_template(self, batch: dict) -> Tensor:
        """A tensor shaped, typed and placed like this rank's clean samples: the batch's data ``x``,
        or, for data-free states, an empty one of ``sample_shape`` for as many samples as the batch
        has labels, conditioning or ``batch_size``."""
        x0 = batch.get("x")
        if x0 is not None:
            return x0
        if self.states == "data":
            raise ValueError(
                "the batch holds no data 'x', and states: data noises the data: train data-free with "
                "model.init_args.states: student (or teacher), or give a data module that serves x")
        if self.sample_shape is None:
            raise ValueError("data-free training needs the samples' shape: set model.init_args.sample_shape "
                             "[C, H, W] or use a data module with a shape (flowmap_lit.data.PriorDataModule)")
        n = _batch_size(batch)
        return torch.empty((n, *self.sample_shape), device=self.device)

    def draw_noise(self, x0: Tensor, generator: torch.Generator | None = None, rank: int = 0,
                   world_size: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(t, s, eps, lam)`` for this rank's samples ``x0`` (only their shape is read).

        They are drawn for the global batch of ``world_size`` equal parts and this rank's part is
        kept, so with the same data a run draws the same noise per sample on any number of ranks
        (a 2-process step equals the single-process step on the global batch).
        """
        n = x0.shape[0]
        total, part = n * world_size, slice(rank * n, (rank + 1) * n)
        t, s = self.time_sampler(total, device=x0.device, generator=generator)
        s = self.objective.select_s(t, s)
        eps = torch.randn((total, *x0.shape[1:]), device=x0.device, generator=generator, dtype=x0.dtype)
        lam = self._guidance(total, generator=generator)
        return t[part], s[part], eps[part], (lam[part] if lam is not None else None)

    def draw_labels(self, n: int, generator: torch.Generator | None = None, rank: int = 0,
                    world_size: int = 1) -> Tensor | None:
        """Uniform class labels for this rank's ``n`` samples (global batch drawn, this rank's part
        kept) when the batch brings none; None for unconditional models."""
        if self.num_classes <= 0:
            return None
        labels = torch.randint(self.num_classes, (n * world_size,), device=self.device, generator=generator)
        return labels[rank * n:(rank + 1) * n]

    @torch.no_grad()
    def trajectory_states(self, z: Tensor, t: Tensor, labels: Tensor | None, lam: Tensor | None,
                          cond: dict[str, Tensor] | None = None) -> Tensor:
        """Data-free ``x_t`` from noise ``z`` at ``t = 1`` (docs/design.md section 13): the student's
        jump ``f(z, 1, t)`` (``states: student``) or ``state_steps`` Euler steps of the guided
        teacher's ODE from 1 to ``t`` (``states: teacher``)."""
        one = torch.ones_like(t)
        if self.states == "student":
            F = self.student_fn(labels, lam, cond)(z, one, t)
            return z + expand_like(t - one, z) * F.to(z.dtype)
        v = self.teacher_fn(labels, lam, cond)
        x, t_cur = z, one
        for i in range(self.state_steps):
            t_next = one + (t - one) * (i + 1) / self.state_steps
            x = x + expand_like(t_next - t_cur, x) * v(x, t_cur).to(x.dtype)
            t_cur = t_next
        return x

    def step_loss(self, batch: dict, generator: torch.Generator | None = None, rank: int = 0,
                  world_size: int = 1) -> tuple[Tensor, dict]:
        """Per-sample loss and stats of one batch (noise from ``draw_noise``; ``batch["cond"]``, if
        present, is passed to the student and the teacher as keyword arguments). With data-free
        ``states`` the batch's data is not read (labels are drawn uniformly if it has none)."""
        x0, labels, cond = self.batch_template(batch), batch.get("label"), batch.get("cond")
        t, s, eps, lam = self.draw_noise(x0, generator, rank, world_size)
        if self.states == "data":
            x_t = interpolate(x0, eps, t)
        else:
            if labels is None:
                labels = self.draw_labels(x0.shape[0], generator, rank, world_size)
            x_t = self.trajectory_states(eps, t, labels, lam, cond)
        student = self.student_fn(labels, lam, cond, compiled=True)
        out = self.objective(student, self.teacher_fn(labels, lam, cond), x_t, t, s, r=self.tangent_warmup())
        stats = dict(out.stats)
        if lam is not None:
            stats["lambda"] = lam.mean()
        return out.loss, stats

    # --- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Checks the student's shape against the data's, and takes the CFG null condition of
        keyword-conditioned (text) data from the data module."""
        dm = getattr(self._trainer, "datamodule", None)
        check_network_shape(self.student, dm, "model.init_args.student")
        if self.sample_shape is None and getattr(dm, "shape", None) is not None:
            self.sample_shape = tuple(int(v) for v in dm.shape)
        null = getattr(dm, "null_cond", None)
        if null is not None:
            self.null_cond = null

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        # The noise is seeded by (step, micro-batch) alone (every rank draws the global batch's noise and
        # keeps its part); anything else random in the step (dropout) also by the rank.
        gen = torch.Generator(device=self.device).manual_seed(derive_seed(self.noise_seed, self.global_step, batch_idx))
        world_size = self._trainer.world_size if self._trainer is not None else 1
        with seeded_rng(self, derive_seed(self.noise_seed, self.global_step, batch_idx, self.global_rank)):
            per_sample, stats = self.step_loss(batch, gen, rank=self.global_rank, world_size=world_size)
        loss = self.masked_mean(per_sample, stats)
        if self.skip_nonfinite(loss, batch=batch):
            return None  # skip this optimizer step
        self.check_divergence(stats)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/r", self.tangent_warmup())
        for key, value in stats.items():
            self.log(f"train/{key}", value)
        return loss

    def masked_mean(self, per_sample: Tensor, stats: dict) -> Tensor:
        """Mean of the per-sample loss; with ``nan_mask`` the non-finite samples are dropped (if any is finite)."""
        finite = torch.isfinite(per_sample)
        if self.nan_mask and not finite.all() and finite.any():
            stats["nonfinite_fraction"] = 1 - finite.float().mean()
            per_sample = per_sample[finite]
        return per_sample.mean()

    def skip_nonfinite(self, loss: Tensor, what: str = "the",
                       advice: str = "Lower the learning rate, lower the time embedding frequencies (time_max_freq), "
                                     "use tangent_norm: l2, or set nan_mask: true to drop bad samples.",
                       batch: dict | None = None) -> bool:
        """True when ``loss`` is not finite (the caller skips the step); raises after ``max_bad_steps`` in a
        row, saying whether the last batch's inputs were finite (bad data) or not (the training)."""
        if torch.isfinite(loss):
            self.bad_steps = 0
            return False
        self.bad_steps += 1
        self.log("train/nonfinite_steps", float(self.bad_steps))
        if self.bad_steps >= self.max_bad_steps:
            where = (f"{what} loss was non-finite for {self.bad_steps} consecutive steps (last at step "
                     f"{self.global_step})")
            if batch is not None and not all(torch.isfinite(v).all() for v in _tensors(batch)):
                raise RuntimeError(f"{where}, and the batch held NaN or infinite inputs: the data is at fault, not "
                                   "the training. Re-create the dataset from finite data (python -m flowmap_lit "
                                   "prepare refuses non-finite samples), or set nan_mask: true.")
            inputs = " The batch's inputs were finite." if batch is not None else ""
            raise RuntimeError(f"{where}.{inputs} {advice}")
        return True

    def check_divergence(self, stats: dict) -> None:
        """Stops a run whose student outputs explode (``max_output_rms``) while its bounded loss looks fine."""
        rms = stats.get("student_rms")
        if self.max_output_rms is None or rms is None:
            return
        if float(rms) <= self.max_output_rms:
            self.exploding_steps = 0
            return
        self.exploding_steps += 1
        if self.exploding_steps >= self.max_bad_steps:
            raise RuntimeError(
                f"the student is diverging: its output RMS was {float(rms):.3g} at step {self.global_step}, above "
                f"max_output_rms={self.max_output_rms:g} for {self.exploding_steps} consecutive steps (a flow map's "
                "output is an average velocity, of the order of the data's scale). The normalized tangent bounds "
                "the loss, so train/loss stays small while this happens. Lower the learning rate (or raise "
                "lr_warmup_steps); set max_output_rms: null to train on regardless.")

    def on_before_optimizer_step(self, optimizer) -> None:
        """Logs the student's gradient norm (train/grad_norm), before any clipping."""
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        with seeded_rng(self, derive_seed(self.noise_seed, -1, batch_idx, self.global_rank)):
            loss, _ = self.step_loss(batch)
        self.log("val/loss", loss.mean(), sync_dist=True, batch_size=_batch_size(batch))

    def configure_model(self) -> None:
        """Activation checkpointing, and FSDP2 sharding under ``ModelParallelStrategy`` (its device
        mesh): the student block by block, and the frozen teacher and guide if ``shard_teacher``."""
        if self.activation_checkpointing:
            apply_activation_checkpointing(self.student)
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            return
        dp_mesh = data_parallel_mesh(mesh)
        shard_network(self.student, dp_mesh)
        if self.shard_teacher:
            for frozen in (self.teacher, self.guide):
                if frozen is not None and frozen.network is not None:
                    shard_network(frozen.network, dp_mesh)

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad] + list(self.objective.parameters())
        optimizer = self.optimizer_factory(params)
        total = self.schedule_length() if self.lr_schedule != "constant" else None
        scheduler = warmup_then_decay(optimizer, self.lr_warmup_steps, self.lr_schedule, total,
                                      self.lr_decay_start, self.lr_min_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def schedule_length(self) -> int | None:
        """Length of the run in learning-rate scheduler steps (optimizer steps here): trainer.max_steps."""
        steps = self.trainer.max_steps
        return int(steps) if steps and steps > 0 else None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen teacher and guide are rebuilt from their own source; do not duplicate them.
        # (Sharded checkpoints keep them: the distributed loader restores the model strictly.)
        # A student sharing the teacher's weights stores only its own (adapter) weights.
        if not any(is_sharded(v) for v in checkpoint["state_dict"].values()):
            shared = self._shared_student_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith(("teacher.", "guide.")) and k not in shared}
        checkpoint["data_info"] = data_info(self._trainer)
        if self.null_cond is not None:
            checkpoint["null_cond"] = {k: v.cpu() for k, v in self.null_cond.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("null_cond") is not None:
            self.null_cond = checkpoint["null_cond"]
        if "state_dict" not in checkpoint:  # sharded checkpoint: the strategy loads the weights itself
            return
        own, shared, state = self.state_dict(keep_vars=True), self._shared_student_keys(), checkpoint["state_dict"]
        # A teacher entry that is a (trained) student tensor too takes the student's saved value.
        student_key = {id(v): k for k, v in own.items() if k.startswith("student.") and k in state}
        for k, v in own.items():
            if k.startswith(("teacher.", "guide.")) or k in shared:
                state[k] = state[student_key[id(v)]] if id(v) in student_key else v.detach()

    def _shared_student_keys(self) -> set[str]:
        """State-dict keys of the student that are the teacher's (frozen, shared) weights."""
        if not self.shared_student:
            return set()
        return {f"student.{k}" for k in self.student.shared_state_keys()}

    # --- sampling ----------------------------------------------------------------------------------
    def _eval_inputs(self, noise: Tensor, guidance: float | None) -> Tensor | None:
        return self._guidance(noise.shape[0], self.eval_guidance if guidance is None else guidance)

    @torch.no_grad()
    def sample(self, noise: Tensor, class_labels: Tensor | None = None, num_steps: int = 1,
               guidance: float | None = None, schedule: Tensor | None = None, gamma: float | None = None,
               generator: torch.Generator | None = None, cond: dict[str, Tensor] | None = None) -> Tensor:
        """k-step samples from ``noise``: flow-map chaining, or gamma sampling; ``cond``: keyword conditioning.

        Without ``schedule`` the grid is the tuned one of ``schedules`` for ``num_steps`` (with its
        gamma) where there is one, else uniform; ``gamma`` defaults to that or to ``sample_gamma``."""
        lam = self._eval_inputs(noise, guidance)
        tuned_gamma = self.sample_gamma
        if schedule is None and num_steps in self.schedules:
            schedule, tuned_gamma = self.schedules[num_steps]
        sched = uniform_schedule(num_steps) if schedule is None else schedule
        gamma = tuned_gamma if gamma is None else gamma
        return gamma_sample(self.student_fn(class_labels, lam, cond), noise, sched, gamma, generator)

    @torch.no_grad()
    def velocity_sample(self, noise: Tensor, class_labels: Tensor | None = None, num_steps: int = 64,
                        guidance: float | None = None, cond: dict[str, Tensor] | None = None) -> Tensor:
        """The ODE of the student's own velocity ``F(x, t, t)`` (EDM schedule, Heun): the limit that
        k-step flow-map sampling tends to as k grows."""
        F = self.student_fn(class_labels, self._eval_inputs(noise, guidance), cond)
        return ode_sample(lambda x, t: F(x, t, t), noise, num_steps, "heun", schedule=edm_schedule(num_steps))

    @torch.no_grad()
    def teacher_sample(self, noise: Tensor, class_labels: Tensor | None = None, num_steps: int = 64,
                       guidance: float | None = None, solver: Literal["euler", "heun"] = "heun",
                       cond: dict[str, Tensor] | None = None) -> Tensor:
        """The guided teacher's ODE solution from the same noise (EDM schedule, Heun)."""
        lam = self._eval_inputs(noise, guidance)
        return ode_sample(self.teacher_fn(class_labels, lam, cond), noise, num_steps, solver,
                          schedule=edm_schedule(num_steps))


def _batch_size(batch: dict) -> int:
    """Number of samples of a batch: its data, labels or conditioning, or its ``batch_size`` entry."""
    for key in ("x", "label"):
        if isinstance(batch.get(key), Tensor):
            return batch[key].shape[0]
    for value in (batch.get("cond") or {}).values():
        return value.shape[0]
    if "batch_size" in batch:
        return int(batch["batch_size"])
    raise ValueError(f"cannot tell the batch size of a batch with keys {sorted(batch)}: it needs 'x', 'label', "
                     "'cond' or 'batch_size'")


def _tensors(batch):
    """The floating-point tensors of a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return [batch] if batch.is_floating_point() else []
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in _tensors(v)]
    return []
