"""The data modules (flowmap_lit.data): normalization, posterior draws, the built-in digits and shapes
datasets prepared on first use, and Lightning's use of the loaders."""

import os

import numpy as np
import torch

from flowmap_lit.commands.prepare import main as prepare_main
from flowmap_lit.data import DigitsDataModule, LatentDataModule, write_dataset
from tests.helpers.data import SHAPE, dm_for, index_of, read_all


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
