"""Prompt embeddings from local ``transformers`` text encoders, as the SD3 and FLUX transformers take them.

``encode_prompts(prompts, encoder_dir, style)`` returns ``(tokens (N, L, D), pooled (N, D'))`` float32
arrays, the ``encoder_hidden_states`` and ``pooled_projections`` of the diffusers transformers,
computed the way the diffusers pipelines' ``encode_prompt`` computes them:

- ``style="sd3"`` (``StableDiffusion3Pipeline``): every CLIP encoder gives its penultimate hidden
  state (padded to 77 tokens) and its pooled projection; the CLIP states are concatenated along
  the channels, the pooled ones too; a T5 encoder's last hidden state (``t5_max_length`` tokens, 256
  by default) follows along the sequence, the CLIP part zero-padded to T5's width;
- ``style="flux"`` (``FluxPipeline``): the pooled output of the (first) CLIP encoder is the pooled
  projection, and the T5 encoder's last hidden state (512 tokens by default) the token sequence.

``encoder_dir`` is either one encoder (a directory with ``config.json``, the weights and its
tokenizer), or a diffusers pipeline's directory with ``text_encoder``/``tokenizer``,
``text_encoder_2``/``tokenizer_2`` and ``text_encoder_3``/``tokenizer_3`` subfolders (only the text
encoders and tokenizers are needed). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STYLES = ("sd3", "flux")
DOWNLOAD_HINT = (
    "download the text encoders once where there is internet, e.g. "
    "`hf download stabilityai/stable-diffusion-3.5-medium --include 'text_encoder*/*' 'tokenizer*/*' "
    "--local-dir models/sd3.5-medium` (SD3) or `hf download black-forest-labs/FLUX.1-dev --include "
    "'text_encoder*/*' 'tokenizer*/*' --local-dir models/flux.1-dev` (FLUX), and pass that folder; "
    "flowmap_lit never downloads weights")


def encoder_parts(encoder_dir: str | Path) -> list[tuple[Path, Path]]:
    """``[(model directory, tokenizer directory), ...]`` of ``encoder_dir`` (one encoder, or a pipeline's
    ``text_encoder*``/``tokenizer*`` subfolders in order); a clear error when there is none."""
    root = Path(encoder_dir).expanduser()
    if (root / "config.json").is_file():
        return [(root, root)]
    parts = []
    for suffix in ("", "_2", "_3"):
        model = root / f"text_encoder{suffix}"
        if (model / "config.json").is_file():
            tokenizer = root / f"tokenizer{suffix}"
            if not tokenizer.is_dir():
                raise FileNotFoundError(f"{model} has no tokenizer: expected {tokenizer} next to it; {DOWNLOAD_HINT}")
            parts.append((model, tokenizer))
    if not parts:
        raise FileNotFoundError(f"no text encoder in {root} (expected config.json there, or text_encoder/, "
                                f"text_encoder_2/, text_encoder_3/ subfolders with their tokenizer/ folders): "
                                f"{DOWNLOAD_HINT}")
    return parts


def _load(model_dir: Path, tokenizer_dir: Path, dtype, device):
    """(kind "clip" or "t5", model, tokenizer) of one local encoder."""
    try:
        import transformers
    except ImportError as err:
        raise ModuleNotFoundError("encoding prompts needs transformers: pip install 'flowmap_lit[fid]'") from err
    config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    arch = (getattr(config, "architectures", None) or [""])[0]
    model_type = str(getattr(config, "model_type", ""))
    if model_type.startswith("clip"):
        kind, cls = "clip", getattr(transformers, arch, None) if arch.startswith("CLIPText") else None
        cls = cls or transformers.CLIPTextModel
    elif "t5" in model_type:
        kind, cls = "t5", getattr(transformers, arch, None) if arch.endswith("EncoderModel") else None
        cls = cls or transformers.T5EncoderModel
    else:
        raise ValueError(f"{model_dir}: a {model_type or 'model of unknown type'} ({arch}); expected a CLIP text "
                         "encoder or a T5 encoder")
    model = cls.from_pretrained(str(model_dir), local_files_only=True, dtype=dtype).to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return kind, model, tokenizer


def encode_prompts(
    prompts: list[str],                  # the prompts ("" is the empty prompt, the CFG null)
    encoder_dir: str | Path,             # one local encoder, or a diffusers pipeline's directory (module doc)
    style: str = "sd3",                  # "sd3" or "flux": how the encoders' outputs combine (module doc)
    clip_max_length: int = 77,           # CLIP tokens (padded / truncated), at most the model's positions
    t5_max_length: int | None = None,    # T5 tokens; None: 256 for sd3, 512 for flux
    batch_size: int = 64,                # prompts per encoder call
    device: str = "cpu",                 # where the encoders run
    dtype: str = "float32",              # encoder precision ("float32", "bfloat16", "float16")
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(tokens (N, L, D), pooled (N, D') or None)`` float32 embeddings of ``prompts`` (module doc)."""
    import torch

    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    t5_max_length = t5_max_length or (256 if style == "sd3" else 512)
    encoders = [_load(m, t, getattr(torch, dtype), device) for m, t in encoder_parts(encoder_dir)]
    clips = [e for e in encoders if e[0] == "clip"]
    t5s = [e for e in encoders if e[0] == "t5"]
    if style == "flux" and (not clips or not t5s):
        raise ValueError(f"style 'flux' needs a CLIP and a T5 encoder in {encoder_dir}, found "
                         f"{[e[0] for e in encoders]}")
    if not encoders:
        raise ValueError(f"no encoder in {encoder_dir}")

    def ids(tokenizer, batch, max_length):
        return tokenizer(batch, padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)

    tokens, pooled = [], []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            batch = list(prompts[i:i + batch_size])
            clip_states, clip_pooled = [], []
            for _, model, tokenizer in (clips[:1] if style == "flux" else clips):
                length = min(clip_max_length, int(model.config.max_position_embeddings))
                out = model(ids(tokenizer, batch, length), output_hidden_states=True)
                clip_states.append(out.hidden_states[-2].float())
                clip_pooled.append((out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output).float())
            t5_states = [model(ids(tokenizer, batch, t5_max_length))[0].float() for _, model, tokenizer in t5s[:1]]
            if style == "flux":
                tokens.append(t5_states[0])
                pooled.append(clip_pooled[0])
                continue
            seq = []
            if clip_states:
                clip = torch.cat(clip_states, dim=-1)
                if t5_states:
                    width = t5_states[0].shape[-1]
                    if clip.shape[-1] > width:
                        raise ValueError(f"the CLIP states ({clip.shape[-1]} channels) are wider than T5's ({width})")
                    clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
                seq.append(clip)
            seq.extend(t5_states)
            tokens.append(torch.cat(seq, dim=-2))
            if clip_pooled:
                pooled.append(torch.cat(clip_pooled, dim=-1))
    tokens_np = torch.cat(tokens).cpu().numpy()
    pooled_np = torch.cat(pooled).cpu().numpy() if pooled else None
    return tokens_np, pooled_np


def encoder_description(encoder_dir: str | Path, style: str, clip_max_length: int = 77,
                        t5_max_length: int | None = None) -> str:
    """What ``stats.json`` records as ``text.encoder``: the style, the encoder folders and the lengths."""
    names = ", ".join(str(m) for m, _ in encoder_parts(encoder_dir))
    t5 = t5_max_length or (256 if style == "sd3" else 512)
    return f"{style}: {names}; clip {clip_max_length} tokens, t5 {t5} tokens"
