"""ImageNet-style preparation (flowmap_lit.data.imagenet, python -m flowmap_lit prepare imagenet): center crop,
SD-VAE posterior shards, resume, parallel writers, tar sources."""

import io
import os
import tarfile

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from flowmap_lit.checkpoints.vae import load_vae  # noqa: E402
from flowmap_lit.commands.prepare import main  # noqa: E402
from flowmap_lit.data import LatentDataModule  # noqa: E402
from flowmap_lit.data.imagenet import encode  # noqa: E402
from flowmap_lit.data.images import center_crop  # noqa: E402
from tests.helpers import tiny_vae  # noqa: E402

SIZES = [(40, 56), (70, 35), (33, 33), (90, 64)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    src = root / "train"
    for wnid in ["n01", "n02", "n03"]:
        (src / wnid).mkdir(parents=True)
        for i, (w, h) in enumerate(SIZES):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(src / wnid / f"img_{i}.{'png' if i % 2 else 'jpeg'}")
    tiny_vae(32).save_pretrained(root / "vae")
    return root, src, root / "vae"


def run(src, vae, out, *extra):
    return main(["imagenet", "--src", str(src), "--vae", str(vae), "--out", str(out), "--resolution", "32",
                 "--samples-per-shard", "5", "--batch-size", "3", *extra])


def shard_bytes(out):
    return {p: (out / p).read_bytes() for p in sorted(os.listdir(out)) if p.endswith(".tar")}


def read_shard(path):
    members = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members[m.name] = tar.extractfile(m).read()
    return members


def test_posterior_shards_match_the_vae(assets, tmp_path):
    root, src, vae_dir = assets
    stats = run(src, vae_dir, tmp_path / "out")
    assert stats["kind"] == "posterior" and stats["shape"] == [4, 16, 16] and stats["num_classes"] == 3
    assert stats["splits"] == {"train": {"num_samples": 12, "num_shards": 3}}
    # every stored posterior is the VAE's, in float16, for the center crop of the right image and label
    vae = load_vae(str(vae_dir))
    files = sorted((src / c / f, label) for label, c in enumerate(sorted(os.listdir(src)))
                   for f in os.listdir(src / c))
    seen = 0
    for name in sorted(os.listdir(tmp_path / "out")):
        if not name.endswith(".tar"):
            continue
        members = read_shard(tmp_path / "out" / name)
        for key in {m.split(".")[0] for m in members}:
            path, label = files[int(key.split("_")[1])]
            mean, std = encode(vae, center_crop(path.read_bytes(), 32)[None])
            stored_mean = np.load(io.BytesIO(members[f"{key}.mean.npy"]))
            stored_std = np.load(io.BytesIO(members[f"{key}.std.npy"]))
            assert stored_mean.dtype == np.float16 and stored_mean.shape == (4, 16, 16)
            np.testing.assert_allclose(stored_mean, mean[0], rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(stored_std, std[0], rtol=2e-3, atol=2e-3)
            assert int(members[f"{key}.cls"]) == label
            seen += 1
    assert seen == 12
    batch = next(iter(LatentDataModule(str(tmp_path / "out"), batch_size=4, num_workers=0).train_dataloader()))
    assert batch["x"].shape == (4, 4, 16, 16) and torch.isfinite(batch["x"]).all()


def test_center_crop_is_square_and_in_range(assets):
    _, src, _ = assets
    x = center_crop((src / "n01" / "img_3.png").read_bytes(), 32)
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_resume_skips_finished_shards(assets, tmp_path):
    _, src, vae_dir = assets
    out = tmp_path / "out"
    first = run(src, vae_dir, out)
    before = shard_bytes(out)
    mtimes = {p: os.stat(out / p).st_mtime_ns for p in before}
    os.remove(out / "train-000001.tar")  # as if killed while writing shard 1 (its sidecar stays)
    assert run(src, vae_dir, out) == first
    assert shard_bytes(out) == before
    assert all(os.stat(out / p).st_mtime_ns == mtimes[p] for p in before if p != "train-000001.tar")


def test_parallel_writers_and_tar_sources_give_the_same_dataset(assets, tmp_path):
    _, src, vae_dir = assets
    reference = run(src, vae_dir, tmp_path / "single")
    assert run(src, vae_dir, tmp_path / "par", "--rank", "0", "--world-size", "2") is None  # rank 1 not done
    assert not (tmp_path / "par" / "stats.json").exists()
    assert run(src, vae_dir, tmp_path / "par", "--rank", "1", "--world-size", "2") == {
        **reference, "source": reference["source"].replace("single", "par")}
    assert shard_bytes(tmp_path / "par") == shard_bytes(tmp_path / "single")
    # ILSVRC2012_img_train.tar layout: one tar per class
    nested = tmp_path / "train.tar"
    with tarfile.open(nested, "w") as outer:
        for c in sorted(os.listdir(src)):
            inner = tmp_path / f"{c}.tar"
            with tarfile.open(inner, "w") as t:
                for f in sorted(os.listdir(src / c)):
                    t.add(src / c / f, arcname=f)
            outer.add(inner, arcname=f"{c}.tar")
    run(nested, vae_dir, tmp_path / "nested")
    assert shard_bytes(tmp_path / "nested") == shard_bytes(tmp_path / "single")


def test_missing_vae_is_a_clear_error(assets, tmp_path):
    _, src, _ = assets
    with pytest.raises(FileNotFoundError, match="never downloads"):
        run(src, tmp_path / "no-vae", tmp_path / "out")
