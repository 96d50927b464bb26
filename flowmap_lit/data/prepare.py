"""Create latent datasets (format in ``format.py``): ``python -m flowmap_lit prepare <source> ...``.

Subcommands::

    digits --out data/digits                          scikit-learn digits, 1 x 8 x 8 in [-1, 1], 1497/300
    shapes --out data/shapes                          procedural colored shapes, 3 x 8 x 8 in [-1, 1], 4 classes,
                                                      1700/300
    images --src DIR --out OUT --resolution R         DIR/<class>/<image>: center crop, resize, 3 x R x R in [-1, 1]
    array  --src FILE.npz --out OUT                   x (N,C,H,W) + y (N,), or mean + std + y (VAE posterior)
    text-array --src FILE.npz --out OUT              x (N,C,H,W) + text_emb (N,L,D) [+ text_pooled (N,D')]
                                                      + null_text_emb [+ null_text_pooled] [+ prompt (N,) str]:
                                                      text-to-image latents
    text-prompts --prompts FILE.txt --out OUT        prompts only (no latents), one per line, embedded by
      (--encoder DIR | --embeddings FILE.npz)         local text encoders or taken from an .npz: data-free
                                                      distillation
    imagenet --src DIR|TAR --vae VAE_DIR --out OUT    center crop 512, SD-VAE posterior (float16); see imagenet.py

A new source is one ``add_<name>(subparsers)`` function appended to ``SUBCOMMANDS``,
whose parser sets ``func`` to a function of the parsed arguments.
"""

import argparse
import os
from collections.abc import Callable

import numpy as np

from .format import FORMAT_VERSION, PREPARE_CMD, STATS_FILE
from .images import list_images, load_image, split_indices
from .shards import (
    ChannelStats,
    ShardSink,
    channel_stats,
    read_stats,
    remove_stale_shards,
    write_dataset,
    write_prompt_dataset,
    write_stats,
)

DIGITS_TRAIN, DIGITS_VAL = 1497, 300                      # fixed digits split (1797 images)



