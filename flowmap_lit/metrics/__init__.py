"""Evaluation metrics: FID on frozen feature extractors (digits classifier or Inception-v3).

- ``digits_classifier.py``: a small CNN for the 8x8 digits, trained by
  ``python -m flowmap_lit.metrics.digits_classifier --data data/digits --out data/digits/classifier.pt``.
- ``features.py``: ``FeatureExtractor`` (images in [-1, 1] -> (N, d) float64), ``DigitsFeatures``,
  ``InceptionFeatures`` (local weights, needs torch-fidelity), ``build_feature_extractor``.
- ``fid.py``: ``FID`` (torchmetrics with fixed reference statistics), cached reference statistics,
  and ``frechet_distance`` in float64.
"""

from .digits_classifier import DigitsClassifier, load_digits_classifier, train_digits_classifier
from .features import DigitsFeatures, FeatureExtractor, InceptionFeatures, build_feature_extractor
from .fid import (
    FID,
    dataset_reference_stats,
    frechet_distance,
    load_or_compute_reference_stats,
    reference_cache_path,
    reference_stats,
)

__all__ = [
    "DigitsClassifier", "load_digits_classifier", "train_digits_classifier",
    "FeatureExtractor", "DigitsFeatures", "InceptionFeatures", "build_feature_extractor",
    "FID", "reference_stats", "load_or_compute_reference_stats", "dataset_reference_stats",
    "reference_cache_path", "frechet_distance",
]
