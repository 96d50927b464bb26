"""Second stages on the neural digits arm: the distribution-matching corrector or a GAN, on a saved base.

    python benchmarks/quality.py --arms neural --methods ayf_emd --save-teachers T   # teacher + guide, once
    python benchmarks/second_stage.py --teacher-ckpt T/teacher.ckpt --guide-ckpt T/guide.ckpt \
        --base T/base0.ckpt --train-base                  # the AYF-EMD base: the arm's 400 batches, saved
    python benchmarks/second_stage.py --teacher-ckpt T/teacher.ckpt --guide-ckpt T/guide.ckpt \
        --base T/base0.ckpt --batches 300 --lr 1e-4       # one corrector stage on it
    python benchmarks/second_stage.py ... --base T/base0.ckpt --save T/stage0.ckpt   # keep it, then
    python benchmarks/second_stage.py ... --base T/stage0.ckpt --stage adversarial   # a GAN stage on it

The base is the neural arm's AYF-EMD run of ``benchmarks/quality.py`` (student a copy of the teacher's
U-Net, Adam 3e-4, 400 batches of 128, autoguidance from the guide, 60% of the pairs at ``s = t`` and
25% on the sampling grids), saved with its EMA weights. A stage is ``DistributionMatchingModule`` (or
``AdversarialFinetuneModule``) started from that checkpoint (``init_checkpoint``) with a fresh EMA
(decay 0.995), for ``--batches`` batches. Each run prints one JSON line: its settings, FID and
relative flow-map error at 1/2/4/8 steps (the evaluation of ``benchmarks/quality.py``, EMA weights;
``--raw``: also the raw weights), the teacher ODE's FID and the training seconds.

``--objective ayf_lmd`` distills with AYF-LMD instead (base and stage). ``--stage adversarial`` runs
``AdversarialFinetuneModule`` instead of the corrector (RpGAN against the data's digits, or with
``--adv-real teacher`` against the guided teacher's ODE samples; fakes from ``--adv-times``).
``--save`` writes a stage's EMA student in the base's format, so stages can follow one another.
``--tune-steps 2 4`` then tunes those step counts' time grids on the FID of held-out noise (the
``python -m flowmap_lit schedule --criterion fid`` search: seed ``10_000 + --seed``, the budget's evaluation samples,
``--tune-budget`` evaluations per step count) and evaluates again with them (``fid_tuned``,
``flowmap_rel_error_tuned``, ``grids``); ``--stage none`` trains nothing and evaluates (and tunes)
the saved student ``--base`` as it is. ``--scan-mid 0.3 0.5`` also scores the 2-step FID on the grid
``[1, t1, 0]`` for each ``t1`` given, on the evaluation's own noise (``mid_scan``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402
from quality import BUDGETS, evaluate, gan_stage, neural_settings, save_student, trainer, tune_grids  # noqa: E402,E501

from flowmap_lit.callbacks import EMA, FewStepFID  # noqa: E402
from flowmap_lit.data import DigitsDataModule, PriorDataModule  # noqa: E402
from flowmap_lit.grids import check_grid  # noqa: E402
from flowmap_lit.modules import DistributionMatchingModule, FlowMapDistillModule  # noqa: E402,E501
from flowmap_lit.modules.two_player import load_student_state  # noqa: E402
from flowmap_lit.objectives import AYFEMD, AYFLMD, DistributionMatching  # noqa: E402
from flowmap_lit.teachers import NetworkTeacher  # noqa: E402


def scan_mid(module, dm, root: Path, mids: list[float], num: int) -> list[list[float]]:
    """``[[t1, FID], ...]``: the 2-step FID on the grid ``[1, t1, 0]``, on the evaluation's noise (sample ``i``'s
    noise and label depend on the seed and ``i`` only, so each value equals the 2-step column of ``evaluate``
    with that grid); the module's grids are left as they were."""
    fid = FewStepFID(feature_path=str(root / "classifier.pt"), step_counts=[2], num_samples=num, print_table=False,
                     teacher_steps=None)
    t = trainer(0, [fid], root.parent)
    t.strategy.connect(module)
    t.datamodule = dm
    fid.setup(t, module, "validate")
    kept, rows = dict(module.schedules), []
    try:
        for mid in mids:
            module.schedules = {**kept, 2: (check_grid([1.0, mid, 0.0], 2), 0.0)}
            rows.append([mid, fid.evaluate(t, module)[0]["fid"]])
    finally:
        module.schedules = kept
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher-ckpt", required=True)
    p.add_argument("--guide-ckpt", required=True)
    p.add_argument("--base", required=True, help="the base checkpoint (written by --train-base)")
    p.add_argument("--train-base", action="store_true", help="train and save the base instead of a stage")
    p.add_argument("--data", default="data/digits")
    p.add_argument("--budget", default="small", choices=sorted(BUDGETS),
                   help="the base's batches, batch size and evaluation samples (benchmarks/quality.py's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", type=int, default=300, help="batches of the stage")
    p.add_argument("--base-batches", type=int, default=None,
                   help="batches of the base with --train-base (default: the budget's, 400 at small)")
    p.add_argument("--lr", type=float, default=1e-4, help="the student's Adam learning rate in the stage")
    p.add_argument("--fake-lr", type=float, default=3e-4)
    p.add_argument("--fake-init", default="student", choices=["teacher", "student"])
    p.add_argument("--fake-updates", type=int, default=1)
    p.add_argument("--weight", type=float, default=0.1, help="dm_weight")
    p.add_argument("--adaptive", action="store_true", help="adaptive_weight")
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--dm-steps", type=int, nargs="+", default=[1])
    p.add_argument("--r-distribution", default="uniform", choices=["uniform", "logit_normal"])
    p.add_argument("--r-mean", type=float, default=0.0, help="P_mean of a logit-normal r")
    p.add_argument("--states", default="data", choices=["data", "student", "teacher"],
                   help="where the noisy points come from (base and stage); student/teacher: no data read")
    p.add_argument("--one-fraction", type=float, default=0.0,
                   help="fraction of the distillation's (t, s) pairs that start at t = 1 (base and stage), taken "
                        "from the logit-normal share")
    p.add_argument("--raw", action="store_true", help="also evaluate the raw (non-EMA) weights")
    p.add_argument("--objective", default="ayf_emd", choices=["ayf_emd", "ayf_lmd"],
                   help="the distillation objective (base and stage)")
    p.add_argument("--stage", default="corrector", choices=["corrector", "adversarial", "none"],
                   help="adversarial: RpGAN against the data (AdversarialFinetuneModule) instead of the corrector; "
                        "none: no training, evaluate the student in --base")
    p.add_argument("--adv-weight", type=float, default=0.1, help="adversarial stage: adv_weight")
    p.add_argument("--adv-times", type=float, nargs="+", default=None,
                   help="adversarial stage: adv_times (default [1.0])")
    p.add_argument("--adv-steps", type=int, nargs="+", default=None,
                   help="adversarial stage: adv_steps, fakes that are the student's k-step samples (not with "
                        "--adv-times)")
    p.add_argument("--disc-lr", type=float, default=2e-4, help="adversarial stage: the discriminator's Adam lr")
    p.add_argument("--penalty-every", type=int, default=1,
                   help="adversarial stage: RpGAN penalty_every (R1/R2 on every this many discriminator steps)")
    p.add_argument("--adv-real", default="data", choices=["data", "teacher"],
                   help="adversarial stage: the discriminator's reals (teacher: the guided teacher's ODE samples, "
                        "no data read with --states student)")
    p.add_argument("--adv-real-steps", type=int, default=16,
                   help="adversarial stage: Heun steps of the teacher's reals")
    p.add_argument("--adv-real-pool", type=int, default=0,
                   help="adversarial stage with --adv-real teacher: draw the reals from this many teacher samples "
                        "made once (0: fresh reals every batch)")
    p.add_argument("--save", default=None, help="write the stage's EMA student here (the base's format)")
    p.add_argument("--tune-steps", type=int, nargs="+", default=None,
                   help="after the evaluation, tune these step counts' grids on held-out FID and evaluate again")
    p.add_argument("--tune-budget", type=int, default=14, help="FID evaluations of the grid search per step count")
    p.add_argument("--tune-samples", type=int, default=None,
                   help="held-out noises of the grid search (default: the budget's evaluation samples)")
    p.add_argument("--scan-mid", type=float, nargs="+", default=None,
                   help="also score the 2-step FID on the grid [1, t1, 0] for each t1 (evaluation noise)")
    return p


