"""On-disk format of a flowmap_lit latent dataset (format version 1).

A dataset is one directory::

    data/digits/
      stats.json                 written LAST: its presence means the dataset is complete
      train-000000.tar           WebDataset shards, named {split}-{index:06d}.tar
      train-000001.tar
      val-000000.tar

Each shard is a plain (uncompressed) tar file. Consecutive members sharing a key form
one sample (WebDataset convention; a key contains no ".")::

    train_00000000.latent.npy    a latent, any shape C x H x W, float16 or float32
    train_00000000.cls           class label as ASCII text, e.g. b"7"

or, for VAE posteriors (``kind == "posterior"``), instead of ``latent.npy``::

    train_00000000.mean.npy      posterior mean, C x H x W
    train_00000000.std.npy       posterior standard deviation, C x H x W

A posterior sample is drawn as ``mean + std * N(0, 1)`` every time the sample is read.

``stats.json`` (``FORMAT_VERSION == 1``)::

    {
      "format": 1,
      "shape": [C, H, W],                 latent shape of every sample
      "num_classes": 10,                  labels are 0 .. num_classes - 1
      "kind": "latent" | "posterior",
      "mean": [m_0, ..., m_{C-1}],        per-channel mean of the train latents
      "std":  [s_0, ..., s_{C-1}],        per-channel std of the train latents
      "splits": {"train": {"num_samples": n, "num_shards": k}, "val": {...}},
      "source": "python -m flowmap_lit.data.prepare digits --out data/digits"
    }

For posterior data the per-channel statistics describe the drawn latents: the mean is the
mean of the posterior means; the variance is the variance of the means plus the average
posterior variance (law of total variance).

Shards are written to ``*.tar.tmp`` and renamed, so a killed writer never leaves a
truncated ``.tar``; readers list shards from ``stats.json`` (``num_shards``), so stale
shards from an older, larger dataset in the same directory are never read.
"""

import os

FORMAT_VERSION = 1                       # version of stats.json and the shard layout
STATS_FILE = "stats.json"                # name of the statistics file next to the shards
KINDS = ("latent", "posterior")          # sample kinds: stored latent, or VAE posterior pair
PREPARE_CMD = "python -m flowmap_lit.data.prepare"  # the CLI that creates datasets


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``, e.g. ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


def shard_paths(root: str, split: str, num_shards: int) -> list[str]:
    """Absolute paths of the ``num_shards`` shards of ``split`` under ``root``."""
    return [os.path.join(os.path.abspath(root), shard_name(split, i)) for i in range(num_shards)]


def sample_key(split: str, index: int) -> str:
    """Key of sample ``index`` of ``split`` (no dots: WebDataset splits keys at the first one)."""
    return f"{split}_{index:08d}"
