"""``LatentDataModule``: class-labelled latents from WebDataset shards (format in ``format.py``).

Batches are dicts ``{"x": FloatTensor (B, C, H, W), "label": LongTensor (B,)}``, plus, for
text-conditioned data (``format.py``), ``"cond": {"encoder_hidden_states": (B, L, D),
"pooled_projections": (B, D')}`` (float32; ``null_cond`` holds the empty prompt's); with
``normalize=True`` (default) ``x`` is standardized per channel with the ``stats.json``
statistics, and ``denormalize(x)`` maps model outputs back (e.g. before a VAE decoder).

Training reads an endless, resampled stream; one "epoch" is
``train_samples_per_epoch // world_size // batch_size`` batches on EVERY rank, so DDP
ranks never wait on each other. The stream of epoch ``e`` depends only on
``(seed, rank, worker, e)``, so a run resumed from a checkpoint taken after ``b`` batches of
epoch ``e`` rebuilds that epoch's stream and skips its first ``b`` batches: it continues with
exactly the batches the uninterrupted run would have read (the skipped batches are read and
dropped, so resuming costs at most one epoch of reading).

Validation reads each sample at most once across ranks x workers, the same number on every
rank (``EvenSplit``: the last ``num_samples % world_size`` are dropped, so ranks run equal
batch counts and DDP/FSDP collectives never wait), with deterministic posterior draws.

Datasets that store the prompts' text add ``"prompt"`` (a list of str) to every batch.
``PromptDataModule`` reads prompts-only datasets (``prepare text-prompts``): the same streams, with
batches ``{"label", "cond", "prompt"}`` and no ``"x"``; the latent shape comes from its config.
"""

import os
import weakref
from typing import Literal

import lightning as L
import numpy as np
import torch
import webdataset as wds

from .format import COND_KEYS, PROMPTS_KIND, shard_paths
from .shards import read_null_text, read_stats
from .stream import Collate, Decode, ErrorPolicy, EvenSplit, ShardList, Shuffle, TarSamples


