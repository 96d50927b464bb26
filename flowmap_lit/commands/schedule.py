"""Tuned k-step grids for a checkpoint: ``python -m flowmap_lit schedule`` (or ``python -m flowmap_lit schedule``).

The search and the criteria are in ``flowmap_lit.grid_search``, the file format in ``flowmap_lit.grids``
(docs/design.md section 11).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flowmap_lit.checkpoints import load_module
from flowmap_lit.commands.common import count_type, steps_type, warn_guidance
from flowmap_lit.commands.evaluate import _data_root
from flowmap_lit.flowmap import denormalize
from flowmap_lit.grid_search import HELD_OUT_SEED, fid_criterion, flowmap_error_criterion, held_out_inputs, search_grid
from flowmap_lit.grids import __doc__ as SCHEDULE_DOC
from flowmap_lit.grids import save_schedules


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m flowmap_lit schedule", description=SCHEDULE_DOC.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="FlowMapDistillModule checkpoint written by python -m flowmap_lit fit")
    p.add_argument("--steps", type=steps_type, nargs="+", default=[2, 4, 8])
    p.add_argument("--criterion", default="flowmap_error", choices=["flowmap_error", "fid"])
    p.add_argument("--budget", type=int, default=64, help="criterion evaluations per step count")
    p.add_argument("--num", type=count_type, default=1000, help="held-out noise samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (the held-out noise uses 10_000 + seed)")
    p.add_argument("--gamma", action="store_true", help="also search gamma (re-noising of gamma sampling)")
    p.add_argument("--reference-steps", type=int, default=128, help="Heun steps of the teacher reference")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the module's)")
    p.add_argument("--data", default=None, help="dataset root for --criterion fid (default: the checkpoint's)")
    p.add_argument("--feature", default="digits", choices=["digits", "inception"])
    p.add_argument("--feature-path", default=None, help="feature network weights (digits: DATA/classifier.pt)")
    p.add_argument("--out", default=None, help="output JSON (default: schedules.json next to the checkpoint)")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--trust-code", action="store_true", help="build classes the checkpoint names outside flowmap_lit "
                                                             "and torch.optim (trusted files only)")
    args = p.parse_args(argv)

    module = load_module(args.ckpt, use_ema=not args.no_ema, map_location=args.device, trust_code=args.trust_code)
    warn_guidance(module, args.guidance)
    if not hasattr(module, "teacher_sample"):
        raise SystemExit(f"error: {args.ckpt} is not a distilled flow map (FlowMapDistillModule); its sampler "
                         "has no free time grid to tune")
    shape = tuple((module.data_info or {}).get("shape") or ())
    if not shape:
        raise SystemExit(f"error: {args.ckpt} records no data shape")
    noise, labels = held_out_inputs(module, args.num, HELD_OUT_SEED + args.seed, shape)
    if args.criterion == "flowmap_error":
        criterion = flowmap_error_criterion(module, noise, labels, args.reference_steps, args.guidance)
    else:
        from flowmap_lit.metrics import FID, build_feature_extractor, dataset_reference_stats

        root = args.data or _data_root(args.ckpt)
        if root is None:
            raise SystemExit("error: --criterion fid needs the dataset root (--data)")
        path = args.feature_path or (str(Path(root) / "classifier.pt") if args.feature == "digits" else None)
        extractor = build_feature_extractor(args.feature, path).to(module.device)
        fid = FID(extractor).to(module.device)
        fid.set_reference(dataset_reference_stats(root, "train", extractor, device=module.device))
        criterion = fid_criterion(module, noise, labels, fid, args.guidance,
                                  to_data=lambda x: denormalize(x, module.data_info))
    grids, gammas, report = {}, {}, {}
    gamma0 = float(module.sample_gamma)
    for k in args.steps:
        res = search_grid(criterion, k, args.budget, args.seed, gamma0, args.gamma)
        grids[k], gammas[k] = res.grid, res.gamma
        report[str(k)] = {**res.baselines, "tuned": res.value, "evaluations": res.evaluations}
        print(f"{k} steps: {args.criterion} uniform {res.baselines['uniform']:.5g}  edm {res.baselines['edm']:.5g}  "
              f"tuned {res.value:.5g}  grid {[round(float(t), 4) for t in res.grid]}  gamma {res.gamma:.3g}",
              flush=True)
    out = Path(args.out) if args.out else Path(args.ckpt).parent / "schedules.json"
    meta = {"criterion": args.criterion, "seed": args.seed, "budget": args.budget, "num": args.num,
            "checkpoint": str(args.ckpt), "held_out": report}
    save_schedules(out, grids, gammas, meta)
    print(f"schedules: {out}")
    return {"path": str(out), "report": report, "grids": {k: g.tolist() for k, g in grids.items()}, "gamma": gammas}



if __name__ == "__main__":
    main()
