"""``python -m flowmap_lit reference``: caches a dataset split's reference statistics (decoded latents,
DINOv2 features from a local directory)."""

from pathlib import Path

from tests.helpers import tiny_dinov2, tiny_vae_dir
from tests.helpers.cli import cli
from tests.helpers.latents import latent_dataset


def test_reference_command(tmp_path):
    data = tmp_path / "data"
    latent_dataset(data, 60)
    rows = cli("reference", "--data", data, "--feature", "dinov2", "--feature-path", tiny_dinov2(tmp_path / "d"),
               "--vae", tiny_vae_dir(tmp_path / "vae"), "--num", "40", "--device", "cpu")
    assert rows[0]["num_samples"] == 40 and Path(rows[0]["file"]).is_file()
