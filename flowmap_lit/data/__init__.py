"""Latent datasets: WebDataset shards + ``stats.json``, a Lightning DataModule, and preparation tools.

Layout and schema: see ``flowmap_lit/data/format.py``. Create a dataset with
``python -m flowmap_lit prepare {digits,shapes,images,array,text-array,text-prompts,imagenet} ...``
(``prepare.py``) and read it with ``LatentDataModule(root=...)`` (prompts-only datasets:
``PromptDataModule(root=..., shape=...)``); ``DigitsDataModule`` and ``ShapesDataModule`` prepare
the built-in datasets by themselves.

Names are imported lazily, so the preparation CLI does not pay for importing Lightning.
"""

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LatentDataModule": "datamodule", "DigitsDataModule": "digits", "ShapesDataModule": "digits",
    "PriorDataModule": "prior",
    "ShardError": "stream", "DataWarning": "stream", "read_split": "shards",
    "write_shards": "shards", "write_stats": "shards", "write_dataset": "shards",
    "read_stats": "shards", "channel_stats": "shards", "ShardSink": "shards",
    "prepare_digits": "prepare", "prepare_shapes": "prepare", "prepare_images": "prepare", "prepare_array": "prepare",
    "prepare_text_array": "prepare", "read_null_text": "shards", "write_null_text": "shards",
    "prepare_text_prompts": "prepare", "write_prompt_dataset": "shards", "encode_prompts": "text_encoders",
    "PromptDataModule": "datamodule", "open_datamodule": "datamodule",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from .datamodule import LatentDataModule, PromptDataModule, open_datamodule
    from .digits import DigitsDataModule, ShapesDataModule
    from .prepare import (
        prepare_array,
        prepare_digits,
        prepare_images,
        prepare_shapes,
        prepare_text_array,
        prepare_text_prompts,
    )
    from .prior import PriorDataModule
    from .shards import (
        ShardSink,
        channel_stats,
        read_null_text,
        read_split,
        read_stats,
        write_dataset,
        write_null_text,
        write_prompt_dataset,
        write_shards,
        write_stats,
    )
    from .stream import DataWarning, ShardError
    from .text_encoders import encode_prompts


def __getattr__(name: str):
    """Import the submodule that defines ``name`` on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
