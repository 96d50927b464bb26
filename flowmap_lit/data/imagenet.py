"""ImageNet (or any class-labelled image collection) -> SD-VAE posterior shards.

    python -m flowmap_lit prepare imagenet --src /data/ILSVRC2012/train --vae /models/sd-vae-ft-mse \\
        --out data/imagenet512 --resolution 512

Each image is center-cropped to ``resolution`` (box-halved while at least twice the target,
bicubic resize of the short side, center crop; the ADM/EDM2 recipe), scaled to [-1, 1] and
encoded by a diffusers ``AutoencoderKL`` loaded from a local directory (never downloaded). The
posterior mean and standard deviation are stored per sample in float16 with the class label
(``kind: posterior``; a latent is drawn from them every time a sample is read).

``--src`` is a folder ``<class>/<image>`` or a tar file holding either ``<class>/<image>``
members or one ``<class>.tar`` per class (the layout of ``ILSVRC2012_img_train.tar``); labels
follow the sorted class names. Images are assigned to shards by a seeded permutation, so
every shard mixes classes.

Parallel and resumable: shard ``j`` is written by rank ``j % world_size`` (``--rank`` and
``--world-size``, by default from torchrun's ``RANK``/``WORLD_SIZE`` or SLURM's
``SLURM_PROCID``/``SLURM_NTASKS``). A shard is finished when its ``.stats.json`` sidecar (its
channel sums) exists; a restarted run skips finished shards. The rank that finds every shard
finished combines the sidecars into ``stats.json``, the file readers require.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass

import numpy as np
import torch

from flowmap_lit.checkpoints.vae import load_vae

from .format import PREPARE_CMD, STATS_FILE, shard_name
from .images import IMAGE_EXTENSIONS, center_crop, list_images, split_indices
from .shards import ChannelStats, ShardSink, read_stats, write_stats

SIDECAR = ".stats.json"  # appended to a shard's file name: its channel sums, written once it is complete


# --------------------------------------------------------------------------- image sources
@dataclass(frozen=True)
class ImageRef:
    """Where one image lives: a file path, or a tar member (optionally inside a per-class tar)."""

    path: str                            # file, or tar member name
    inner: str | None = None             # member of the nested tar ``path`` (per-class tars)


class ImageSource:
    """The images and labels of a class-folder directory or of a (nested) tar archive."""

    def __init__(self, src: str):
        self.src = src
        if os.path.isdir(src):
            self.tar = None
            self.refs, self.labels, self.classes = self._scan_folder(src)
        elif os.path.isfile(src) and tarfile.is_tarfile(src):
            self.tar = tarfile.open(src, "r:")
            self._inner: dict[str, tarfile.TarFile] = {}
            self.refs, self.labels, self.classes = self._scan_tar()
        else:
            raise FileNotFoundError(
                f"--src {src!r} is neither a folder of class subfolders nor a tar file; point it at the ImageNet "
                "train folder (train/<wnid>/*.JPEG) or at ILSVRC2012_img_train.tar"
            )
        if not self.refs:
            raise ValueError(f"no images with extensions {IMAGE_EXTENSIONS} found in {src}")

    @staticmethod
    def _scan_folder(src: str):
        paths, labels, classes = list_images(src)
        return [ImageRef(p) for p in paths], [int(v) for v in labels], classes

    def _scan_tar(self):
        by_class: dict[str, list[ImageRef]] = {}
        for m in self.tar.getmembers():
            if not m.isfile():
                continue
            name = m.name.lstrip("./")
            if name.lower().endswith(".tar"):  # one tar per class
                cls = os.path.splitext(os.path.basename(name))[0]
                inner = self._inner_tar(m.name)
                by_class[cls] = [ImageRef(m.name, i.name) for i in sorted(inner.getmembers(), key=lambda i: i.name)
                                 if i.isfile() and i.name.lower().endswith(IMAGE_EXTENSIONS)]
            elif name.lower().endswith(IMAGE_EXTENSIONS) and "/" in name:
                by_class.setdefault(name.split("/")[0], []).append(ImageRef(m.name))
        classes = sorted(by_class)
        refs, labels = [], []
        for label, cls in enumerate(classes):
            members = sorted(by_class[cls], key=lambda r: (r.path, r.inner or ""))
            refs += members
            labels += [label] * len(members)
        return refs, labels, classes

    def _inner_tar(self, member: str) -> tarfile.TarFile:
        if member not in self._inner:
            self._inner[member] = tarfile.open(fileobj=self.tar.extractfile(member), mode="r:")
        return self._inner[member]

    def read(self, ref: ImageRef) -> bytes:
        """The encoded bytes of one image."""
        if self.tar is None:
            with open(ref.path, "rb") as f:
                return f.read()
        if ref.inner is None:
            return self.tar.extractfile(ref.path).read()
        return self._inner_tar(ref.path).extractfile(ref.inner).read()


# --------------------------------------------------------------------------- the VAE
@torch.no_grad()
def encode(vae, images: np.ndarray, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, R, R) images in [-1, 1] -> posterior (mean, std), each (N, C, R/f, R/f) float32."""
    x = torch.from_numpy(images).to(device=device, dtype=vae.dtype)
    dist = vae.encode(x).latent_dist
    return dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy()


