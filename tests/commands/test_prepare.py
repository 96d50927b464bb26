"""``python -m flowmap_lit prepare``: the digits, shapes, image-folder and array sources."""

import numpy as np

from flowmap_lit.commands.prepare import main as prepare_main
from flowmap_lit.data import read_stats
from tests.helpers.cli import cli
from tests.helpers.data import dm_for, read_all


def test_cli_digits(tmp_path):
    out = tmp_path / "digits"
    cli("prepare", "digits", "--out", out, "--samples-per-shard", "500")
    stats = read_stats(str(out))
    assert stats["splits"]["train"] == {"num_samples": 1497, "num_shards": 3}
    assert stats["source"].startswith("python -m flowmap_lit prepare digits")


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
    assert stats["splits"] == {"train": {"num_samples": 27, "num_shards": 4},
                               "val": {"num_samples": 3, "num_shards": 1}}
    post = tmp_path / "post.npz"
    m = rng.standard_normal((10, 4, 2, 2)).astype(np.float16)
    np.savez(post, mean=m, std=np.ones_like(m), y=np.zeros(10, int), mean_val=m[:2], std_val=m[:2] * 0 + 1,
             y_val=[0, 0])
    stats = prepare_main(["array", "--src", str(post), "--out", str(tmp_path / "p")])
    assert stats["kind"] == "posterior" and stats["splits"]["val"]["num_samples"] == 2
