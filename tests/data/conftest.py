"""The ``toy`` dataset of the data tests."""

import pytest

from flowmap_lit.data import write_dataset
from tests.helpers.data import toy_latents


@pytest.fixture
def toy(tmp_path):
    """64 train samples in 4 shards, 40 val samples in 3 shards (16, 16, 8)."""
    root = str(tmp_path / "toy")
    train, val = toy_latents(64, 0), toy_latents(40, 1)
    write_dataset(root, {"train": train, "val": val}, num_classes=5, source="toy", samples_per_shard=16)
    return root, train, val
