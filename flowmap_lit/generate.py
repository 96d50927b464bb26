"""Samples of a trained module across step counts, from one seeded noise (the ``sample`` command's
and the notebook's entry point), and prompt embeddings for text-conditioned modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

PROMPT_KEYS = {"encoder_hidden_states": ("prompt_embeds", "encoder_hidden_states", "text_emb"),
               "pooled_projections": ("pooled_prompt_embeds", "pooled_projections", "text_pooled")}


def load_prompts(spec: str, module, data_root: str | None = None) -> dict[str, Tensor]:
    """Prompt embeddings ``{"encoder_hidden_states": (P, L, D), "pooled_projections": (P, D')}`` from an
    ``.npz`` file (diffusers' ``encode_prompt`` names or the dataset's) or ``"val"``: the validation
    split of ``data_root`` (default: the checkpoint's dataset)."""
    if spec == "val":
        from flowmap_lit.data import LatentDataModule
        from flowmap_lit.metrics.few_step import text_prompts

        root = data_root
        if root is None:
            raise ValueError("--prompts val needs the dataset: the checkpoint records none, pass --data ROOT")
        dm = LatentDataModule(root=root, num_workers=0, normalize=False)
        dm.setup("predict")
        prompts = text_prompts(dm, 10**9)
        if prompts is None:
            raise ValueError(f"--prompts val: the dataset {root} has no text embeddings")
        return prompts
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {spec}: no such file; pass an .npz of prompt embeddings (prompt_embeds "
                                "(P, L, D) and pooled_prompt_embeds (P, D'), from the pipeline's encode_prompt) "
                                "or 'val'")
    arrays = np.load(path)
    out = {}
    for target, names in PROMPT_KEYS.items():
        found = [n for n in names if n in arrays.files]
        if found:
            out[target] = torch.from_numpy(np.asarray(arrays[found[0]], dtype=np.float32))
    if "encoder_hidden_states" not in out:
        raise ValueError(f"{path} holds {arrays.files}; expected prompt_embeds (P, L, D) (and pooled_prompt_embeds "
                         "(P, D')), or the dataset's text_emb / text_pooled")
    if out["encoder_hidden_states"].ndim == 2:  # one prompt
        out = {k: v[None] for k, v in out.items()}
    return out


@torch.no_grad()
def generate(module, num: int, steps: list[int], guidance: float | None = None, seed: int = 0,
             labels: Tensor | None = None, shape: tuple[int, ...] | None = None,
             batch_size: int = 500, prompts: dict[str, Tensor] | None = None
             ) -> tuple[Tensor, Tensor | None, dict[int, Tensor]]:
    """``(noise, labels, {k: samples})``: the same seeded noise and labels for every step count.

    Labels default to ``arange(num) % num_classes`` (one column per class in a grid); with
    ``prompts`` (text embeddings, see ``load_prompts``) sample ``i`` takes prompt ``i % P``.
    """
    info = getattr(module, "data_info", None) or {}
    shape = tuple(shape or info.get("shape") or ())
    if not shape:
        raise ValueError("the checkpoint records no data shape; pass shape=(C, H, W)")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((num, *shape), generator=gen).to(module.device)
    k_classes = getattr(module, "num_classes", 0)
    if labels is None and k_classes:
        labels = torch.arange(num) % k_classes
    labels = labels.to(module.device) if labels is not None else None
    kwargs = {} if guidance is None else {"guidance": guidance}
    from flowmap_lit.metrics.few_step import prompt_cond, slice_cond

    cond = prompt_cond(prompts, range(num), module.device)
    out = {}
    for k in steps:
        parts = []
        for i in range(0, num, batch_size):
            lab = labels[i:i + batch_size] if labels is not None else None
            parts.append(module.sample(noise[i:i + batch_size], lab, num_steps=k,
                                       **slice_cond(cond, slice(i, i + batch_size)), **kwargs))
        out[k] = torch.cat(parts)
    return noise, labels, out
