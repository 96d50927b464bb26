"""The constructor arguments of the classes that configs name are documented where the command line shows them.

jsonargparse reads the Google-style ``Args:`` sections of the class docstrings (through docstring-parser)
for ``--help``, ``--model.help CLASS`` and ``--print_config=comments``; a trailing comment on a
signature line reaches none of them.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest
from jsonargparse import ArgumentParser

from flowmap_lit.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Classes that configs reach without naming them: bases whose arguments their subclasses take, the other
# objectives and teachers a config may choose, the pieces of the adversarial finetune.
REACHED = [
    "flowmap_lit.objectives.TangentObjective",
    "flowmap_lit.objectives.FlowMatching",
    "flowmap_lit.objectives.DiscreteEMD",
    "flowmap_lit.objectives.Weighting",
    "flowmap_lit.teachers.ConvertedTeacher",
    "flowmap_lit.teachers.SchedulerTeacher",
    "flowmap_lit.teachers.MixtureTeacher",
    "flowmap_lit.teachers.GaussianTeacher",
    "flowmap_lit.networks.DecodeLatents",
    "flowmap_lit.callbacks.FlowMapDiagnostics",
]


def config_classes() -> list[str]:
    """Every ``class_path: flowmap_lit...`` of the configs."""
    names: set[str] = set()
    for path in CONFIGS.rglob("*.yaml"):
        names.update(re.findall(r"class_path:\s*[\"']?(flowmap_lit(?:\.\w+)+)", path.read_text()))
    return sorted(names)


def resolve(path: str) -> type:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def argument_docs(cls: type) -> dict[str, str | None]:
    """The description of each constructor argument as jsonargparse shows it (None: none)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "init", fail_untyped=False)
    return {action.dest[len("init."):]: action.help for action in parser._actions
            if action.dest.startswith("init.") and not action.dest.endswith(".help")}


def option_help(out: str, option: str) -> str:
    """The help text of ``option`` in argparse's output, its lines joined."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(option + " "))
    body = [lines[start]]
    for line in lines[start + 1:]:
        if line.lstrip().startswith("--"):
            break
        body.append(line)
    return " ".join(" ".join(body).split())


def test_config_classes_are_found():
    names = config_classes()
    for name in ("flowmap_lit.modules.FlowMapDistillModule", "flowmap_lit.time_pairs.TimePairSampler",
                 "flowmap_lit.teachers.EDM2Teacher", "flowmap_lit.callbacks.EMA", "flowmap_lit.data.DigitsDataModule"):
        assert name in names


@pytest.mark.parametrize("path", sorted(set(config_classes()) | set(REACHED)))
def test_every_argument_has_a_description(path):
    cls = resolve(path)
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    names = [p.name for p in inspect.signature(cls).parameters.values() if p.kind not in variadic]
    assert names, f"{path} takes no arguments"
    docs = argument_docs(cls)
    missing = [name for name in names if not (docs.get(name) or "").strip()]
    assert not missing, f"{path}: no description in the docstring's Args section for {missing}"


def test_model_help_shows_descriptions(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["flowmap_lit"])  # LightningCLI warns when pytest's own arguments are there
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--model.help", "flowmap_lit.modules.FlowMapDistillModule"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    warmup = option_help(out, "--model.warmup_steps")
    assert "regularized tangent warmup" in warmup and "ramps linearly from 0" in warmup
    sampler = option_help(out, "--model.time_sampler")
    assert "Sampler of the training time pairs" in sampler and "logit-normal" in sampler


def test_print_config_comments_show_descriptions(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["flowmap_lit"])
    pytest.importorskip("ruamel.yaml", reason="--print_config=comments needs ruamel.yaml (jsonargparse[ruamel])")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--print_config=comments"])
    assert exit_.value.code == 0
    comments = " ".join(line.strip().lstrip("#") for line in capsys.readouterr().out.splitlines()
                        if line.strip().startswith("#"))
    comments = " ".join(comments.split())
    assert "Length of the regularized tangent warmup" in comments  # FlowMapDistillModule
    assert "Fraction of the pairs with s = t" in comments  # its TimePairSampler
    assert "EMA decay beta per update" in comments  # a callback
