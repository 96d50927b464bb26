"""The exported flow map (flowmap_lit.export): what the export needs from a checkpoint, and the errors
that name the fix. Exporting a fitted checkpoint and sampling from the export are in
tests/commands/test_schedule.py."""

from types import SimpleNamespace

import pytest

from flowmap_lit.export import load_flowmap, student_config


def test_export_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="flowmap_lit.export --ckpt"):
        load_flowmap(tmp_path)
    with pytest.raises(ValueError, match="adapters"):
        student_config(SimpleNamespace(shared_student=True))
    built_in_python = SimpleNamespace(shared_student=False, hparams={}, teacher=SimpleNamespace())
    with pytest.raises(ValueError, match="records no architecture"):
        student_config(built_in_python)
    copied = SimpleNamespace(shared_student=False, hparams={"student": None},
                             teacher=SimpleNamespace(net_config={"class_path": "x.Y", "init_args": {}}))
    assert student_config(copied)["class_path"] == "x.Y"  # a copy of the teacher: the teacher's network
