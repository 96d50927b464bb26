"""Execute notebooks/explore_samples.ipynb in place, outputs and images included.

    python -m flowmap_lit fit --config configs/quickstart.yaml && python notebooks/refresh.py

The notebook reads the quickstart checkpoint (``checkpoints/quickstart/last.ckpt``, or the file
named by ``FLOWMAP_CKPT``) and the digits data (``data/digits``, or ``FLOWMAP_DATA``). It runs in a
fresh ``python3`` kernel from the repository root, so the result does not depend on where this
script is started. Cell timings are not recorded, so a refresh changes only what the notebook shows.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "explore_samples.ipynb"
MAX_BYTES = 1_000_000  # the committed notebook stays small


def refresh(path: Path = NOTEBOOK, timeout: int = 600) -> int:
    """Execute ``path`` in place; returns its size in bytes."""
    import nbclient
    import nbformat

    ckpt = Path(os.environ.get("FLOWMAP_CKPT", "checkpoints/quickstart/last.ckpt"))
    if not (ckpt if ckpt.is_absolute() else ROOT / ckpt).exists():
        sys.exit(f"{ckpt} does not exist: train it first with "
                 "python -m flowmap_lit fit --config configs/quickstart.yaml")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # a clean start: no outputs or counts of an earlier run survive a failure
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError (and leaves the file untouched) if a cell fails
    nbformat.write(nb, path)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebook", type=Path, default=NOTEBOOK)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    size = refresh(args.notebook, args.timeout)
    print(f"executed {args.notebook} ({size / 1e3:.0f} kB)")
    if size > MAX_BYTES:
        sys.exit(f"{args.notebook} is {size} bytes, over {MAX_BYTES}: shrink its figures before committing")


if __name__ == "__main__":
    main()
