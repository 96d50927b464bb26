"""Non-finite data is caught at the door: refused when written, flagged with shard and key when read."""

import json

import numpy as np
import pytest

from flowmap_lit.data import LatentDataModule, ShardError, write_dataset
from flowmap_lit.data import shards as shards_module


def latents(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 2, 4, 4)).astype(np.float32), rng.integers(0, 3, n)


def test_write_refuses_nan_naming_the_sample_and_keeps_the_old_dataset(tmp_path):
    root = str(tmp_path / "data")
    write_dataset(root, {"train": latents(20, 0), "val": latents(8, 1)}, num_classes=3, samples_per_shard=8)
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}
    x, y = latents(20, 2)
    x[13, 1, 2, 2] = np.nan
    x[17, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"split 'train': latent of sample 13 \(and 1 more\) holds NaN"):
        write_dataset(root, {"train": (x, y), "val": latents(8, 3)}, num_classes=3, samples_per_shard=8)
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before  # nothing lost
    mean, std = latents(20, 4)[0], np.ones((20, 2, 4, 4), np.float32)
    std[3] = np.nan
    with pytest.raises(ValueError, match="std of sample 3 holds NaN"):
        write_dataset(str(tmp_path / "post"), {"train": ((mean, std), y)}, num_classes=3)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_nan_sample_written_by_other_means_is_flagged_with_shard_and_key(tmp_path, monkeypatch):
    root = tmp_path / "data"
    x, y = latents(24, 5)
    x_val, y_val = latents(8, 6)
    x_val[5] = np.nan
    monkeypatch.setattr(shards_module, "check_finite", lambda *a, **k: None)  # a writer without the check
    write_dataset(str(root), {"train": (x, y), "val": (x_val, y_val)}, num_classes=3, samples_per_shard=4)
    dm = LatentDataModule(str(root), batch_size=4, num_workers=0)
    dm.setup("fit")
    with pytest.raises(ShardError, match=r"val-000001\.tar, sample 'val_00000005'.*NaN or infinite"):
        for _ in dm.val_dataloader():
            pass

    x[10] = np.inf  # in the train split, the channel statistics are not finite either
    with pytest.raises(ValueError, match="non-finite channel statistics"):  # the writer reads its stats back
        write_dataset(str(root), {"train": (x, y), "val": (x_val, y_val)}, num_classes=3, samples_per_shard=4)
    assert "Infinity" in (root / "stats.json").read_text()
    json.loads((root / "stats.json").read_text())
    with pytest.raises(ValueError, match="non-finite channel statistics.*prepare refuses"):
        LatentDataModule(str(root), batch_size=4, num_workers=0).setup("fit")
