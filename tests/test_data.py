"""Tests of flowmap_lit.data: shard format, datamodule streams, error handling, preparation CLI."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from flowmap_lit.data import (
    DataWarning, DigitsDataModule, LatentDataModule, ShardError, prepare_digits, read_stats, write_dataset,
    write_shards,
)
from flowmap_lit.commands.prepare import main as prepare_main

SHAPE = (2, 4, 4)


def toy_latents(n: int, seed: int = 0, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, *shape)) * [[[2.0]], [[0.5]]] + [[[1.0]], [[-3.0]]]).astype(np.float32)
    return x, rng.integers(0, 5, n)


@pytest.fixture
def toy(tmp_path):
    """64 train samples in 4 shards, 40 val samples in 3 shards (16, 16, 8)."""
    root = str(tmp_path / "toy")
    train, val = toy_latents(64, 0), toy_latents(40, 1)
    write_dataset(root, {"train": train, "val": val}, num_classes=5, source="toy", samples_per_shard=16)
    return root, train, val


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


# ---------------------------------------------------------------------------- round trip
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


def test_normalize_and_denormalize(toy):
    root, (x, _), _ = toy
    dm = LatentDataModule(root, batch_size=64, num_workers=0, val_batch_size=40)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "label"} and batch["x"].shape == (64, *SHAPE)
    per_channel = batch["x"].transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(2), atol=0.1, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(2), atol=0.1, rtol=0)
    raw = next(iter(dm_for(root, val_batch_size=40).val_dataloader()))["x"]
    val = next(iter(LatentDataModule(root, num_workers=0, val_batch_size=40).val_dataloader()))["x"]
    torch.testing.assert_close(dm.denormalize(val), raw, atol=1e-5, rtol=1e-5)


def test_posterior_draws(tmp_path):
    root = str(tmp_path / "post")
    rng = np.random.default_rng(0)
    means = rng.standard_normal((48, *SHAPE)).astype(np.float32)
    stds = np.full_like(means, 0.5)
    y = rng.integers(0, 3, 48)
    stats = write_dataset(root, {"train": ((means, stds), y), "val": ((means, stds), y)}, 3, samples_per_shard=16)
    assert stats["kind"] == "posterior"
    np.testing.assert_allclose(stats["std"], np.sqrt(means.var(axis=(0, 2, 3)) + 0.25), rtol=1e-5)

    dm = dm_for(root, batch_size=48, shuffle_buffer=1)
    loader = dm.train_dataloader()
    draws = [read_all(loader) for _ in range(2)]  # two epochs
    for d in draws:
        z = (d["x"].numpy() - means[[index_of(k) for k in d["key"]]]) / 0.5
        assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
    first = {k: v for k, v in zip(draws[0]["key"], draws[0]["x"])}
    common = [k for k in draws[1]["key"] if k in first]
    assert common and all(not torch.equal(first[k], v) for k, v in zip(draws[1]["key"], draws[1]["x"]) if k in first)

    val1, val2 = read_all(dm.val_dataloader()), read_all(dm_for(root, num_workers=2).val_dataloader())
    sort = lambda d: d["x"][np.argsort([index_of(k) for k in d["key"]])]  # noqa: E731
    torch.testing.assert_close(sort(val1), sort(val2), rtol=0, atol=0)  # seeded by key: same for any workers
    assert not torch.equal(sort(val1), torch.from_numpy(means))
    mean_val = read_all(dm_for(root, val_posterior="mean").val_dataloader())
    np.testing.assert_array_equal(sort(mean_val).numpy(), means)


def test_train_stream_reproducible(toy):
    root = toy[0]
    first = lambda **kw: next(iter(dm_for(root, **kw).train_dataloader()))["x"]  # noqa: E731
    torch.testing.assert_close(first(seed=3), first(seed=3), rtol=0, atol=0)
    assert not torch.equal(first(seed=3), first(seed=4))
    loader = dm_for(root, train_samples_per_epoch=40).train_dataloader()
    assert len(loader) == 5 and sum(1 for _ in loader) == 5 and sum(1 for _ in loader) == 5


def test_shard_cache_replays_the_same_stream(toy, monkeypatch):
    from flowmap_lit.data import stream as pipeline

    root = toy[0]
    opened = []
    real_open = open
    monkeypatch.setattr(pipeline, "open", lambda path, *a: opened.append(path) or real_open(path, *a), raising=False)
    plain = dm_for(root, cache_mb=0).train_dataloader()
    reference = [read_all(plain) for _ in range(3)]
    opens_plain, opened[:] = len(opened), []
    cached = dm_for(root).train_dataloader()  # 4 small shards: they fit the default cache_mb
    for epoch in reference:
        again = read_all(cached)
        assert again["key"] == epoch["key"] and torch.equal(again["x"], epoch["x"])
    assert len(opened) == 2 * 4 < opens_plain  # each file checked and parsed once, then replayed
    # a shard rewritten on disk (new size / modification time) is read again
    x, y = toy_latents(16, seed=9)
    write_shards(root, "train", np.concatenate([toy[1][0][:48], x]), np.concatenate([toy[1][1][:48], y]),
                 samples_per_shard=16)
    seen = torch.cat([read_all(cached)["x"] for _ in range(3)])
    assert any(torch.equal(row, torch.from_numpy(x[0])) for row in seen)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "int64"])
def test_load_npy_matches_numpy(order, dtype):
    import io

    from flowmap_lit.data.stream import load_npy

    array = np.asarray(np.arange(24).reshape(2, 3, 4), dtype=dtype, order=order)
    buf = io.BytesIO()
    np.save(buf, array)
    data = buf.getvalue()
    for _ in range(2):  # parsed header, then the cached one
        out = load_npy(data)
        assert out.dtype == array.dtype and out.shape == array.shape
        np.testing.assert_array_equal(out, array)
    with pytest.raises(ValueError):  # a truncated member still fails as np.load fails
        load_npy(data[:-8])


# ---------------------------------------------------------------------------- workers and ranks
@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_more_workers_than_shards(tmp_path):
    root = str(tmp_path / "one")
    train, val = toy_latents(20, 0), toy_latents(12, 1)
    write_dataset(root, {"train": train, "val": val}, 5, samples_per_shard=100)
    dm = dm_for(root, num_workers=3, batch_size=4, val_batch_size=5)
    train_loader = dm.train_dataloader()
    batches = list(train_loader)
    assert len(batches) == 5 and all(b["x"].shape == (4, *SHAPE) for b in batches)
    keys = read_all(dm.val_dataloader())["key"]
    assert sorted(keys) == [f"val_{i:08d}" for i in range(12)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_rank_split(toy, monkeypatch, num_workers):
    root = toy[0]
    val_keys, train = [], []
    for rank in range(2):
        dm = dm_for(root, num_workers=num_workers)
        monkeypatch.setattr(dm, "_rank_info", lambda rank=rank: (rank, 2))
        val_keys.append(read_all(dm.val_dataloader())["key"])
        train.append(read_all(dm.train_dataloader()))
    assert not set(val_keys[0]) & set(val_keys[1])
    assert len(val_keys[0]) == len(val_keys[1]) == 20  # equal shares: equal batch counts under DDP/FSDP
    assert sorted(val_keys[0] + val_keys[1]) == [f"val_{i:08d}" for i in range(40)]
    # an uneven split drops the remainder rather than give one rank an extra batch
    three = []
    for rank in range(3):
        dm = dm_for(root, num_workers=num_workers)
        monkeypatch.setattr(dm, "_rank_info", lambda rank=rank: (rank, 3))
        loader = dm.val_dataloader()
        three.append((read_all(loader)["key"], sum(1 for _ in loader)))
    assert [len(k) for k, _ in three] == [13, 13, 13] and len({n for _, n in three}) == 1
    assert len(set().union(*(set(k) for k, _ in three))) == 39
    assert len(train[0]["key"]) == len(train[1]["key"]) == 64 // 2 // 8 * 8
    assert train[0]["key"] != train[1]["key"]


# ---------------------------------------------------------------------------- errors
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


# ---------------------------------------------------------------------------- digits and preparation
def test_digits_datamodule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = DigitsDataModule(num_workers=0, batch_size=500, val_batch_size=300)  # root "data/digits" in the cwd
    assert dm.root == str(tmp_path / "data" / "digits")
    assert dm.shape == (1, 8, 8) and dm.num_classes == 10  # known before prepare_data
    preview = dict(dm.stats)
    dm.prepare_data()
    assert sorted(os.listdir(dm.root)) == ["stats.json", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    dm.setup("fit")
    assert dm.stats == preview
    splits = dm.stats["splits"]
    assert splits["train"]["num_samples"] == 1497 and splits["val"]["num_samples"] == 300
    train = torch.cat([b["x"] for b in dm.train_dataloader()])
    val = next(iter(dm.val_dataloader()))
    assert train.shape == (1000, 1, 8, 8) and val["x"].shape == (300, 1, 8, 8)
    assert set(val["label"].tolist()) == set(range(10))
    assert abs(train.mean()) < 0.05 and abs(train.std() - 1) < 0.05
    assert abs(val["x"].mean()) < 0.15 and abs(val["x"].std() - 1) < 0.15
    raw = dm.denormalize(val["x"])
    assert raw.min() >= -1 - 1e-5 and raw.max() <= 1 + 1e-5
    mtime = os.path.getmtime(os.path.join(dm.root, "stats.json"))
    dm.prepare_data()  # already there: not rewritten
    assert os.path.getmtime(os.path.join(dm.root, "stats.json")) == mtime


def test_cli_digits(tmp_path):
    out = tmp_path / "digits"
    cmd = [sys.executable, "-m", "flowmap_lit", "prepare", "digits", "--out", str(out), "--samples-per-shard", "500"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
    stats = read_stats(str(out))
    assert stats["splits"]["train"] == {"num_samples": 1497, "num_shards": 3}
    assert stats["source"].startswith("python -m flowmap_lit prepare digits")


def test_shapes_dataset(tmp_path, monkeypatch):
    """The second built-in dataset: deterministic, balanced, in range, classes visibly different,
    prepared by its datamodule on first use (stats known before) and by the CLI."""
    from flowmap_lit.data import ShapesDataModule
    from flowmap_lit.data.prepare import SHAPES_CLASSES, shapes_arrays

    a, b, c = shapes_arrays(0), shapes_arrays(0), shapes_arrays(1)
    assert np.array_equal(a["train"][0], b["train"][0]) and not np.array_equal(a["train"][0], c["train"][0])
    x, y = a["train"]
    assert x.shape == (1700, 3, 8, 8) and x.dtype == np.float32 and a["val"][0].shape == (300, 3, 8, 8)
    assert x.min() >= -1 and x.max() <= 1
    counts = np.bincount(np.concatenate([y, a["val"][1]]), minlength=len(SHAPES_CLASSES))
    assert counts.tolist() == [500] * 4
    # Bars are thin: a horizontal bar's bright pixels share rows, a vertical bar's share columns.
    bright = (x.max(1) > x.reshape(len(x), -1).mean(1)[:, None, None] + 0.3)
    rows, cols = bright.any(2).sum(1), bright.any(1).sum(1)
    assert (rows[y == 1] <= 2).mean() > 0.9 and (cols[y == 2] <= 2).mean() > 0.9
    monkeypatch.chdir(tmp_path)
    dm = ShapesDataModule(num_workers=0, batch_size=100)
    assert dm.shape == (3, 8, 8) and dm.num_classes == 4
    preview = dict(dm.stats)
    dm.prepare_data()
    assert sorted(os.listdir(dm.root)) == ["stats.json", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    dm.setup("fit")
    assert dm.stats == preview
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (100, 3, 8, 8)
    out = tmp_path / "shapes2"
    stats = prepare_main(["shapes", "--out", str(out)])
    assert stats["source"] == f"python -m flowmap_lit prepare shapes --out {out}" and stats["num_classes"] == 4


def test_cli_images(tmp_path):
    from PIL import Image

    src = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 3), ("dog", 4)):
        (src / cls).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (10 + i, 7 + 3 * i, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(src / cls / f"{i}.png")
    (src / "cat" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    stats = prepare_main(["images", "--src", str(src), "--out", str(out), "--resolution", "6", "--val-fraction", "0.3"])
    assert stats["shape"] == [3, 6, 6] and stats["num_classes"] == 2
    assert stats["splits"]["train"]["num_samples"] == 5 and stats["splits"]["val"]["num_samples"] == 2
    data = read_all(dm_for(str(out), batch_size=5).train_dataloader())
    assert data["x"].abs().max() <= 1 and set(data["label"].tolist()) <= {0, 1}


def test_cli_array(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "lat.npz"
    np.savez(npz, x=rng.standard_normal((30, 4, 2, 2)), y=rng.integers(0, 3, 30))
    stats = prepare_main(["array", "--src", str(npz), "--out", str(tmp_path / "a"), "--samples-per-shard", "8"])
    assert stats["kind"] == "latent" and stats["shape"] == [4, 2, 2] and stats["num_classes"] == 3
    assert stats["splits"] == {"train": {"num_samples": 27, "num_shards": 4}, "val": {"num_samples": 3, "num_shards": 1}}
    post = tmp_path / "post.npz"
    m = rng.standard_normal((10, 4, 2, 2)).astype(np.float16)
    np.savez(post, mean=m, std=np.ones_like(m), y=np.zeros(10, int), mean_val=m[:2], std_val=m[:2] * 0 + 1, y_val=[0, 0])
    stats = prepare_main(["array", "--src", str(post), "--out", str(tmp_path / "p")])
    assert stats["kind"] == "posterior" and stats["splits"]["val"]["num_samples"] == 2


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


def test_trainer_fit(toy, tmp_path):
    """Lightning accepts the loaders: fixed train batches per epoch, all val batches."""
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.train_batches, self.val_samples = 0, 0

        def training_step(self, batch, _):
            self.train_batches += 1
            return (self.w - batch["x"].mean()) ** 2

        def validation_step(self, batch, _):
            self.val_samples += len(batch["x"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Probe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=LatentDataModule(toy[0], batch_size=8, num_workers=0))
    assert model.train_batches == 2 * 8 and model.val_samples == 2 * 40 + 16  # + sanity check (2 batches)


DDP_SCRIPT = '''
import sys, torch, lightning as L
from flowmap_lit.data import LatentDataModule

class Probe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin, self.keys = torch.nn.Linear(32, 1), {"train": [], "val": []}
    def training_step(self, batch, _):
        self.keys["train"] += batch["key"]
        return self.lin(batch["x"].flatten(1)).pow(2).mean()
    def validation_step(self, batch, _):
        self.keys["val"] += batch["key"]
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)
    def on_fit_end(self):
        gathered = [None, None]
        torch.distributed.all_gather_object(gathered, self.keys)
        if self.global_rank == 0:
            torch.save(gathered, sys.argv[2])

dm = LatentDataModule(sys.argv[1], batch_size=8, num_workers=1, return_keys=True)
trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False, num_sanity_val_steps=0,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Probe(), datamodule=dm)
'''


@pytest.mark.slow
def test_ddp_two_ranks(toy, tmp_path):
    """A real 2-process DDP run (subprocess, gloo): equal train batches, disjoint complete validation."""
    script, out = tmp_path / "ddp.py", tmp_path / "keys.pt"
    script.write_text(DDP_SCRIPT)
    subprocess.run([sys.executable, str(script), toy[0], str(out)], check=True, timeout=300, cwd=tmp_path,
                   capture_output=True)
    keys = torch.load(out)
    assert len(keys[0]["train"]) == len(keys[1]["train"]) == 64 // 2 // 8 * 8
    assert keys[0]["train"] != keys[1]["train"]
    assert sorted(keys[0]["val"] + keys[1]["val"]) == [f"val_{i:08d}" for i in range(40)]


def test_teardown_ends_persistent_workers_and_loaders_still_work(toy):
    root, _, _ = toy
    import multiprocessing

    dm = LatentDataModule(root=str(root), batch_size=8, num_workers=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    before = len(multiprocessing.active_children())
    first = [b["x"] for b in loader]
    assert len(multiprocessing.active_children()) == before + 1  # the persistent worker stays between epochs
    dm.teardown("fit")
    assert len(multiprocessing.active_children()) == before
    again = [b["x"] for b in loader]  # a later epoch starts a new worker
    assert len(again) == len(first)
    dm.teardown("fit")
    assert len(multiprocessing.active_children()) == before
