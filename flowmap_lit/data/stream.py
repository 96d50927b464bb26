"""WebDataset pipeline stages for latent shards: shard lists, seeded shuffling, decoding.

The stages are built from webdataset parts (``wds.DataPipeline``, its tar expander and
key grouping with a ``handler=`` hook, ``batched``) rather than ``wds.WebDataset``, because
every random choice must come from an RNG derived from ``(seed, rank, worker, epoch)``:
``wds.WebDataset(resampled=True)`` seeds its shard sampler with the pid and the clock and
takes the rank from ``torch.distributed``, so runs would not be reproducible and the rank
could not come from the Lightning trainer. Python's tarfile also stops silently at a
truncated header, so shards are checked for completeness before reading (``tar_problem``).

Stages run inside DataLoader workers; each stage counts its own epochs (one ``__iter__`` /
``__call__`` per epoch, persistent workers keep the counter).
"""

import io
import os
import random
import warnings
import zlib
from typing import Literal

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from flowmap_lit.seeding import derive_seed

from .format import COND_KEYS, PROMPT, PROMPTS_KIND, TEXT_EMB, TEXT_POOLED

_TAG_SHARDS, _TAG_SHUFFLE, _TAG_NOISE = 1, 2, 3  # keep the three RNG streams independent


class ShardError(RuntimeError):
    """A shard or one of its samples cannot be read (corrupt, truncated, wrong shape)."""


class DataWarning(UserWarning):
    """A bad shard or sample was skipped (``on_error="warn"``)."""


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class ErrorPolicy:
    """What to do with a bad shard or sample: raise a ``ShardError`` or warn once per shard and skip.

    ``handler`` is the webdataset exception hook (returns True = skip and continue);
    ``sample_error`` is called by the decoder. After ``max_consecutive`` shards opened
    without a single good sample, it raises even in "warn" mode (all shards bad: an endless
    resampled stream would otherwise spin forever).
    """

    def __init__(
        self,
        mode: Literal["raise", "warn"],  # "raise": fail with a clear error; "warn": skip with a warning
        urls: list[str],                 # shard paths, to name the bad one in messages
        source: str = "",                # how the dataset was made (stats.json "source")
        max_consecutive: int = 0,        # shards in a row without a good sample before giving up; 0: 4 * len(urls) + 16
    ):
        if mode not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', got {mode!r}")
        self.mode, self.urls, self.source = mode, list(urls), source
        self.max_consecutive = max_consecutive or 4 * len(urls) + 16
        self._warned: set[str] = set()
        self._shards_since_ok = 0

    def fix(self) -> str:
        """The advice appended to every error."""
        how = f"`{self.source}`" if self.source else "`python -m flowmap_lit prepare ...`"
        return (f"Re-create the dataset (it was made with {how}), or set data.init_args.on_error=warn "
                f"(LatentDataModule(on_error='warn')) to skip bad samples.")

    def ok(self) -> None:
        """A good sample arrived."""
        self._shards_since_ok = 0

    def opened(self, url: str) -> None:
        """A shard is about to be read; give up if too many in a row yielded nothing good."""
        self._shards_since_ok += 1
        if self._shards_since_ok > self.max_consecutive:
            raise ShardError(f"read {self._shards_since_ok - 1} shards in a row without a single good sample "
                             f"(last: {url}); see the warnings above. {self.fix()}")

    def _report(self, url: str, key: str | None, reason: str) -> None:
        where = f"shard {url}" + (f", sample {key!r}" if key else "")
        reason = reason.rstrip(". ")
        if self.mode == "raise":
            raise ShardError(f"Cannot read {where}: {reason}. {self.fix()}")
        if url not in self._warned:  # once per shard (per worker process)
            self._warned.add(url)
            warnings.warn(f"Skipping bad data in {where}: {reason} (further errors in this shard are not reported)",
                          DataWarning, stacklevel=2)

    def handler(self, exn: Exception) -> bool:
        """webdataset ``handler=`` hook for tar-level errors (truncated or garbage tar files)."""
        if isinstance(exn, ShardError):
            raise exn
        text = " ".join(str(a) for a in exn.args)
        url = next((u for u in self.urls if u in text), "<unknown shard>")
        reason = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
        self._report(url, None, reason)
        return True

    def sample_error(self, url: str, key: str | None, reason: str) -> None:
        """Report a bad shard (``key=None``) or a sample that cannot be decoded or has the wrong shape."""
        self._report(url, key, reason)


