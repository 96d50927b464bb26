"""Command line: ``python -m flowmap_lit {fit,validate,test,predict} --config CONFIG.yaml``.

A thin ``LightningCLI``: the model and the data module are chosen by ``class_path`` in the config
(any ``LightningModule`` / ``LightningDataModule``), every constructor argument is reachable from
YAML or the command line, and ``--print_config`` prints a complete config that runs as is.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI


class FlowMapCLI(LightningCLI):
    """LightningCLI with subclass mode for models and data and a saved, overwritable config."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", pl.LightningModule)
        kwargs.setdefault("datamodule_class", pl.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)


def main(args: list[str] | None = None) -> FlowMapCLI:
    """Entry point of ``python -m flowmap_lit`` and of the ``flowmap-lit`` script."""
    return FlowMapCLI(args=args)  # None: parse sys.argv