# --------------------------------------------------------------------------- digits
def digits_arrays(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn digits as ``{"train": (x, y), "val": (x, y)}``; x is (N, 1, 8, 8) float32 = pixels/8 - 1."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # [0, 16] -> [-1, 1]
    y = digits.target.astype(np.int64)
    train, val = split_indices(len(x), DIGITS_VAL / len(x), seed)
    assert len(train) == DIGITS_TRAIN and len(val) == DIGITS_VAL
    return {"train": (x[train], y[train]), "val": (x[val], y[val])}


def digits_stats(
    out_dir: str = "data/digits",        # dataset directory (only enters "source")
    samples_per_shard: int = 750,        # as for prepare_digits
    seed: int = 0,                       # as for prepare_digits
) -> dict:
    """The ``stats.json`` contents ``prepare_digits`` would write, computed in memory (nothing written)."""
    arrays = digits_arrays(seed)
    mean, std = channel_stats(arrays["train"][0])
    splits = {k: {"num_samples": len(y), "num_shards": -(-len(y) // samples_per_shard)} for k, (_, y) in arrays.items()}
    return {"format": FORMAT_VERSION, "shape": [1, 8, 8], "num_classes": 10, "kind": "latent", "mean": mean,
            "std": std, "splits": splits, "source": f"{PREPARE_CMD} digits --out {out_dir}"}


def prepare_digits(
    out_dir: str = "data/digits",        # dataset directory to (over)write
    samples_per_shard: int = 750,        # 750: 2 train shards + 1 val shard
    seed: int = 0,                       # seed of the fixed train/val permutation
) -> dict:
    """Write the digits dataset (1497 train / 300 val, 10 classes) and return its stats."""
    source = f"{PREPARE_CMD} digits --out {out_dir}"
    return write_dataset(out_dir, digits_arrays(seed), 10, source, samples_per_shard)


# --------------------------------------------------------------------------- shapes
SHAPES_TRAIN, SHAPES_VAL = 1700, 300                      # fixed shapes split
SHAPES_CLASSES = ("square", "horizontal bar", "vertical bar", "ring")


def shapes_arrays(seed: int = 0, resolution: int = 8) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Procedural colored shapes as ``{"train": (x, y), "val": (x, y)}``; x is (N, 3, R, R) float32 in [-1, 1].

    A second small RGB benchmark next to the digits, made from a seed (no download): each image is
    one shape of class ``y`` (``SHAPES_CLASSES``: a filled square, a horizontal or vertical bar, a
    hollow square) of random size, position and color on a dark random background, plus pixel noise.
    The classes are balanced and the same seed gives the same arrays.
    """
    rng = np.random.default_rng(seed)
    n, r = SHAPES_TRAIN + SHAPES_VAL, resolution
    y = np.arange(n) % len(SHAPES_CLASSES)
    x = np.empty((n, 3, r, r), np.float32)
    for i, label in enumerate(y):
        mask = np.zeros((r, r), bool)
        if label in (0, 3):  # square / ring: side 3 to r - 2 (a ring needs side >= 4)
            side = int(rng.integers(3 if label == 0 else 4, r - 1))
            top, left = rng.integers(0, r - side + 1, size=2)
            mask[top:top + side, left:left + side] = True
            if label == 3:
                mask[top + 1:top + side - 1, left + 1:left + side - 1] = False
        else:  # bars: thickness 1 or 2, length 4 to r
            thick, length = int(rng.integers(1, 3)), int(rng.integers(4, r + 1))
            a, b = int(rng.integers(0, r - thick + 1)), int(rng.integers(0, r - length + 1))
            if label == 1:
                mask[a:a + thick, b:b + length] = True
            else:
                mask[b:b + length, a:a + thick] = True
        background = rng.uniform(0.0, 0.3, size=3).astype(np.float32)
        color = rng.uniform(0.35, 1.0, size=3).astype(np.float32)
        img = np.where(mask[None], color[:, None, None], background[:, None, None])
        x[i] = np.clip(img + rng.normal(0.0, 0.03, size=img.shape), 0.0, 1.0) * 2.0 - 1.0
    train, val = split_indices(n, SHAPES_VAL / n, seed)
    return {"train": (x[train], y[train].astype(np.int64)), "val": (x[val], y[val].astype(np.int64))}


def shapes_stats(out_dir: str = "data/shapes", samples_per_shard: int = 850, seed: int = 0) -> dict:
    """The ``stats.json`` contents ``prepare_shapes`` would write, computed in memory (nothing written)."""
    arrays = shapes_arrays(seed)
    mean, std = channel_stats(arrays["train"][0])
    splits = {k: {"num_samples": len(y), "num_shards": -(-len(y) // samples_per_shard)} for k, (_, y) in arrays.items()}
    return {"format": FORMAT_VERSION, "shape": [3, 8, 8], "num_classes": len(SHAPES_CLASSES), "kind": "latent",
            "mean": mean, "std": std, "splits": splits, "source": f"{PREPARE_CMD} shapes --out {out_dir}"}


def prepare_shapes(
    out_dir: str = "data/shapes",        # dataset directory to (over)write
    samples_per_shard: int = 850,        # 850: 2 train shards + 1 val shard
    seed: int = 0,                       # seed of the images and of the train/val permutation
) -> dict:
    """Write the shapes dataset (1700 train / 300 val, 4 classes, 3 x 8 x 8) and return its stats."""
    source = f"{PREPARE_CMD} shapes --out {out_dir}"
    return write_dataset(out_dir, shapes_arrays(seed), len(SHAPES_CLASSES), source, samples_per_shard)


#: Datasets made from nothing but this package (no download): name -> (prepare, stats in memory).
BUILTIN_DATASETS: dict[str, tuple[Callable[..., dict], Callable[..., dict]]] = {
    "digits": (prepare_digits, digits_stats), "shapes": (prepare_shapes, shapes_stats)}


# --------------------------------------------------------------------------- images
def prepare_images(
    src: str,                            # folder of class subfolders of images
    out_dir: str,                        # dataset directory to (over)write
    resolution: int,                     # output side length R in pixels
    samples_per_shard: int = 1000,       # samples per tar file
    val_fraction: float = 0.1,           # fraction of images held out for validation
    seed: int = 0,                       # seed of the train/val permutation
    dtype: str = "float32",              # stored dtype: "float32" or "float16"
) -> dict:
    """Center-crop and resize every image, write shards (streaming) and stats; returns the stats."""
    paths, labels, classes = list_images(src)
    train, val = split_indices(len(paths), val_fraction, seed)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, STATS_FILE)):
        os.remove(os.path.join(out_dir, STATS_FILE))
    acc, infos = ChannelStats(), {}
    for split, indices in (("train", train), ("val", val)):
        with ShardSink(out_dir, split, samples_per_shard) as sink:
            for i in indices:
                x = load_image(paths[i], resolution)
                if split == "train":
                    acc.update(x[None])
                sink.write({"latent": x.astype(dtype)}, int(labels[i]))
        remove_stale_shards(out_dir, split, keep=sink.num_shards)
        infos[split] = sink.info
    mean, std = acc.result()
    source = f"{PREPARE_CMD} images --src {src} --out {out_dir} --resolution {resolution}"
    write_stats(out_dir, shape=(3, resolution, resolution), num_classes=len(classes), kind="latent",
                mean=mean, std=std, splits=infos, source=source)
    return read_stats(out_dir)


# --------------------------------------------------------------------------- arrays
def prepare_array(
    src: str,                            # .npz with x, y (or mean, std, y); optional x_val/mean_val/std_val/y_val
    out_dir: str,                        # dataset directory to (over)write
    samples_per_shard: int = 1000,       # samples per tar file
    val_fraction: float = 0.1,           # held-out fraction when the file has no *_val arrays
    seed: int = 0,                       # seed of the train/val permutation
    dtype: str | None = None,            # stored dtype: "float32"/"float16"; None keeps the file's float dtype
) -> dict:
    """Write an .npz of latents (or VAE posteriors) as a dataset; returns the stats."""
    with np.load(src, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    posterior = "mean" in data and "std" in data
    if not ("y" in data and (posterior or "x" in data)):
        raise ValueError(f"{src} must hold x (N,C,H,W) and y (N,), or mean, std and y; it has {sorted(data)}")

    def latents(suffix: str, idx=slice(None)):
        if posterior:
            return data["mean" + suffix][idx], data["std" + suffix][idx]
        return data["x" + suffix][idx]

    if "y_val" in data:
        splits = {"train": (latents(""), data["y"]), "val": (latents("_val"), data["y_val"])}
    else:
        train, val = split_indices(len(data["y"]), val_fraction, seed)
        splits = {"train": (latents("", train), data["y"][train]), "val": (latents("", val), data["y"][val])}
    if dtype is None:  # keep float16/float32; store anything else (e.g. float64) as float32
        first = splits["train"][0][0] if posterior else splits["train"][0]
        dtype = None if first.dtype in (np.float16, np.float32) else "float32"
    labels = np.concatenate([splits["train"][1], splits["val"][1]]).astype(np.int64)
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    source = f"{PREPARE_CMD} array --src {src} --out {out_dir}"
    return write_dataset(out_dir, splits, num_classes, source, samples_per_shard, dtype)


def prepare_text_array(
    src: str,                            # .npz: x, text_emb, [text_pooled], [null_text_emb, null_text_pooled], [*_val]
    out_dir: str,                        # dataset directory to (over)write
    samples_per_shard: int = 1000,       # samples per tar file
    val_fraction: float = 0.1,           # held-out fraction when the file has no *_val arrays
    seed: int = 0,                       # seed of the train/val permutation
    dtype: str | None = None,            # stored latent dtype; None keeps float16/float32
    text_dtype: str = "float16",         # stored dtype of the text embeddings
    text_encoder: str = "",              # how the embeddings were made (stats.json text.encoder)
) -> dict:
    """Write an .npz of latents with precomputed text embeddings as a text-conditioned dataset.

    Arrays: ``x`` (N, C, H, W) latents (or ``mean`` + ``std`` posteriors), ``text_emb`` (N, L, D)
    per-token embeddings, optional ``text_pooled`` (N, D'), optional ``null_text_emb`` (L, D) and
    ``null_text_pooled`` (D',): the empty prompt's embeddings, used as the CFG null condition
    (zeros when absent), optional ``prompt`` (N,) str: the prompts' text (stored with the
    embeddings; batches then carry ``batch["prompt"]``). ``*_val`` versions give an explicit
    validation split. Labels are all 0.
    """
    with np.load(src, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    posterior = "mean" in data and "std" in data
    if not ((posterior or "x" in data) and "text_emb" in data):
        raise ValueError(f"{src} must hold x (N,C,H,W) (or mean, std) and text_emb (N,L,D); it has {sorted(data)}")

    def part(suffix: str, idx=slice(None)):
        x = (data["mean" + suffix][idx], data["std" + suffix][idx]) if posterior else data["x" + suffix][idx]
        pooled = data.get("text_pooled" + suffix)
        text = (data["text_emb" + suffix][idx], None if pooled is None else pooled[idx])
        prompt = data.get("prompt" + suffix)
        return x, text, None if prompt is None else [str(p) for p in prompt[idx]]

    if "text_emb_val" in data:
        parts = {"train": part(""), "val": part("_val")}
    else:
        train, val = split_indices(len(data["text_emb"]), val_fraction, seed)
        parts = {"train": part("", train), "val": part("", val)}
    splits = {k: (x, np.zeros(len(t[0]), np.int64)) for k, (x, t, _) in parts.items()}
    text = {k: t for k, (_, t, _) in parts.items()}
    prompts = {k: p for k, (_, _, p) in parts.items()}
    if any(p is None for p in prompts.values()):
        if any(p is not None for p in prompts.values()):
            raise ValueError(f"{src}: prompt text for some splits only; give prompt (and prompt_val with *_val)")
        prompts = None
    null = None
    if "null_text_emb" in data:
        null = (data["null_text_emb"], data.get("null_text_pooled"))
    if dtype is None:
        first = splits["train"][0][0] if posterior else splits["train"][0]
        dtype = None if first.dtype in (np.float16, np.float32) else "float32"
    source = f"{PREPARE_CMD} text-array --src {src} --out {out_dir}"
    return write_dataset(out_dir, splits, 0, source, samples_per_shard, dtype, text=text, null_text=null,
                         text_encoder=text_encoder, text_dtype=text_dtype, prompts=prompts)


def read_prompt_file(path: str) -> list[str]:
    """The prompts of a UTF-8 text file, one per line (surrounding whitespace stripped, blank lines skipped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such prompt file (a UTF-8 text file, one prompt per line)")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line)")
    return prompts


#: Names of the precomputed embeddings in an .npz: ours, or the names of diffusers' encode_prompt.
EMBEDDING_NAMES = {"text_emb": ("text_emb", "prompt_embeds"), "text_pooled": ("text_pooled", "pooled_prompt_embeds"),
                   "null_text_emb": ("null_text_emb", "negative_prompt_embeds"),
                   "null_text_pooled": ("null_text_pooled", "negative_pooled_prompt_embeds")}


def prepare_text_prompts(
    prompts_file: str,                   # UTF-8 text file, one prompt per line
    out_dir: str,                        # dataset directory to (over)write
    encoder: str | None = None,          # local text encoder(s) (flowmap_lit.data.text_encoders); or embeddings
    embeddings: str | None = None,       # .npz of precomputed text_emb (N,L,D) [+ text_pooled, null_text_*]
    style: str = "sd3",                  # how the encoders' outputs combine: "sd3" or "flux"
    samples_per_shard: int = 1000,       # samples per tar file
    val_fraction: float = 0.1,           # held-out fraction (the evaluation's prompts)
    seed: int = 0,                       # seed of the train/val permutation
    text_dtype: str = "float16",         # stored dtype of the embeddings
    clip_max_length: int = 77,           # CLIP tokens
    t5_max_length: int | None = None,    # T5 tokens; None: 256 (sd3) or 512 (flux)
    batch_size: int = 64,                # prompts per encoder call
    device: str = "cpu",                 # where the encoders run
    dtype: str = "float32",              # encoder precision
) -> dict:
    """Write a prompts-only dataset (text embeddings and prompt text, no latents; ``format.py``) and the
    empty prompt's embedding; returns the stats.

    The embeddings come from local text encoders (``encoder``, ``encode_prompts``; the empty prompt is
    encoded the same way) or from an ``.npz`` (``embeddings``: ``text_emb`` (N, L, D), optional
    ``text_pooled`` (N, D'), ``null_text_emb`` (L, D) and ``null_text_pooled`` (D',), or diffusers'
    names ``prompt_embeds`` / ``pooled_prompt_embeds`` / ``negative_*``), one row per line of the
    prompt file, in order. Without a stored null the CFG null is zeros.
    """
    if (encoder is None) == (embeddings is None):
        raise ValueError("give the text encoder directory (encoder=, --encoder) or precomputed embeddings "
                         "(embeddings=, --embeddings), not both")
    prompts = read_prompt_file(prompts_file)
    if encoder is not None:
        from .text_encoders import encode_prompts, encoder_description

        tokens, pooled = encode_prompts(prompts + [""], encoder, style, clip_max_length, t5_max_length,
                                        batch_size, device, dtype)
        null = (tokens[-1], None if pooled is None else pooled[-1])
        tokens, pooled = tokens[:-1], None if pooled is None else pooled[:-1]
        description = encoder_description(encoder, style, clip_max_length, t5_max_length)
        how = f"--encoder {encoder} --style {style}"
    else:
        with np.load(embeddings, allow_pickle=False) as f:
            found = {name: f[next(n for n in names if n in f.files)] for name, names in EMBEDDING_NAMES.items()
                     if any(n in f.files for n in names)}
        if "text_emb" not in found:
            raise ValueError(f"{embeddings} must hold text_emb (N, L, D) (or prompt_embeds); it has "
                             f"{sorted(np.load(embeddings).files)}")
        tokens, pooled = found["text_emb"], found.get("text_pooled")
        if len(tokens) != len(prompts) or (pooled is not None and len(pooled) != len(prompts)):
            raise ValueError(f"{embeddings} holds {len(tokens)} embeddings but {prompts_file} {len(prompts)} prompts; "
                             "give one row per prompt (line), in order")
        null = (found["null_text_emb"], found.get("null_text_pooled")) if "null_text_emb" in found else None
        description = f"precomputed: {embeddings}"
        how = f"--embeddings {embeddings}"
    train, val = split_indices(len(prompts), val_fraction, seed)
    splits = {name: (tokens[idx], None if pooled is None else pooled[idx], [prompts[i] for i in idx])
              for name, idx in (("train", train), ("val", val))}
    source = f"{PREPARE_CMD} text-prompts --prompts {prompts_file} {how} --out {out_dir}"
    return write_prompt_dataset(out_dir, splits, null, source, samples_per_shard, description, text_dtype)


# --------------------------------------------------------------------------- CLI
def _add_builtin(sub: argparse._SubParsersAction, name: str, help: str, samples_per_shard: int, seed_help: str) -> None:
    """A built-in dataset's subcommand: ``--out data/<name>``, shard size, seed."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--out", default=f"data/{name}", help="output directory")
    p.add_argument("--samples-per-shard", type=int, default=samples_per_shard, help="samples per tar shard")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.set_defaults(func=lambda a: BUILTIN_DATASETS[name][0](a.out, a.samples_per_shard, a.seed))


def add_digits(sub: argparse._SubParsersAction) -> None:
    _add_builtin(sub, "digits", "scikit-learn 8x8 digits (ships with scikit-learn, no download)", 750,
                 "seed of the fixed train/val split")


def add_shapes(sub: argparse._SubParsersAction) -> None:
    _add_builtin(sub, "shapes", "procedural colored shapes, 3 x 8 x 8, 4 classes (made from a seed, no download)",
                 850, "seed of the images and of the train/val split")


def add_images(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("images", help="a folder of class subfolders of images (pixel-space, 3 x R x R)")
    p.add_argument("--src", required=True, help="folder with one subfolder of images per class")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resolution", type=int, required=True, help="output side length in pixels")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored dtype")
    p.set_defaults(func=lambda a: prepare_images(a.src, a.out, a.resolution, a.samples_per_shard,
                                                 a.val_fraction, a.seed, a.dtype))


def _npz_arguments(p: argparse.ArgumentParser, src_help: str) -> None:
    """The arguments shared by the .npz routes: source, output, shard size and the train/val split."""
    p.add_argument("--src", required=True, help=src_help)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out fraction if there are no *_val arrays")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")


def add_array(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("array", help="an .npz with x, y (or mean, std, y) arrays")
    _npz_arguments(p, ".npz file: x (N,C,H,W) + y (N,), or mean + std + y; *_val optional")
    p.add_argument("--dtype", default=None, choices=["float32", "float16"], help="stored dtype (default: keep)")
    p.set_defaults(func=lambda a: prepare_array(a.src, a.out, a.samples_per_shard, a.val_fraction, a.seed, a.dtype))


def add_text_array(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("text-array", help="an .npz of latents with precomputed text embeddings (text-to-image)")
    _npz_arguments(p, ".npz: x, text_emb, [text_pooled], [null_text_emb, null_text_pooled]")
    p.add_argument("--text-encoder", default="", help="how the embeddings were made (recorded in stats.json)")
    p.set_defaults(func=lambda a: prepare_text_array(a.src, a.out, a.samples_per_shard, a.val_fraction, a.seed,
                                                     text_encoder=a.text_encoder))


def add_text_prompts(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("text-prompts", help="prompts only (no latents): embeddings + prompt text, for data-free "
                                            "distillation")
    p.add_argument("--prompts", required=True, help="UTF-8 text file, one prompt per line")
    p.add_argument("--out", required=True, help="output directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--encoder", default=None, help="local text encoder directory: one CLIP or T5 encoder with its "
                                                     "tokenizer, or a diffusers pipeline folder with text_encoder*/ "
                                                     "and tokenizer*/")
    src.add_argument("--embeddings", default=None, help=".npz of precomputed text_emb (N,L,D) [+ text_pooled (N,D'), "
                                                        "null_text_emb, null_text_pooled], one row per prompt")
    p.add_argument("--style", default="sd3", choices=["sd3", "flux"],
                   help="how the encoders' outputs combine (as the SD3 or the FLUX pipeline's encode_prompt)")
    p.add_argument("--clip-max-length", type=int, default=77, help="CLIP tokens per prompt")
    p.add_argument("--t5-max-length", type=int, default=None, help="T5 tokens per prompt (default: 256 sd3, 512 flux)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per encoder call")
    p.add_argument("--device", default="cpu", help="where the encoders run, e.g. cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="encoder precision")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of the prompts held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.set_defaults(func=lambda a: prepare_text_prompts(
        a.prompts, a.out, a.encoder, a.embeddings, a.style, a.samples_per_shard, a.val_fraction, a.seed,
        clip_max_length=a.clip_max_length, t5_max_length=a.t5_max_length, batch_size=a.batch_size,
        device=a.device, dtype=a.dtype))


def add_imagenet(sub: argparse._SubParsersAction) -> None:
    from .imagenet import add_imagenet as add  # imports torch; only this subcommand needs it

    add(sub)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_digits, add_shapes, add_images, add_array,
                                                                    add_text_array, add_text_prompts, add_imagenet]


if __name__ == "__main__":  # the former command form; the command lives in flowmap_lit.commands
    import sys

    from flowmap_lit._moved import run_moved_command

    run_moved_command("flowmap_lit.data.prepare", "prepare", sys.argv[1:])
