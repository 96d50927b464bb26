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
