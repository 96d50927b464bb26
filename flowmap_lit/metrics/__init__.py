"""Evaluation metrics: FID on frozen feature extractors (digits classifier or Inception-v3), CLIP score.

- ``digits_classifier.py``: a small CNN for the 8x8 digits, trained by
  ``python -m flowmap_lit classifier --data data/digits --out data/digits/classifier.pt``.
- ``features.py``: ``FeatureExtractor`` (images in [-1, 1] -> (N, d) float64), ``DigitsFeatures``,
  ``InceptionFeatures`` (local weights; built-in FID Inception-v3, or torch-fidelity's), ``DinoV2Features`` (local
  transformers directory), ``DecodedFeatures`` (behind a latent decoder), ``build_feature_extractor``.
- ``decode.py``: ``LatentDecoder``, a frozen local diffusers VAE for latent datasets.
- ``few_step.py``: process-count-independent seeded noise, shares and distances of a sampler.
- ``fid.py``: ``FID`` (torchmetrics with fixed reference statistics), cached reference statistics,
  and ``frechet_distance`` in float64.
- ``clip_score.py``: ``CLIPScore``, images against their prompts' text, from a local CLIP directory.

Names are imported lazily, so ``python -m flowmap_lit classifier`` runs cleanly.
"""

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "DigitsClassifier": "digits_classifier", "load_digits_classifier": "digits_classifier",
    "train_digits_classifier": "digits_classifier",
    "FeatureExtractor": "features", "DigitsFeatures": "features", "InceptionFeatures": "features",
    "DinoV2Features": "features", "DecodedFeatures": "features", "build_feature_extractor": "features",
    "LatentDecoder": "decode", "seeded_noise": "few_step", "rank_share": "few_step",
    "sampler_distances": "few_step", "image_distances": "few_step",
    "FID": "fid", "reference_stats": "fid", "load_or_compute_reference_stats": "fid",
    "dataset_reference_stats": "fid", "reference_cache_path": "fid", "frechet_distance": "fid",
    "CLIPScore": "clip_score",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from .clip_score import CLIPScore
    from .decode import LatentDecoder
    from .digits_classifier import DigitsClassifier, load_digits_classifier, train_digits_classifier
    from .features import (
        DecodedFeatures,
        DigitsFeatures,
        DinoV2Features,
        FeatureExtractor,
        InceptionFeatures,
        build_feature_extractor,
    )
    from .few_step import image_distances, rank_share, sampler_distances, seeded_noise
    from .fid import (
        FID,
        dataset_reference_stats,
        frechet_distance,
        load_or_compute_reference_stats,
        reference_cache_path,
        reference_stats,
    )


def __getattr__(name: str):
    """Import the submodule that defines ``name`` on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
