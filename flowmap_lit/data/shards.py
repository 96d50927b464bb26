"""Writing WebDataset latent shards and reading/writing ``stats.json`` (see ``format.py``).

Example::

    info = write_shards("data/toy", "train", x_train, y_train, samples_per_shard=1000)
    mean, std = channel_stats(x_train)
    write_stats("data/toy", shape=x_train.shape[1:], num_classes=10, kind="latent",
                mean=mean, std=std, splits={"train": info}, source="my script")

Text-conditioned data (your own encoder's outputs; see ``format.py``)::

    write_dataset("data/t2i", {"train": (x, np.zeros(len(x), int))}, num_classes=0,
                  text={"train": (tokens_N_L_D, pooled_N_D)}, null_text=(null_L_D, null_D),
                  text_encoder="sd3: clip-l + clip-g + t5-xxl, 154 tokens",
                  prompts={"train": ["a red cube", ...]})           # optional: the prompts' text

A prompts-only dataset (no latents; data-free distillation reads it with ``PromptDataModule``)::

    write_prompt_dataset("data/prompts", {"train": (tokens_N_L_D, pooled_N_D, prompts)},
                         null_text=(null_L_D, null_D), text_encoder="...")
"""

import glob
import io
import json
import os
import re
import tarfile
from collections.abc import Sequence

import numpy as np

from .format import (
    FORMAT_VERSION,
    KINDS,
    NULL_TEXT_FILE,
    PREPARE_CMD,
    PROMPT,
    PROMPTS_KIND,
    STATS_FILE,
    TEXT_EMB,
    TEXT_POOLED,
    sample_key,
    shard_name,
)

Latents = np.ndarray | tuple[np.ndarray, np.ndarray]  # (N, C, H, W) array, or (means, stds) pair
TextEmbeddings = tuple[np.ndarray, np.ndarray | None]  # (N, L, D) token embeddings, (N, D') pooled or None


