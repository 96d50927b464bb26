"""Tuned k-step grids during fit: the ``ScheduleSearch`` callback (docs/design.md section 11).

The search of ``python -m flowmap_lit schedule`` (``flowmap_lit.grid_search.search_grid``), run on
the EMA student before every validation's evaluations, so that the logged and printed few-step
metrics are those of the sampler a user gets with the tuned grids, and the grids are written next
to the run's checkpoints.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from flowmap_lit.callbacks.ema import evaluation_mode
from flowmap_lit.grids import Criterion, load_schedules, save_schedules, schedules_doc

CRITERIA = ("fid", "flowmap_error")


class ScheduleSearch(pl.Callback):
    """Search the sampler's k-step time grids of the EMA student, and sample with them.

    At the start of every validation (so before FewStepFID and FlowMapError measure, whatever the
    order of the callbacks), and at the end of training when no validation ran at the final step,
    each k of ``step_counts`` gets the grid (and, with ``gamma``, the re-noising) that minimizes
    ``criterion`` on held-out noise (seed ``flowmap_lit.grid_search.HELD_OUT_SEED + seed``, which
    no evaluation callback uses): the search of ``python -m flowmap_lit schedule``, with the same
    result for the same checkpoint and arguments. The grids are set on the module (its ``sample``
    uses them; other step counts keep what the module had), written to ``path`` in the format that
    ``sample``/``evaluate``/``export --schedules`` read, and kept in the trainer's checkpoints, so a
    resumed run samples with them from its first batch. Every rank draws its share of the noise
    and the criterion is reduced over the ranks, so each rank finds the same grids.

    Cost per search: ``budget`` evaluations of ``num_samples`` k-step samples for each k (plus,
    for ``flowmap_error``, the teacher's reference once per fit).

    Args:
        step_counts: Step counts k whose grids are searched (k = 1 has no free time; with gamma
            only its gamma is searched).
        criterion: "fid": FID of the k-step samples with the first feature network, reference and
            image mapping (decoder) of the trainer's FewStepFID callback, which must exist;
            "flowmap_error": relative error of the k-step samples against the teacher's
            reference_steps Heun ODE from the same noise.
        budget: Criterion evaluations per step count and search (the uniform and EDM grids first;
            the result is never worse than either on the criterion).
        num_samples: Held-out noise samples per evaluation, over all ranks.
        seed: Seed of the search; the held-out noise uses HELD_OUT_SEED + seed.
        gamma: Also search gamma, the re-noising of gamma sampling (docs/design.md section 5).
        guidance: Guidance scale passed to sample(); None: the module's own (as the evaluation
            callbacks' default).
        reference_steps: Heun steps of the teacher's reference ODE (criterion "flowmap_error").
        batch_size: Samples per network call.
        path: The JSON file written after each search; None: schedules.json in the directory of
            the trainer's checkpoint callback, else in the trainer's log directory, else none.
    """

    def __init__(
        self,
        step_counts: list[int] = [2],  # noqa: B006 (read, never mutated; --help shows it)
        criterion: str = "fid",
        budget: int = 14,
        num_samples: int = 1000,
        seed: int = 0,
        gamma: bool = False,
        guidance: float | None = None,
        reference_steps: int = 128,
        batch_size: int = 500,
        path: str | None = None,
    ) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"ScheduleSearch: criterion must be one of {CRITERIA}, got {criterion!r}")
        bad = [k for k in step_counts if int(k) != k or k < 1]
        if bad or not step_counts:
            raise ValueError(f"ScheduleSearch: step_counts must be a non-empty list of integers >= 1, "
                             f"got {step_counts}")
        if budget < 2:
            raise ValueError(f"ScheduleSearch: budget must allow the 2 starting grids (uniform, EDM), got {budget}")
        if num_samples < 2:
            raise ValueError(f"ScheduleSearch: num_samples must be >= 2, got {num_samples}")
        self.step_counts = [int(k) for k in step_counts]
        self.criterion, self.budget, self.num_samples, self.seed = criterion, budget, num_samples, seed
        self.gamma, self.guidance = gamma, guidance
        self.reference_steps, self.batch_size, self.path = reference_steps, batch_size, path
        self.tuned: dict[int, tuple[torch.Tensor, float]] = {}  # the last search's grids and gammas
        self.report: dict[str, dict] = {}  # the last search's criterion values per k (uniform, edm, tuned)
        self.searches = 0
        self.seconds = 0.0
        self._last_step = -1  # global step of the last search during fit
        self._reference: tuple | None = None  # this rank's held-out noise, labels, text conditioning, teacher ODE

    # --- hooks -------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "set_schedules") or not hasattr(pl_module, "teacher_sample"):
            raise ValueError(f"ScheduleSearch tunes the time grids of a distilled flow map (FlowMapDistillModule); "
                             f"{type(pl_module).__name__} has no free time grid; remove the callback")
        if self.criterion == "fid":
            self._fid_callback(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.schedules.update(self.tuned)  # restored from a checkpoint: in use from the first batch

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.search(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before on_fit_end, where the evaluation callbacks measure again when no validation ran at this step
        if self._last_step != trainer.global_step:
            self.search(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"schedules": schedules_doc(self.tuned), "report": self.report, "searches": self.searches}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tuned = load_schedules(state_dict["schedules"])
        self.report, self.searches = dict(state_dict.get("report", {})), int(state_dict.get("searches", 0))

    # --- the search --------------------------------------------------------------------------------
    @torch.no_grad()
    def search(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[int, tuple[torch.Tensor, float]]:
        """Search every k of ``step_counts`` on the module as it is now; set, write and return the grids."""
        from flowmap_lit.grid_search import search_grid

        start = time.perf_counter()
        with evaluation_mode(trainer, pl_module):
            criterion = self._criterion(trainer, pl_module)
            gamma0 = float(getattr(pl_module, "sample_gamma", 0.0))
            tuned, report = {}, {}
            for k in self.step_counts:
                res = search_grid(criterion, k, self.budget, self.seed, gamma0, self.gamma)
                tuned[k] = (res.grid, res.gamma)
                report[str(k)] = {**res.baselines, "tuned": res.value, "evaluations": res.evaluations}
        self.tuned, self.report = tuned, report
        self.searches += 1
        self.seconds = time.perf_counter() - start  # the last search's wall time (printed with its result)
        pl_module.schedules.update(tuned)
        if trainer.state.fn == "fit":
            self._last_step = trainer.global_step
        out = self._write(trainer)
        rank_zero_info(f"ScheduleSearch at step {trainer.global_step} ({self.criterion} on {self.num_samples} held-out "
                       f"samples, {self.seconds:.1f} s): " + "; ".join(
                           f"{k} steps {[round(float(t), 4) for t in grid]}"
                           + (f" gamma {g:.3g}" if self.gamma else "")
                           + f" ({report[str(k)]['tuned']:.4g}, uniform {report[str(k)]['uniform']:.4g})"
                           for k, (grid, g) in tuned.items())
                       + ("" if out is None else f" -> {out}"))
        return tuned

    def output_path(self, trainer: pl.Trainer) -> Path | None:
        if self.path is not None:
            return Path(self.path)
        ckpt = getattr(trainer, "checkpoint_callback", None)
        directory = getattr(ckpt, "dirpath", None) or getattr(trainer, "log_dir", None)
        return None if directory is None else Path(directory) / "schedules.json"

    def _write(self, trainer: pl.Trainer) -> Path | None:
        out = self.output_path(trainer)
        if out is None or not trainer.is_global_zero:
            return out
        meta = {"criterion": self.criterion, "seed": self.seed, "budget": self.budget, "num": self.num_samples,
                "global_step": trainer.global_step, "held_out": self.report}
        return save_schedules(out, {k: g for k, (g, _) in self.tuned.items()},
                              {k: gm for k, (_, gm) in self.tuned.items()}, meta)

    def _fid_callback(self, trainer: pl.Trainer):
        from flowmap_lit.callbacks.fid import FewStepFID

        found = [c for c in trainer.callbacks if isinstance(c, FewStepFID)]
        if not found or not found[0].features:
            raise ValueError("ScheduleSearch(criterion='fid') measures with the feature network and reference of the "
                             "trainer's FewStepFID callback, and there is none (or it has no feature network); add "
                             "a FewStepFID callback, or use criterion: flowmap_error")
        return found[0]

    def _inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple:
        """This rank's share of the held-out noise, labels and text conditioning (and, for the flow-map
        error, the teacher's reference ODE from them), made once."""
        if self._reference is None:
            from flowmap_lit.grid_search import HELD_OUT_SEED
            from flowmap_lit.metrics.few_step import prompt_cond, rank_share, seeded_noise, text_prompts

            dm = trainer.datamodule
            share = rank_share(self.num_samples, trainer.global_rank, trainer.world_size)
            noise, labels = seeded_noise(share, self.num_samples, tuple(dm.shape), HELD_OUT_SEED + self.seed,
                                         getattr(pl_module, "num_classes", 0))
            noise = noise.to(pl_module.device)
            labels = labels.to(pl_module.device) if labels is not None else None
            cond = prompt_cond(text_prompts(dm, self.num_samples), share, pl_module.device)
            reference = None
            if self.criterion == "flowmap_error":
                reference = self._batched(pl_module.teacher_sample, noise, labels, cond,
                                          num_steps=self.reference_steps)
            self._reference = (noise, labels, cond, reference)
        return self._reference

    def _batched(self, fn, noise, labels, cond, **kw) -> torch.Tensor:
        from flowmap_lit.metrics.few_step import sample_in_batches

        if self.guidance is not None:
            kw["guidance"] = self.guidance
        return sample_in_batches(fn, noise, labels, self.batch_size, cond, **kw)

    def _criterion(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Criterion:
        noise, labels, cond, reference = self._inputs(trainer, pl_module)
        device = noise.device

        def generator() -> torch.Generator:  # the same re-noising for every candidate, as the schedule command
            return torch.Generator(device=device).manual_seed(0)

        if self.criterion == "flowmap_error":
            def total(x: torch.Tensor) -> torch.Tensor:
                return trainer.strategy.reduce(x.double().square().sum(), reduce_op="sum")

            ref_total = total(reference)

            def flowmap_error(grid: torch.Tensor, gamma: float) -> float:
                x = self._batched(pl_module.sample, noise, labels, cond, schedule=grid, gamma=gamma,
                                  generator=generator())
                return float(total(x - reference) / ref_total)

            return flowmap_error

        from flowmap_lit.metrics.few_step import sampler_distances

        fid_callback = self._fid_callback(trainer)
        fid_callback.setup_metrics(trainer, pl_module)
        name = fid_callback.metric_names[0]
        metric = {name: fid_callback.metrics[name]}
        to_images = fid_callback.to_images(trainer.datamodule)
        kw = {} if self.guidance is None else {"guidance": self.guidance}

        def fid(grid: torch.Tensor, gamma: float) -> float:
            return float(sampler_distances(metric, pl_module.sample, noise, labels, self.batch_size, to_images, cond,
                                           schedule=grid, gamma=gamma, generator=generator(), **kw)[name])

        return fid
