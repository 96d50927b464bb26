"""The exploration notebook runs end to end on a tiny checkpoint made here."""

import pytest

from tests.test_cli import ROOT, make_quickstart_checkpoint

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")


def test_explore_samples_notebook_executes(tmp_path, monkeypatch):
    ckpt = make_quickstart_checkpoint(tmp_path, steps=2)
    monkeypatch.setenv("FLOWMAP_CKPT", str(ckpt))
    monkeypatch.setenv("FLOWMAP_DATA", str(tmp_path / "digits"))  # has the classifier: the FID branch runs
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    nb = nbformat.read(ROOT / "notebooks/explore_samples.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "FlowMapDistillModule" in outputs
    assert "FID: [" in outputs  # the FID-versus-steps branch ran
    assert not any(o.get("output_type") == "error" for cell in nb.cells for o in cell.get("outputs", []))
