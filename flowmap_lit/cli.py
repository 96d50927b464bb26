"""The one command line: ``python -m flowmap_lit COMMAND`` (or ``flowmap-lit COMMAND``) for every command.

``fit``, ``validate``, ``test`` and ``predict`` take a config (``--config CONFIG.yaml``) and go to
LightningCLI (``flowmap_lit.commands.train``); every other command is a module of
``flowmap_lit.commands`` with a ``main(argv)``. This module imports none of them until one runs, so
``--help`` answers at once.
"""

from __future__ import annotations

import importlib
import sys

#: Every command of ``python -m flowmap_lit COMMAND`` / ``flowmap-lit COMMAND``: name -> (module whose
#: ``main(argv)`` runs it, one line of help). fit/validate/test/predict go to LightningCLI.
TRAINING = {  # flowmap_lit.commands.train
    "fit": "train a model from a config (--config CONFIG.yaml; --help lists every argument)",
    "validate": "run the validation loop of a config (and --ckpt_path)",
    "test": "run the test loop of a config (and --ckpt_path)",
    "predict": "run the predict loop of a config (and --ckpt_path)",
}
COMMANDS = {
    "sample": ("flowmap_lit.commands.sample", "sample grids and an .npz from a checkpoint, at any step counts"),
    "evaluate": ("flowmap_lit.commands.evaluate", "FID, FD_DINOv2 and the flow-map error across step counts"),
    "diagnose": ("flowmap_lit.commands.diagnose", "where a flow map is wrong: single-jump error grid, per-step errors"),
    "schedule": ("flowmap_lit.commands.schedule", "tune k-step time grids of a distilled checkpoint"),
    "export": ("flowmap_lit.commands.export", "a flow map as safetensors + JSON, optional diffusers pipeline"),
    "consolidate": ("flowmap_lit.commands.consolidate", "one checkpoint file from a sharded (FSDP2) directory"),
    "prepare": ("flowmap_lit.commands.prepare", "write a dataset of latents as WebDataset shards"),
    "reference": ("flowmap_lit.commands.reference", "cache a dataset split's FID / FD_DINOv2 reference statistics"),
    "classifier": ("flowmap_lit.commands.classifier", "train the digits classifier behind the digits FID features"),
}


def usage() -> str:
    """The one ``--help`` of the command line: every command, with a line each."""
    width = max(map(len, [*TRAINING, *COMMANDS]))
    lines = ["usage: python -m flowmap_lit COMMAND [ARGS]   (or: flowmap-lit COMMAND [ARGS])", "",
             "Training (LightningCLI; a config names the model, data, trainer and callbacks):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in TRAINING.items()]
    lines += ["", "Commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "python -m flowmap_lit COMMAND --help lists a command's arguments.",
              "Quickstart: python -m flowmap_lit fit --config configs/quickstart.yaml"]
    return "\n".join(lines)


def main(args: list[str] | None = None):
    """Entry point of ``python -m flowmap_lit`` and of the ``flowmap-lit`` script. ``fit``, ``validate``,
    ``test`` and ``predict`` go to LightningCLI (a config whose objects cannot be built exits with
    status 2 and the message of the class that refused); every other command runs its module's
    ``main``; no command, or ``--help``, prints the list of commands."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    if argv[0] in COMMANDS:
        from flowmap_lit.checkpoints.trust import UntrustedCodeError

        try:
            return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])
        except UntrustedCodeError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    if argv[0] not in TRAINING and not argv[0].startswith("-"):
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    from flowmap_lit.commands.train import main as train

    return train(args)  # None: LightningCLI parses sys.argv itself


def __getattr__(name: str):  # the LightningCLI classes, where older code imports them from
    if name in ("FlowMapCLI", "ConfigError", "SaveConfigNextToLogs", "quiet_warnings", "project_error"):
        return getattr(importlib.import_module("flowmap_lit.commands.train"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
