"""Flow-map error across step counts: k-step student samples against the teacher's ODE solution.

For a teacher with an accurate ODE reference (the exact GMM teacher, or a neural teacher with
many Heun steps), the student's k-step map from noise should reproduce the teacher's ODE map from
the same noise. Logged per k as ``flowmap_error/{k}step`` (mean squared distance per element)
and ``flowmap_rel_error/{k}step`` (that divided by the reference's mean square, the relative error
of docs/design.md section 8). For scale, the table also gives the teacher's own k-step Euler error.

With ``velocity_limit_steps > 0`` it also integrates the student's own velocity ``F(x, t, t)``
with that many Heun steps (``flowmap_rel_error/velocity_limit``): the error that k-step sampling
tends to as k grows (docs/design.md section 9). A flow map whose error rises with steps has a
velocity limit above its few-step error: its ``s = t`` diagonal is less accurate than its jumps.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from flowmap_lit.callbacks.ema import evaluation_mode


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Plain-text table of ``rows`` (dicts) with the given column order."""
    cells = [columns] + [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def log_at_fit_end(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Write ``metrics`` to every logger at the final step (``LightningModule.log`` is not allowed in
    ``on_fit_end``; the validation-time values go through it as usual)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()


class FlowMapError(pl.Callback):
    """At every validation and at the end of fit: flow-map error of the EMA student for each k.

    Needs ``pl_module.sample(noise, labels, num_steps=k)`` and ``pl_module.teacher_sample(noise,
    labels, num_steps=...)`` (``FlowMapDistillModule`` has both).

    Args:
        step_counts: Student step counts k that are evaluated (each logged as
            flowmap_error/{k}step and flowmap_rel_error/{k}step).
        num_samples: Noise samples (fixed by seed), with the teacher's reference computed once.
        reference_steps: Heun steps (EDM schedule) of the teacher's reference ODE solution.
        batch_size: Samples per network call.
        seed: Seed of the noise and the labels.
        print_table: Print the table at the end of fit.
        velocity_limit_steps: Above 0: also integrate the student's own velocity F(x, t, t) with
            this many Heun steps (flowmap_rel_error/velocity_limit, docs/design.md section 9); 0: off.
    """

    def __init__(
        self,
        step_counts: list[int] = [1, 2, 4, 8],  # noqa: B006 (read, never mutated; --help shows it)
        num_samples: int = 1000,
        reference_steps: int = 128,
        batch_size: int = 500,
        seed: int = 0,
        print_table: bool = True,
        velocity_limit_steps: int = 0,
    ) -> None:
        self.step_counts = list(step_counts)
        self.num_samples = num_samples
        self.reference_steps = reference_steps
        self.batch_size = batch_size
        self.seed = seed
        self.print_table = print_table
        self.velocity_limit_steps = velocity_limit_steps
        self.velocity_limit: dict | None = None  # {"steps", "flowmap_mse", "relative_error"} of the last evaluation
        self._reference: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None
        self._cond: dict[str, torch.Tensor] | None = None  # text data: the prompts of the noises
        self.results: list[dict] = []
        self._last_step = -1  # global step of the last evaluation during fit

    def _inputs(self, trainer, pl_module):
        from flowmap_lit.metrics.few_step import prompt_cond, text_prompts

        gen = torch.Generator().manual_seed(self.seed)
        shape = tuple(trainer.datamodule.shape)
        noise = torch.randn((self.num_samples, *shape), generator=gen)
        k = getattr(pl_module, "num_classes", 0)
        labels = torch.randint(0, k, (self.num_samples,), generator=gen) if k else None
        # text data: sample i is conditioned on validation prompt i (cycled)
        self._cond = prompt_cond(text_prompts(trainer.datamodule, self.num_samples), range(self.num_samples),
                                 pl_module.device)
        return noise.to(pl_module.device), (labels.to(pl_module.device) if labels is not None else None)

    def _batched(self, fn, noise, labels, **kw) -> torch.Tensor:
        from flowmap_lit.metrics.few_step import sample_in_batches

        return sample_in_batches(fn, noise, labels, self.batch_size, self._cond, **kw)

    def reference(self, trainer, pl_module):
        if self._reference is None:
            noise, labels = self._inputs(trainer, pl_module)
            ref = self._batched(pl_module.teacher_sample, noise, labels, num_steps=self.reference_steps)
            self._reference = (noise, labels, ref)
        return self._reference

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict]:
        rows = []
        with evaluation_mode(trainer, pl_module):
            noise, labels, ref = self.reference(trainer, pl_module)
            for k in self.step_counts:
                x = self._batched(pl_module.sample, noise, labels, num_steps=k)
                mse = (x - ref).square().mean().item()
                rows.append({"steps": k, "flowmap_mse": mse, "relative_error": mse / ref.square().mean().item()})
            if self.velocity_limit_steps > 0:
                x = self._batched(pl_module.velocity_sample, noise, labels, num_steps=self.velocity_limit_steps)
                mse = (x - ref).square().mean().item()
                self.velocity_limit = {"steps": self.velocity_limit_steps, "flowmap_mse": mse,
                                       "relative_error": mse / ref.square().mean().item()}
        return rows

    def _limit_metrics(self) -> dict[str, float]:
        if self.velocity_limit is None:
            return {}
        return {"flowmap_error/velocity_limit": self.velocity_limit["flowmap_mse"],
                "flowmap_rel_error/velocity_limit": self.velocity_limit["relative_error"]}

    def _log(self, trainer, pl_module, rows):
        for row in rows:
            pl_module.log(f"flowmap_error/{row['steps']}step", row["flowmap_mse"], rank_zero_only=True)
            pl_module.log(f"flowmap_rel_error/{row['steps']}step", row["relative_error"], rank_zero_only=True)
        for name, value in self._limit_metrics().items():
            pl_module.log(name, value, rank_zero_only=True)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.results = self.evaluate(trainer, pl_module)
        self._log(trainer, pl_module, self.results)
        if trainer.state.fn != "fit":
            self._print(trainer, pl_module)
        else:
            self._last_step = trainer.global_step

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._last_step != trainer.global_step:  # a validation at the final step already evaluated and logged it
            self.results = self.evaluate(trainer, pl_module)
            log_at_fit_end(trainer, {f"{name}/{row['steps']}step": row[key] for row in self.results
                                     for name, key in (("flowmap_error", "flowmap_mse"),
                                                       ("flowmap_rel_error", "relative_error"))}
                           | self._limit_metrics())
        self._print(trainer, pl_module)

    def _print(self, trainer, pl_module) -> None:
        if not self.print_table:
            return
        # Every rank runs the teacher (a sharded teacher needs all ranks in each forward); rank 0 prints.
        noise, labels, ref = self.reference(trainer, pl_module)
        for row in self.results:
            euler = self._batched(pl_module.teacher_sample, noise, labels, num_steps=row["steps"], solver="euler")
            row["teacher_euler_relative_error"] = (euler - ref).square().mean().item() / ref.square().mean().item()
        rank_zero_info(
            f"\nFlow-map error at step {trainer.global_step}: EMA student vs the teacher's "
            f"{self.reference_steps}-step Heun ODE from the same {self.num_samples} noises "
            "(relative_error = mean squared error / mean square of the reference):\n"
            + format_table(self.results, ["steps", "flowmap_mse", "relative_error", "teacher_euler_relative_error"])
            + ("" if self.velocity_limit is None else
               f"\nstudent's own velocity F(x, t, t), {self.velocity_limit['steps']}-step Heun (the many-step limit): "
               f"relative_error {self.velocity_limit['relative_error']:.4g}")
        )
