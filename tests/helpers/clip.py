"""Tiny CLIP models and tokenizers made offline (no download), for the prompt and CLIP-score tests."""

import json
from pathlib import Path

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_tokenizer(directory):
    """A CLIP tokenizer over single letters (vocab.json + an empty merges.txt), saved to ``directory``."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token="<|endoftext|>")
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def text_config(max_positions: int = 16, hidden: int = 16, projection: int = 8):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=2 + 2 * len(LETTERS), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_positions,
                          projection_dim=projection, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_text_encoder(directory, seed: int = 0):
    """A random ``CLIPTextModelWithProjection`` (16 positions, width 16, projection 8) and its tokenizer,
    saved together to ``directory`` (an SD3-style single CLIP encoder)."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(text_config()).eval()
    model.save_pretrained(str(directory))
    tiny_tokenizer(directory)
    return model


COLORS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
          "white": (1.0, 1.0, 1.0)}  # prompt -> the RGB color of its image, in [-1, 1]


def color_images(names, size: int = 16) -> torch.Tensor:
    """(N, 3, size, size) images in [-1, 1], image i filled with the color of prompt ``names[i]``."""
    rgb = torch.tensor([COLORS[n] for n in names])
    return rgb[:, :, None, None].expand(-1, -1, size, size).contiguous()


def tiny_clip(directory, steps: int = 80, seed: int = 0):
    """A tiny ``CLIPModel`` (16 px images, 8 px patches) trained with CLIP's contrastive loss until it pairs
    each color image of ``COLORS`` with its color name, saved with its tokenizer and image processor config to
    ``directory``. Training runs on the CLIP score's own preprocessing; the same seed gives the same model."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    from flowmap_lit.metrics.clip_score import CLIPScore

    directory = Path(directory)
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, projection_dim=8)
    config = CLIPConfig(text_config=text_config().to_dict(), vision_config=vision.to_dict(), projection_dim=8)
    model = CLIPModel(config)
    model.save_pretrained(str(directory))
    tiny_tokenizer(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 16},
        "crop_size": {"height": 16, "width": 16}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    scorer = CLIPScore(directory)
    names = list(COLORS)
    pixels = scorer.preprocess(color_images(names))
    ids = scorer.tokens(names)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(str(directory))
    return directory
