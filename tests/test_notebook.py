"""The exploration notebook runs end to end on a tiny checkpoint made here, and the committed copy is
the executed one (outputs and figures included, small, no errors; refreshed by notebooks/refresh.py)."""

import copy

import pytest

from tests.test_cli import ROOT, make_quickstart_checkpoint

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = ROOT / "notebooks/explore_samples.ipynb"


def test_explore_samples_notebook_executes(tmp_path, monkeypatch):
    ckpt = make_quickstart_checkpoint(tmp_path, steps=2)
    monkeypatch.setenv("FLOWMAP_CKPT", str(ckpt))
    monkeypatch.setenv("FLOWMAP_DATA", str(tmp_path / "digits"))  # has the classifier: the FID branch runs
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    nb = copy.deepcopy(nbformat.read(NOTEBOOK, as_version=4))  # in memory: the committed outputs stay as they are
    for cell in nb.cells:  # what is checked below comes from this run, not from the committed outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    outputs = "".join(o.get("text", "") for cell in code for o in cell.get("outputs", []))
    assert "DistributionMatchingModule" in outputs  # the quickstart's module
    assert "FID: [" in outputs  # the FID-versus-steps branch ran
    assert not any(o.get("output_type") == "error" for cell in nb.cells for o in cell.get("outputs", []))


def test_committed_notebook_is_executed_and_small():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "run python notebooks/refresh.py before committing"
    outputs = [o for cell in code for o in cell.outputs]
    assert not any(o.get("output_type") == "error" for o in outputs)
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4  # the four figures
    assert "FID: [" in "".join(o.get("text", "") for o in outputs)  # executed with the digits classifier
    assert NOTEBOOK.stat().st_size < 1_000_000
