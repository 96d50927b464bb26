"""Old module paths that keep resolving after the package was laid out anew.

Configs, notebooks and, above all, stored checkpoints name classes by dotted path (a checkpoint's
hyperparameters hold ``flowmap_lit.time_sampling.TimePairSampler``, ``flowmap_lit.finetune.…``); those
files must keep loading. ``MOVED`` maps each old module to the modules that now hold its names: an
import of the old path gets a module whose attributes are those modules' (the same objects, so
``isinstance`` and class identity hold). ``python -m OLD.PATH`` of a former command runs the
command's new form and says so on stderr.

Nothing else lives here: new code imports the new paths (docs/design.md section 7).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

#: old module -> (the modules that hold its names now, the command it ran as ``python -m``, or None)
MOVED: dict[str, tuple[tuple[str, ...], str | None]] = {
    "flowmap_lit.finetune": (("flowmap_lit.modules.finetune",), None),
    "flowmap_lit.schedule": (("flowmap_lit.grids", "flowmap_lit.grid_search"), "schedule"),
    "flowmap_lit.sampling": (("flowmap_lit.solvers",), None),
    "flowmap_lit.time_sampling": (("flowmap_lit.time_pairs",), None),
    "flowmap_lit.pipeline": (("flowmap_lit.diffusers_pipeline",), None),
    "flowmap_lit.consolidate": (("flowmap_lit.checkpoints.sharded",), "consolidate"),
    "flowmap_lit.data.pipeline": (("flowmap_lit.data.stream",), None),
    "flowmap_lit.metrics.reference": (("flowmap_lit.commands.reference",), "reference"),
    "flowmap_lit.teachers.external": (("flowmap_lit.teachers.edm2", "flowmap_lit.teachers.diffusers_models"), None),
}


def run_moved_command(old: str, command: str, argv: list[str]) -> object:
    """``python -m OLD`` of a former command: a note naming the new form, then the command itself."""
    print(f"note: `python -m {old}` is now `python -m flowmap_lit {command}` (also `flowmap-lit {command}`)",
          file=sys.stderr)
    from flowmap_lit.cli import main

    return main([command, *argv])


class _MovedLoader(importlib.abc.Loader):
    def __init__(self, name: str) -> None:
        self.name = name

    def create_module(self, spec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        targets, _ = MOVED[self.name]
        for target in targets:
            new = importlib.import_module(target)
            module.__dict__.update({k: v for k, v in vars(new).items() if not k.startswith("__")})
        module.__doc__ = f"Moved: the names of {self.name} now live in {', '.join(targets)}."
        module.__moved_to__ = targets

    def get_code(self, name: str):  # what runpy executes for ``python -m OLD``
        targets, command = MOVED[name]
        if command is None:
            source = (f"raise SystemExit('error: {name} is not a command; its names live in {', '.join(targets)}. "
                      "Commands: python -m flowmap_lit --help')")
        else:
            source = ("import sys\nfrom flowmap_lit._moved import run_moved_command\n"
                      f"run_moved_command({name!r}, {command!r}, sys.argv[1:])\n")
        return compile(source, f"<moved {name}>", "exec")

    def is_package(self, name: str) -> bool:
        return False


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, _MovedLoader(name), origin=f"moved to {MOVED[name][0][0]}")


def install() -> None:
    """Adds the finder once (``flowmap_lit/__init__.py`` calls it)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
