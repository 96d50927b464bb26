"""A dataset of random latents for the evaluation tests."""

from pathlib import Path

import numpy as np

from flowmap_lit.data import write_dataset


def latent_dataset(root: Path, n: int = 120) -> np.ndarray:
    """``n`` random 4 x 4 x 4 latents of 10 classes as the train split at ``root`` (shards of 50); returns them."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((n, 4, 4, 4)).astype(np.float32)
    labels = rng.integers(0, 10, n)
    write_dataset(str(root), {"train": (latents, labels)}, num_classes=10, samples_per_shard=50)
    return latents
