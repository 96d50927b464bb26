"""Per-batch training cost of the neural arm's runs of ``benchmarks/second_stage.py``, measured side by side.

    python benchmarks/stage_cost.py --teacher-ckpt T/teacher.ckpt --guide-ckpt T/guide.ckpt --base B \\
        --variant "emd=--train-base" --variant "lmd=--train-base --objective ayf_lmd" \\
        --variant "gan=--objective ayf_lmd --stage adversarial --lr 1e-3"

Each variant is a ``second_stage.py`` command line (added to the shared ``--teacher-ckpt``, ``--guide-ckpt``,
``--base``, ``--data`` and ``--budget``); its module is the one that command trains. In one process the
variants are trained for ``--batches`` batches each, in turn, ``--repeats`` times; a callback times every
batch (the whole Lightning batch: data, both networks' steps, the EMA) and the first ``--warmup`` batches
of each turn are dropped. Prints one JSON object: each variant's median seconds per batch and its ratio to
the first variant's. Wall times of whole runs move with whatever else shares the machine; these ratios
come from one process, so they move much less.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import trainer  # noqa: E402
from second_stage import build, parser  # noqa: E402

from flowmap_lit.data import DigitsDataModule  # noqa: E402
from flowmap_lit.teachers import NetworkTeacher  # noqa: E402


class BatchTimer(pl.Callback):
    """Seconds of every training batch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher-ckpt", required=True)
    p.add_argument("--guide-ckpt", required=True)
    p.add_argument("--base", required=True, help="the base checkpoint the stages start from")
    p.add_argument("--data", default="data/digits")
    p.add_argument("--budget", default="small", help="benchmarks/quality.py's budget (batch size)")
    p.add_argument("--variant", action="append", required=True, metavar="NAME=ARGS",
                   help="a second_stage.py command line to time; the first is the unit of the ratios")
    p.add_argument("--batches", type=int, default=12, help="batches per turn")
    p.add_argument("--warmup", type=int, default=2, help="batches dropped at the start of each turn")
    p.add_argument("--repeats", type=int, default=3, help="turns per variant, interleaved")
    args = p.parse_args(argv)
    if args.batches <= args.warmup:
        raise SystemExit(f"--batches ({args.batches}) must exceed --warmup ({args.warmup})")

    root = Path(args.data).resolve()
    DigitsDataModule(root=str(root)).prepare_data()
    teacher, guide = NetworkTeacher(args.teacher_ckpt), NetworkTeacher(args.guide_ckpt)
    shared = ["--teacher-ckpt", args.teacher_ckpt, "--guide-ckpt", args.guide_ckpt, "--base", args.base,
              "--data", args.data, "--budget", args.budget]
    variants = {}
    for item in args.variant:
        name, sep, line = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--variant takes NAME=ARGS, got {item!r}")
        variants[name] = parser().parse_args(shared + shlex.split(line))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            module, data, _, steps = build(run, teacher, guide)
            if not steps:
                raise SystemExit(f"variant {name!r} trains nothing (--stage none)")
            timer = BatchTimer()  # a two-optimizer stage counts steps_per_batch optimizer steps per batch
            trainer(args.batches * getattr(module, "steps_per_batch", 1), [timer], root.parent).fit(module, data)
            times[name] += timer.seconds[args.warmup:]
    unit = statistics.median(times[next(iter(variants))])
    result = {"batches": args.batches, "warmup": args.warmup, "repeats": args.repeats,
              "variants": {name: {"args": line.partition("=")[2], "seconds_per_batch": round(statistics.median(t), 4),
                                  "ratio": round(statistics.median(t) / unit, 3), "timed_batches": len(t)}
                           for (name, t), line in zip(times.items(), args.variant)}}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
