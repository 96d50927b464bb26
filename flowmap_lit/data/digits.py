"""``DigitsDataModule``: the scikit-learn 8x8 digits as a latent dataset, created on first use.

The smallest end-to-end benchmark (docs/design.md section 8): 1 x 8 x 8 "latents" (the pixels,
scaled to [-1, 1]), 10 classes, 1497 train / 300 val samples. ``prepare_data()`` writes the
shards with ``prepare_digits`` when ``<root>/stats.json`` is missing; Lightning calls it on
local rank 0 only, and the other ranks wait at a barrier before ``setup()``.
"""

import os

from .datamodule import LatentDataModule
from .format import STATS_FILE


class DigitsDataModule(LatentDataModule):
    """``LatentDataModule`` over ``root`` (default ``data/digits``), preparing the digits there if needed.

    Takes every ``LatentDataModule`` argument; ``samples_per_shard`` only matters when the
    shards are (re)created.
    """

    def __init__(
        self,
        root: str = "data/digits",       # shard directory; relative to the current working directory
        batch_size: int = 256,           # training batch size per rank
        samples_per_shard: int = 750,    # when preparing: 750 gives 2 train shards + 1 val shard
        **kwargs,                        # any other LatentDataModule argument
    ):
        self.samples_per_shard = samples_per_shard
        super().__init__(root=root, batch_size=batch_size, **kwargs)

    def load_stats(self) -> dict:
        """``stats.json`` if prepared; otherwise the same statistics computed in memory, so that
        ``shape`` / ``num_classes`` work right after construction (e.g. to size a model)."""
        if os.path.isfile(os.path.join(self.root, STATS_FILE)):
            return super().load_stats()
        from .prepare import digits_stats

        return self._checked(digits_stats(self.root, self.samples_per_shard))

    def prepare_data(self) -> None:
        """Write the digits shards unless ``stats.json`` already exists (runs on local rank 0)."""
        if not os.path.isfile(os.path.join(self.root, STATS_FILE)):
            from .prepare import prepare_digits  # lazy: keeps `python -m flowmap_lit.data.prepare` clean

            prepare_digits(self.root, samples_per_shard=self.samples_per_shard)
