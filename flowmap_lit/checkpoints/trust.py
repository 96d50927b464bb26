"""Files name classes, never code: what a checkpoint, an export or a config read from a file may build.

A checkpoint's hyperparameters, an exported ``flowmap.json`` and a resumed run's stored config hold
``class_path`` strings that the loaders import and call. A file from someone else must not be able
to run code that way (``{"class_path": "subprocess.run", ...}``), just as its weights are read with
``weights_only=True``. So every dotted path a file names is checked before anything is imported:

- classes of this package (``flowmap_lit.…``) and torch's optimizers (``torch.optim.…``) are built;
- Lightning's own instantiator (``lightning.pytorch.cli.instantiate_module``), which LightningCLI
  records in every checkpoint, is called;
- anything else (another module, or a function of this package, such as a command) is refused with
  a message naming the file, the path and the opt-in: ``trust_code=True`` in Python, ``--trust-code``
  on the command line, for files whose source you trust.
"""

from __future__ import annotations

import importlib
from pathlib import Path

TRUSTED_MODULES = ("flowmap_lit", "torch.optim")
TRUSTED_CALLABLES = {"lightning.pytorch.cli.instantiate_module"}
#: keys whose values are dotted paths that a loader imports
PATH_KEYS = ("class_path", "_class_path", "_instantiator")


class UntrustedCodeError(RuntimeError):
    """A file names a class or function outside what files may build (see the module docstring)."""


def named_paths(tree) -> list[str]:
    """Every dotted path under a ``PATH_KEYS`` key in a nested dict/list (the order they appear)."""
    if isinstance(tree, dict):
        own = [tree[k] for k in PATH_KEYS if isinstance(tree.get(k), str)]
        return own + [p for v in tree.values() for p in named_paths(v)]
    if isinstance(tree, (list, tuple)):
        return [p for v in tree for p in named_paths(v)]
    return []


def is_trusted(path: str) -> bool:
    """True for a class of this package or of ``torch.optim``, or a ``TRUSTED_CALLABLES`` entry.

    Only the module prefix is read before importing, so an untrusted module is never imported."""
    if path in TRUSTED_CALLABLES:
        return True
    module_name, _, name = path.rpartition(".")
    if not any(module_name == m or module_name.startswith(m + ".") for m in TRUSTED_MODULES):
        return False
    try:
        obj = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return True  # not a code path: the loader's own error names what is missing
    return isinstance(obj, type)


def check_trusted(tree, source: str | Path, trust_code: bool = False, option: str = "--trust-code") -> None:
    """Raises ``UntrustedCodeError`` when ``tree`` (a checkpoint's hyperparameters, a ``flowmap.json``)
    names a path outside ``is_trusted``, unless ``trust_code``."""
    if trust_code:
        return
    refused = [p for p in named_paths(tree) if not is_trusted(p)]
    if refused:
        raise UntrustedCodeError(
            f"{source} names {refused[0]!r}"
            + (f" (and {len(refused) - 1} more)" if len(refused) > 1 else "")
            + ", which is not a class of flowmap_lit or torch.optim. Loading it would import and call code that "
            f"the file chooses, so it is refused. If you trust the file's source, pass {option} "
            "(trust_code=True in Python).")
