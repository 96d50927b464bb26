"""The shipped configs: the second-dataset quickstart keeps every setting of the quickstart."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# What names the data (paths, shapes, class count, log/checkpoint names), and nothing else.
DATA_KEYS = {
    "trainer.logger.init_args.name",
    "trainer.callbacks.2.init_args.feature_path",
    "trainer.callbacks.4.init_args.dirpath",
    "model.init_args.teacher.init_args.data_root",
    "model.init_args.guide.init_args.data_root",
    "model.init_args.student.init_args.img_channels",
    "model.init_args.student.init_args.num_classes",
    "model.init_args.num_classes",
    "data.class_path",
    "data.init_args.root",
}


def flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in flatten(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


def test_shapes_quickstart_differs_only_in_the_data():
    base = flatten(yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text()))
    shapes = flatten(yaml.safe_load((ROOT / "configs/shapes/quickstart.yaml").read_text()))
    assert base.keys() == shapes.keys()
    differ = {k for k in base if base[k] != shapes[k]}
    assert differ == DATA_KEYS, sorted(differ ^ DATA_KEYS)
    assert shapes["data.class_path"] == "flowmap_lit.data.ShapesDataModule"
