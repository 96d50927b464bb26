"""One ordinary checkpoint file from a sharded (FSDP2) checkpoint directory.

    python -m flowmap_lit consolidate checkpoints/run/last.ckpt checkpoints/run/last-full.ckpt

Under ``ModelParallelStrategy`` (configs/strategies/fsdp2.yaml) Lightning writes every checkpoint
as a directory in ``torch.distributed.checkpoint`` (DCP) format::

    last.ckpt/
      .metadata        DCP's index: where each shard of each tensor lies
      __0_0.distcp     rank 0's shards of "state_dict" (the module's weights) and "optimizer_0", ...
      __1_0.distcp     rank 1's shards, and so on, one file per rank
      meta.pt          the rest, saved by rank 0: global_step, epoch, loops, callbacks (the EMA
                       callback's weights, gathered whole, under callbacks["EMA"]), lr_schedulers,
                       hyper_parameters, datamodule_hyper_parameters, data_info, ...

``load_distributed_checkpoint`` reassembles such a directory in one process (no process group,
any number of ranks) into the dict a single-file checkpoint of the same run holds:

- ``state_dict``: whole tensors. The frozen teacher and guide entries of a distillation
  checkpoint are not read: the sharded form keeps them only because the distributed loader
  restores the model strictly, and the single-file form never has them
  (``FlowMapDistillModule.on_save_checkpoint`` drops them; loaders rebuild the teacher and guide
  from their own source).
- ``optimizer_states``: kept, one whole state per optimizer, keyed by parameter name as
  ``torch.distributed.checkpoint.state_dict`` writes it. ``torch.optim.Optimizer.load_state_dict``
  matches parameters by their position in the parameter groups, so a consolidated file resumes
  (``fit --ckpt_path FILE``) on one device. An FSDP2 run resumes from the directory itself (its
  strict loader wants the frozen teacher's weights, which no single-file checkpoint has).
- everything in ``meta.pt``, as it is.

Every part is read with ``weights_only=True`` unless ``allow_pickle`` is set, including DCP's index,
which torch itself unpickles without restriction: here only the plain classes an index is made of
may appear in it. ``consolidate`` writes the dict with ``torch.save`` (to a temporary file moved
into place), and the file loads with ``torch.load(path, weights_only=True)``.
``flowmap_lit.checkpoints.load_checkpoint`` calls ``load_distributed_checkpoint`` for a directory, so
every reader of checkpoints (``NetworkTeacher``, ``sample``, ``evaluate``, the adversarial
finetune's ``init_checkpoint``) takes either form.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

# DCP's loader with no_dist=True reads in this process alone even where a process group is up (a teacher
# built inside a multi-process run); the public load() takes no_dist only in recent torch. Lightning's
# and torch's own converters (dcp_to_torch_save) call it the same way.
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

DCP_INDEX = ".metadata"  # written by torch.distributed.checkpoint.save once every rank's shards are on disk
LIGHTNING_META = "meta.pt"  # Lightning's file of everything but the weights and optimizer states (rank 0, last)
FROZEN_PREFIXES = ("teacher.", "guide.")  # a distillation module's frozen networks (not in single-file checkpoints)

LAYOUT = (f"a sharded checkpoint directory (what ModelParallelStrategy writes, e.g. checkpoints/run/last.ckpt/) "
          f"holds {DCP_INDEX} (the shard index), one __<rank>_0.distcp file of shards per rank and "
          f"{LIGHTNING_META} (step, callbacks, hyperparameters)")

_INDEX_CLASSES = {  # (module, name) of everything a DCP index is made of, besides torch dtypes
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
}


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles a DCP index allowing only its plain classes: the dataclasses and enums of
    ``torch.distributed.checkpoint.metadata``, ``torch.Size``, dtypes, layouts and paths. Anything
    else (code a crafted index could run) is refused, as ``torch.load(weights_only=True)`` refuses it."""

    def find_class(self, module: str, name: str):
        if (module, name) in _INDEX_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch.distributed.checkpoint.metadata":
            import torch.distributed.checkpoint.metadata as metadata

            cls = getattr(metadata, name, None)
            if isinstance(cls, type) and cls.__module__ == module:
                return cls
        raise pickle.UnpicklingError(f"{module}.{name} is not one of the classes a checkpoint index is made of")


class _IndexedReader(FileSystemReader):
    """A ``FileSystemReader`` that uses an index already read instead of unpickling ``.metadata`` itself."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(path)
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self.metadata


class _PlainLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, reading the non-tensor entries (learning rates, parameter names of the
    optimizer's groups) with ``weights_only`` unless pickles are allowed."""

    def __init__(self, allow_pickle: bool) -> None:
        super().__init__()
        self.allow_pickle = allow_pickle

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        node, *path = self.mappings[read_item.dest_index.fqn]
        target = self.original_state_dict[node]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = torch.load(value, map_location="cpu", weights_only=not self.allow_pickle)


