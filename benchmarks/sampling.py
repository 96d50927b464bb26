"""Sampling speed: the student at 1, 2, 4, 8 steps against the teacher's Heun sampler.

    python benchmarks/sampling.py --ckpt checkpoints/digits/distill_ayf_emd/last.ckpt

With a distillation checkpoint (``FlowMapDistillModule``), times k-step flow-map sampling and the
guided teacher's Heun ODE (``--teacher-steps``, NFE = 2 x steps x guidance calls), from the same
noise, and reports samples/s and the speed-up next to the NFE ratio. Without ``--ckpt`` it builds
a quickstart-shaped module (exact mixture teacher, MLP student) with random student weights:
speed does not depend on what the weights learned. Prints a table and one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import quickstart_like_module  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None)
    p.add_argument("--num", type=int, default=1000, help="samples per call")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--teacher-steps", type=int, default=32, help="Heun steps of the teacher reference sampler")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.ckpt:
        from flowmap_lit.checkpoints import load_module

        module = load_module(args.ckpt, map_location=args.device)
    else:
        module = quickstart_like_module().eval().to(args.device)
    shape = tuple(module.data_info["shape"])
    noise = torch.randn((args.num, *shape), device=module.device)
    labels = torch.arange(args.num, device=module.device) % max(module.num_classes, 1) if module.num_classes else None
    guide_calls = 2 if module.guidance in ("autoguidance", "cfg") else 1
    teacher_s = timed(lambda: module.teacher_sample(noise, labels, num_steps=args.teacher_steps), args.repeats)
    teacher_nfe = 2 * args.teacher_steps * guide_calls
    rows = []
    for k in args.steps:
        sec = timed(lambda k=k: module.sample(noise, labels, num_steps=k), args.repeats)
        rows.append({"steps": k, "nfe": k, "samples_per_s": round(args.num / sec),
                     "speedup_vs_teacher": round(teacher_s / sec, 1),
                     "nfe_ratio": round(teacher_nfe / k, 1)})
    result = {"device": str(module.device), "num": args.num, "teacher": {"heun_steps": args.teacher_steps,
              "nfe": teacher_nfe, "samples_per_s": round(args.num / teacher_s)}, "student": rows,
              "checkpoint": args.ckpt}
    print(f"teacher Heun {args.teacher_steps} steps (NFE {teacher_nfe}): "
          f"{result['teacher']['samples_per_s']} samples/s")
    for r in rows:
        print(f"student {r['steps']} step(s): {r['samples_per_s']:>8} samples/s  "
              f"speed-up {r['speedup_vs_teacher']:>6}x  "
              f"(NFE ratio {r['nfe_ratio']}x)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
