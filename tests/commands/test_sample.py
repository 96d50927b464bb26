"""``python -m flowmap_lit sample``: PNG grids and an .npz of samples from a checkpoint."""

import numpy as np

from tests.helpers.cli import cli


def test_sample_writes_png_grids_and_an_npz(quickstart, tmp_path):
    paths = cli("sample", "--ckpt", quickstart.ckpt, "--steps", "1", "2", "--num", "20", "--out", tmp_path / "samples")
    assert sorted(paths) == [1, 2]
    arrays = np.load(tmp_path / "samples/samples.npz")
    assert arrays["x_1step"].shape == (20, 1, 8, 8) and arrays["labels"].tolist() == [i % 10 for i in range(20)]
    assert (tmp_path / "samples/samples_2step.png").is_file()
