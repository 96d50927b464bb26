"""Fréchet distance between generated images and precomputed reference statistics.

FID = ||mu_r - mu_g||^2 + Tr(C_r + C_g - 2 (C_r C_g)^(1/2)) between Gaussians fitted to the
features of reference (real) and generated (fake) images (Heusel et al. 2017, eq. 6).

- ``FID`` wraps torchmetrics' ``FrechetInceptionDistance`` with a frozen ``FeatureExtractor``;
  the reference enters through ``set_reference`` (written into the metric's real-feature states),
  generated images through ``update_fake``. Fake states are summed across DDP ranks by torchmetrics.
- ``reference_stats`` / ``load_or_compute_reference_stats`` / ``dataset_reference_stats``: reference
  statistics of a data split, cached in a ``.pt`` file next to the shards.
- ``frechet_distance``: the same distance in float64 with scipy's ``sqrtm`` (an independent check).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .features import FeatureExtractor

REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
CACHE_FORMAT = 1                           # version of the reference-statistics cache file


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + Tr(cov1) + Tr(cov2) - 2 Tr((cov1 cov2)^(1/2)) in float64.

    The matrix square root is scipy's ``sqrtm`` (as pytorch-fid), independent of torchmetrics'
    ``eigvals(cov1 cov2)``; singular covariances (dead ReLU units) are expected and not warned about.
    """
    from scipy import linalg

    mu1, mu2, cov1, cov2 = (torch.as_tensor(a).detach().cpu().double().numpy() for a in (mu1, mu2, cov1, cov2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov1 @ cov2)
        if not np.isfinite(covmean).all():  # failed on a singular product: regularize slightly, as pytorch-fid
            offset = np.eye(cov1.shape[0]) * 1e-6
            covmean = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(np.real(covmean)))


def _same_on_all_ranks(gathered: Tensor) -> Tensor:
    """DDP reduction of the reference states (stacked over ranks): check they agree, keep one copy."""
    first = gathered[0]
    if not torch.allclose(gathered.double(), first.double().expand_as(gathered), rtol=1e-5, atol=0.0):
        raise RuntimeError("FID reference statistics differ across ranks: load the same cached file on every rank")
    return first


def _as_tensor(value, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value).to(dtype).cpu()


class FID:
    """FID of generated images against fixed reference statistics, on torchmetrics' metric.

    A plain object, not an ``nn.Module``: held by a callback or a LightningModule attribute it
    never enters a checkpoint (the extractor's weights come from their own file). Move it with
    ``to(device)``. ``reset_fake()`` clears the generated images and keeps the reference.

    Example::

        fid = FID(DigitsFeatures("data/digits/classifier.pt"))
        fid.set_reference(dataset_reference_stats("data/digits", "train", fid.extractor))
        fid.update_fake(samples)           # (N, 1, 8, 8) in [-1, 1], any number of calls
        value = fid.compute()
    """

    def __init__(
        self,
        extractor: FeatureExtractor,       # frozen feature extractor (images in [-1, 1] -> (N, d))
        **metric_kwargs,                   # forwarded to torchmetrics' Metric (e.g. sync_on_compute, process_group)
    ) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.extractor = extractor.eval().requires_grad_(False)   # frozen, whatever was passed in
        self.metric = FrechetInceptionDistance(feature=self.extractor, reset_real_features=False, **metric_kwargs)
        for name in REAL_STATES:           # the reference is identical on every rank: gather-check, never sum
            self.metric._reductions[name] = _same_on_all_ranks
        self.has_reference = False

    @property
    def num_features(self) -> int:
        return int(self.metric.real_features_sum.shape[0])

    def to(self, device: str | torch.device) -> FID:
        self.metric.to(device)
        return self

    def set_reference(self, stats: dict) -> None:
        """Reference from ``{"mean": (d,), "cov": (d, d), "num_samples": n}`` (cov unbiased, 1/(n-1))
        or raw sums ``{"sum": (d,), "cov_sum": (d, d) = sum f f^T, "num_samples": n}``."""
        n = int(stats["num_samples"])
        d = self.num_features
        if n < 2:
            raise ValueError(f"reference needs at least 2 samples, got {n}")
        if "sum" in stats:
            total, outer = _as_tensor(stats["sum"]), _as_tensor(stats["cov_sum"])
        else:
            mean, cov = _as_tensor(stats["mean"]), _as_tensor(stats["cov"])
            total, outer = n * mean, (n - 1) * cov + n * torch.outer(mean, mean)
        if total.shape != (d,) or outer.shape != (d, d):
            raise ValueError(f"reference statistics have shapes {tuple(total.shape)}, {tuple(outer.shape)}; "
                             f"the extractor has {d} features")
        device = self.metric.real_features_sum.device
        self.metric.real_features_sum = total.to(device)
        self.metric.real_features_cov_sum = outer.to(device)
        self.metric.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=device)
        self.metric._computed = None       # drop torchmetrics' cached result
        self.has_reference = True

    @torch.no_grad()
    def update_fake(self, images: Tensor) -> None:
        """Add generated images (N, C, H, W) in the data range [-1, 1]."""
        self.metric.update(images.to(self.metric.real_features_sum.device), real=False)

    def compute(self) -> float:
        """FID between everything added since the last ``reset_fake`` (all ranks) and the reference."""
        if not self.has_reference:
            raise RuntimeError("FID has no reference statistics: call set_reference(...) first")
        return float(self.metric.compute())

    def reset_fake(self) -> None:
        """Forget the generated images; the reference stays (``reset_real_features=False``)."""
        self.metric.reset()


