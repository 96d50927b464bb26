"""On-disk format of a flowmap_lit latent dataset (format version 1).

A dataset is one directory::

    data/digits/
      stats.json                 written LAST: its presence means the dataset is complete
      train-000000.tar           WebDataset shards, named {split}-{index:06d}.tar
      train-000001.tar
      val-000000.tar

Each shard is a plain (uncompressed) tar file. Consecutive members sharing a key form
one sample (WebDataset convention; a key contains no ".")::

    train_00000000.latent.npy    a latent, any shape C x H x W, float16 or float32
    train_00000000.cls           class label as ASCII text, e.g. b"7"

or, for VAE posteriors (``kind == "posterior"``), instead of ``latent.npy``::

    train_00000000.mean.npy      posterior mean, C x H x W
    train_00000000.std.npy       posterior standard deviation, C x H x W

A posterior sample is drawn as ``mean + std * N(0, 1)`` every time the sample is read.

Text-conditioned datasets (optional; ``stats.json`` has a ``"text"`` entry) add to every sample
the precomputed output of any text encoder (CLIP, T5, ...; the reader never runs one)::

    train_00000000.text_emb.npy     per-token embeddings, L x D (float16 or float32); for SD3 the
                                    joint CLIP-L/G + T5 sequence the pipeline's encode_prompt returns
    train_00000000.text_pooled.npy  pooled embedding, D' (optional: only if "pooled_shape" is set)
    train_00000000.prompt.txt       the prompt itself, UTF-8 (optional: only if "prompts" is true)

and the dataset directory holds the embedding of the EMPTY prompt once, the null condition of
classifier-free guidance::

    null_text.npz                   arrays "text_emb" (L x D) and, if pooled, "text_pooled" (D')

Every sample has the same ``L`` (pad or truncate to a fixed length when encoding, as diffusers
pipelines do). ``LatentDataModule`` puts them in the batch as
``batch["cond"] = {"encoder_hidden_states": (B, L, D), "pooled_projections": (B, D')}`` (float32),
the keyword arguments of diffusers transformers; datasets without ``"text"`` have no ``"cond"``.
Class labels are still stored (``cls``, 0 for text data with ``num_classes: 0``). Where the
prompts are known their text is stored too, and batches carry it as ``batch["prompt"]`` (a list of
str; CLIP scores of samples need it).

Prompts-only datasets (``"kind": "prompts"``, made by ``prepare text-prompts``) hold no latents:
each sample is ``text_emb.npy`` [+ ``text_pooled.npy``] + ``prompt.txt`` + ``cls`` (0), with
``"shape": null`` and empty ``mean``/``std`` in ``stats.json``; they feed data-free distillation,
whose data module (``PromptDataModule``) takes the latent shape from its own config.

``stats.json`` (``FORMAT_VERSION == 1``)::

    {
      "format": 1,
      "shape": [C, H, W],                 latent shape of every sample (null for prompts-only data)
      "num_classes": 10,                  labels are 0 .. num_classes - 1
      "kind": "latent" | "posterior" | "prompts",
      "mean": [m_0, ..., m_{C-1}],        per-channel mean of the train latents
      "std":  [s_0, ..., s_{C-1}],        per-channel std of the train latents
      "splits": {"train": {"num_samples": n, "num_shards": k}, "val": {...}},
      "source": "python -m flowmap_lit prepare digits --out data/digits",
      "text": {                           optional: text-conditioned data only
        "emb_shape": [L, D],              shape of every text_emb.npy
        "pooled_shape": [D'] | null,      shape of every text_pooled.npy (null: none stored)
        "null_file": "null_text.npz" | null,  empty-prompt embedding (null: CFG uses zeros)
        "encoder": "sd3: clip-l + clip-g + t5-xxl, 154 tokens",  free text, how it was made
        "prompts": true                   optional: every sample has prompt.txt (absent: no prompt text)
      }
    }

For posterior data the per-channel statistics describe the drawn latents: the mean is the
mean of the posterior means; the variance is the variance of the means plus the average
posterior variance (law of total variance).

Shards are written to ``*.tar.tmp`` and renamed, so a killed writer never leaves a
truncated ``.tar``; readers list shards from ``stats.json`` (``num_shards``), so stale
shards from an older, larger dataset in the same directory are never read.
"""

import os

FORMAT_VERSION = 1                       # version of stats.json and the shard layout
STATS_FILE = "stats.json"                # name of the statistics file next to the shards
KINDS = ("latent", "posterior", "prompts")  # sample kinds: stored latent, VAE posterior pair, or no latent
PROMPTS_KIND = "prompts"                 # kind of prompts-only datasets (text embeddings + prompt text)
PREPARE_CMD = "python -m flowmap_lit prepare"  # the CLI that creates datasets
TEXT_EMB, TEXT_POOLED = "text_emb", "text_pooled"   # member names (``<key>.text_emb.npy``) of text embeddings
PROMPT = "prompt"                        # member name (``<key>.prompt.txt``) of the prompt text, UTF-8
NULL_TEXT_FILE = "null_text.npz"         # empty-prompt embeddings (arrays named like the members)
COND_KEYS = {TEXT_EMB: "encoder_hidden_states", TEXT_POOLED: "pooled_projections"}  # batch["cond"] keys


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``, e.g. ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


def shard_paths(root: str, split: str, num_shards: int) -> list[str]:
    """Absolute paths of the ``num_shards`` shards of ``split`` under ``root``."""
    return [os.path.join(os.path.abspath(root), shard_name(split, i)) for i in range(num_shards)]


def sample_key(split: str, index: int) -> str:
    """Key of sample ``index`` of ``split`` (no dots: WebDataset splits keys at the first one)."""
    return f"{split}_{index:08d}"
