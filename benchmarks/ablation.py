"""Ablations of a distillation config across seeds: the same command with and without a change.

    python benchmarks/ablation.py --seeds 0 1 2 \
        --variant base= \
        --variant grid25="--model.init_args.time_sampler.init_args.grid_fraction 0.25"

Each variant is the config (default ``configs/quickstart.yaml``) plus its command-line overrides,
run once per seed (``--seed_everything``: the student's initialization and every training noise;
the data order stays fixed), in this process, one after another, at the config's own budget
unless ``--max-steps`` shortens every run alike. Validation runs only at the end. Reported per
variant and step count: mean and standard deviation over the seeds of the relative flow-map error
and of FID (when the config has ``FewStepFID``), the teacher's Euler error and ODE FID, and the wall
time per run. Prints one table and one JSON object (``--json`` also writes it).
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowmap_lit.callbacks import FewStepFID, FlowMapError  # noqa: E402
from flowmap_lit.callbacks.flowmap_error import format_table  # noqa: E402
from flowmap_lit.cli import FlowMapCLI  # noqa: E402


def run_once(config: str, overrides: list[str], seed: int, max_steps: int | None, workdir: Path) -> dict:
    """One fit; returns ``{"rel": {k: ...}, "fid": {k: ...}, "euler": {k: ...}, "teacher_fid", "seconds",
    "velocity_limit"}`` (the last: FlowMapError's many-step limit, when the config asks for it)."""
    args = ["fit", "--config", config, "--seed_everything", str(seed), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(workdir)]
    if max_steps is not None:
        args += ["--trainer.max_steps", str(max_steps)]
    args += ["--trainer.val_check_interval", str(max_steps or 10**9)]  # no validation before the end
    start = time.perf_counter()
    cli = FlowMapCLI(args=[*args, *overrides], save_config_callback=None)
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "rel": {}, "fid": {}, "euler": {}, "teacher_fid": None, "velocity_limit": None}
    for cb in cli.trainer.callbacks:
        if isinstance(cb, FlowMapError):
            out["rel"] = {r["steps"]: r["relative_error"] for r in cb.results}
            out["euler"] = {r["steps"]: r.get("teacher_euler_relative_error") for r in cb.results}
            if cb.velocity_limit is not None:
                out["velocity_limit"] = cb.velocity_limit["relative_error"]
        if isinstance(cb, FewStepFID):
            out["fid"] = {r["steps"]: r["fid"] for r in cb.results}
            out["teacher_fid"] = cb.teacher_fid
    del cli  # the fit's objects sit in reference cycles; collecting them now also ends its loader workers
    gc.collect()
    return out


def summarize(runs: list[dict]) -> dict:
    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values}

    steps = sorted(runs[0]["rel"]) or sorted(runs[0]["fid"])
    return {
        "rel": {k: stats([r["rel"].get(k) for r in runs]) for k in steps},
        "fid": {k: stats([r["fid"].get(k) for r in runs]) for k in steps},
        "euler": {k: runs[0]["euler"].get(k) for k in steps},
        "teacher_fid": stats([r["teacher_fid"] for r in runs]),
        "velocity_limit": stats([r.get("velocity_limit") for r in runs]),
        "seconds": stats([r["seconds"] for r in runs]),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="a variant: its name, '=', and its command-line overrides (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-steps", type=int, default=None, help="shorten every run alike (default: the config's)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    sys.argv = sys.argv[:1]  # the runs' arguments go to LightningCLI(args=...) alone
    variants = [v.split("=", 1) for v in (args.variant or ["base="])]
    result = {"config": args.config, "seeds": args.seeds, "max_steps": args.max_steps, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in variants:
            runs = [run_once(args.config, shlex.split(overrides), seed, args.max_steps, Path(tmp) / name)
                    for seed in args.seeds]
            result["variants"][name] = summary = {"overrides": overrides, **summarize(runs)}
            rel = " / ".join(f"{v['mean']:.4f}" for v in summary["rel"].values() if v)
            print(f"{name}: relative error {rel} ({statistics.fmean(r['seconds'] for r in runs):.0f} s per run)",
                  file=sys.stderr)
            if args.json:  # after every variant, so that a stopped ablation keeps the finished ones
                Path(args.json).write_text(json.dumps(result, indent=2))
    rows = []
    for name, v in result["variants"].items():
        for k, rel in v["rel"].items():
            fid = v["fid"].get(k)
            rows.append({"variant": name, "steps": k,
                         "rel_error": f"{rel['mean']:.4f} ± {rel['std']:.4f}" if rel else "-",
                         "teacher_euler": f"{v['euler'][k]:.4f}" if v["euler"].get(k) is not None else "-",
                         "fid": f"{fid['mean']:.2f} ± {fid['std']:.2f}" if fid else "-",
                         "teacher_fid": f"{v['teacher_fid']['mean']:.2f}" if v["teacher_fid"] else "-",
                         "s_per_run": f"{v['seconds']['mean']:.0f}"})
        if v["velocity_limit"]:
            lim = v["velocity_limit"]
            rows.append({"variant": name, "steps": "limit", "rel_error": f"{lim['mean']:.4f} ± {lim['std']:.4f}",
                         "teacher_euler": "-", "fid": "-", "teacher_fid": "-", "s_per_run": ""})
    print(format_table(rows, ["variant", "steps", "rel_error", "teacher_euler", "fid", "teacher_fid", "s_per_run"]))
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
