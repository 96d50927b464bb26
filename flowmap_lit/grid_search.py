"""Tuned k-step time grids (and gamma) for a distilled flow map (docs/design.md section 11).

    python -m flowmap_lit schedule --ckpt checkpoints/quickstart/last.ckpt --steps 2 4 8 \\
        --out checkpoints/quickstart/schedules.json

A flow map jumps between any two times, so the grid ``1 = t_0 > t_1 > ... > t_k = 0`` of k-step
sampling is a free knob. For each k the search minimizes a criterion on held-out noise (a seed
that the evaluation callbacks do not use):

- ``flowmap_error`` (default): relative error of the k-step samples against the teacher's
  many-step ODE from the same noise; no features, milliseconds per candidate on small models;
- ``fid``: FID of the k-step samples with the configured feature network.

Every candidate is a valid grid by construction: ``k`` unconstrained parameters ``theta`` give the
increments ``t_{i} - t_{i+1} = softmax(theta)_i`` (``theta`` clipped to a bounded box, so no increment
underflows), hence a strictly decreasing grid from exactly 1 to exactly 0. The search is a seeded
evolution strategy with a diagonal covariance (a small CMA-ES without the rank updates) that starts
from the better of the uniform and EDM grids and returns the best grid it evaluated, so the result
is never worse than either on the criterion. With ``--gamma`` the re-noising of gamma sampling is
searched too (one more parameter, clipped to [0, 1]).

The output JSON is read by ``python -m flowmap_lit sample/evaluate --schedules FILE``, by
``FlowMapDistillModule(schedules=FILE)`` (so the callbacks use it), and by ``flowmap_lit.export``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flowmap_lit.grids import THETA_BOUND, Criterion, check_grid, grid_from_params, params_from_grid
from flowmap_lit.interpolant import edm_schedule, uniform_schedule


@dataclass
class SearchResult:
    grid: Tensor
    gamma: float
    value: float
    baselines: dict[str, float]  # criterion of the uniform and EDM grids (at the starting gamma)
    evaluations: int
    history: list[float] = field(default_factory=list)  # best value after each generation


def search_grid(criterion: Criterion, num_steps: int, budget: int = 64, seed: int = 0, gamma: float = 0.0,
                search_gamma: bool = False, sigma: float = 0.7) -> SearchResult:
    """Minimize ``criterion(grid, gamma)`` over valid ``num_steps``-step grids with at most ``budget`` calls.

    Seeded (diagonal) evolution strategy in the softmax parameters: ``lam = 4 + 3 ln(d)`` candidates
    per generation around the mean, the best half recombined with log-rank weights into the next
    mean, the step size per coordinate set from the elites' spread (floored, so the search never
    freezes). The uniform and EDM grids are the first two evaluations.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if budget < 2:
        raise ValueError(f"budget must allow at least the 2 baseline evaluations, got {budget}")
    gen = torch.Generator().manual_seed(seed)
    evals = 0
    best: tuple[float, Tensor, float] | None = None

    def evaluate(theta: Tensor, g: float) -> float:
        nonlocal evals, best
        grid = grid_from_params(theta)
        value = float(criterion(check_grid(grid, num_steps), g))
        evals += 1
        if not math.isfinite(value):
            value = math.inf
        if best is None or value < best[0]:
            best = (value, grid, g)
        return value

    baselines = {}
    starts = {}
    for name, make in (("uniform", uniform_schedule), ("edm", edm_schedule)):
        theta = params_from_grid(make(num_steps))
        baselines[name] = evaluate(theta, gamma)
        starts[name] = theta
    free_grid = num_steps > 1  # a 1-step grid is always (1, 0)
    dim = (num_steps if free_grid else 0) + (1 if search_gamma else 0)
    history = [best[0]]
    if dim > 0:
        start = starts[min(baselines, key=baselines.get)]
        mean = torch.tensor(([*start.tolist()] if free_grid else []) + ([gamma] if search_gamma else []),
                            dtype=torch.float64)
        scale = torch.full((dim,), sigma, dtype=torch.float64)
        if search_gamma:
            scale[-1] = 0.3
        floor = scale * 0.05
        lam = 4 + int(3 * math.log(dim))
        mu = lam // 2
        weights = torch.log(torch.tensor(mu + 0.5, dtype=torch.float64)) - torch.log(
            torch.arange(1, mu + 1, dtype=torch.float64))
        weights = weights / weights.sum()

        def split(z: Tensor) -> tuple[Tensor, float]:
            theta = z[:num_steps] if free_grid else starts["uniform"]
            g = float(z[-1].clamp(0.0, 1.0)) if search_gamma else gamma
            return theta, g

        while evals + lam <= budget:
            cand = mean + scale * torch.randn((lam, dim), generator=gen, dtype=torch.float64)
            if free_grid:
                cand[:, :num_steps] = cand[:, :num_steps].clamp(-THETA_BOUND, THETA_BOUND)
            if search_gamma:
                cand[:, -1] = cand[:, -1].clamp(0.0, 1.0)
            values = torch.tensor([evaluate(*split(c)) for c in cand], dtype=torch.float64)
            elite = cand[torch.argsort(values)[:mu]]
            mean = (weights[:, None] * elite).sum(0)
            scale = torch.maximum(0.5 * scale + 0.5 * elite.std(0, unbiased=False) * 1.5, floor)
            history.append(best[0])
    value, grid, g = best
    return SearchResult(grid=grid, gamma=g, value=value, baselines=baselines, evaluations=evals, history=history)


