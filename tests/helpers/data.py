"""Toy latent datasets for the data tests: arrays, shard directories, and reading a loader back."""

import numpy as np
import torch

from flowmap_lit.data import LatentDataModule

SHAPE = (2, 4, 4)


def toy_latents(n: int, seed: int = 0, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, *shape)) * [[[2.0]], [[0.5]]] + [[[1.0]], [[-3.0]]]).astype(np.float32)
    return x, rng.integers(0, 5, n)


def read_all(loader) -> dict:
    """All batches of a loader, concatenated; keys must be in the batch."""
    xs, ys, keys = [], [], []
    for batch in loader:
        xs.append(batch["x"]), ys.append(batch["label"]), keys.extend(batch["key"])
    return {"x": torch.cat(xs), "label": torch.cat(ys), "key": keys}


def dm_for(root, **kw) -> LatentDataModule:
    kw = {"batch_size": 8, "num_workers": 0, "return_keys": True, "normalize": False, **kw}
    return LatentDataModule(root, **kw)


def index_of(key: str) -> int:
    return int(key.split("_")[1])