def _npy_bytes(array: np.ndarray) -> bytes:
    """Serialize one array to ``.npy`` bytes (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class ShardSink:
    """Streams samples into ``{split}-{index:06d}.tar`` shards, ``samples_per_shard`` each.

    Each shard is written to ``<name>.tar.tmp`` and renamed when complete, so an
    interrupted writer leaves no truncated ``.tar``. Use as a context manager; on an
    exception the unfinished shard is deleted. ``info`` gives ``num_samples``/``num_shards``.
    """

    def __init__(
        self,
        out_dir: str,                    # directory receiving the shards (created if missing)
        split: str,                      # split name, e.g. "train" or "val"
        samples_per_shard: int = 1000,   # samples per tar file
        first_shard: int = 0,            # index of the first shard written (parallel writers)
    ):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir, self.split, self.samples_per_shard = out_dir, split, samples_per_shard
        os.makedirs(out_dir, exist_ok=True)
        self.num_samples, self.num_shards, self.first_shard = 0, first_shard, first_shard
        self._tar: tarfile.TarFile | None = None
        self._tmp_path = ""
        self._in_shard = 0

    def _open_shard(self) -> None:
        self._tmp_path = os.path.join(self.out_dir, shard_name(self.split, self.num_shards) + ".tmp")
        self._tar = tarfile.open(self._tmp_path, "w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        os.replace(self._tmp_path, self._tmp_path[: -len(".tmp")])
        self.num_shards += 1

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: reproducible bytes
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, arrays: dict[str, np.ndarray], label: int, key: str | None = None,
              texts: dict[str, str] | None = None) -> None:
        """Add one sample: ``arrays`` maps ``"latent"`` (or ``"mean"``, ``"std"``) to C x H x W (and text
        embeddings by member name); ``texts`` maps member names to strings (``{"prompt": "..."}``,
        stored UTF-8 as ``<key>.prompt.txt``)."""
        if self._tar is None:
            self._open_shard()
        key = sample_key(self.split, self.num_samples) if key is None else key
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        for name, array in arrays.items():
            self._add(f"{key}.{name}.npy", _npy_bytes(array))
        for name, text in (texts or {}).items():
            self._add(f"{key}.{name}.txt", text.encode("utf-8"))
        self._add(f"{key}.cls", str(int(label)).encode("ascii"))
        self.num_samples += 1
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self._finish_shard()

    def close(self) -> None:
        """Finish the last (possibly partial) shard."""
        if self._tar is not None:
            self._finish_shard()

    @property
    def info(self) -> dict[str, int]:
        """``{"num_samples": n, "num_shards": k}`` as stored in ``stats.json`` splits."""
        return {"num_samples": self.num_samples, "num_shards": self.num_shards - self.first_shard}

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # interrupted: drop the unfinished shard
            self._tar.close()
            self._tar = None
            os.remove(self._tmp_path)


def remove_stale_shards(out_dir: str, split: str, keep: int = 0) -> None:
    """Delete ``{split}-*.tar`` / ``.tar.tmp`` files with index >= ``keep``."""
    pattern = re.compile(rf"^{re.escape(split)}-(\d{{6}})\.tar(\.tmp)?$")
    for path in glob.glob(os.path.join(glob.escape(out_dir), f"{split}-*.tar*")):
        match = pattern.match(os.path.basename(path))
        if match and int(match.group(1)) >= keep:
            os.remove(path)


def text_arrays(text: TextEmbeddings, n: int, dtype: str | None = None) -> dict[str, np.ndarray]:
    """Check ``(tokens (N, L, D), pooled (N, D') or None)`` and return them by member name."""
    if not isinstance(text, (tuple, list)) or len(text) != 2:
        raise ValueError("text must be a pair (tokens (N, L, D), pooled (N, D') or None)")
    out = {TEXT_EMB: text[0]} if text[1] is None else {TEXT_EMB: text[0], TEXT_POOLED: text[1]}
    for name, ndim, what in ((TEXT_EMB, 3, "(N, L, D)"), (TEXT_POOLED, 2, "(N, D')")):
        if name not in out:
            continue
        array = np.asarray(out[name]) if dtype is None else np.asarray(out[name], dtype=dtype)
        if array.ndim != ndim or len(array) != n:
            raise ValueError(f"{name} must have shape {what} with N = number of samples = {n}, got {array.shape}")
        if array.dtype not in (np.float16, np.float32):
            raise ValueError(f"{name} must be float16 or float32 (or pass text_dtype=), got {array.dtype}")
        out[name] = array
    return out


def text_info(text: TextEmbeddings, null_file: str | None = None, encoder: str = "", prompts: bool = False) -> dict:
    """The ``stats.json`` ``"text"`` entry of a split's text embeddings (see ``format.py``); ``prompts``:
    every sample stores its prompt text."""
    info = {"emb_shape": [int(d) for d in np.shape(text[0])[1:]],
            "pooled_shape": None if text[1] is None else [int(d) for d in np.shape(text[1])[1:]],
            "null_file": null_file, "encoder": encoder}
    if prompts:
        info["prompts"] = True
    return info


def prompt_list(prompts, n: int, split: str = "train") -> list[str]:
    """Check ``n`` prompt strings (a list, or a numpy array of str) and return them as a list."""
    items = [p.item() if isinstance(p, np.generic) else p for p in (prompts.tolist() if isinstance(prompts, np.ndarray)
                                                                      else list(prompts))]
    if len(items) != n:
        raise ValueError(f"split {split!r}: {len(items)} prompts for {n} samples; give one prompt per sample")
    bad = next((i for i, p in enumerate(items) if not isinstance(p, str)), None)
    if bad is not None:
        raise ValueError(f"split {split!r}: prompt {bad} is {type(items[bad]).__name__}, not str")
    return items


def check_text_info(text: dict, where: str = "stats.json") -> dict:
    """Check a ``"text"`` entry: an (L, D) token shape and a (D',) pooled shape or null."""
    emb, pooled = text.get("emb_shape"), text.get("pooled_shape")
    if not (isinstance(emb, list) and len(emb) == 2 and all(isinstance(d, int) and d > 0 for d in emb)):
        raise ValueError(f"{where}: text.emb_shape must be [L, D] (tokens x channels), got {emb!r}")
    if pooled is not None and not (isinstance(pooled, list) and len(pooled) == 1 and pooled[0] > 0):
        raise ValueError(f"{where}: text.pooled_shape must be [D'] or null, got {pooled!r}")
    if not isinstance(text.get("prompts", False), bool):
        raise ValueError(f"{where}: text.prompts must be true or false, got {text['prompts']!r}")
    return text


def write_null_text(out_dir: str, tokens: np.ndarray, pooled: np.ndarray | None, text: dict) -> str:
    """Write the empty-prompt embeddings ``null_text.npz``, checked against the ``"text"`` entry."""
    arrays = {TEXT_EMB: np.asarray(tokens, dtype=np.float32)}
    if pooled is not None:
        arrays[TEXT_POOLED] = np.asarray(pooled, dtype=np.float32)
    expected = {TEXT_EMB: text["emb_shape"], TEXT_POOLED: text["pooled_shape"]}
    for name, shape in expected.items():
        got = list(arrays[name].shape) if name in arrays else None
        if got != shape:
            raise ValueError(f"null text {name} has shape {got}, but the samples have {shape}")
    path = os.path.join(out_dir, NULL_TEXT_FILE)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(path + ".tmp", path)
    return path


def read_null_text(root: str, stats: dict) -> dict[str, np.ndarray] | None:
    """The empty-prompt embeddings ``{"text_emb": (L, D), ["text_pooled": (D',)]}`` (float32), or None
    if the dataset has no text or stored none (classifier-free guidance then uses zeros)."""
    text = stats.get("text")
    if not text or not text.get("null_file"):
        return None
    path = os.path.join(os.path.abspath(os.path.expanduser(root)), text["null_file"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} (the empty-prompt embedding named in stats.json) is missing; "
                                f"re-create the dataset ({stats.get('source') or PREPARE_CMD})")
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k].astype(np.float32) for k in f.files}
    for name, shape in ((TEXT_EMB, text["emb_shape"]), (TEXT_POOLED, text["pooled_shape"])):
        if shape is not None and list(arrays.get(name, np.zeros(0)).shape) != shape:
            raise ValueError(f"{path}: {name} must have shape {shape}, got "
                             f"{list(arrays[name].shape) if name in arrays else 'nothing'}")
    return arrays


