"""``PriorDataModule``: batches for data-free distillation, with class labels and no data.

Data-free distillation (``FlowMapDistillModule(states="student" | "teacher")``, docs/design.md
section 13) needs only the class distribution: its noisy points come from noise and the student
or the teacher. This data module serves ``{"label": LongTensor (B,)}`` batches, labels drawn from
``class_weights`` (uniform by default), and reads no shard. Evaluation callbacks still need to
know the data's shape, normalization and root (for FID reference statistics): give ``source``,
another data module whose metadata (``stats.json``) it passes on, or ``shape`` and
``num_classes`` for a model without a dataset.

Labels of batch ``b`` of epoch ``e`` on rank ``k`` depend only on ``(seed, e, k, b)``, so a run
resumed mid-epoch continues with the labels the uninterrupted run would have drawn.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from flowmap_lit.seeding import derive_seed


class _Labels(IterableDataset):
    def __init__(self, num_batches: int, batch_size: int, num_classes: int, weights: torch.Tensor | None,
                 seed: int, start: int = 0) -> None:
        self.num_batches, self.batch_size, self.num_classes = num_batches, batch_size, num_classes
        self.weights, self.seed, self.start = weights, seed, start

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        start, self.start = self.start, 0  # a resumed epoch skips only once
        for b in range(start, self.num_batches):
            gen = torch.Generator().manual_seed(derive_seed(self.seed, b))
            if self.num_classes <= 0:
                yield {"batch_size": torch.tensor(self.batch_size)}
            elif self.weights is None:
                yield {"label": torch.randint(self.num_classes, (self.batch_size,), generator=gen)}
            else:
                yield {"label": torch.multinomial(self.weights, self.batch_size, replacement=True, generator=gen)}


class PriorDataModule(L.LightningDataModule):
    """Labels-only batches for data-free distillation (see the module docstring).

    Args:
        source: A data module (e.g. flowmap_lit.data.DigitsDataModule) whose shape, classes,
            normalization, root and text embeddings this one reports; its shards are never read
            here (its prepare_data still runs, so built-in datasets exist for evaluation). None:
            give shape and num_classes.
        shape: Shape [C, H, W] of one sample; None: the source's.
        num_classes: Number of classes; None: the source's (0: unconditional batches).
        batch_size: Samples per batch per rank.
        batches_per_epoch: Batches of one training epoch per rank.
        val_batches: Batches of one validation epoch per rank (validation hooks, e.g. the FID
            callbacks, run on them); 0: no validation batches.
        class_weights: Relative frequency of each class; None: uniform.
        seed: Base seed of the labels; batch b of epoch e on rank k depends on (seed, e, k, b).
    """

    def __init__(
        self,
        source: L.LightningDataModule | None = None,
        shape: list[int] | None = None,
        num_classes: int | None = None,
        batch_size: int = 128,
        batches_per_epoch: int = 1000,
        val_batches: int = 1,
        class_weights: list[float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if source is None and (shape is None or num_classes is None):
            raise ValueError("PriorDataModule needs a source data module, or both shape and num_classes")
        if batch_size < 1 or batches_per_epoch < 1 or val_batches < 0:
            raise ValueError(f"batch_size and batches_per_epoch must be >= 1 and val_batches >= 0, got "
                             f"{batch_size}, {batches_per_epoch}, {val_batches}")
        self.source = source
        self._shape = None if shape is None else tuple(int(v) for v in shape)
        self._num_classes = num_classes
        self.batch_size, self.batches_per_epoch, self.val_batches = batch_size, batches_per_epoch, val_batches
        self.seed = seed
        if class_weights is not None:
            weights = torch.tensor(class_weights, dtype=torch.float64)
            if weights.ndim != 1 or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(f"class_weights must be non-negative with a positive sum, got {class_weights}")
            if len(weights) != self.num_classes:
                raise ValueError(f"class_weights has {len(weights)} entries for {self.num_classes} classes")
            self.class_weights = weights
        else:
            self.class_weights = None

    # --- what evaluation reads --------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape if self._shape is not None else tuple(self.source.shape)

    @property
    def num_classes(self) -> int:
        return int(self._num_classes) if self._num_classes is not None else int(self.source.num_classes)

    @property
    def stats(self) -> dict:
        if self.source is not None:
            return {**self.source.stats, "shape": list(self.shape), "num_classes": self.num_classes}
        return {"shape": list(self.shape), "num_classes": self.num_classes}

    @property
    def normalize(self) -> bool:
        return bool(getattr(self.source, "normalize", False))

    @property
    def root(self) -> str | None:
        return getattr(self.source, "root", None)

    @property
    def null_cond(self):
        return getattr(self.source, "null_cond", None)

    @property
    def text(self):
        return getattr(self.source, "text", None)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.source.denormalize(x) if self.source is not None else x

    def prepare_data(self) -> None:
        if self.source is not None:
            self.source.prepare_data()

    # --- batches ------------------------------------------------------------------------------------
    def _rank_epoch(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return int(trainer.global_rank), int(trainer.current_epoch)

    def train_dataloader(self) -> DataLoader:
        rank, epoch = self._rank_epoch()
        start = 0
        if self.trainer is not None:  # a resumed epoch continues where it stopped
            start = int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed) % self.batches_per_epoch
        labels = _Labels(self.batches_per_epoch, self.batch_size, self.num_classes, self.class_weights,
                         derive_seed(self.seed, epoch, rank), start)
        return DataLoader(labels, batch_size=None)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_batches == 0:
            return []
        rank, _ = self._rank_epoch()
        labels = _Labels(self.val_batches, self.batch_size, self.num_classes, self.class_weights,
                         derive_seed(self.seed, -1, rank))
        return DataLoader(labels, batch_size=None)