# --------------------------------------------------------------------------- the job
def default_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun or SLURM variables; (0, 1) when run alone."""
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in os.environ and world_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[world_var])
    return 0, 1


def _write_json(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def prepare_imagenet(
    src: str,                            # folder <class>/<image>, or a tar (class folders or per-class tars)
    vae: str,                            # local diffusers AutoencoderKL directory
    out_dir: str,                        # dataset directory
    resolution: int = 512,               # side length of the center crop in pixels
    samples_per_shard: int = 1000,       # samples per tar file
    val_fraction: float = 0.0,           # fraction held out as the "val" split (0: train only)
    batch_size: int = 32,                # images per VAE call
    seed: int = 0,                       # seed of the shard permutation and the train/val split
    rank: int | None = None,             # this writer's rank; None: from torchrun/SLURM, else 0
    world_size: int | None = None,       # number of writers; None: from torchrun/SLURM, else 1
    device: str | None = None,           # VAE device; None: cuda:<LOCAL_RANK> if CUDA is available, else cpu
    vae_dtype: str = "float32",          # VAE compute dtype: float32, bfloat16 or float16
    limit: int | None = None,            # use only the first `limit` images of the permutation (smoke runs)
) -> dict | None:
    """Encode this rank's unfinished shards; returns the stats once every shard is finished, else None."""
    env_rank, env_world = default_rank()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    source = ImageSource(src)
    order = np.random.default_rng(seed).permutation(len(source.refs))
    if limit is not None:
        order = order[:limit]
    train, val = split_indices(len(order), val_fraction, seed + 1)
    splits = {"train": order[np.sort(train)], "val": order[np.sort(val)]}
    splits = {k: v for k, v in splits.items() if len(v)}
    os.makedirs(out_dir, exist_ok=True)
    model = None
    shape = None
    for split, indices in splits.items():
        for j, start in enumerate(range(0, len(indices), samples_per_shard)):
            path = os.path.join(out_dir, shard_name(split, j))
            if j % world_size != rank or (os.path.isfile(path) and os.path.isfile(path + SIDECAR)):
                continue
            if model is None:
                model = load_vae(vae, device, getattr(torch, vae_dtype))
            acc = ChannelStats()
            chunk = indices[start:start + samples_per_shard]
            with ShardSink(out_dir, split, samples_per_shard, first_shard=j) as sink:
                for b in range(0, len(chunk), batch_size):
                    ids = chunk[b:b + batch_size]
                    images = np.stack([center_crop(source.read(source.refs[i]), resolution) for i in ids])
                    mean, std = encode(model, images, device)
                    mean16, std16 = mean.astype(np.float16), std.astype(np.float16)
                    acc.update(mean16, std16)  # statistics of the stored values
                    shape = list(mean.shape[1:])
                    for i, m, s in zip(ids, mean16, std16):
                        sink.write({"mean": m, "std": s}, int(source.labels[i]), key=f"{split}_{int(i):08d}")
            _write_json(path + SIDECAR, {"num_samples": len(chunk), "shape": shape, **acc.to_dict()})
            print(f"[rank {rank}] wrote {path} ({len(chunk)} samples)", flush=True)
    return finalize(out_dir, splits, samples_per_shard, len(source.classes),
                    f"{PREPARE_CMD} imagenet --src {src} --vae {vae} --out {out_dir} --resolution {resolution}")


def finalize(out_dir: str, splits: dict[str, np.ndarray], samples_per_shard: int, num_classes: int,
             source: str) -> dict | None:
    """Write ``stats.json`` from the shard sidecars if every shard is finished; else None."""
    sidecars = {split: [os.path.join(out_dir, shard_name(split, j)) + SIDECAR
                        for j in range(-(-len(idx) // samples_per_shard))] for split, idx in splits.items()}
    missing = [p for paths in sidecars.values() for p in paths if not os.path.isfile(p)]
    if missing:
        print(f"{len(missing)} shard(s) are still being written by other ranks; the last rank to finish writes "
              f"{STATS_FILE} (or run this command again once they are done)", flush=True)
        return None
    acc, infos, shape = ChannelStats(), {}, None
    for split, paths in sidecars.items():
        parts = [json.load(open(p)) for p in paths]
        if split == "train":
            for part in parts:
                acc.merge(part)
        shape = parts[0]["shape"]
        infos[split] = {"num_samples": sum(p["num_samples"] for p in parts), "num_shards": len(paths)}
    mean, std = acc.result()
    write_stats(out_dir, shape=shape, num_classes=num_classes, kind="posterior", mean=mean, std=std,
                splits=infos, source=source)
    return read_stats(out_dir)


def add_imagenet(sub) -> None:
    p = sub.add_parser("imagenet", help="ImageNet-style images -> SD-VAE posterior shards (needs diffusers)")
    p.add_argument("--src", required=True, help="train folder (<class>/<image>) or tar (class folders or class tars)")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL directory (e.g. sd-vae-ft-mse)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resolution", type=int, default=512, help="center-crop side length in pixels")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction held out as the val split")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE call")
    p.add_argument("--seed", type=int, default=0, help="seed of the shard permutation")
    p.add_argument("--rank", type=int, default=None, help="writer rank (default: $RANK or $SLURM_PROCID, else 0)")
    p.add_argument("--world-size", type=int, default=None, help="writers (default: $WORLD_SIZE or $SLURM_NTASKS)")
    p.add_argument("--device", default=None, help="VAE device (default: cuda:$LOCAL_RANK if available, else cpu)")
    p.add_argument("--vae-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--limit", type=int, default=None, help="only the first N images (smoke runs)")
    p.set_defaults(func=lambda a: prepare_imagenet(
        a.src, a.vae, a.out, a.resolution, a.samples_per_shard, a.val_fraction, a.batch_size, a.seed, a.rank,
        a.world_size, a.device, a.vae_dtype, a.limit))