def check_finite(split: str, latents: Latents, text: TextEmbeddings | None = None) -> None:
    """Refuses a split holding NaN or infinite values, naming the first bad sample: a non-finite latent
    would poison the channel statistics (``stats.json``) and every step it reaches."""
    arrays = {"mean": latents[0], "std": latents[1]} if isinstance(latents, tuple) else {"latent": latents}
    if text is not None:
        arrays.update({TEXT_EMB: text[0]} if text[1] is None else {TEXT_EMB: text[0], TEXT_POOLED: text[1]})
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.dtype.kind != "f" or array.size == 0:
            continue
        bad = np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))
        if len(bad):
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise ValueError(f"split {split!r}: {name} of sample {int(bad[0])}{more} holds NaN or infinite values. "
                             "Fix or drop those samples at the source (an encoder run in float16 overflows, a "
                             "failed image decodes to NaN); nothing was written.")


def write_shards(
    out_dir: str,                        # dataset directory
    split: str,                          # split name ("train", "val", ...)
    latents: Latents,                    # (N, C, H, W) latents, or a (means, stds) posterior pair
    labels: Sequence[int] | np.ndarray,  # (N,) integer class labels
    samples_per_shard: int = 1000,       # samples per tar file
    dtype: str | None = None,            # store as "float16"/"float32"; None keeps the input dtype
    text: TextEmbeddings | None = None,  # (tokens (N, L, D), pooled (N, D') or None): text conditioning
    text_dtype: str | None = None,       # store the text embeddings as "float16"/"float32"; None: keep
    prompts: Sequence[str] | None = None,  # (N,) prompt strings, stored as <key>.prompt.txt (needs text)
) -> dict[str, int]:
    """Write one split as tar shards; returns ``{"num_samples": N, "num_shards": k}``.

    Older shards of the same split with a higher index are removed afterwards.
    """
    check_finite(split, latents, text)
    posterior = isinstance(latents, tuple)
    arrays = {"mean": latents[0], "std": latents[1]} if posterior else {"latent": latents}
    arrays = {k: np.asarray(v) if dtype is None else np.asarray(v, dtype=dtype) for k, v in arrays.items()}
    labels = np.asarray(labels)
    n = len(labels)
    if text is not None:
        arrays.update(text_arrays(text, n, text_dtype))
    if prompts is not None:
        if text is None:
            raise ValueError("prompts are stored with their text embeddings: pass text= too")
        prompts = prompt_list(prompts, n, split)
    for name, array in arrays.items():
        if name in (TEXT_EMB, TEXT_POOLED):
            continue  # checked by text_arrays
        if array.ndim != 4 or len(array) != n:
            raise ValueError(f"{name} must have shape (N, C, H, W) with N = len(labels) = {n}, got {array.shape}")
        if array.dtype not in (np.float16, np.float32):
            raise ValueError(f"{name} must be float16 or float32 (or pass dtype=), got {array.dtype}")
    if posterior and arrays["mean"].shape != arrays["std"].shape:
        raise ValueError(f"means {arrays['mean'].shape} and stds {arrays['std'].shape} differ in shape")
    with ShardSink(out_dir, split, samples_per_shard) as sink:
        for i in range(n):
            sink.write({k: v[i] for k, v in arrays.items()}, int(labels[i]),
                       texts=None if prompts is None else {PROMPT: prompts[i]})
    remove_stale_shards(out_dir, split, keep=sink.num_shards)
    return sink.info


