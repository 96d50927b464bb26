"""Distances of k-step samples to the data, computed in shares across processes with the same result.

Sample ``i`` of an evaluation always gets the same noise and label, however many processes share
the work: ``seeded_noise`` cuts the sample indices ``0..N-1`` into blocks whose random streams are
seeded by ``(seed, block)``, and each process draws only the blocks that overlap its contiguous
share (``rank_share``). A block holds all ``N`` samples when their noise is small (at most
``BLOCK_ELEMENTS`` numbers; then block 0 is exactly ``randn((N, *shape), generator=seed)``), else as
many samples as fit. Each process feeds its generated images to the metrics; the metrics' float64
sums are all-reduced when computed (torchmetrics), so no image ever leaves its process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

BLOCK_ELEMENTS = 2**26           # noise numbers per seeded block (256 MiB of float32)
BLOCK_SEED_STRIDE = 1_000_003    # block b draws from seed + b * stride


def rank_share(num_samples: int, rank: int, world_size: int) -> range:
    """The contiguous indices of ``rank``'s share: sizes differ by at most one, lower ranks first."""
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def seeded_noise(indices: range, num_samples: int, shape: tuple[int, ...], seed: int = 0, num_classes: int = 0,
                 labels: str = "random") -> tuple[Tensor, Tensor | None]:
    """``(noise (len(indices), *shape), labels (len(indices),) or None)`` of the samples ``indices`` of an
    evaluation of ``num_samples``; ``labels``: ``"random"`` (drawn after each block's noise) or
    ``"balanced"`` (sample ``i`` gets class ``i % num_classes``)."""
    if labels not in ("random", "balanced"):
        raise ValueError(f"labels must be 'random' or 'balanced', got {labels!r}")
    numel = math.prod(shape)
    block = num_samples if num_samples * numel <= BLOCK_ELEMENTS else max(1, BLOCK_ELEMENTS // numel)
    noise, label_parts = [], []
    if len(indices):
        for b in range(indices.start // block, (indices.stop - 1) // block + 1):
            lo, hi = b * block, min((b + 1) * block, num_samples)
            gen = torch.Generator().manual_seed(seed + b * BLOCK_SEED_STRIDE)
            z = torch.randn((hi - lo, *shape), generator=gen)
            y = torch.randint(0, num_classes, (hi - lo,), generator=gen) if num_classes and labels == "random" else None
            keep = slice(max(indices.start, lo) - lo, min(indices.stop, hi) - lo)
            noise.append(z[keep])
            if y is not None:
                label_parts.append(y[keep])
    noise = torch.cat(noise) if noise else torch.zeros((0, *shape))
    if not num_classes:
        return noise, None
    if labels == "balanced":
        return noise, torch.arange(indices.start, indices.stop) % num_classes
    return noise, torch.cat(label_parts) if label_parts else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def image_distances(metrics: Mapping[str, object], samples: Iterable[Tensor],
                    to_images: Callable[[Tensor], Tensor] = lambda x: x) -> dict[str, float]:
    """``{name: distance}`` of the batches ``samples`` for each ``FID``-like metric (``reset_fake`` /
    ``update_fake`` / ``compute``), over this process's batches and every other process's
    (``compute`` all-reduces). ``to_images`` maps a batch to images once for all metrics (e.g.
    un-normalize and decode latents)."""
    for metric in metrics.values():
        metric.reset_fake()
    for batch in samples:
        images = to_images(batch)
        for metric in metrics.values():
            metric.update_fake(images)
    return {name: metric.compute() for name, metric in metrics.items()}


def sample_in_batches(sampler: Callable[..., Tensor], noise: Tensor, labels: Tensor | None, batch_size: int = 500,
                      cond: dict[str, Tensor] | None = None, **sampler_kwargs) -> Tensor:
    """``sampler(noise, labels, **sampler_kwargs)`` (with ``cond=`` the rows of ``cond`` when given), drawn
    ``batch_size`` at a time and concatenated."""
    return torch.cat([sampler(noise[i:i + batch_size], labels[i:i + batch_size] if labels is not None else None,
                              **slice_cond(cond, slice(i, i + batch_size)), **sampler_kwargs)
                      for i in range(0, len(noise), batch_size)])


def sampler_distances(metrics: Mapping[str, object], sampler: Callable[..., Tensor], noise: Tensor,
                      labels: Tensor | None, batch_size: int = 500,
                      to_images: Callable[[Tensor], Tensor] = lambda x: x, cond: dict[str, Tensor] | None = None,
                      **sampler_kwargs) -> dict[str, float]:
    """``image_distances`` of ``sampler(noise, labels, **sampler_kwargs)`` (with ``cond=`` the rows of
    ``cond`` when given, e.g. text embeddings), drawn ``batch_size`` at a time."""
    batches = (sampler(noise[i:i + batch_size], labels[i:i + batch_size] if labels is not None else None,
                       **slice_cond(cond, slice(i, i + batch_size)), **sampler_kwargs)
               for i in range(0, len(noise), batch_size))
    return image_distances(metrics, batches, to_images)


def text_prompts(datamodule, count: int) -> dict[str, Tensor] | None:
    """The stored text embeddings (``batch["cond"]``) of the first ``count`` samples of the data
    module's validation split, on the CPU; None for a dataset without text. Sample ``i`` of an
    evaluation is conditioned on prompt ``i % count`` (``prompt_cond``)."""
    return text_prompts_with_text(datamodule, count)[0]


def text_prompts_with_text(datamodule, count: int) -> tuple[dict[str, Tensor] | None, list[str] | None]:
    """``(text_prompts(datamodule, count), their prompt strings)``: the strings are None where the
    dataset stores no prompt text (``batch["prompt"]``)."""
    if getattr(datamodule, "text", None) is None:
        return None, None
    parts: dict[str, list[Tensor]] = {}
    texts: list[str] | None = []
    taken = 0
    for batch in datamodule.split_loader():
        n = min(count - taken, len(batch["label"]))
        for key, value in batch["cond"].items():
            parts.setdefault(key, []).append(value[:n])
        if texts is not None and "prompt" in batch:
            texts.extend(batch["prompt"][:n])
        else:
            texts = None
        taken += n
        if taken >= count:
            break
    if not taken:
        raise ValueError(f"text-conditioned evaluation takes its prompts from the validation split "
                         f"{datamodule.val_split!r} of {datamodule.root}, which has no samples; write the dataset "
                         "with a val split (flowmap_lit.data.write_dataset(..., text=...))")
    return {key: torch.cat(values) for key, values in parts.items()}, texts


def prompt_texts(texts: list[str] | None, indices) -> list[str] | None:
    """The prompt strings of samples ``indices`` (prompt ``i % len(texts)``, as ``prompt_cond``), or None."""
    return None if texts is None else [texts[i % len(texts)] for i in indices]


def prompt_cond(prompts: dict[str, Tensor] | None, indices, device=None) -> dict[str, Tensor] | None:
    """The keyword conditioning of samples ``indices`` (prompt ``i % len(prompts)``), or None."""
    if prompts is None:
        return None
    first = next(iter(prompts.values()))
    rows = torch.as_tensor(list(indices), dtype=torch.long) % len(first)
    return {key: value[rows].to(device) for key, value in prompts.items()}


def slice_cond(cond: dict[str, Tensor] | None, part: slice) -> dict:
    """``{"cond": cond[part]}`` as sampler keyword arguments, or nothing without conditioning."""
    return {} if cond is None else {"cond": {key: value[part] for key, value in cond.items()}}