# --- criteria --------------------------------------------------------------------------------------
HELD_OUT_SEED = 10_000  # a search with seed S draws its noise with HELD_OUT_SEED + S: no evaluation callback uses it


def held_out_inputs(module, num: int, seed: int, shape: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((num, *shape), generator=gen)
    k = getattr(module, "num_classes", 0)
    labels = torch.randint(0, k, (num,), generator=gen) if k else None
    return noise.to(module.device), (labels.to(module.device) if labels is not None else None)


def _batched(fn, noise: Tensor, labels: Tensor | None, batch_size: int, **kw) -> Tensor:
    return torch.cat([fn(noise[i:i + batch_size], labels[i:i + batch_size] if labels is not None else None, **kw)
                      for i in range(0, noise.shape[0], batch_size)])


def flowmap_error_criterion(module, noise: Tensor, labels: Tensor | None, reference_steps: int = 128,
                            guidance: float | None = None, batch_size: int = 1000) -> Criterion:
    """Relative error of k-step samples on ``grid`` against the teacher's ``reference_steps`` Heun ODE."""
    kw = {} if guidance is None else {"guidance": guidance}
    reference = _batched(module.teacher_sample, noise, labels, batch_size, num_steps=reference_steps, **kw)
    ref_ms = reference.square().mean()

    def criterion(grid: Tensor, gamma: float) -> float:
        gen = torch.Generator(device=noise.device).manual_seed(0)  # the same re-noising for every candidate
        x = _batched(module.sample, noise, labels, batch_size, schedule=grid, gamma=gamma, generator=gen, **kw)
        return float((x - reference).square().mean() / ref_ms)

    return criterion


def fid_criterion(module, noise: Tensor, labels: Tensor | None, fid, guidance: float | None = None,
                  batch_size: int = 500, to_data: Callable[[Tensor], Tensor] = lambda x: x) -> Criterion:
    """FID of k-step samples on ``grid`` (``fid``: a ``flowmap_lit.metrics.FID`` with its reference set)."""
    kw = {} if guidance is None else {"guidance": guidance}

    def criterion(grid: Tensor, gamma: float) -> float:
        gen = torch.Generator(device=noise.device).manual_seed(0)
        fid.reset_fake()
        for i in range(0, noise.shape[0], batch_size):
            lab = labels[i:i + batch_size] if labels is not None else None
            fid.update_fake(to_data(module.sample(noise[i:i + batch_size], lab, schedule=grid, gamma=gamma,
                                                  generator=gen, **kw)))
        return float(fid.compute())

    return criterion


# --- files -----------------------------------------------------------------------------------------
