"""The shard format (flowmap_lit.data.shards): round trip with statistics, corrupt and mismatched shards
named with the fix, missing statistics, and atomic writes."""

import json
import os
import warnings

import numpy as np
import pytest
import torch

from flowmap_lit.data import (
    DataWarning,
    LatentDataModule,
    ShardError,
    prepare_digits,
    read_stats,
    write_dataset,
    write_shards,
)
from tests.helpers.data import SHAPE, dm_for, index_of, read_all, toy_latents


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_and_stats(tmp_path, dtype):
    root = str(tmp_path / "rt")
    x, y = toy_latents(50)
    info = write_shards(root, "val", x, y, samples_per_shard=16, dtype=dtype)
    assert info == {"num_samples": 50, "num_shards": 4}
    assert sorted(os.listdir(root)) == [f"val-00000{i}.tar" for i in range(4)]
    write_dataset(root, {"train": (x, y), "val": (x, y)}, num_classes=5, source="t", samples_per_shard=16, dtype=dtype)
    stats = json.load(open(os.path.join(root, "stats.json")))
    assert stats["format"] == 1 and stats["shape"] == list(SHAPE) and stats["kind"] == "latent"
    assert stats["num_classes"] == 5 and stats["source"] == "t"
    assert stats["splits"] == {k: {"num_samples": 50, "num_shards": 4} for k in ("train", "val")}
    stored = x.astype(dtype).astype(np.float64)
    np.testing.assert_allclose(stats["mean"], stored.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], stored.std(axis=(0, 2, 3)), rtol=1e-6)

    dm = dm_for(root, val_batch_size=7)
    dm.setup("fit")
    assert dm.shape == SHAPE and dm.num_classes == 5
    out = read_all(dm.val_dataloader())
    order = np.argsort([index_of(k) for k in out["key"]])
    assert out["x"].dtype == torch.float32 and out["label"].dtype == torch.int64
    np.testing.assert_array_equal(out["x"].numpy()[order], x.astype(dtype).astype(np.float32))
    np.testing.assert_array_equal(out["label"].numpy()[order], y)


def damage(path: str, how: str) -> None:
    data = bytearray(open(path, "rb").read())
    if how == "garbage":
        data = np.random.default_rng(0).bytes(len(data))
    elif how == "truncated":
        data = data[: 512 * 12]  # cut exactly at a header: Python's tarfile alone would not notice
    elif how == "bad_member":
        header = data.index(b"\x93NUMPY")  # first latent.npy payload
        data[header : header + 64] = np.random.default_rng(0).bytes(64)
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["garbage", "truncated", "bad_member"])
def test_corrupt_shard(toy, how):
    root = toy[0]
    bad = os.path.join(root, "val-000001.tar")
    damage(bad, how)
    with pytest.raises(ShardError, match="val-000001.tar") as err:
        read_all(dm_for(root).val_dataloader())
    assert "on_error=warn" in str(err.value) and "Re-create" in str(err.value)
    with pytest.warns(DataWarning, match="val-000001.tar"):
        out = read_all(dm_for(root, on_error="warn").val_dataloader())
    good = {f"val_{i:08d}" for i in list(range(16)) + list(range(32, 40))}
    assert good <= set(out["key"]) and len(out["key"]) == len(set(out["key"])) < 40

    train_bad = os.path.join(root, "train-000002.tar")
    damage(train_bad, how)
    with pytest.raises(ShardError, match="train-000002.tar"):
        for _ in range(3):  # resampled: the bad shard comes up within a few epochs
            read_all(dm_for(root).train_dataloader())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        loader = dm_for(root, on_error="warn").train_dataloader()
        assert all(len(read_all(loader)["key"]) == 64 for _ in range(3))


def test_all_shards_bad_warn_gives_up(tmp_path):
    root = str(tmp_path / "bad")
    write_dataset(root, {"train": toy_latents(8), "val": toy_latents(8)}, 5, samples_per_shard=4)
    for i in range(2):
        damage(os.path.join(root, f"train-00000{i}.tar"), "garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(ShardError, match="in a row without a single good sample"):
            read_all(dm_for(root, on_error="warn").train_dataloader())


def test_wrong_shape(toy, tmp_path):
    root = toy[0]
    with pytest.raises(ValueError, match=r"\[2, 4, 4\].*expected_shape is \[4, 8, 8\]"):
        dm_for(root, expected_shape=[4, 8, 8]).setup("fit")
    dm_for(root, expected_shape=[2, 4, 4]).setup("fit")
    write_shards(root, "val", *toy_latents(40, shape=(2, 4, 5)), samples_per_shard=16)  # disagree with stats.json
    with pytest.raises(ShardError, match=r"val-000000.tar, sample 'val_00000000'.*shape \(2, 4, 5\)"):
        read_all(dm_for(root).val_dataloader())
    with pytest.warns(DataWarning):
        assert list(dm_for(root, on_error="warn").val_dataloader()) == []


def test_missing_stats(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"stats.json.*python -m flowmap_lit prepare digits"):
        read_stats(str(tmp_path))
    dm = LatentDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere/stats.json"):
        dm.setup("fit")


def test_prepare_digits_is_atomic(tmp_path, monkeypatch):
    """An interrupted write leaves no stats.json and no .tar: readers reject the directory."""
    import flowmap_lit.data.shards as shards

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    prepare_digits(str(tmp_path))
    monkeypatch.setattr(shards, "write_stats", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_digits(str(tmp_path))
    assert not (tmp_path / "stats.json").exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
