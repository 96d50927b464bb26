"""Reading checkpoints: the ground floor every other layer reads weights through.

- ``load_checkpoint``: a Lightning checkpoint file, or a sharded (FSDP2) checkpoint directory
  reassembled in memory (``flowmap_lit.checkpoints.sharded``), with ``weights_only=True`` unless
  pickles are allowed;
- ``ema_state_from_checkpoint``: the EMA weights stored by the ``EMA`` callback;
- ``load_module``: the LightningModule a ``fit`` wrote, rebuilt from its stored hyperparameters,
  with the EMA weights by default;
- ``checkpoint_data_root``: the dataset root a run was trained on;
- ``flowmap_lit.checkpoints.vae.load_vae``: a diffusers VAE from a local directory.
"""

from __future__ import annotations

import importlib
import io
from pathlib import Path

import torch
from torch import Tensor

from flowmap_lit.checkpoints.trust import check_trusted

__all__ = ["checkpoint_data_root", "ema_state_from_checkpoint", "load_checkpoint", "load_module"]


def load_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict:
    """``torch.load`` a checkpoint with ``weights_only=True`` unless pickles are allowed.

    A directory is a sharded checkpoint (written under FSDP2's ``ModelParallelStrategy``): it is
    consolidated in memory into the dict of the single-file form (``flowmap_lit.checkpoints.sharded``), read
    with the same ``weights_only`` rule.
    """
    path = Path(path)
    if path.is_dir():
        from flowmap_lit.checkpoints.sharded import load_distributed_checkpoint

        return load_distributed_checkpoint(path, allow_pickle)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist. Train it first (e.g. python -m flowmap_lit fit --config "
            "configs/digits/teacher.yaml) or point the config at an existing file."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:  # unpickling errors have many types
        if allow_pickle:
            raise
        raise RuntimeError(
            f"could not load {path} with weights_only=True ({err}). If you trust this file, set "
            "allow_pickle: true on the teacher to load arbitrary pickled objects."
        ) from err


def ema_state_from_checkpoint(checkpoint: dict) -> dict[str, Tensor] | None:
    """The EMA weights stored in a Lightning checkpoint dict, or ``None`` if it has none."""
    state = checkpoint.get("callbacks", {}).get("EMA")
    if not state or not state.get("shadow"):
        return None
    return state["shadow"]


def load_module(ckpt_path: str, use_ema: bool = True, map_location: str = "cpu", allow_pickle: bool = False,
                trust_code: bool = False):
    """The LightningModule saved in ``ckpt_path`` (a checkpoint file, or a sharded checkpoint directory),
    in eval mode, with EMA weights when present.

    The module is rebuilt from the class paths stored in the checkpoint only when they are classes of
    this package or ``torch.optim`` (``flowmap_lit.checkpoints.trust``); ``trust_code`` lifts that."""
    ckpt = load_checkpoint(ckpt_path, allow_pickle)
    check_trusted(ckpt.get("hyper_parameters", {}), ckpt_path, trust_code)
    class_path = ckpt.get("hyper_parameters", {}).get("_class_path")
    if class_path is None:
        raise ValueError(
            f"{ckpt_path} does not record its module class; it was not written by "
            "`python -m flowmap_lit fit`. Load it in Python with YourModule.load_from_checkpoint."
        )
    module_name, _, cls_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    source = ckpt_path
    if Path(ckpt_path).is_dir():  # sharded (FSDP2): Lightning reads the consolidated dict, less the optimizers
        source = io.BytesIO()
        torch.save({k: v for k, v in ckpt.items() if k != "optimizer_states"}, source)
        source.seek(0)
    module = cls.load_from_checkpoint(source, map_location=map_location, weights_only=not allow_pickle)
    shadow = ema_state_from_checkpoint(ckpt) if use_ema else None
    if shadow is not None:
        module.ema_network().load_state_dict(shadow, strict=False)
    module.data_info = ckpt.get("data_info")
    module.checkpoint_hparams = ckpt.get("hyper_parameters", {})  # as written (configs, not the objects built)
    return module.eval()


def checkpoint_data_root(ckpt_path: str) -> str | None:
    """The dataset root recorded in a checkpoint (its data module's ``root``), or None."""
    hp = load_checkpoint(ckpt_path).get("datamodule_hyper_parameters", {})
    return hp.get("root") or hp.get("init_args", {}).get("root")