class LatentDataModule(L.LightningDataModule):
    """Latent (or VAE-posterior) shards in ``root``; see the module docstring.

    ``shape`` / ``num_classes`` / ``stats`` read ``stats.json`` lazily, so they work
    before ``setup()`` (e.g. to size a network); ``setup()`` re-reads the file.

    Args:
        root: Shard directory holding stats.json (made by python -m flowmap_lit prepare); a
            relative path is relative to the current working directory.
        batch_size: Training batch size per rank.
        val_batch_size: Validation batch size per rank; None: batch_size.
        num_workers: DataLoader worker processes per rank; 0: the main process reads.
        train_samples_per_epoch: Samples of one training epoch over all ranks (each rank reads
            train_samples_per_epoch // world_size // batch_size batches); None: the train split's size.
        shuffle_buffer: Size of the shuffle buffer in samples, per worker.
        seed: Base seed of the shard order, the shuffle and the posterior draws; the streams derive
            from (seed, rank, worker, epoch).
        normalize: Standardize the latents per channel with the stats.json mean and std
            (denormalize() maps samples back).
        expected_shape: Fail with a clear error unless the data has this shape [C, H, W]; None: any.
        on_error: What a bad shard or sample does: "raise" a clear error, or "warn" and skip it.
        pin_memory: Pin batches in page-locked memory; None: if CUDA is available.
        val_posterior: Validation samples of VAE-posterior data: "sample" (a draw seeded by the
            sample's key, the same in every run) or "mean" (the posterior mean).
        return_keys: Also put the sample keys (a list of str) in batch["key"].
        train_split: Name of the split used for training.
        val_split: Name of the split used for validation.
        cache_mb: Keep a split's raw shards in memory (per worker) when together they fit in this
            many MiB; 0: no cache.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 128,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        train_samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        normalize: bool = True,
        expected_shape: list[int] | None = None,
        on_error: Literal["raise", "warn"] = "raise",
        pin_memory: bool | None = None,
        val_posterior: Literal["sample", "mean"] = "sample",
        return_keys: bool = False,
        train_split: str = "train",
        val_split: str = "val",
        cache_mb: float = 64.0,
    ):
        super().__init__()
        self._worker_loaders: list[weakref.ref] = []  # loaders with persistent workers, ended in teardown
        self.save_hyperparameters()
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        if val_posterior not in ("sample", "mean"):
            raise ValueError(f"val_posterior must be 'sample' or 'mean', got {val_posterior!r}")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size}, {val_batch_size}")
        self.root = os.path.abspath(os.path.expanduser(root))
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.train_samples_per_epoch = num_workers, train_samples_per_epoch
        self.shuffle_buffer, self.seed, self.normalize = shuffle_buffer, seed, normalize
        self.expected_shape = None if expected_shape is None else tuple(int(s) for s in expected_shape)
        self.on_error, self.val_posterior, self.return_keys = on_error, val_posterior, return_keys
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.train_split, self.val_split = train_split, val_split
        if cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0 (0 turns the shard cache off), got {cache_mb}")
        self.cache_mb = cache_mb
        self._stats: dict | None = None

    # ----------------------------------------------------------------- statistics
    def load_stats(self) -> dict:
        """Read and check ``stats.json`` (no ``setup()`` needed); caches the result."""
        return self._checked(read_stats(self.root))

    def _checked(self, stats: dict) -> dict:
        """Check ``stats`` against ``expected_shape`` and cache it."""
        if stats["kind"] == PROMPTS_KIND:
            raise ValueError(f"{self.root} is a prompts-only dataset (text embeddings and prompts, no latents): "
                             "read it with flowmap_lit.data.PromptDataModule(root=..., shape=[C, H, W]) "
                             "(data.class_path: flowmap_lit.data.PromptDataModule)")
        shape = tuple(stats["shape"])
        if self.expected_shape is not None and shape != self.expected_shape:
            raise ValueError(
                f"{self.root}/stats.json says the latents have shape {list(shape)}, but expected_shape is "
                f"{list(self.expected_shape)}: point data.init_args.root at the right dataset or fix expected_shape."
            )
        self._stats = stats
        return stats

    @property
    def stats(self) -> dict:
        """Contents of ``stats.json`` (read on first use)."""
        return self._stats if self._stats is not None else self.load_stats()

    @property
    def shape(self) -> tuple[int, int, int]:
        """Latent shape (C, H, W)."""
        return tuple(self.stats["shape"])

    @property
    def num_classes(self) -> int:
        """Number of class labels."""
        return int(self.stats["num_classes"])

    @property
    def text(self) -> dict | None:
        """The stats.json ``"text"`` entry (shapes of the text embeddings), or None."""
        return self.stats.get("text")

    @property
    def null_cond(self) -> dict[str, torch.Tensor] | None:
        """Empty-prompt embeddings by batch key (``{"encoder_hidden_states": (L, D), ...}``) for
        classifier-free guidance; zeros if the dataset stored none; None for data without text."""
        text = self.text
        if text is None:
            return None
        arrays = read_null_text(self.root, self.stats)
        if arrays is None:
            shapes = {"text_emb": text["emb_shape"], "text_pooled": text.get("pooled_shape")}
            arrays = {k: np.zeros(v, np.float32) for k, v in shapes.items() if v is not None}
        return {COND_KEYS[k]: torch.from_numpy(v) for k, v in arrays.items()}

    def setup(self, stage: str | None = None) -> None:
        """Re-read ``stats.json`` (``prepare_data`` may just have written it)."""
        self.load_stats()

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the per-channel normalization of (..., C, H, W) latents; identity if normalize=False."""
        if not self.normalize:
            return x
        mean = torch.tensor(self.stats["mean"], dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.stats["std"], dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x * std + mean

    # ---------------------------------------------------------------- pipelines
    def _rank_info(self) -> tuple[int, int]:
        """(global rank, world size): from the trainer if attached, else torch.distributed, else (0, 1)."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _start_epoch(self) -> int:
        """Epoch the streams start counting at (the trainer's, so resumed runs see new data)."""
        return int(self.trainer.current_epoch) if self.trainer is not None else 0

    def _urls(self, split: str) -> list[str]:
        """Shard paths of ``split`` listed in stats.json; a clear error if any is missing."""
        splits = self.stats["splits"]
        num_shards = int(splits.get(split, {}).get("num_shards", 0))
        urls = shard_paths(self.root, split, num_shards)
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} shard(s) listed in {self.root}/stats.json are missing, e.g. {missing[0]}. "
                f"Re-create the dataset: {self.stats.get('source') or 'python -m flowmap_lit prepare ...'}"
            )
        return urls

    def _cache(self, urls: list[str]) -> bool:
        """Whether the shards ``urls`` together fit ``cache_mb`` (then ``TarSamples`` keeps them in memory)."""
        size = sum(os.path.getsize(u) for u in urls if os.path.isfile(u))
        return size <= self.cache_mb * 2**20

    def _decoder(self, policy: ErrorPolicy, noise: str, rank: int) -> Decode:
        stats = self.stats
        mean, std = (stats["mean"], stats["std"]) if self.normalize else (None, None)
        shape = None if stats["shape"] is None else tuple(stats["shape"])
        return Decode(stats["kind"], shape, policy, mean=mean, std=std, noise=noise, seed=self.seed, rank=rank,
                      epoch=self._start_epoch(), text=stats.get("text"))

    def _loader(self, pipeline: wds.DataPipeline) -> wds.WebLoader:
        loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0, pin_memory=self.pin_memory)
        if self.num_workers > 0:
            self._worker_loaders.append(weakref.ref(loader.pipeline[0]))
        return loader

    def teardown(self, stage: str | None = None) -> None:
        """Ends the persistent worker processes of the loaders this module made, so that several
        fits in one process (a notebook, an ablation) do not each leave their workers behind."""
        for ref in self._worker_loaders:
            loader = ref()
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
                loader._iterator = None
        self._worker_loaders = [ref for ref in self._worker_loaders if ref() is not None]

    def train_batches_per_epoch(self) -> int:
        """Batches per training epoch on every rank (at least 1)."""
        _, world_size = self._rank_info()
        total = self.train_samples_per_epoch or int(self.stats["splits"][self.train_split]["num_samples"])
        return max(1, total // world_size // self.batch_size)

    def train_dataloader(self) -> wds.WebLoader:
        """Endless resampled stream cut into epochs of ``train_batches_per_epoch()`` batches."""
        rank, world_size = self._rank_info()
        urls = self._urls(self.train_split)
        if not urls:
            raise ValueError(f"{self.root}/stats.json lists no shards for split {self.train_split!r}")
        policy = ErrorPolicy(self.on_error, urls, self.stats.get("source", ""))
        epoch = self._start_epoch()
        pipeline = wds.DataPipeline(
            ShardList(urls, rank, world_size, resampled=True, seed=self.seed, epoch=epoch),
            TarSamples(policy, cache=self._cache(urls)),
            self._decoder(policy, "stream", rank),  # before the shuffle, so errors are counted in read order
            Shuffle(self.shuffle_buffer, seed=self.seed, rank=rank, epoch=epoch),
            wds.batched(self.batch_size, collation_fn=Collate(self.return_keys), partial=False),
        )
        num_batches = self.train_batches_per_epoch()
        loader = self._loader(pipeline).with_epoch(num_batches).with_length(num_batches, silent=True)
        return ResumingLoader(loader, num_batches, self._batches_done(num_batches))

    def _batches_done(self, num_batches: int) -> int:
        """Batches of the current epoch that the restored run had already trained on (0 on a fresh start)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return min(max(int(done), 0), num_batches)

    def val_dataloader(self) -> wds.WebLoader | list:
        """Equal shares of the validation samples per rank (``EvenSplit``), in shard order; [] if no val split."""
        return self.split_loader(*self._rank_info())

    def split_loader(self, rank: int = 0, world_size: int = 1) -> wds.WebLoader | list:
        """Share ``rank`` of ``world_size`` of the ``val_split`` samples, in shard order (the whole split
        by default, whatever process group is running, e.g. for reference statistics on one rank)."""
        urls = self._urls(self.val_split)
        if not urls:
            return []
        policy = ErrorPolicy(self.on_error, urls, self.stats.get("source", ""))
        noise = "keyed" if self.val_posterior == "sample" else "mean"
        num_samples = int(self.stats["splits"][self.val_split]["num_samples"])
        pipeline = wds.DataPipeline(
            ShardList(urls, resampled=False, split_workers=False),
            TarSamples(policy),
            EvenSplit(rank, world_size, num_samples),
            self._decoder(policy, noise, rank),
            wds.batched(self.val_batch_size, collation_fn=Collate(self.return_keys), partial=True),
        )
        return self._loader(pipeline)


class PromptDataModule(LatentDataModule):
    """Prompts-only shards in ``root`` (``prepare text-prompts``): batches ``{"label": (B,) zeros,
    "cond": {"encoder_hidden_states": (B, L, D), "pooled_projections": (B, D')}, "prompt": [str] * B}``
    and no ``"x"``, for data-free distillation. The streams (seeded, resumable, equal batch counts
    per rank) are ``LatentDataModule``'s. ``shape`` is the latent shape the student and the teacher
    work in (the data has none); there are no latent statistics, so ``normalize`` is False and
    ``denormalize`` the identity. ``null_cond`` is the stored empty-prompt embedding.

    Args:
        root: Directory of a prompts-only dataset (made by python -m flowmap_lit prepare text-prompts); a
            relative path is relative to the current working directory.
        shape: Latent shape [C, H, W] of the samples the models generate (e.g. [16, 128, 128] for SD3 at
            1024 px).
        batch_size: Training batch size per rank.
        val_batch_size: Validation batch size per rank; None: batch_size.
        num_workers: DataLoader worker processes per rank; 0: the main process reads.
        train_samples_per_epoch: Prompts of one training epoch over all ranks; None: the train split's size.
        shuffle_buffer: Size of the shuffle buffer in samples, per worker.
        seed: Base seed of the shard order and the shuffle; the streams derive from (seed, rank, worker, epoch).
        on_error: What a bad shard or sample does: "raise" a clear error, or "warn" and skip it.
        pin_memory: Pin batches in page-locked memory; None: if CUDA is available.
        return_keys: Also put the sample keys (a list of str) in batch["key"].
        train_split: Name of the split used for training.
        val_split: Name of the split used for validation.
        cache_mb: Keep a split's raw shards in memory (per worker) when together they fit in this
            many MiB; 0: no cache.
    """

    def __init__(
        self,
        root: str,
        shape: list[int],
        batch_size: int = 128,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        train_samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        on_error: Literal["raise", "warn"] = "raise",
        pin_memory: bool | None = None,
        return_keys: bool = False,
        train_split: str = "train",
        val_split: str = "val",
        cache_mb: float = 64.0,
    ):
        shape = [int(s) for s in shape]
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"PromptDataModule: shape must be the latent shape [C, H, W], got {shape}")
        super().__init__(root, batch_size, val_batch_size, num_workers, train_samples_per_epoch, shuffle_buffer,
                         seed, normalize=False, expected_shape=shape, on_error=on_error, pin_memory=pin_memory,
                         return_keys=return_keys, train_split=train_split, val_split=val_split, cache_mb=cache_mb)

    def _checked(self, stats: dict) -> dict:
        """Check that ``stats`` describes a prompts-only dataset; fill in the configured shape."""
        if stats["kind"] != PROMPTS_KIND:
            raise ValueError(f"{self.root} holds latents ({stats['kind']}), not prompts only: read it with "
                             "flowmap_lit.data.LatentDataModule")
        c = self.expected_shape[0]
        self._stats = {**stats, "shape": list(self.expected_shape), "mean": [0.0] * c, "std": [1.0] * c,
                       "kind": PROMPTS_KIND}
        return self._stats

    def _decoder(self, policy: ErrorPolicy, noise: str, rank: int) -> Decode:
        return Decode(PROMPTS_KIND, None, policy, seed=self.seed, rank=rank, epoch=self._start_epoch(),
                      text=self.stats["text"])


def open_datamodule(root: str, shape: list[int] | None = None, **kwargs) -> LatentDataModule:
    """The data module that reads the dataset at ``root``: a ``PromptDataModule`` (latent ``shape``
    needed) for prompts-only data, else a ``LatentDataModule``; ``kwargs`` go to its constructor."""
    if read_stats(root)["kind"] == PROMPTS_KIND:
        if shape is None:
            raise ValueError(f"{root} is a prompts-only dataset: its data module needs the latent shape [C, H, W]")
        kwargs.pop("normalize", None)
        kwargs.pop("val_posterior", None)
        return PromptDataModule(root, shape=list(shape), **kwargs)
    return LatentDataModule(root, **kwargs)


class ResumingLoader:
    """The training loader of ``LatentDataModule``: ``len()`` batches per epoch; its first epoch
    skips ``skip`` batches (those a resumed run had already trained on)."""

    def __init__(self, loader, num_batches: int, skip: int = 0):
        self.loader, self.num_batches, self.skip = loader, num_batches, skip

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        iterator = iter(self.loader)

        def batches():  # skips on the first next(): iterators Lightning creates and drops keep the skip
            skip, self.skip = self.skip, 0
            for _ in range(skip):
                next(iterator)
            yield from iterator

        return batches()