class ChannelStats:
    """Streaming per-channel mean/std of latents (float64 sums), for data too big for memory.

    ``update(means, stds)`` with (N, C, H, W) blocks; ``stds`` given for posterior data,
    where mean = E[mean] and var = Var[mean] + E[std^2] (law of total variance).
    """

    def __init__(self):
        self.total, self.total_sq, self.extra_var, self.count = 0.0, 0.0, 0.0, 0

    def update(self, means: np.ndarray, stds: np.ndarray | None = None) -> None:
        block = np.asarray(means, dtype=np.float64)
        self.total = self.total + block.sum(axis=(0, 2, 3))
        self.total_sq = self.total_sq + np.square(block).sum(axis=(0, 2, 3))
        if stds is not None:
            self.extra_var = self.extra_var + np.square(np.asarray(stds, dtype=np.float64)).sum(axis=(0, 2, 3))
        self.count += block.shape[0] * block.shape[2] * block.shape[3]

    def result(self) -> tuple[list[float], list[float]]:
        """(per-channel mean, per-channel std); a constant channel gets std 1."""
        if self.count == 0:
            raise ValueError("cannot compute channel statistics of an empty array")
        mean = self.total / self.count
        var = np.maximum(self.total_sq / self.count - mean**2, 0.0) + self.extra_var / self.count
        std = np.sqrt(var)
        std = np.where(std > 1e-8, std, 1.0)
        return [float(m) for m in mean], [float(s) for s in std]

    def to_dict(self) -> dict:
        """The running sums as plain lists (JSON), e.g. one file per shard of a parallel writer."""
        as_list = lambda v: np.atleast_1d(np.asarray(v, dtype=np.float64)).tolist()  # noqa: E731
        return {"total": as_list(self.total), "total_sq": as_list(self.total_sq),
                "extra_var": as_list(self.extra_var), "count": int(self.count)}

    def merge(self, other: "ChannelStats | dict") -> None:
        """Add another accumulator's sums (or its ``to_dict()``) to this one."""
        d = other.to_dict() if isinstance(other, ChannelStats) else other
        self.total = self.total + np.asarray(d["total"])
        self.total_sq = self.total_sq + np.asarray(d["total_sq"])
        self.extra_var = self.extra_var + np.asarray(d["extra_var"])
        self.count += int(d["count"])


