"""Tuned k-step grids against the uniform and EDM grids on one checkpoint, over search seeds.

    python benchmarks/schedule_gain.py --ckpt checkpoints/quickstart/last.ckpt --seeds 0 1 2
    python benchmarks/schedule_gain.py --ckpt checkpoints/quickstart/last.ckpt --seeds 0 1 2 --criterion fid

For each seed, ``flowmap_lit.grid_search``'s search (``--criterion``: the flow-map error or FID,
held-out noise of that seed, ``--budget`` evaluations per step count) picks a grid per step count; every grid is then
scored on the evaluation noise the callbacks and ``evaluate`` use (seed 0, disjoint from the
search's): relative flow-map error against the teacher's ODE and FID (the checkpoint's dataset,
digits features). Prints one JSON object: per step count the uniform and EDM scores and the
tuned grids' mean and standard deviation over seeds, plus the per-seed grids.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowmap_lit.checkpoints import load_module  # noqa: E402
from flowmap_lit.commands.evaluate import _data_root  # noqa: E402
from flowmap_lit.flowmap import denormalize
from flowmap_lit.grid_search import HELD_OUT_SEED, fid_criterion, flowmap_error_criterion, held_out_inputs, search_grid  # noqa: E402
from flowmap_lit.interpolant import edm_schedule, uniform_schedule  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="checkpoints/quickstart/last.ckpt")
    p.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--num", type=int, default=1000, help="held-out noise samples of the search")
    p.add_argument("--eval-num", type=int, default=2000, help="evaluation samples (error and FID)")
    p.add_argument("--reference-steps", type=int, default=128)
    p.add_argument("--criterion", default="flowmap_error", choices=["flowmap_error", "fid"],
                   help="what the search minimizes on its held-out noise (scoring reports both)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    start = time.perf_counter()
    module = load_module(args.ckpt)
    shape = tuple(module.data_info["shape"])
    from flowmap_lit.metrics import FID, build_feature_extractor, dataset_reference_stats

    root = _data_root(args.ckpt)
    extractor = build_feature_extractor("digits", str(Path(root) / "classifier.pt"))
    fid = FID(extractor)
    fid.set_reference(dataset_reference_stats(root, "train", extractor))
    noise, labels = held_out_inputs(module, args.eval_num, 0, shape)
    score_err = flowmap_error_criterion(module, noise, labels, args.reference_steps)
    score_fid = fid_criterion(module, noise, labels, fid, to_data=lambda x: denormalize(x, module.data_info))
    gamma = float(module.sample_gamma)

    def score(grid):
        return {"flowmap_rel_error": score_err(grid, gamma), "fid": score_fid(grid, gamma)}

    searches = {}  # per seed: the criterion on its held-out noise (the teacher reference is solved once)
    for seed in args.seeds:
        h_noise, h_labels = held_out_inputs(module, args.num, HELD_OUT_SEED + seed, shape)
        if args.criterion == "flowmap_error":
            searches[seed] = flowmap_error_criterion(module, h_noise, h_labels, args.reference_steps)
        else:  # the same feature network and reference statistics, on the held-out noise
            searches[seed] = fid_criterion(module, h_noise, h_labels, fid,
                                           to_data=lambda x: denormalize(x, module.data_info))
    rows = {}
    for k in args.steps:
        base = {"uniform": score(uniform_schedule(k)), "edm": score(edm_schedule(k))}
        tuned = []
        for seed in args.seeds:
            res = search_grid(searches[seed], k, args.budget, seed, gamma)
            tuned.append({"seed": seed, "grid": [round(float(t), 5) for t in res.grid], "held_out": res.value,
                          **score(res.grid)})
        row = {**base, "tuned": tuned}
        for key in ("flowmap_rel_error", "fid"):
            vals = [t[key] for t in tuned]
            row[f"tuned_{key}_mean"] = statistics.fmean(vals)
            row[f"tuned_{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row[f"{key}_ratio_to_uniform"] = row[f"tuned_{key}_mean"] / base["uniform"][key]
        rows[str(k)] = row
        print(f"{k} steps: error uniform {base['uniform']['flowmap_rel_error']:.5f} edm "
              f"{base['edm']['flowmap_rel_error']:.5f} tuned {row['tuned_flowmap_rel_error_mean']:.5f}"
              f"±{row['tuned_flowmap_rel_error_std']:.5f}; FID uniform {base['uniform']['fid']:.3f} edm "
              f"{base['edm']['fid']:.3f} tuned {row['tuned_fid_mean']:.3f}±{row['tuned_fid_std']:.3f}", flush=True)
    out = {"checkpoint": args.ckpt, "criterion": args.criterion, "seeds": args.seeds, "budget": args.budget,
           "search_num": args.num,
           "eval_num": args.eval_num, "reference_steps": args.reference_steps, "steps": rows,
           "seconds": round(time.perf_counter() - start)}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
