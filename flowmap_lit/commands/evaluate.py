"""Evaluate a checkpoint across step counts: FID, flow-map error, NFE and sampling speed.

    python -m flowmap_lit evaluate --ckpt checkpoints/quickstart/last.ckpt --steps 1 2 4 8

prints one row per step count: NFE (network evaluations per sample: k for a flow map, 2k for a
Heun teacher), FID against the data's reference statistics (digits classifier features by
default; ``--feature inception --feature-path WEIGHTS`` for real images), the flow-map error
against the teacher's ODE from the same noise (distilled checkpoints), and samples per second of
the sampler alone. ``--json`` also writes the rows to a file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flowmap_lit.callbacks.flowmap_error import format_table
from flowmap_lit.commands.sample import denormalize, generate, load_module, use_schedules
from flowmap_lit.teachers import load_checkpoint


def _data_root(ckpt_path: str) -> str | None:
    hp = load_checkpoint(ckpt_path).get("datamodule_hyper_parameters", {})
    return hp.get("root") or hp.get("init_args", {}).get("root")


@torch.no_grad()
def evaluate(module, steps: list[int], num: int = 2000, data_root: str | None = None, feature: str = "digits",
             feature_path: str | None = None, reference_steps: int = 128, guidance: float | None = None,
             seed: int = 0, batch_size: int = 500) -> list[dict]:
    """Rows ``{steps, nfe, fid, flowmap_rel_error, samples_per_s}`` (None where not applicable)."""
    noise, labels, _ = generate(module, num, [], guidance, seed)
    kwargs = {} if guidance is None else {"guidance": guidance}
    fid = None
    if data_root is not None:
        from flowmap_lit.metrics import FID, build_feature_extractor, dataset_reference_stats

        path = feature_path or (str(Path(data_root) / "classifier.pt") if feature == "digits" else None)
        extractor = build_feature_extractor(feature, path).to(module.device)
        fid = FID(extractor).to(module.device)
        fid.set_reference(dataset_reference_stats(data_root, "train", extractor, device=module.device))
    reference = None
    if hasattr(module, "teacher_sample"):
        reference = torch.cat([module.teacher_sample(noise[i:i + batch_size],
                                                     labels[i:i + batch_size] if labels is not None else None,
                                                     num_steps=reference_steps, **kwargs)
                               for i in range(0, num, batch_size)])
    heun_teacher = not hasattr(module, "teacher_sample")  # a FlowMatchingModule samples with Heun
    rows = []
    for k in steps:
        start = time.perf_counter()
        _, _, samples = generate(module, num, [k], guidance, seed, batch_size=batch_size)
        x = samples[k]
        seconds = time.perf_counter() - start
        row = {"steps": k, "nfe": 2 * k if heun_teacher else k, "fid": None, "flowmap_rel_error": None,
               "samples_per_s": num / seconds}
        if fid is not None:
            fid.reset_fake()
            for i in range(0, num, batch_size):
                fid.update_fake(denormalize(x[i:i + batch_size], module.data_info))
            row["fid"] = fid.compute()
        if reference is not None:
            row["flowmap_rel_error"] = ((x - reference).square().mean() / reference.square().mean()).item()
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m flowmap_lit evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by python -m flowmap_lit fit")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--num", type=int, default=2000, help="samples per step count")
    p.add_argument("--data", default=None, help="dataset root for FID (default: the one in the checkpoint)")
    p.add_argument("--no-fid", action="store_true", help="skip FID")
    p.add_argument("--feature", default="digits", choices=["digits", "inception"])
    p.add_argument("--feature-path", default=None, help="feature network weights (digits: DATA/classifier.pt)")
    p.add_argument("--reference-steps", type=int, default=128, help="Heun steps of the teacher reference")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--schedules", default=None, help="tuned grids from python -m flowmap_lit.schedule (default: "
                                                     "the checkpoint's, else uniform)")
    args = p.parse_args(argv)
    module = load_module(args.ckpt, map_location=args.device)
    if args.schedules:
        use_schedules(module, args.schedules)
    data_root = None if args.no_fid else (args.data or _data_root(args.ckpt))
    rows = evaluate(module, args.steps, args.num, data_root, args.feature, args.feature_path,
                    args.reference_steps, args.guidance, args.seed)
    print(format_table([{k: ("-" if v is None else v) for k, v in r.items()} for r in rows],
                       ["steps", "nfe", "fid", "flowmap_rel_error", "samples_per_s"]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
