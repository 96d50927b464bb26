"""The built-in datasets as latent datasets, created on first use: ``DigitsDataModule``, ``ShapesDataModule``.

The smallest end-to-end benchmarks (docs/design.md section 8), made by this package alone:

- digits: the scikit-learn 8x8 digits, 1 x 8 x 8 "latents" (the pixels, scaled to [-1, 1]),
  10 classes, 1497 train / 300 val samples;
- shapes: procedural colored shapes (``prepare.shapes_arrays``), 3 x 8 x 8 in [-1, 1], 4 classes,
  1700 train / 300 val samples, the second dataset every quality setting is checked on.

``prepare_data()`` writes the shards when ``<root>/stats.json`` is missing; Lightning calls it on
local rank 0 only, and the other ranks wait at a barrier before ``setup()``.
"""

import os

from .datamodule import LatentDataModule
from .format import STATS_FILE


class BuiltinDataModule(LatentDataModule):
    """``LatentDataModule`` over ``root``, writing the built-in dataset ``dataset`` there if needed.

    Args:
        root: Shard directory, written when it has no stats.json; relative to the current working
            directory.
        batch_size: Training batch size per rank.
        samples_per_shard: Samples per shard when the dataset is written; no effect once it exists.
    """

    dataset: str = ""  # key of prepare.BUILTIN_DATASETS

    def __init__(self, root: str, batch_size: int, samples_per_shard: int, **kwargs):
        self.samples_per_shard = samples_per_shard
        super().__init__(root=root, batch_size=batch_size, **kwargs)

    def load_stats(self) -> dict:
        """``stats.json`` if prepared; otherwise the same statistics computed in memory, so that
        ``shape`` / ``num_classes`` work right after construction (e.g. to size a model)."""
        if os.path.isfile(os.path.join(self.root, STATS_FILE)):
            return super().load_stats()
        from .prepare import BUILTIN_DATASETS

        return self._checked(BUILTIN_DATASETS[self.dataset][1](self.root, self.samples_per_shard))

    def prepare_data(self) -> None:
        """Write the shards unless ``stats.json`` already exists (runs on local rank 0)."""
        if not os.path.isfile(os.path.join(self.root, STATS_FILE)):
            from .prepare import BUILTIN_DATASETS  # lazy: keeps `python -m flowmap_lit prepare` clean

            BUILTIN_DATASETS[self.dataset][0](self.root, samples_per_shard=self.samples_per_shard)


class DigitsDataModule(BuiltinDataModule):
    """The digits under ``root`` (default ``data/digits``), prepared there if needed.

    Takes every ``LatentDataModule`` argument; ``samples_per_shard`` only matters when the
    shards are (re)created.

    Args:
        root: Shard directory, where the digits are written when it has no stats.json; relative to
            the current working directory.
        batch_size: Training batch size per rank.
        samples_per_shard: Samples per shard when the digits are written (750: 2 train shards and
            1 val shard); no effect once they exist.
    """

    dataset = "digits"

    def __init__(
        self,
        root: str = "data/digits",
        batch_size: int = 256,
        samples_per_shard: int = 750,
        **kwargs,  # any other LatentDataModule argument
    ):
        super().__init__(root=root, batch_size=batch_size, samples_per_shard=samples_per_shard, **kwargs)


class ShapesDataModule(BuiltinDataModule):
    """The procedural shapes under ``root`` (default ``data/shapes``), prepared there if needed.

    Takes every ``LatentDataModule`` argument; ``samples_per_shard`` only matters when the
    shards are (re)created.

    Args:
        root: Shard directory, where the shapes are written when it has no stats.json; relative to
            the current working directory.
        batch_size: Training batch size per rank.
        samples_per_shard: Samples per shard when the shapes are written (850: 2 train shards and
            1 val shard); no effect once they exist.
    """

    dataset = "shapes"

    def __init__(
        self,
        root: str = "data/shapes",
        batch_size: int = 256,
        samples_per_shard: int = 850,
        **kwargs,  # any other LatentDataModule argument
    ):
        super().__init__(root=root, batch_size=batch_size, samples_per_shard=samples_per_shard, **kwargs)
