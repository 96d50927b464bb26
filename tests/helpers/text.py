"""Text-conditioned latent datasets and a tiny SD3 transformer for the text-to-image tests."""

import numpy as np
import torch

from flowmap_lit.data import write_dataset

TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4,
            num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=8, pooled_projection_dim=6,
            pos_embed_max_size=8)
L, D, P = 5, 8, 6  # text tokens, token width, pooled width


def text_arrays(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4, 8, 8)).astype(np.float32)
    return x, (rng.standard_normal((n, L, D)).astype(np.float32), rng.standard_normal((n, P)).astype(np.float32))


def write_text_dataset(root, n_train=32, n_val=8, null=True):
    (x, tx), (xv, tv) = text_arrays(n_train, 0), text_arrays(n_val, 1)
    rng = np.random.default_rng(2)
    null_text = (rng.standard_normal((L, D)), rng.standard_normal(P)) if null else None
    write_dataset(str(root), {"train": (x, np.zeros(n_train, int)), "val": (xv, np.zeros(n_val, int))}, 0,
                  source="test", samples_per_shard=16, text={"train": tx, "val": tv}, null_text=null_text,
                  text_encoder="random")
    return x, tx, null_text


def cond_batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(n, L, D, generator=g),
            "pooled_projections": torch.randn(n, P, generator=g)}
