"""``python -m flowmap_lit classifier``: trains the digits classifier behind the digits FID features."""

from flowmap_lit.data import prepare_digits
from tests.helpers.cli import cli


def test_classifier_cli_prints_accuracy(tmp_path, capsys):
    prepare_digits(str(tmp_path / "digits"))
    out = tmp_path / "cls.pt"
    cli("classifier", "--data", tmp_path / "digits", "--out", out, "--epochs", "1")
    assert "held-out (val) accuracy" in capsys.readouterr().out and out.is_file()
