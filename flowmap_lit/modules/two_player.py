"""What the two-network modules share: a student trained against a second network of its own.

``TwoNetworkModule`` is a ``FlowMapDistillModule`` with an auxiliary network (the adversarial
finetune's discriminator, the corrector's fake velocity) that has its own optimizer, both stepped
by Lightning manual optimization. It provides:

- the start from a distilled checkpoint (``init_checkpoint``, EMA weights by default);
- the tangent warmup and the student's learning-rate schedule counted in batches (Lightning counts
  every ``optimizer.step()`` of a Lightning optimizer as a global step, so one batch advances
  ``trainer.global_step`` by ``steps_per_batch``: 2 for the adversarial finetune; the corrector
  steps its fake velocity's optimizer through the strategy without counting it, so that its
  ``global_step`` counts batches like plain distillation's);
- the balancing weight ``w * ||grad_W L_distill|| / ||grad_W L_other||`` at the student's last
  layer (VQGAN-style);
- gradient averaging of the auxiliary network under ``ModelParallelStrategy`` (which does not wrap
  it) and the check that plain DDP is told about the unused parameters of each backward pass;
- the seeded training step: the subclass's ``two_network_step`` does the work.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flowmap_lit.checkpoints import ema_state_from_checkpoint, load_checkpoint
from flowmap_lit.distributed import data_parallel_mesh, is_sharded
from flowmap_lit.interpolant import expand_like, uniform_schedule
from flowmap_lit.modules.common import seeded_rng
from flowmap_lit.modules.distill import FlowMapDistillModule
from flowmap_lit.seeding import derive_seed


def _no_closure() -> None:
    """The closure of a manual optimizer step: the backward pass has already run."""


def last_layer_weight(net: nn.Module, name: str | None = None) -> tuple[str, nn.Parameter]:
    """``(name, parameter)`` of ``net``: the one called ``name``, else the last one with >= 2 dims."""
    params = dict(net.named_parameters())
    if name is not None:
        if name not in params:
            raise ValueError(f"adaptive_weight_param {name!r} is not a parameter of the student; "
                             f"its last ones are {list(params)[-5:]}")
        return name, params[name]
    matrices = [(k, p) for k, p in params.items() if p.ndim >= 2 and p.requires_grad]
    if not matrices:
        raise ValueError("the student has no trainable weight matrix to balance the adaptive weight on")
    return matrices[-1]


def load_student_state(checkpoint: str, use_ema: bool = True, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The student's weights in a ``FlowMapDistillModule`` checkpoint, a file or a sharded (FSDP2) directory
    (its EMA weights if asked and present)."""
    ckpt = load_checkpoint(checkpoint, allow_pickle)
    state = ema_state_from_checkpoint(ckpt) if use_ema else None
    if state is None:
        if "state_dict" not in ckpt:
            raise ValueError(f"{checkpoint} has no state_dict: is it a Lightning checkpoint of a distillation run?")
        state = {k[len("student."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    if not state:
        raise ValueError(f"{checkpoint} holds no student weights (no 'student.*' keys, no EMA state): "
                         "init_checkpoint must be a checkpoint written by a FlowMapDistillModule run")
    return state


class TwoNetworkModule(FlowMapDistillModule):
    """Base of the modules that train the student against an auxiliary network (module docstring).

    Subclasses set ``aux_name`` (the attribute holding the auxiliary network), ``steps_per_batch``
    and ``two_network_step``, and call ``init_student`` at the end of their ``__init__``.
    """

    aux_name = "aux"
    count_aux_steps = True  # the auxiliary optimizer's steps count in global_step (steps_per_batch 2), or not (1)

    def __init__(self, aux_optimizer, init_checkpoint: str | None, init_use_ema: bool, allow_pickle: bool,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.aux_optimizer_factory = aux_optimizer
        self._init = (init_checkpoint, init_use_ema, allow_pickle)

    @property
    def steps_per_batch(self) -> int:
        return 2 if self.count_aux_steps else 1

    def step_aux(self, aux_opt) -> None:
        """Steps the auxiliary optimizer: as a Lightning optimizer (counted in ``global_step``), or, when
        ``count_aux_steps`` is false, through the strategy and precision plugin (gradient unscaling of
        16-bit mixed precision included) without counting it."""
        trainer = self._trainer
        if self.count_aux_steps or trainer is None or not hasattr(aux_opt, "optimizer"):
            aux_opt.step()
            return
        trainer.strategy.optimizer_step(aux_opt.optimizer, closure=_no_closure, model=self)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Logs the student's gradient norm before the student's step only (not the auxiliary network's)."""
        optimizers = self._trainer.optimizers if self._trainer is not None else []
        if len(optimizers) > 1 and optimizer is optimizers[1]:
            return
        super().on_before_optimizer_step(optimizer)

    @property
    def aux_network(self) -> nn.Module:
        return getattr(self, self.aux_name)

    def init_student(self) -> None:
        """Loads ``init_checkpoint``'s student weights, if one was given."""
        checkpoint, use_ema, allow_pickle = self._init
        if checkpoint is None:
            return
        state = load_student_state(checkpoint, use_ema, allow_pickle)
        missing, unexpected = self.student.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{checkpoint} does not match the student architecture: missing "
                               f"{missing[:5]}, unexpected {unexpected[:5]}")

    @staticmethod
    def check_weights(distill_weight: float, adaptive: bool) -> None:
        """``distill_weight >= 0``; an adaptive weight needs the distillation loss's gradient."""
        if distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {distill_weight}")
        if adaptive and distill_weight == 0:
            raise ValueError("adaptive_weight scales by the distillation loss's gradient, which distill_weight: 0 "
                             "does not compute: give a fixed weight (adaptive_weight: false) or distill_weight > 0")

    def distill_term(self, batch: dict, generator: torch.Generator | None, rank: int,
                     world_size: int) -> tuple[Tensor, dict]:
        """The distillation loss of the student's step and its stats; with ``distill_weight: 0`` neither
        is computed (no teacher, guide or tangent pass for a term that is multiplied by zero)."""
        if self.distill_weight == 0:
            return torch.zeros((), device=self.device), {}
        per_sample, stats = self.step_loss(batch, generator, rank=rank, world_size=world_size)
        distill = self.masked_mean(per_sample, stats)
        self.check_divergence(stats)
        return distill, stats

    def student_samples(self, z: Tensor, k: int, labels: Tensor | None, lam: Tensor | None,
                        cond: dict[str, Tensor] | None = None) -> Tensor:
        """``k``-step samples from ``z``: the first ``k - 1`` jumps without grad, the last with grad."""
        grid = self.schedules[k][0] if k in self.schedules else uniform_schedule(k)
        times = [float(v) for v in grid]
        F = self.student_fn(labels, lam, cond, compiled=True)
        x = z
        for i in range(k):
            t = torch.full((x.shape[0],), times[i], device=x.device, dtype=x.dtype)
            s = torch.full_like(t, times[i + 1])
            with torch.set_grad_enabled(i == k - 1 and torch.is_grad_enabled()):
                x = x + expand_like(s - t, x) * F(x, t, s).to(x.dtype)
        return x

    def batches_done(self) -> int:
        return self.global_step // self.steps_per_batch

    def tangent_warmup(self, step: int | None = None) -> float:
        """As in ``FlowMapDistillModule``, counting batches (``steps_per_batch`` optimizer steps each)."""
        return super().tangent_warmup(self.batches_done() if step is None else step)

    def balance(self, distill: Tensor, other: Tensor, weight: float, adaptive: bool, max_weight: float,
                param: str | None) -> Tensor:
        """``weight``, or with ``adaptive`` ``weight * ||grad_W distill|| / ||grad_W other||`` at the
        student's last layer ``W`` clamped to ``max_weight`` (a detached scalar)."""
        if not adaptive:
            return torch.tensor(weight, device=distill.device)
        _, w = last_layer_weight(self.student, param)
        if is_sharded(w):
            raise RuntimeError("an adaptive weight needs an unsharded student (it differentiates w.r.t. one weight); "
                               "use a fixed weight under FSDP2")
        (g_distill,) = torch.autograd.grad(distill, w, retain_graph=True, allow_unused=True)
        (g_other,) = torch.autograd.grad(other, w, retain_graph=True, allow_unused=True)
        if g_distill is None or g_other is None:
            return torch.tensor(weight, device=distill.device)
        ratio = g_distill.norm() / (g_other.norm() + 1e-8)
        return (weight * ratio).clamp(max=max_weight).detach()

    def sync_aux_grads(self) -> None:
        """Averages the auxiliary network's gradients over the data-parallel ranks under
        ``ModelParallelStrategy`` (which, unlike DDP, does not wrap the module; it stays replicated)."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or not dist.is_initialized():
            return
        group = data_parallel_mesh(mesh).get_group()
        size = dist.get_world_size(group)
        for p in self.aux_network.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)
                p.grad.div_(size)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        from lightning.pytorch.strategies import DDPStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False):
            raise ValueError(
                f"{type(self).__name__} makes two backward passes per batch (the {self.aux_name}, then the student), "
                "each with its own parameters, which plain DDP rejects: use --trainer.strategy "
                "ddp_find_unused_parameters_true (or configs/strategies/fsdp2.yaml)"
            )

    def two_network_step(self, batch: dict, student_opt, aux_opt, backward, generator: torch.Generator | None = None,
                         rank: int = 0, world_size: int = 1) -> tuple[Tensor, dict] | None:
        """One batch of both networks' updates; returns the student's loss and stats, or None if skipped."""
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        student_opt, aux_opt = self.optimizers()
        rank = self.global_rank
        world_size = self._trainer.world_size if self._trainer is not None else 1
        gen = torch.Generator(device=self.device).manual_seed(derive_seed(self.noise_seed, self.global_step, batch_idx))
        with seeded_rng(self, derive_seed(self.noise_seed, self.global_step, batch_idx, rank)):
            out = self.two_network_step(batch, student_opt, aux_opt, self.manual_backward, gen, rank, world_size)
        if out is None:
            return None
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        loss, stats = out
        for key in ("loss", *self.progress_keys):
            if key in stats:
                self.log(f"train/{key}", stats.pop(key), prog_bar=True)
        self.log("train/r", self.tangent_warmup())
        for key, value in stats.items():
            self.log(f"train/{key}", value)
        return loss

    progress_keys: tuple[str, ...] = ()

    def schedule_length(self) -> int | None:
        """The student's learning-rate schedule steps once per batch: trainer.max_steps / steps_per_batch."""
        steps = super().schedule_length()
        return None if steps is None else steps // self.steps_per_batch

    def configure_optimizers(self):
        student = super().configure_optimizers()
        aux_opt = self.aux_optimizer_factory(self.aux_network.parameters())
        return [student["optimizer"], aux_opt], [student["lr_scheduler"]]
