"""Flow-map diagnostics as a callback: the single-jump error heatmap over (t, s) and each sampling
step's share of the k-step error (``flowmap_lit.diagnostics``; docs/design.md section 9).

Logged to TensorBoard as the figure ``diagnostics/jump_error`` and the scalars
``diagnostics/{k}step/contribution_{i}`` (step ``i`` of the k-step path, relative to the
reference's mean square, summing with the cross terms to ``flowmap_rel_error/{k}step``); the
table is printed at the end of fit. Needs a ``FlowMapDistillModule`` (student and teacher).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from flowmap_lit.callbacks.ema import evaluation_mode
from flowmap_lit.callbacks.flowmap_error import format_table, log_at_fit_end
from flowmap_lit.diagnostics import diagnose, heatmap_figure


def path_table(paths) -> str:
    rows = [{**r, "total": p.total_relative} for p in paths for r in p.rows()]
    return format_table(rows, ["steps", "step", "t", "s", "local", "contribution", "total"])


def grid_table(grid) -> str:
    return format_table(grid.rows(), ["t", "s", "mse", "relative"])


class FlowMapDiagnostics(pl.Callback):
    """Where the EMA student's flow map is wrong, at the end of fit (and, with ``every_validation``, at
    each validation). Rank 0 computes it (the teacher's reference is a fine ODE solve per jump).

    Args:
        times: Times of the single-jump grid, every pair (t, s) of them a jump; None: 1, 7/8, ..., 0.
        step_counts: Step counts k of the sampling paths (uniform schedules) whose error is split
            into the steps' shares.
        num_samples: Noise samples (fixed by seed).
        reference_steps: Heun steps (EDM grid) of the teacher's flow map over [0, 1].
        batch_size: Samples per network call.
        seed: Seed of the noise and the labels.
        every_validation: Also run at every validation (costs about 2 jump grids of ODE solves).
        print_table: Print the tables at the end of fit.
    """

    def __init__(
        self,
        times: list[float] | None = None,
        step_counts: list[int] = [1, 2, 4, 8],  # noqa: B006 (read, never mutated; --help shows it)
        num_samples: int = 500,
        reference_steps: int = 256,
        batch_size: int = 500,
        seed: int = 0,
        every_validation: bool = False,
        print_table: bool = True,
    ) -> None:
        self.times = times
        self.step_counts = list(step_counts)
        self.num_samples, self.reference_steps, self.batch_size = num_samples, reference_steps, batch_size
        self.seed, self.every_validation, self.print_table = seed, every_validation, print_table
        self.grid = None
        self.paths: list = []
        self._last_step = -1

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((self.num_samples, *trainer.datamodule.shape), generator=gen).to(pl_module.device)
        k = getattr(pl_module, "num_classes", 0)
        labels = torch.randint(0, k, (self.num_samples,), generator=gen).to(pl_module.device) if k else None
        with evaluation_mode(trainer, pl_module):
            self.grid, self.paths = diagnose(pl_module, noise, labels, self.step_counts, self.times,
                                             reference_steps=self.reference_steps, batch_size=self.batch_size)
        self._last_step = trainer.global_step
        return self._metrics()

    def _metrics(self) -> dict[str, float]:
        return {f"diagnostics/{p.steps}step/contribution_{i + 1}": c for p in self.paths
                for i, c in enumerate(p.contribution)}

    def _figure(self, trainer) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_figure"):
            import matplotlib.pyplot as plt

            fig = heatmap_figure(self.grid, f"single-jump relative error, step {trainer.global_step}")
            experiment.add_figure("diagnostics/jump_error", fig, trainer.global_step)
            plt.close(fig)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.every_validation or not trainer.is_global_zero:
            return
        for name, value in self.run(trainer, pl_module).items():
            pl_module.log(name, value, rank_zero_only=True)
        self._figure(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        if self._last_step != trainer.global_step:
            log_at_fit_end(trainer, self.run(trainer, pl_module))
            self._figure(trainer)
        if self.print_table:
            rank_zero_info(f"\nSingle jumps of the EMA student at step {trainer.global_step} (relative = mse / mean "
                           "square of the teacher's displacement):\n" + grid_table(self.grid)
                           + "\n\nEach sampling step's error carried to t = 0 by the teacher (relative to the "
                           "reference's mean square):\n" + path_table(self.paths))
