"""FID across step counts (``fid/{k}step``) as a callback, with a FID-versus-steps plot.

At every validation (and, if the last validation was not at the final step, at the end of fit)
each rank generates its share of ``num_samples`` with the EMA student at every step count in
``step_counts``; features are gathered by torchmetrics across ranks. Reference statistics of the
data are computed once and cached next to the shards (``flowmap_lit.metrics.fid``).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from flowmap_lit.callbacks.ema import evaluation_mode
from flowmap_lit.callbacks.flowmap_error import format_table, log_at_fit_end


class FewStepFID(pl.Callback):
    """FID of k-step samples against the data, for each k in ``step_counts``.

    ``feature``: ``"digits"`` (a small classifier trained on the digits, ``feature_path`` =
    its file, made by ``python -m flowmap_lit.metrics.digits_classifier``) or ``"inception"``
    (Inception-v3 pool features for real images, ``feature_path`` = local weights file). Samples
    are mapped to images by the data module's ``denormalize`` (the digits are their own images).
    """

    def __init__(
        self,
        feature: str = "digits",  # feature network kind: "digits" or "inception"
        feature_path: str | None = "data/digits/classifier.pt",  # its weights file (never downloaded)
        step_counts: list[int] = [1, 2, 4, 8],  # sampler step counts
        num_samples: int = 2000,  # generated samples per step count, over all ranks
        reference_split: str = "train",  # data split of the reference statistics
        batch_size: int = 500,  # samples per network call
        seed: int = 0,  # noise seed (rank r uses seed + r)
        guidance: float | None = None,  # guidance scale for sampling; None: the module's default
        print_table: bool = True,  # print the table at the end of fit / validate
        train_if_missing: bool = False,  # "digits": train the classifier (~10 s) when feature_path is missing
        teacher_steps: int | None = 64,  # at the end, also the teacher's FID with this many Heun steps (None: skip)
    ) -> None:
        self.feature, self.feature_path = feature, feature_path
        self.step_counts = list(step_counts)
        self.num_samples = num_samples
        self.reference_split = reference_split
        self.batch_size = batch_size
        self.seed = seed
        self.guidance = guidance
        self.print_table = print_table
        self.train_if_missing = train_if_missing
        self.teacher_steps = teacher_steps
        self.teacher_fid: float | None = None
        self.fid = None
        self.results: list[dict] = []
        self._last_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Here, not in a validation hook: validation runs without grad and the classifier must train.
        if self.train_if_missing and self.feature == "digits" and not Path(self.feature_path).is_file():
            if trainer.is_global_zero:
                from flowmap_lit.metrics import train_digits_classifier

                result = train_digits_classifier(trainer.datamodule.root, self.feature_path)
                rank_zero_info(f"trained the digits FID feature network: held-out accuracy "
                               f"{100 * result['accuracy']:.2f}% -> {self.feature_path}")
            trainer.strategy.barrier("fid_classifier")

    def _setup_metric(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fid is not None:
            return
        from flowmap_lit.metrics import FID, build_feature_extractor, dataset_reference_stats

        dm = trainer.datamodule
        extractor = build_feature_extractor(self.feature, self.feature_path).to(pl_module.device)
        if trainer.is_global_zero:  # rank 0 computes and caches; the others then read the cache
            stats = dataset_reference_stats(dm.root, self.reference_split, extractor, device=pl_module.device)
        trainer.strategy.barrier("fid_reference")
        if not trainer.is_global_zero:
            stats = dataset_reference_stats(dm.root, self.reference_split, extractor, device=pl_module.device)
        self.fid = FID(extractor).to(pl_module.device)
        self.fid.set_reference(stats)

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict]:
        self._setup_metric(trainer, pl_module)
        dm = trainer.datamodule
        rank, world = trainer.global_rank, trainer.world_size
        n_local = self.num_samples // world + (1 if rank < self.num_samples % world else 0)
        gen = torch.Generator().manual_seed(self.seed + rank)
        noise = torch.randn((n_local, *dm.shape), generator=gen).to(pl_module.device)
        k_classes = getattr(pl_module, "num_classes", 0)
        labels = torch.randint(0, k_classes, (n_local,), generator=gen).to(pl_module.device) if k_classes else None
        kwargs = {} if self.guidance is None else {"guidance": self.guidance}
        with evaluation_mode(trainer, pl_module):
            rows = [{"steps": k, "fid": self._fid_of(dm, pl_module.sample, noise, labels, num_steps=k, **kwargs)}
                    for k in self.step_counts]
            if self.teacher_steps and self.teacher_fid is None and hasattr(pl_module, "teacher_sample"):
                self.teacher_fid = self._fid_of(dm, pl_module.teacher_sample, noise, labels,
                                                num_steps=self.teacher_steps, **kwargs)
        self._last_step = trainer.global_step
        return rows

    def _fid_of(self, dm, sampler, noise, labels, **kwargs) -> float:
        """FID of ``sampler(noise, labels, **kwargs)`` over this rank's noise (and the other ranks')."""
        self.fid.reset_fake()
        for i in range(0, len(noise), self.batch_size):
            lab = labels[i:i + self.batch_size] if labels is not None else None
            self.fid.update_fake(dm.denormalize(sampler(noise[i:i + self.batch_size], lab, **kwargs)))
        return self.fid.compute()

    def _log(self, trainer, pl_module, rows) -> None:
        for row in rows:
            pl_module.log(f"fid/{row['steps']}step", row["fid"], rank_zero_only=True)
        experiment = getattr(trainer.logger, "experiment", None)
        if trainer.is_global_zero and experiment is not None and hasattr(experiment, "add_figure"):
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(4, 3))
            ax.plot([r["steps"] for r in rows], [r["fid"] for r in rows], "o-")
            ax.set(xscale="log", xticks=self.step_counts, xticklabels=self.step_counts, xlabel="steps", ylabel="FID")
            fig.tight_layout()
            experiment.add_figure("fid/versus_steps", fig, trainer.global_step)
            plt.close(fig)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.results = self.evaluate(trainer, pl_module)
        if trainer.state.fn == "fit":
            self._log(trainer, pl_module, self.results)
        elif self.print_table:
            self._print(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._last_step != trainer.global_step:  # a validation at the final step already evaluated and logged it
            self.results = self.evaluate(trainer, pl_module)
            log_at_fit_end(trainer, {f"fid/{row['steps']}step": row["fid"] for row in self.results})
        if self.print_table:
            self._print(trainer)

    def _print(self, trainer) -> None:
        if trainer.is_global_zero:
            rank_zero_info(f"\nFID ({self.feature} features, {self.num_samples} samples, reference: "
                           f"{self.reference_split} split) at step {trainer.global_step}:\n"
                           + format_table(self.results, ["steps", "fid"])
                           + (f"\nteacher, {self.teacher_steps}-step Heun ODE: FID {self.teacher_fid:.4g}"
                              if self.teacher_fid is not None else ""))