def tar_problem(path: str) -> str | None:
    """Why the local file ``path`` is not a complete tar archive, or None if it looks complete.

    Python's tarfile stops silently at a truncated header, so truncation is detected here:
    a complete archive is a whole number of 512-byte blocks ending in two zero blocks.
    """
    if not os.path.isfile(path):
        return None  # not a local file: let the opener report it
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return f"not a complete tar archive (truncated?): {size} bytes is not a whole number of 512-byte blocks"
    with open(path, "rb") as f:
        f.seek(size - 1024)
        if f.read(1024).strip(b"\0"):
            return "not a complete tar archive (truncated?): it does not end with the end-of-archive marker"
    return None


def _file_signature(path: str) -> tuple[int, int] | None:
    """(size, modification time in ns) of a local file, None if it cannot be stat-ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class TarSamples:
    """Stage ``{"url"} -> raw sample dicts`` (webdataset's tar expander and key grouping).

    Checks each shard with ``tar_problem`` first; in "warn" mode a truncated shard is still
    read, and its incomplete last sample is rejected by ``Decode``. Closes every file it opens.

    With ``cache=True`` the raw samples of each shard read are kept in memory (per process: each
    DataLoader worker has its own) and later reads of the same unchanged file (same size and
    modification time) replay them instead of parsing the tar again: the same samples in the
    same order. Meant for small datasets (the digits: a training epoch is 5
    batches, and every epoch refills the shuffle buffer); the data module turns it on only when
    the whole split fits ``cache_mb``.
    """

    def __init__(self, policy: ErrorPolicy, cache: bool = False):
        self.policy = policy
        self.cache = cache
        self._cached: dict[str, tuple[tuple[int, int], list[dict]]] = {}  # url -> (file signature, samples)

    def _open(self, src):
        for item in src:
            url = item["url"]
            self.policy.opened(url)
            problem = tar_problem(url)
            if problem is not None:
                self.policy.sample_error(url, None, problem)
            try:
                stream = open(url, "rb")
            except OSError as exn:
                self.policy.handler(exn)
                continue
            try:
                yield {"url": url, "stream": stream}
            finally:
                stream.close()

    def _read(self, src):
        files = wds.tariterators.tar_file_expander(self._open(src), handler=self.policy.handler)
        return wds.tariterators.group_by_keys(files, handler=self.policy.handler)

    def _read_cached(self, url: str):
        """The samples of one shard, replayed from memory when this file was read before.

        A shard is read exactly as without the cache (errors are reported the same way); what it
        yielded is kept if the file did not change while it was read. Replaying it gives what
        reading the unchanged file again would give (a bad shard was already reported once).
        """
        signature = _file_signature(url)
        hit = self._cached.get(url)
        if signature is not None and hit is not None and hit[0] == signature:
            self.policy.opened(url)
            for sample in hit[1]:
                yield dict(sample)
            return
        samples = []
        for sample in self._read([{"url": url}]):
            samples.append(sample)
            yield dict(sample)
        if signature is not None and _file_signature(url) == signature:
            self._cached[url] = (signature, samples)

    def __call__(self, src):
        if not self.cache:
            yield from self._read(src)
            return
        for item in src:
            yield from self._read_cached(item["url"])


class ShardList(IterableDataset):
    """First pipeline stage: yields ``{"url": path}``.

    ``resampled=True``: an endless stream of shards drawn with replacement, seeded by
    (seed, rank, worker, epoch); every worker reads from all shards, so any number of
    workers works. ``resampled=False``: each shard exactly once across ranks x workers
    (``urls[rank::world_size][worker::num_workers]``); surplus workers get nothing.
    """

    def __init__(
        self,
        urls: list[str],                 # shard paths
        rank: int = 0,                   # global rank of this process
        world_size: int = 1,             # number of ranks
        resampled: bool = False,         # endless sampling with replacement (training)
        seed: int = 0,                   # base seed
        epoch: int = 0,                  # first epoch number (e.g. trainer.current_epoch on resume)
        split_workers: bool = True,      # resampled=False: split the shards across workers (else all in each)
    ):
        super().__init__()
        self.urls, self.rank, self.world_size = list(urls), rank, world_size
        self.resampled, self.seed, self.epoch = resampled, seed, epoch
        self.split_workers = split_workers

    def __iter__(self):
        worker, num_workers = worker_info()
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.resampled:
            rng = random.Random(derive_seed(self.seed, self.rank, worker, epoch, _TAG_SHARDS))
            while True:
                yield {"url": rng.choice(self.urls)}
        urls = self.urls[self.rank :: self.world_size]
        for url in urls[worker::num_workers] if self.split_workers else urls:
            yield {"url": url}


class EvenSplit:
    """Validation stage: every rank gets the same number of samples, and every worker its share.

    Every worker of every rank reads the whole split in shard order (``ShardList`` with
    ``world_size=1`` and all shards per worker); sample ``i`` goes to rank ``i % world_size``,
    and the last ``num_samples % world_size`` samples are dropped, so every rank holds exactly
    ``num_samples // world_size`` samples and runs the same number of batches (uneven counts
    hang DDP and FSDP collectives). Within a rank, its ``j``-th sample goes to worker
    ``j % num_workers``. Validation sets are small, so reading them once per worker is cheap.
    """

    def __init__(self, rank: int, world_size: int, num_samples: int):
        self.rank, self.world_size = rank, world_size
        self.limit = (num_samples // world_size) * world_size

    def __call__(self, src):
        worker, num_workers = worker_info()
        mine = 0
        for i, sample in enumerate(src):
            if i >= self.limit:
                break
            if i % self.world_size != self.rank:
                continue
            if mine % num_workers == worker:
                yield sample
            mine += 1


class Shuffle:
    """Shuffle buffer stage with an RNG seeded by (seed, rank, worker, epoch)."""

    def __init__(self, bufsize: int, seed: int = 0, rank: int = 0, epoch: int = 0):
        self.bufsize, self.seed, self.rank, self.epoch = bufsize, seed, rank, epoch

    def __call__(self, src):
        worker, _ = worker_info()
        epoch, self.epoch = self.epoch, self.epoch + 1
        rng = random.Random(derive_seed(self.seed, self.rank, worker, epoch, _TAG_SHUFFLE))
        if self.bufsize <= 1:
            yield from src
        else:
            yield from wds.filters._shuffle(src, self.bufsize, initial=self.bufsize, rng=rng)


_NPY_MAGIC = b"\x93NUMPY\x01\x00"  # .npy format version 1.0
_npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], str]] = {}  # header -> (dtype, shape, order)


def load_npy(data: bytes) -> np.ndarray:
    """``np.load`` of one ``.npy`` member (no pickles), parsing each distinct header only once.

    Every sample of a dataset has the same header, and parsing it (``ast.literal_eval``) costs
    more than reading the array, so headers seen before are looked up; the array is then a
    read-only view of ``data``. Any other input (a new header, another format version, a size
    that does not match) goes through ``np.load``, which raises its usual error for bad data.
    """
    if data[:8] == _NPY_MAGIC and len(data) >= 10:
        start = 10 + int.from_bytes(data[8:10], "little")
        known = _npy_headers.get(data[10:start])
        if known is not None:
            dtype, shape, order = known
            count = int(np.prod(shape))
            if len(data) == start + count * dtype.itemsize:
                return np.frombuffer(data, dtype, count=count, offset=start).reshape(shape, order=order)
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if data[:8] == _NPY_MAGIC and array.dtype != object and len(_npy_headers) < 256:
        start = 10 + int.from_bytes(data[8:10], "little")
        order = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
        _npy_headers[data[10:start]] = (array.dtype, tuple(array.shape), order)
    return array


class Decode:
    """Decode stage: raw tar sample -> ``(latent float32 C x H x W, label, key, cond, prompt)``.

    ``cond`` is None, or for text data (``text`` = the stats.json entry) the float32 text
    embeddings by their batch name (``{"encoder_hidden_states": (L, D), "pooled_projections": (D',)}``);
    ``prompt`` is the prompt text where the dataset stores it (``text.prompts``), else None. For
    prompts-only data (``kind == "prompts"``) the latent is None.

    Posterior samples are drawn as ``mean + std * z``; ``noise`` chooses ``z``:
    "stream": from an RNG seeded by (seed, rank, worker, epoch) (training);
    "keyed": from an RNG seeded by (seed, crc32(key)), the same on every read and for any
    number of ranks/workers (validation); "mean": z = 0.
    """

    def __init__(
        self,
        kind: str,                       # "latent", "posterior" or "prompts" (stats.json)
        shape: tuple[int, ...] | None,   # expected (C, H, W); None for prompts-only data
        policy: ErrorPolicy,             # what to do with bad samples
        mean: list[float] | None = None, # per-channel mean to subtract; None: no normalization
        std: list[float] | None = None,  # per-channel std to divide by
        noise: Literal["stream", "keyed", "mean"] = "stream",  # posterior draw (see class doc)
        seed: int = 0,                   # base seed
        rank: int = 0,                   # global rank (for "stream" noise)
        epoch: int = 0,                  # first epoch number
        text: dict | None = None,        # stats.json "text" entry (shapes of the text embeddings); None: no text
    ):
        self.kind, self.policy, self.noise = kind, policy, noise
        self.shape = None if shape is None else tuple(shape)
        self.text_shapes = {}
        self.prompts = bool(text is not None and text.get("prompts"))
        if kind == PROMPTS_KIND and text is None:
            raise ValueError("prompts-only data needs the stats.json text entry")
        if text is not None:
            self.text_shapes[TEXT_EMB] = tuple(text["emb_shape"])
            if text.get("pooled_shape") is not None:
                self.text_shapes[TEXT_POOLED] = tuple(text["pooled_shape"])
        self.seed, self.rank, self.epoch = seed, rank, epoch
        c = self.shape[0] if self.shape else 0
        latents = kind != PROMPTS_KIND
        self.mean = np.asarray(mean, np.float32).reshape(c, 1, 1) if mean is not None and latents else None
        self.inv_std = (1.0 / np.asarray(std, np.float32)).reshape(c, 1, 1) if std is not None and latents else None

    def _array(self, sample: dict, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        shape = self.shape if shape is None else shape
        if name not in sample:
            raise KeyError(f"member {name!r} missing (has {sorted(k for k in sample if not k.startswith('__'))})")
        array = load_npy(sample[name])
        if array.shape != shape:
            raise ValueError(f"{name} has shape {tuple(array.shape)} but stats.json says {shape}")
        return array.astype(np.float32, copy=False)

    def _decode(self, sample: dict, rng: np.random.Generator) -> tuple:
        key = sample["__key__"]
        x = None
        if self.kind == PROMPTS_KIND:
            pass
        elif self.kind == "latent":
            x = self._array(sample, "latent.npy")
        else:
            x, std = self._array(sample, "mean.npy"), self._array(sample, "std.npy")
            if self.noise == "keyed":
                rng = np.random.default_rng(derive_seed(self.seed, zlib.crc32(key.encode())))
            if self.noise != "mean":
                x = x + std * rng.standard_normal(self.shape, dtype=np.float32)
        if "cls" not in sample:
            raise KeyError("member 'cls' missing")
        label = int(sample["cls"].decode("ascii").strip())
        if self.mean is not None and x is not None:
            x = (x - self.mean) * self.inv_std
        cond = {COND_KEYS[name]: np.ascontiguousarray(self._array(sample, f"{name}.npy", shape))
                for name, shape in self.text_shapes.items()} or None
        prompt = None
        if self.prompts:
            if f"{PROMPT}.txt" not in sample:
                raise KeyError(f"member '{PROMPT}.txt' missing (stats.json says every sample stores its prompt)")
            prompt = bytes(sample[f"{PROMPT}.txt"]).decode("utf-8")
        arrays = [*(() if x is None else [("the latent", x)]), *(cond or {}).items()]
        for name, array in arrays:
            if not np.isfinite(array).all():
                raise ValueError(f"{name} holds NaN or infinite values: rewrite the dataset from finite data "
                                 "(python -m flowmap_lit prepare refuses non-finite samples)")
        return None if x is None else np.ascontiguousarray(x, dtype=np.float32), label, key, cond, prompt

    def __call__(self, src):
        worker, _ = worker_info()
        epoch, self.epoch = self.epoch, self.epoch + 1
        rng = np.random.default_rng(derive_seed(self.seed, self.rank, worker, epoch, _TAG_NOISE))
        for sample in src:
            try:
                out = self._decode(sample, rng)
            except Exception as exn:  # noqa: BLE001 - reported with shard and key by the policy
                self.policy.sample_error(sample.get("__url__", "<unknown shard>"), sample.get("__key__"),
                                         f"{type(exn).__name__}: {exn}")
                continue
            self.policy.ok()
            yield out


class Collate:
    """Stack decoded samples into ``{"x": (B, C, H, W) float32, "label": (B,) int64}`` (+ ``"key"``,
    ``"cond"``: a dict of stacked text embeddings, and ``"prompt"``: a list of str, when the samples
    carry them). Prompts-only samples (no latent) give batches without ``"x"``."""

    def __init__(self, return_keys: bool = False):
        self.return_keys = return_keys

    def __call__(self, samples: list[tuple]) -> dict:
        batch = {} if samples[0][0] is None else {"x": torch.from_numpy(np.stack([s[0] for s in samples]))}
        batch["label"] = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        if self.return_keys:
            batch["key"] = [s[2] for s in samples]
        if len(samples[0]) > 3 and samples[0][3] is not None:
            batch["cond"] = {k: torch.from_numpy(np.stack([s[3][k] for s in samples])) for k in samples[0][3]}
        if len(samples[0]) > 4 and samples[0][4] is not None:
            batch["prompt"] = [s[4] for s in samples]
        return batch
