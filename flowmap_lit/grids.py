"""k-step time grids: their parameterization, checks and files (docs/design.md section 11).

A grid is ``1 = t_0 > t_1 > ... > t_k = 0``; a tuned grid is stored with its gamma in a JSON file
(``FORMAT``) that the module, ``sample``, ``evaluate``, ``diagnose`` and the export read."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

FORMAT = "flowmap-lit-schedules/1"
THETA_BOUND = 8.0  # |theta| <= 8: the smallest increment is >= exp(-16) / k, far above float64 resolution

Criterion = Callable[[Tensor, float], float]  # (grid of k + 1 times, gamma) -> value to minimize


# --- grids -----------------------------------------------------------------------------------------
def grid_from_params(theta: Tensor) -> Tensor:
    """``(k,)`` parameters -> ``(k + 1,)`` float64 times, strictly decreasing from exactly 1 to exactly 0."""
    theta = torch.as_tensor(theta, dtype=torch.float64).clamp(-THETA_BOUND, THETA_BOUND)
    steps = torch.softmax(theta, 0)
    inner = 1.0 - torch.cumsum(steps, 0)[:-1]
    return torch.cat([torch.ones(1, dtype=torch.float64), inner.clamp(0.0, 1.0), torch.zeros(1, dtype=torch.float64)])


def params_from_grid(grid: Tensor) -> Tensor:
    """Inverse of :func:`grid_from_params` (up to the shift that softmax ignores): ``log`` of the increments."""
    grid = check_grid(grid)
    return torch.log(grid[:-1] - grid[1:]).clamp(-THETA_BOUND, THETA_BOUND)


def check_grid(grid, num_steps: int | None = None) -> Tensor:
    """``grid`` as float64, or a ValueError naming what is wrong with it."""
    g = torch.as_tensor(grid, dtype=torch.float64).flatten()
    if num_steps is not None and g.numel() != num_steps + 1:
        raise ValueError(f"a {num_steps}-step grid has {num_steps + 1} times, got {g.numel()}: {g.tolist()}")
    if g.numel() < 2 or g[0] != 1.0 or g[-1] != 0.0 or not bool((g[1:] < g[:-1]).all()):
        raise ValueError(f"a time grid must decrease strictly from 1 to 0, got {g.tolist()}")
    return g


# --- search ----------------------------------------------------------------------------------------
def schedules_doc(schedules: dict[int, tuple[Tensor, float]]) -> dict:
    """The JSON form of ``{k: (grid, gamma)}`` (what :func:`load_schedules` reads back)."""
    return {"format": FORMAT,
            "grids": {str(k): [float(t) for t in check_grid(g, k)] for k, (g, _) in sorted(schedules.items())},
            "gamma": {str(k): float(gm) for k, (_, gm) in sorted(schedules.items())}}


def save_schedules(path: str | Path, grids: dict[int, Tensor], gammas: dict[int, float],
                   meta: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**schedules_doc({k: (g, gammas.get(k, 0.0)) for k, g in grids.items()}), **(meta or {})}
    path.write_text(json.dumps(doc, indent=1))
    return path


def load_schedules(source: str | Path | dict) -> dict[int, tuple[Tensor, float]]:
    """``{k: (grid, gamma)}`` from a schedules file (or its parsed dict), each grid checked."""
    if isinstance(source, dict):
        doc, where = source, "schedules"
    else:
        where = str(source)
        if not Path(source).is_file():
            raise FileNotFoundError(f"schedules file {where} not found; write one with "
                                    "`python -m flowmap_lit schedule --ckpt CKPT --steps 2 4 8 --out FILE`")
        doc = json.loads(Path(source).read_text())
    if doc.get("format") != FORMAT or not isinstance(doc.get("grids"), dict):
        raise ValueError(f"{where} is not a schedules file (expected format {FORMAT!r} with a 'grids' mapping)")
    gammas = doc.get("gamma", {})
    out = {}
    for key, grid in doc["grids"].items():
        k = int(key)
        gamma = float(gammas.get(key, 0.0))
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"{where}: gamma of the {k}-step grid must be in [0, 1], got {gamma}")
        out[k] = (check_grid(grid, k), gamma)
    return out