def channel_stats(latents: Latents, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (N, C, H, W) latents or of a (means, stds) posterior pair."""
    means, stds = latents if isinstance(latents, tuple) else (latents, None)
    acc = ChannelStats()
    for i in range(0, len(means), chunk):
        acc.update(means[i : i + chunk], None if stds is None else stds[i : i + chunk])
    return acc.result()


def write_stats(
    out_dir: str,                        # dataset directory
    *,
    shape: Sequence[int] | None,         # (C, H, W) of every sample; None for prompts-only data
    num_classes: int,                    # number of class labels
    kind: str,                           # "latent" or "posterior"
    mean: Sequence[float],               # per-channel mean (see channel_stats)
    std: Sequence[float],                # per-channel std
    splits: dict[str, dict[str, int]],   # {"train": {"num_samples": n, "num_shards": k}, ...}
    source: str = "",                    # how the data was made (the prepare command line)
    text: dict | None = None,            # text-conditioning entry (see text_info); None: no text
) -> str:
    """Atomically write ``stats.json`` (see ``format.py``); returns its path."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == PROMPTS_KIND:  # no latents: no shape, no statistics
        if text is None or shape is not None or len(mean) or len(std):
            raise ValueError("a prompts-only dataset has text embeddings and no latents: text=..., shape=None, "
                             "mean=[], std=[]")
    else:
        shape = [int(s) for s in shape]
        if len(shape) != 3 or len(mean) != shape[0] or len(std) != shape[0]:
            raise ValueError(f"shape must be [C, H, W] and mean/std have C entries: {shape}, {mean}, {std}")
    stats = {
        "format": FORMAT_VERSION, "shape": shape, "num_classes": int(num_classes), "kind": kind,
        "mean": [float(m) for m in mean], "std": [float(s) for s in std],
        "splits": {k: {"num_samples": int(v["num_samples"]), "num_shards": int(v["num_shards"])}
                   for k, v in splits.items()},
        "source": source,
    }
    if text is not None:
        stats["text"] = check_text_info(text, "write_stats")
    path = os.path.join(out_dir, STATS_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(stats, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def read_stats(root: str) -> dict:
    """Read and check ``<root>/stats.json``; a clear error says how to create a missing one."""
    path = os.path.join(os.path.abspath(os.path.expanduser(root)), STATS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {root!r} is not a prepared flowmap_lit dataset (or it is incomplete). "
            f"Create it with `{PREPARE_CMD} digits --out {root}` (or the `images` / `array` "
            f"subcommands; see `{PREPARE_CMD} --help`)."
        )
    with open(path) as f:
        stats = json.load(f)
    missing = {"format", "shape", "num_classes", "kind", "mean", "std", "splits"} - set(stats)
    if missing:
        raise ValueError(f"{path} lacks the keys {sorted(missing)}; re-create it with {PREPARE_CMD}")
    if stats["format"] != FORMAT_VERSION:
        raise ValueError(f"{path} has format {stats['format']}, this code reads format {FORMAT_VERSION}")
    if stats["kind"] not in KINDS:
        raise ValueError(f"{path}: kind must be one of {KINDS}, got {stats['kind']!r}")
    if stats.get("text") is not None:
        check_text_info(stats["text"], path)
    elif stats["kind"] == PROMPTS_KIND:
        raise ValueError(f"{path}: a prompts-only dataset needs a \"text\" entry; re-create it with "
                         f"{PREPARE_CMD} text-prompts")
    if not np.isfinite(np.asarray(stats["mean"] + stats["std"], dtype=np.float64)).all():
        raise ValueError(f"{path} holds non-finite channel statistics (mean {stats['mean']}, std {stats['std']}): "
                         "its train split has NaN or infinite samples. Re-create the dataset from finite data "
                         f"({PREPARE_CMD} refuses non-finite samples, naming them).")
    return stats


def write_dataset(
    out_dir: str,                        # dataset directory
    splits: dict[str, tuple[Latents, np.ndarray]],  # {"train": (latents, labels), "val": ...}
    num_classes: int,                    # number of class labels
    source: str = "",                    # how the data was made (the prepare command line)
    samples_per_shard: int = 1000,       # samples per tar file
    dtype: str | None = None,            # store as "float16"/"float32"; None keeps the input dtype
    text: dict[str, TextEmbeddings] | None = None,  # per split (tokens (N, L, D), pooled (N, D') or None)
    null_text: TextEmbeddings | None = None,  # empty-prompt (tokens (L, D), pooled (D',) or None), for CFG
    text_encoder: str = "",              # how the text embeddings were made (stats.json text.encoder)
    text_dtype: str | None = "float16",  # stored dtype of the text embeddings; None keeps the input dtype
    prompts: dict[str, Sequence[str]] | None = None,  # per split, one prompt string per sample (needs text)
) -> dict:
    """Write all splits and then ``stats.json`` (channel stats of "train"); returns the stats.

    ``stats.json`` is deleted first and written last, so an interrupted run leaves a
    directory that readers reject (and ``DigitsDataModule.prepare_data`` re-creates).
    With ``text``, every split needs its embeddings, all with the same shapes (``format.py``);
    with ``prompts`` also its prompt strings (batches then carry ``batch["prompt"]``).
    """
    for name, (x, _) in splits.items():  # before anything of an existing dataset is removed
        check_finite(name, x, None if text is None else text.get(name))
    if prompts is not None:
        if text is None:
            raise ValueError("prompts are stored with their text embeddings: pass text= too")
        if set(prompts) != set(splits):
            raise ValueError(f"prompts are needed for every split {sorted(splits)}, got {sorted(prompts)}")
        prompts = {name: prompt_list(prompts[name], len(splits[name][1]), name) for name in splits}
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, STATS_FILE)):
        os.remove(os.path.join(out_dir, STATS_FILE))
    info_text = None
    if text is not None:
        if set(text) != set(splits):
            raise ValueError(f"text embeddings are needed for every split {sorted(splits)}, got {sorted(text)}")
        info_text = text_info(text["train"], NULL_TEXT_FILE if null_text is not None else None, text_encoder,
                              prompts is not None)
        for name, pair in text.items():
            other = text_info(pair)
            if (other["emb_shape"], other["pooled_shape"]) != (info_text["emb_shape"], info_text["pooled_shape"]):
                raise ValueError(f"split {name!r} has text shapes {other['emb_shape']}, {other['pooled_shape']}; "
                                 f"'train' has {info_text['emb_shape']}, {info_text['pooled_shape']}")
        if null_text is not None:
            write_null_text(out_dir, null_text[0], null_text[1], info_text)
    elif null_text is not None:
        raise ValueError("null_text needs text embeddings for the samples (text=)")
    infos = {name: write_shards(out_dir, name, x, y, samples_per_shard, dtype,
                                text=None if text is None else text[name], text_dtype=text_dtype,
                                prompts=None if prompts is None else prompts[name])
             for name, (x, y) in splits.items()}
    train = splits["train"][0]
    if dtype is not None:  # statistics of the stored values, as the reader sees them
        train = tuple(np.asarray(a, dtype) for a in train) if isinstance(train, tuple) else np.asarray(train, dtype)
    mean, std = channel_stats(train)
    shape = (train[0] if isinstance(train, tuple) else train).shape[1:]
    kind = "posterior" if isinstance(train, tuple) else "latent"
    write_stats(out_dir, shape=shape, num_classes=num_classes, kind=kind, mean=mean, std=std,
                splits=infos, source=source, text=info_text)
    return read_stats(out_dir)


def write_prompt_dataset(
    out_dir: str,                        # dataset directory
    splits: dict[str, tuple[np.ndarray, np.ndarray | None, Sequence[str]]],  # per split (tokens, pooled, prompts)
    null_text: TextEmbeddings | None = None,  # empty-prompt (tokens (L, D), pooled (D',) or None)
    source: str = "",                    # how the data was made (the prepare command line)
    samples_per_shard: int = 1000,       # samples per tar file
    text_encoder: str = "",              # how the embeddings were made (stats.json text.encoder)
    text_dtype: str | None = "float16",  # stored dtype of the text embeddings; None keeps the input dtype
) -> dict:
    """Write a prompts-only dataset (``"kind": "prompts"``: text embeddings and prompt text, no latents;
    ``format.py``) and then ``stats.json``; returns the stats. Every split needs the same shapes."""
    if "train" not in splits:
        raise ValueError(f"a prompts-only dataset needs a 'train' split, got {sorted(splits)}")
    checked = {}
    for name, (tokens, pooled, prompts) in splits.items():
        check_finite(name, np.zeros((len(tokens), 0, 0, 0), np.float32), (tokens, pooled))
        checked[name] = (text_arrays((tokens, pooled), len(tokens), text_dtype),
                         prompt_list(prompts, len(tokens), name))
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, STATS_FILE)):
        os.remove(os.path.join(out_dir, STATS_FILE))
    first = splits["train"]
    info_text = text_info((first[0], first[1]), NULL_TEXT_FILE if null_text is not None else None, text_encoder, True)
    for name, (tokens, pooled, _) in splits.items():
        other = text_info((tokens, pooled))
        if (other["emb_shape"], other["pooled_shape"]) != (info_text["emb_shape"], info_text["pooled_shape"]):
            raise ValueError(f"split {name!r} has text shapes {other['emb_shape']}, {other['pooled_shape']}; "
                             f"'train' has {info_text['emb_shape']}, {info_text['pooled_shape']}")
    if null_text is not None:
        write_null_text(out_dir, null_text[0], null_text[1], info_text)
    infos = {}
    for name, (arrays, prompts) in checked.items():
        with ShardSink(out_dir, name, samples_per_shard) as sink:
            for i, prompt in enumerate(prompts):
                sink.write({k: v[i] for k, v in arrays.items()}, 0, texts={PROMPT: prompt})
        remove_stale_shards(out_dir, name, keep=sink.num_shards)
        infos[name] = sink.info
    write_stats(out_dir, shape=None, num_classes=0, kind=PROMPTS_KIND, mean=[], std=[], splits=infos,
                source=source, text=info_text)
    return read_stats(out_dir)


def read_split(root: str, split: str = "train", normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """All samples of a split as arrays ``(x (N, C, H, W) float32, labels (N,) int64)``, in order."""
    from flowmap_lit.data import LatentDataModule

    dm = LatentDataModule(root=root, val_split=split, num_workers=0, val_batch_size=4096,
                          normalize=normalize, val_posterior="mean")
    xs, ys = [], []
    for batch in dm.split_loader():  # the whole split, also inside a process group (not this rank's share)
        xs.append(batch["x"].numpy())
        ys.append(batch["label"].numpy())
    return np.concatenate(xs), np.concatenate(ys)
