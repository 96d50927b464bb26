"""Where a distilled flow map is wrong: single-jump errors over (t, s) and each step's share of the
k-step error, for a checkpoint (``flowmap_lit.diagnostics``; docs/design.md section 9).

    python -m flowmap_lit diagnose --ckpt checkpoints/quickstart/last.ckpt --out diagnostics/quickstart

prints both tables and writes ``DIR/jump_error.png`` (the heatmap) and ``DIR/diagnostics.json``.
The teacher's reference is its closed-form flow map where it has one (unguided), else a Heun solve
on a fine EDM grid (``--reference-steps`` over [0, 1]).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from flowmap_lit.callbacks.diagnostics import grid_table, path_table
from flowmap_lit.checkpoints import load_module
from flowmap_lit.commands.common import count_type, steps_type, warn_guidance
from flowmap_lit.commands.sample import use_schedules
from flowmap_lit.diagnostics import diagnose, heatmap_figure
from flowmap_lit.generate import generate


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m flowmap_lit diagnose", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="distillation checkpoint written by python -m flowmap_lit fit")
    p.add_argument("--out", default=None, help="directory for jump_error.png and diagnostics.json")
    p.add_argument("--steps", type=steps_type, nargs="+", default=[1, 2, 4, 8], help="sampling paths to decompose")
    p.add_argument("--times", type=float, nargs="+", default=None, help="jump grid (default 1, 7/8, ..., 0)")
    p.add_argument("--num", type=count_type, default=1000, help="noise samples")
    p.add_argument("--reference-steps", type=int, default=256, help="Heun steps of the teacher's flow map over [0, 1]")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the module's eval_guidance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--schedules", default=None, help="decompose the tuned grids of python -m flowmap_lit schedule")
    p.add_argument("--trust-code", action="store_true", help="build classes the checkpoint names outside flowmap_lit "
                                                             "and torch.optim (trusted files only)")
    args = p.parse_args(argv)
    module = load_module(args.ckpt, map_location=args.device, trust_code=args.trust_code)
    if args.schedules:
        use_schedules(module, args.schedules)
    if not hasattr(module, "teacher_fn"):
        raise SystemExit(f"{args.ckpt} is not a flow-map distillation checkpoint (no student and teacher)")
    noise, labels, _ = generate(module, args.num, [], seed=args.seed)
    warn_guidance(module, args.guidance)
    grid, paths = diagnose(module, noise, labels, args.steps, args.times, args.guidance, args.reference_steps)
    print("Single jumps (relative = mse / mean square of the teacher's displacement):\n" + grid_table(grid))
    print("\nEach sampling step's error carried to t = 0 by the teacher (relative to the reference's mean "
          "square; total = the k-step relative flow-map error):\n" + path_table(paths))
    result = {"checkpoint": args.ckpt, "grid": asdict(grid), "paths": [asdict(p) for p in paths]}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        fig = heatmap_figure(grid)
        fig.savefig(out / "jump_error.png", dpi=130)
        (out / "diagnostics.json").write_text(json.dumps(result, indent=2))
        print(f"\nwrote {out / 'jump_error.png'} and {out / 'diagnostics.json'}")
    return result


if __name__ == "__main__":
    main()