def build(args, teacher: NetworkTeacher, guide: NetworkTeacher):
    """``(module, training data, evaluation data, max_steps)`` of the run ``args`` asks for (the base, a stage,
    or none), untrained; a stage's module holds the base's weights."""
    root = Path(args.data).resolve()
    budget = BUDGETS[args.budget]
    # the arm's settings (Adam 3e-4 after the warmup for the base); the stage: Adam --lr, no warmup
    common = {**neural_settings(guide, budget, 3e-4, one_fraction=args.one_fraction), "noise_seed": args.seed}
    dm = DigitsDataModule(root=str(root), batch_size=budget["batch"], num_workers=1)
    data = dm if args.states == "data" else PriorDataModule(dm, batch_size=budget["batch"])  # labels only
    pl.seed_everything(args.seed, verbose=False)
    objective = {"ayf_emd": AYFEMD, "ayf_lmd": AYFLMD}[args.objective]()
    if args.train_base or args.stage == "none":
        module = FlowMapDistillModule(teacher, objective, states=args.states, **common)
        if not args.train_base:
            module.student.load_state_dict(load_student_state(args.base))
        return module, data, dm, ((args.base_batches or budget["neural_steps"]) if args.train_base else 0)
    common.update(warmup_steps=0, optimizer=lambda ps: torch.optim.Adam(ps, lr=args.lr))
    if args.stage == "adversarial":
        if args.states != "data" and args.adv_real == "data":
            raise SystemExit("--stage adversarial with --adv-real data reads the data: give --states data, or "
                             "--adv-real teacher to run it data-free")
        module = gan_stage(teacher, objective, args.base, common, disc_lr=args.disc_lr,
                           penalty_every=args.penalty_every, adv_weight=args.adv_weight,
                           adaptive_weight=args.adaptive, distill_weight=args.distill_weight,
                           adv_times=args.adv_times, adv_steps=args.adv_steps, states=args.states,
                           adv_real=args.adv_real, adv_real_steps=args.adv_real_steps,
                           adv_real_pool=args.adv_real_pool)
        steps = 2 * args.batches  # both optimizers' steps count in global_step here
    else:
        module = DistributionMatchingModule(
            teacher=teacher, objective=objective, states=args.states, init_checkpoint=args.base,
            fake_init=args.fake_init, fake_optimizer=lambda ps: torch.optim.Adam(ps, lr=args.fake_lr),
            fake_updates=args.fake_updates,
            dm_weight=args.weight, adaptive_weight=args.adaptive, distill_weight=args.distill_weight,
            dm_steps=args.dm_steps, corrector=DistributionMatching(distribution=args.r_distribution,
                                                                   P_mean=args.r_mean), **common)
        steps = args.batches
    return module, data, dm, steps


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    root = Path(args.data).resolve()
    DigitsDataModule(root=str(root)).prepare_data()
    budget = BUDGETS[args.budget]
    module, data, dm, steps = build(args, NetworkTeacher(args.teacher_ckpt), NetworkTeacher(args.guide_ckpt))
    ema = EMA(decay=0.995)
    start = time.perf_counter()
    if steps:
        trainer(steps, [ema], root.parent).fit(module, data)
        if args.train_base or args.save:
            save_student(module, ema, args.base if args.train_base else args.save)
    seconds = time.perf_counter() - start
    result, cache = {**vars(args), "train_seconds": round(seconds, 1)}, {}  # one teacher reference for both
    if args.raw:
        raw = evaluate(module, dm, budget, root, cache)
        result.update(fid_raw=raw["fid"], flowmap_rel_error_raw=raw["flowmap_rel_error"])
    averaged = ema.averaged(module) if args.stage != "none" else contextlib.nullcontext()
    with averaged:
        result.update(evaluate(module, dm, budget, root, cache))
        if args.scan_mid:
            result["mid_scan"] = scan_mid(module, dm, root, args.scan_mid, budget["eval_samples"])
        if args.tune_steps:
            start = time.perf_counter()
            grids = tune_grids(module, dm, root, args.tune_steps, args.tune_budget, args.seed,
                               args.tune_samples or budget["eval_samples"])
            tuned = evaluate(module, dm, budget, root, cache)
            result.update(fid_tuned=tuned["fid"], flowmap_rel_error_tuned=tuned["flowmap_rel_error"],
                          grids={k: [round(float(t), 4) for t in g] for k, g in grids.items()},
                          tune_seconds=round(time.perf_counter() - start, 1))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