def is_distributed_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a complete sharded checkpoint directory (DCP index and Lightning's ``meta.pt``)."""
    path = Path(path)
    return (path / DCP_INDEX).is_file() and (path / LIGHTNING_META).is_file()


def check_distributed_checkpoint(path: Path) -> None:
    """A clear error unless ``path`` is a complete sharded checkpoint directory: says what one looks like,
    points at the checkpoints inside a directory of checkpoints, and calls a half-written one incomplete."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: give the directory of a sharded checkpoint "
                                f"({LAYOUT})")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a sharded checkpoint directory; it is already one "
                                 "checkpoint file (read it as it is)")
    if is_distributed_checkpoint(path):
        return
    if (path / DCP_INDEX).is_file() or (path / LIGHTNING_META).is_file() or any(path.glob("*.distcp")):
        raise ValueError(f"{path} is an incomplete sharded checkpoint (the run stopped while saving it?): "
                         f"{LAYOUT}. Use another checkpoint of the run")
    inside = sorted(p.name for p in path.iterdir() if p.suffix == ".ckpt")
    hint = f"; it holds checkpoints: give one of them, e.g. {path / inside[-1]}" if inside else ""
    raise ValueError(f"{path} is not a sharded checkpoint directory: {LAYOUT}{hint}")


def read_index(path: Path, allow_pickle: bool = False) -> Metadata:
    """DCP's index of ``path``; only its plain classes are unpickled unless ``allow_pickle``."""
    with open(path / DCP_INDEX, "rb") as f:
        try:
            return (pickle.Unpickler if allow_pickle else _IndexUnpickler)(f).load()
        except pickle.UnpicklingError as err:
            raise _refused(path / DCP_INDEX, err) from err


def _refused(path: Path, err: Exception) -> RuntimeError:
    return RuntimeError(f"could not load {path} with weights_only=True ({err}). If you trust this checkpoint, "
                        "allow pickles (allow_pickle: true on a teacher, --allow-pickle on the command line)")


def _insert(root: dict, path: tuple, value) -> None:
    """Sets ``root[path[0]][path[1]]... = value``, making the dicts (str keys) and lists (int keys) on the way."""
    node = root
    for key, next_key in zip(path, path[1:]):
        _make_room(node, key)
        if node[key] is None:
            node[key] = [] if isinstance(next_key, int) else {}
        node = node[key]
    _make_room(node, path[-1])
    node[path[-1]] = value


def _make_room(node: dict | list, key: str | int) -> None:
    """``node[key]`` exists afterwards (``None`` if it did not): a new dict key, or a list grown to ``key + 1``."""
    if isinstance(node, list):
        node.extend([None] * (key + 1 - len(node)))
    else:
        node.setdefault(key, None)


def _skeleton(metadata: Metadata) -> dict:
    """Empty whole tensors (and placeholders for the other entries) of everything to read, nested as
    they were saved; a distillation module's frozen teacher and guide are left out."""
    def weight(path: tuple, prefixes: tuple[str, ...]) -> bool:
        return len(path) > 1 and path[0] == "state_dict" and path[1].startswith(prefixes)

    paths = metadata.planner_data
    distill = any(weight(p, ("student.",)) for p in paths.values())
    skeleton: dict = {}
    for key, entry in metadata.state_dict_metadata.items():
        if distill and weight(paths[key], FROZEN_PREFIXES):
            continue
        tensor = isinstance(entry, TensorStorageMetadata)
        _insert(skeleton, paths[key], torch.empty(entry.size, dtype=entry.properties.dtype) if tensor else None)
    return skeleton


def load_distributed_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict:
    """The sharded checkpoint directory ``path`` as the dict of a single-file checkpoint (see the module
    docstring): whole tensors on the CPU, read in this process alone."""
    path = Path(path)
    check_distributed_checkpoint(path)
    index = read_index(path, allow_pickle)
    state = _skeleton(index)
    try:
        _load_state_dict(state, storage_reader=_IndexedReader(path, index), planner=_PlainLoadPlanner(allow_pickle),
                         no_dist=True)
    except CheckpointException as err:  # DCP's wrapper (a BaseException) of what failed while reading
        (failure, _), *_ = err.failures.values()
        if isinstance(failure, pickle.UnpicklingError):
            raise _refused(path, failure) from err
        raise RuntimeError(f"could not read the shards of {path} ({type(failure).__name__}: {failure}); the "
                           "directory is damaged or incomplete: use another checkpoint of the run") from err
    try:
        checkpoint = torch.load(path / LIGHTNING_META, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        raise _refused(path / LIGHTNING_META, err) from err
    checkpoint["state_dict"] = state.get("state_dict", {})
    optimizers = sorted((k for k in state if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    # An optimizer without state (plain SGD, or before its first step) saved no "state" entry; the file has {}.
    checkpoint["optimizer_states"] = [{"state": {}, **state[k]} for k in optimizers]
    return checkpoint


def consolidate(ckpt_dir: str | Path, out_path: str | Path, overwrite: bool = False,
                allow_pickle: bool = False) -> dict:
    """Writes the sharded checkpoint ``ckpt_dir`` to the single file ``out_path``; returns its dict.

    Refuses an existing ``out_path`` unless ``overwrite``. The file appears complete or not at all
    (written to a temporary file, then moved into place)."""
    out = Path(out_path)
    if out.is_dir():
        raise IsADirectoryError(f"output {out} is a directory; give the path of the file to write, e.g. "
                                f"{out.with_suffix('')}-full.ckpt")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} exists; pass --overwrite (overwrite=True) to replace it, or give "
                              "another path")
    checkpoint = load_distributed_checkpoint(ckpt_dir, allow_pickle)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        torch.save(checkpoint, partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return checkpoint
