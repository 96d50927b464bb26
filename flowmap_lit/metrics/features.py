"""Frozen feature extractors for FID: images (N, C, H, W) in the data range [-1, 1] -> features (N, d) float64.

- ``DigitsFeatures``: the penultimate activations (128-d) of the digits classifier (``digits_classifier.py``).
- ``InceptionFeatures``: Inception-v3 pool features (2048-d) with weights from a local file, on the
  package's own network (``inception.py``) or torch-fidelity's.
- ``DinoV2Features``: DINOv2 class-token features (1024-d for ViT-L/14), the network of FD_DINOv2
  (Stein et al. 2023; the metric EDM2 reports), from a local Hugging Face ``transformers`` directory.
- ``DecodedFeatures``: any of them behind a latent decoder (``decode.py``), for latent datasets.

Nothing is ever downloaded. ``build_feature_extractor(kind, path, decoder)`` picks one by name. Each extractor has
``num_features`` (read by torchmetrics instead of a dummy forward pass), ``name`` (used in cache file names) and
``extractor_id`` (name + hash of the weights file, the key of cached reference statistics).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"   # torch-fidelity's converted TF Inception-v3 weights
FEATURE_KINDS = ("digits", "inception", "dinov2")
METRIC_NAMES = {"digits": "fid", "inception": "fid", "dinov2": "fd_dinov2"}  # what the distance is called
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def file_digest(path: str | Path, length: int = 12) -> str:
    """The first ``length`` hex digits of the SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


class FeatureExtractor(nn.Module):
    """Base class: a frozen network; subclasses implement ``extract`` (images in [-1, 1] -> (N, d)).

    Frozen means eval mode forever (``train()`` is a no-op) and ``requires_grad=False`` on every
    parameter, so it neither trains nor changes when it sits inside a torchmetrics metric.
    """

    name: str = "features"                 # short name, used in cache file names
    num_features: int                      # d, the feature dimension

    def __init__(self) -> None:
        super().__init__()
        self.extractor_id = self.name      # identity of the weights; subclasses add a file hash

    def freeze(self) -> FeatureExtractor:
        """Eval mode and no gradients for every parameter; returns self."""
        super().train(False)
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> FeatureExtractor:  # always stays in eval mode
        return super().train(False)

    def extract(self, images: Tensor) -> Tensor:
        """Features (N, num_features) of images (N, C, H, W) in [-1, 1]."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """``extract`` with its shape checked, as float64 (N, num_features)."""
        if images.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects images (N, C, H, W), got shape {tuple(images.shape)}")
        feats = self.extract(images)
        if feats.shape != (images.shape[0], self.num_features):
            raise RuntimeError(f"{type(self).__name__} returned {tuple(feats.shape)}, "
                               f"expected ({images.shape[0]}, {self.num_features})")
        return feats.to(torch.float64)


class DigitsFeatures(FeatureExtractor):
    """Penultimate (feature-layer) activations of the digits classifier saved at ``path``."""

    name = "digits"

    def __init__(
        self,
        path: str | Path = "data/digits/classifier.pt",   # classifier file (digits_classifier.py CLI)
    ) -> None:
        from .digits_classifier import load_digits_classifier

        super().__init__()
        self.net = load_digits_classifier(path)
        cfg = self.net.config
        self.num_features = int(cfg["feature_dim"])
        self.input_shape = (int(cfg["in_channels"]), int(cfg["image_size"]), int(cfg["image_size"]))
        self.extractor_id = f"{self.name}-{file_digest(path)}"
        self.freeze()

    def extract(self, images: Tensor) -> Tensor:
        if tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"DigitsFeatures expects images of shape (N, {', '.join(map(str, self.input_shape))}) "
                             f"in [-1, 1], got {tuple(images.shape)}")
        return self.net.features(images.to(self.net.fc.weight.dtype))


def as_rgb(images: Tensor, who: str) -> Tensor:
    """(N, 1 or 3, H, W) -> (N, 3, H, W): gray repeated to RGB; other channel counts are an error."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"{who} expects 1 or 3 channels, got {images.shape[1]}")
    return images


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 pixels 0..255 (``x * 127.5 + 128``, clipped, truncated, as EDM's FID)."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


class InceptionFeatures(FeatureExtractor):
    """Inception-v3 2048-d pool features (the FID network), local weights only.

    ``implementation``: ``"builtin"`` (``inception.py``: plain PyTorch, no torchvision; pytorch-fid's
    network and its bilinear resize to 299 px) or ``"torch-fidelity"`` (torch-fidelity's network via
    torchmetrics, with its TF1-compatible resize when ``antialias=False``; needs torch-fidelity and a
    torchvision matching torch). Both read the same weights file; their FIDs differ slightly through
    the resize. Images (N, 1 or 3, H, W) in [-1, 1] become uint8 RGB first (gray is repeated).
    """

    name = "inception"
    num_features = 2048

    def __init__(
        self,
        weights_path: str | Path | None,   # local pt_inception-2015-12-05-6726825d.pth; None raises (never downloads)
        antialias: bool = False,           # torch-fidelity: False is its TF1-compatible resize (as published FIDs)
        implementation: str = "builtin",   # "builtin" or "torch-fidelity"
    ) -> None:
        super().__init__()
        hint = (f"download {INCEPTION_WEIGHTS} on a machine with internet (pytorch-fid's GitHub release; "
                f"torch-fidelity names the same 6726825d file weights-inception-2015-12-05-6726825d.pth) "
                f"and pass its path as weights_path (build_feature_extractor('inception', path))")
        if implementation not in ("builtin", "torch-fidelity"):
            raise ValueError(f"implementation must be 'builtin' or 'torch-fidelity', got {implementation!r}")
        if weights_path is None:
            raise FileNotFoundError(f"InceptionFeatures needs local weights and never downloads: {hint}")
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"Inception weights {weights_path} do not exist: {hint}")
        self.implementation = implementation
        if implementation == "builtin":
            from .inception import load_fid_inception

            self.net = load_fid_inception(str(weights_path))
        else:
            from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

            if not _TORCH_FIDELITY_AVAILABLE:
                raise ModuleNotFoundError("InceptionFeatures(implementation='torch-fidelity') needs torch-fidelity: "
                                          "pip install torch-fidelity (or use implementation='builtin')")
            try:
                from torchmetrics.image.fid import NoTrainInceptionV3
            except (ImportError, RuntimeError) as err:  # e.g. a torchvision built for another torch
                raise ModuleNotFoundError(f"torch-fidelity is installed but does not import ({err}); it needs a "
                                          "torchvision matching torch: pip install torch-fidelity torchvision") from err

            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(self.num_features)],
                                          feature_extractor_weights_path=str(weights_path), antialias=antialias)
        self.extractor_id = f"{self.name}-{file_digest(weights_path)}-{implementation}"
        self.freeze()

    def extract(self, images: Tensor) -> Tensor:
        images = as_rgb(images, "InceptionFeatures")
        if self.implementation == "builtin":
            return self.net(to_uint8(images).float() / 127.5 - 1)
        return self.net(to_uint8(images)).reshape(images.shape[0], -1)


