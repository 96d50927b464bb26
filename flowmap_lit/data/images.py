"""Image files and train/val splits: the helpers the preparation routes share (``prepare.py``, ``imagenet.py``).

A leaf module (numpy and PIL only), so that every route imports it and none imports another route.
"""

import io
import os

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of a seeded permutation; both stay in permuted order so shards mix classes."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def center_crop(data: bytes, resolution: int) -> np.ndarray:
    """Encoded image -> (3, R, R) float32 in [-1, 1]: box-halve while >= 2R, bicubic resize, center crop
    (the ADM/EDM2 recipe)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        while min(img.size) >= 2 * resolution:
            img = img.resize(tuple(s // 2 for s in img.size), resample=Image.Resampling.BOX)
        scale = resolution / min(img.size)
        img = img.resize(tuple(max(resolution, round(s * scale)) for s in img.size), resample=Image.Resampling.BICUBIC)
        left, top = (img.size[0] - resolution) // 2, (img.size[1] - resolution) // 2
        array = np.asarray(img.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    return (array / 127.5 - 1.0).transpose(2, 0, 1).copy()


def load_image(path: str, resolution: int) -> np.ndarray:
    """Image file -> (3, R, R) float32 in [-1, 1] (``center_crop``)."""
    with open(path, "rb") as f:
        return center_crop(f.read(), resolution)


def list_images(src: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(paths, labels, class names) of ``src/<class>/**/<image>``; labels follow sorted class names."""
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise ValueError(f"{src} has no class subfolders (expected {src}/<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(os.path.join(src, name))):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(folder, f))
                    labels.append(label)
    if not paths:
        raise ValueError(f"no images with extensions {IMAGE_EXTENSIONS} under {src}")
    return paths, np.asarray(labels, dtype=np.int64), classes
