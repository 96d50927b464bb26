"""The streams of the data modules (flowmap_lit.data.stream): reproducible training streams, the shard
cache, the .npy reader, workers and ranks, and the persistent workers' teardown."""

import gc
import multiprocessing
import subprocess
import sys

import numpy as np
import pytest
import torch

from flowmap_lit.data import LatentDataModule, write_dataset, write_shards
from tests.helpers.data import SHAPE, dm_for, read_all, toy_latents


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
    dm.teardown("fit")
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
        dm.teardown("fit")  # no idle workers left behind for a later test
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
        dm.teardown("fit")
    assert [len(k) for k, _ in three] == [13, 13, 13] and len({n for _, n in three}) == 1
    assert len(set().union(*(set(k) for k, _ in three))) == 39
    assert len(train[0]["key"]) == len(train[1]["key"]) == 64 // 2 // 8 * 8
    assert train[0]["key"] != train[1]["key"]


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
    dm = LatentDataModule(root=str(root), batch_size=8, num_workers=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    gc.collect()  # loaders of earlier tests end their workers when collected: not while this test counts
    before = set(multiprocessing.active_children())
    first = [b["x"] for b in loader]
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 1  # the persistent worker stays between epochs
    dm.teardown("fit")
    assert not set(multiprocessing.active_children()) - before
    again = [b["x"] for b in loader]  # a later epoch starts a new worker
    assert len(again) == len(first)
    dm.teardown("fit")
    assert not set(multiprocessing.active_children()) - before