def _weights_digest(directory: Path) -> str:
    """Digest of a model directory: its config and its weight files (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(directory.iterdir()):
        if f.is_file() and (f.name == "config.json" or f.suffix in (".safetensors", ".bin")):
            h.update(f.name.encode())
            h.update(file_digest(f, 64).encode())
    return h.hexdigest()[:12]


class DinoV2Features(FeatureExtractor):
    """DINOv2 class-token features, the network of FD_DINOv2, from a local ``transformers`` directory.

    Preprocessing as EDM2's FD_DINOv2: images in [-1, 1] become uint8 pixels, then [0, 1] floats,
    resized to ``resolution`` (224) by antialiased bicubic interpolation and normalized with the
    ImageNet mean and std; the feature is the final layer-normed class token (``pooler_output``,
    the same vector as the torch.hub model's ``x_norm_clstoken``). Gray images are repeated to RGB.
    """

    name = "dinov2"

    def __init__(
        self,
        path: str | Path | None,           # local directory of facebook/dinov2-large (config.json + weights)
        resolution: int = 224,             # input side after resizing (16 x 16 patches of 14 px)
    ) -> None:
        super().__init__()
        hint = ("download it once where there is internet, e.g. `huggingface-cli download facebook/dinov2-large "
                "--local-dir /models/dinov2-large`, and pass that folder (feature_path / --feature-path); "
                "flowmap_lit never downloads weights")
        if path is None or not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"DinoV2Features needs a local transformers DINOv2 directory with config.json "
                                    f"and weights, got {path!r}: {hint}")
        try:
            from transformers import Dinov2Model
        except ImportError as err:
            raise ModuleNotFoundError("DinoV2Features needs transformers: pip install 'flowmap_lit[fid]'") from err
        self.net = Dinov2Model.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32)
        self.num_features = int(self.net.config.hidden_size)
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.extractor_id = f"{self.name}-{_weights_digest(Path(path))}-{resolution}"
        self.freeze()

    def extract(self, images: Tensor) -> Tensor:
        x = to_uint8(as_rgb(images, "DinoV2Features")).float() / 255
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", antialias=True)
        x = (x - self.mean) / self.std
        return self.net(pixel_values=x).pooler_output


class DecodedFeatures(FeatureExtractor):
    """``extractor(decoder(latents))``: features of decoded latents (``decode.LatentDecoder``), so the
    FID machinery and its cached reference statistics work on latent datasets unchanged."""

    def __init__(self, extractor: FeatureExtractor, decoder: nn.Module) -> None:
        super().__init__()
        self.extractor, self.decoder = extractor, decoder
        self.name = f"{extractor.name}_decoded"
        self.num_features = extractor.num_features
        self.extractor_id = f"{extractor.extractor_id}@{decoder.decoder_id}"
        self.freeze()

    def extract(self, images: Tensor) -> Tensor:
        return self.extractor.extract(self.decoder(images))


def build_feature_extractor(
    kind: str,                             # "digits", "inception" or "dinov2"
    path: str | Path | None = None,        # classifier file, Inception weights file, or DINOv2 directory
    decoder: nn.Module | None = None,      # a latent decoder (decode.LatentDecoder) to put in front
) -> FeatureExtractor:
    """The frozen feature extractor ``kind`` with weights from ``path`` (behind ``decoder`` if given)."""
    if kind == "digits":
        extractor = DigitsFeatures(path if path is not None else "data/digits/classifier.pt")
    elif kind == "inception":
        extractor = InceptionFeatures(path)
    elif kind == "dinov2":
        extractor = DinoV2Features(path)
    else:
        raise ValueError(f"unknown feature extractor kind {kind!r}; expected one of {FEATURE_KINDS}")
    return DecodedFeatures(extractor, decoder) if decoder is not None else extractor