@torch.no_grad()
def reference_stats(extractor: FeatureExtractor, images_iter: Iterable, device: str | torch.device = "cpu") -> dict:
    """``{"mean": (d,), "cov": (d, d) unbiased, "num_samples": n}`` in float64 of the features of every
    batch (N, C, H, W) in [-1, 1] that ``images_iter`` yields (tensors or numpy arrays)."""
    total = outer = None
    n = 0
    for images in images_iter:
        feats = extractor(torch.as_tensor(images).to(device)).double().cpu()
        total = feats.sum(0) if total is None else total + feats.sum(0)
        outer = feats.T @ feats if outer is None else outer + feats.T @ feats
        n += feats.shape[0]
    if n < 2:
        raise ValueError(f"reference statistics need at least 2 images, got {n}")
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
    return {"mean": mean, "cov": cov, "num_samples": n}


def load_or_compute_reference_stats(
    cache_path: str | Path,                # the .pt cache file
    extractor_id: str,                     # identity of the extractor (weights); part of the cache key
    compute_fn: Callable[[], dict],        # returns reference_stats(...) when the cache is missing or stale
    extra_key: dict | None = None,         # more key entries (split, dataset fingerprint); strings/numbers
) -> dict:
    """Cached reference statistics: reuse ``cache_path`` when its stored key matches
    ``{"extractor_id": extractor_id, **extra_key}``, else recompute and rewrite it atomically."""
    cache_path = Path(cache_path)
    key = {"extractor_id": str(extractor_id), **(extra_key or {})}
    if cache_path.is_file():
        try:
            cached = torch.load(cache_path, map_location="cpu", weights_only=True)
            if cached.get("format") == CACHE_FORMAT and cached.get("key") == key:
                return {k: cached[k] for k in ("mean", "cov", "num_samples")}
        except Exception as err:          # unreadable or truncated: recompute
            warnings.warn(f"ignoring unreadable FID reference cache {cache_path}: {err}", stacklevel=2)
    stats = compute_fn()
    mean, cov = _as_tensor(stats["mean"]), _as_tensor(stats["cov"])
    payload = {"format": CACHE_FORMAT, "kind": "fid_reference", "key": key,
               "mean": mean, "cov": cov, "num_samples": int(stats["num_samples"])}
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(f"{cache_path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, cache_path)
    return {k: payload[k] for k in ("mean", "cov", "num_samples")}


def reference_cache_path(data_root: str | Path, extractor: FeatureExtractor, split: str,
                         num_samples: int | None = None) -> Path:
    """``{data_root}/fid_ref_{extractor name}_{split}[_{n}].pt`` (the key inside tells which weights and data)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{extractor.name}_{split}" + (f"_{num_samples}" if num_samples else ""))
    return Path(data_root) / f"fid_ref_{name}.pt"


def dataset_reference_stats(
    data_root: str | Path,                 # dataset directory (shards + stats.json)
    split: str,                            # "train" or "val"
    extractor: FeatureExtractor,           # frozen feature extractor (a DecodedFeatures for latent data)
    batch_size: int = 500,                 # samples per extractor call
    device: str | torch.device = "cpu",    # where the extractor runs
    num_samples: int | None = None,        # the first this many samples of the split (None: all of it)
) -> dict:
    """Reference statistics of a split's raw samples (``normalize=False``; latents go through the
    extractor's decoder), streamed from the shards in order and cached next to them.

    The key holds the extractor's id (weights hashes, decoder included), the split, the sample
    count and the dataset's stats.json, so other weights, another split or re-prepared data
    recompute. The whole split is read whatever process group runs; under DDP call it on rank 0
    first (then barrier) or on every rank: the write is atomic and the content identical.
    """
    from flowmap_lit.data import LatentDataModule

    stats_file = Path(data_root) / "stats.json"
    fingerprint = ""                       # hash of the dataset's stats.json (changes when the data is re-prepared)
    if stats_file.is_file():
        canonical = json.dumps(json.loads(stats_file.read_text()), sort_keys=True)
        fingerprint = hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def batches():
        dm = LatentDataModule(root=str(data_root), val_split=split, num_workers=0, val_batch_size=batch_size,
                              normalize=False, val_posterior="mean")
        dm.setup("validate")
        remaining = num_samples
        for batch in dm.split_loader():
            x = batch["x"]
            if remaining is not None:
                x, remaining = x[:remaining], remaining - len(x[:remaining])
            if len(x):
                yield x
            if remaining == 0:
                return

    def compute() -> dict:
        return reference_stats(extractor, batches(), device=device)

    extra = {"split": split, "data": fingerprint}
    if num_samples is not None:
        extra["num_samples"] = int(num_samples)
    return load_or_compute_reference_stats(reference_cache_path(data_root, extractor, split, num_samples),
                                           extractor.extractor_id, compute, extra_key=extra)
