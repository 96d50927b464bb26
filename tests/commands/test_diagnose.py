"""``python -m flowmap_lit diagnose``: the jump-error table, per-step decomposition, heatmap and JSON."""

import json

from tests.helpers.cli import cli


def test_diagnose_writes_the_jump_grid_and_the_per_step_decomposition(quickstart, tmp_path, capsys):
    result = cli("diagnose", "--ckpt", quickstart.ckpt, "--steps", "1", "2", "--num", "30", "--times", "1", "0.5", "0",
                 "--reference-steps", "8", "--out", tmp_path / "diag")
    written = json.loads((tmp_path / "diag/diagnostics.json").read_text())
    assert written["grid"]["times"] == result["grid"]["times"]
    assert result["grid"]["times"] == [1.0, 0.5, 0.0] and len(result["paths"]) == 2
    assert len(result["paths"][1]["contribution"]) == 2 and (tmp_path / "diag/jump_error.png").is_file()
    out = capsys.readouterr().out
    assert "contribution" in out and "Single jumps" in out
