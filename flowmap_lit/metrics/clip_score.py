"""CLIP score of generated images against their prompts' text, from a local ``transformers`` CLIP directory.

    score = 100 * max(cos(E_image(image), E_text(prompt)), 0), averaged over the images

the definition of torchmetrics' ``CLIPScore`` (Hessel et al., 2021, without the 2.5 weight), computed
here from a local CLIP directory (``CLIPModel`` weights + tokenizer + ``preprocessor_config.json``,
e.g. ``openai/clip-vit-large-patch14``) without PIL: images in [-1, 1] become uint8 pixels, then
[0, 1] floats, are resized (shorter side to the processor's ``size``, antialiased bicubic),
center-cropped to ``crop_size`` and normalized with the processor's mean and std; prompts are
tokenized to at most the text model's positions (77), truncated. Nothing is downloaded.

The sums are float64 ``torchmetrics`` states reduced by ``sum``, so ``compute`` gives the same
mean whether 1 or N processes scored their shares. Like ``FID`` it plugs into
``flowmap_lit.metrics.few_step.image_distances``: ``set_prompts(texts)`` gives the text of the
images that ``update_fake`` will receive next, in order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

DOWNLOAD = "hf download openai/clip-vit-large-patch14 --local-dir models/clip-vit-large-patch14"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _mean_metric():
    """A torchmetrics metric summing scores and counts in float64 (``sum``-reduced across processes)."""
    from torchmetrics import Metric

    class MeanScore(Metric):
        full_state_update = False
        higher_is_better = True

        def __init__(self) -> None:
            super().__init__()
            self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

        def update(self, scores: Tensor) -> None:
            self.total += scores.double().sum()
            self.count += scores.numel()

        def compute(self) -> Tensor:
            return self.total / self.count.clamp_min(1)

    return MeanScore()


def _size(value, default: int) -> tuple[int, int] | int:
    """A processor ``size`` / ``crop_size`` entry: ``{"shortest_edge": s}`` -> s, ``{"height", "width"}`` -> (h, w)."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
    return default


class CLIPScore:
    """CLIP score (module doc) of images against prompt strings, from the local CLIP directory ``path``.

    A plain object, not an ``nn.Module`` (it never enters a checkpoint); move it with ``to(device)``.
    ``score(images, texts)`` gives the per-pair scores; ``update(images, texts)`` accumulates them and
    ``compute()`` returns their mean over every process; ``reset()`` clears them.
    """

    name = "clip_score"

    def __init__(
        self,
        path: str | Path | None,           # local directory of a transformers CLIPModel (+ tokenizer, processor)
        batch_size: int = 64,              # images per CLIP call
    ) -> None:
        if path is None or not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(
                f"the CLIP score needs a local transformers CLIP directory with config.json, weights, the tokenizer "
                f"and preprocessor_config.json, got {path!r}: download it once where there is internet, "
                f"`{DOWNLOAD}`, and pass that folder (clip: / --clip); flowmap_lit never downloads weights")
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError as err:
            raise ModuleNotFoundError("the CLIP score needs transformers: pip install 'flowmap_lit[fid]'") from err
        self.path = Path(path)
        self.model = CLIPModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        processor = self.path / "preprocessor_config.json"
        config = json.loads(processor.read_text()) if processor.is_file() else {}
        image_size = int(self.model.config.vision_config.image_size)
        self.resize = _size(config.get("size"), image_size)
        self.crop = _size(config.get("crop_size"), image_size)
        if isinstance(self.crop, int):
            self.crop = (self.crop, self.crop)
        self.image_mean = torch.tensor(config.get("image_mean", OPENAI_CLIP_MEAN)).view(1, 3, 1, 1)
        self.image_std = torch.tensor(config.get("image_std", OPENAI_CLIP_STD)).view(1, 3, 1, 1)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.batch_size = batch_size
        self.metric = _mean_metric()
        self._prompts: list[str] = []

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> CLIPScore:
        self.model.to(device)
        self.metric.to(device)
        self.image_mean, self.image_std = self.image_mean.to(device), self.image_std.to(device)
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """(N, 1 or 3, H, W) images in [-1, 1] -> CLIP's ``pixel_values`` (N, 3, crop_h, crop_w)."""
        from flowmap_lit.metrics.features import as_rgb, to_uint8

        x = to_uint8(as_rgb(images, "CLIPScore")).float().to(self.device) / 255
        h, w = x.shape[-2:]
        if isinstance(self.resize, int):  # the shorter side to `resize`, the aspect ratio kept
            scale = self.resize / min(h, w)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
        else:
            size = self.resize
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        ch, cw = self.crop
        top, left = max(0, (x.shape[-2] - ch) // 2), max(0, (x.shape[-1] - cw) // 2)
        x = x[..., top:top + ch, left:left + cw]
        return (x - self.image_mean) / self.image_std

    def tokens(self, texts: list[str]) -> Tensor:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def score(self, images: Tensor, texts: list[str]) -> Tensor:
        """Per-pair scores ``100 * max(cos(image_i, text_i), 0)``, (N,) float64."""
        if len(images) != len(texts):
            raise ValueError(f"CLIPScore: {len(images)} images but {len(texts)} prompts; give one prompt per image")
        out = []
        for i in range(0, len(texts), self.batch_size):
            image = self.model.get_image_features(pixel_values=self.preprocess(images[i:i + self.batch_size]))
            text = self.model.get_text_features(input_ids=self.tokens(texts[i:i + self.batch_size]))
            image = getattr(image, "pooler_output", image)  # a tensor, or an output object in newer transformers
            text = getattr(text, "pooler_output", text)
            cos = F.cosine_similarity(image.double(), text.double(), dim=-1)
            out.append(100 * cos.clamp_min(0))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=self.device)

    def update(self, images: Tensor, texts: list[str]) -> None:
        """Add the scores of ``images`` against ``texts`` (one prompt per image)."""
        self.metric.update(self.score(images, texts))

    def compute(self) -> float:
        """The mean score of everything added since the last reset, over every process."""
        value = float(self.metric.compute())
        return value if math.isfinite(value) else float("nan")

    def reset(self) -> None:
        self.metric.reset()

    # --- the interface of FID (few_step.image_distances): the images come with prompts set beforehand
    def set_prompts(self, texts: list[str]) -> None:
        """The prompts of the images ``update_fake`` will receive next, in order (one per image)."""
        self._prompts = list(texts)

    def reset_fake(self) -> None:
        self.metric.reset()
        self._cursor = 0

    def update_fake(self, images: Tensor) -> None:
        start = getattr(self, "_cursor", 0)
        texts = self._prompts[start:start + len(images)]
        if len(texts) != len(images):
            raise ValueError(f"CLIPScore: images {start}..{start + len(images) - 1} have no prompts "
                             f"({len(self._prompts)} set); call set_prompts with one prompt per image first")
        self._cursor = start + len(images)
        self.update(images, texts)
