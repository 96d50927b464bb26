"""Kept for tests/test_notebook.py, which imports its checkpoint maker from here. The tests of the command
line are in tests/commands/; what the tests share is in tests/helpers/."""

import shutil

from tests.helpers import ROOT
from tests.helpers.cli import SHARED
from tests.helpers.cli import make_quickstart_checkpoint as _make

__all__ = ["ROOT", "make_quickstart_checkpoint"]


def make_quickstart_checkpoint(tmp_path, steps=3):
    """A tiny quickstart run in ``tmp_path`` (its ``digits/`` data with the FID classifier, ``ckpt/last.ckpt``);
    returns its ``last.ckpt``. A copy of the session's shared run (the ``quickstart`` fixture, 3 steps) when
    there is one, whatever ``steps`` asks; else fitted in this process."""
    shared = SHARED.get("quickstart")
    if shared is None:
        return _make(tmp_path, steps, in_process=True)
    for name in ("digits", "ckpt"):
        shutil.copytree(shared / name, tmp_path / name)
    return tmp_path / "ckpt/last.ckpt"
