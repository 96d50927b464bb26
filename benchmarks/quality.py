"""Small-scale reproduction: flow maps vs consistency models across step counts, plus ablations.

    python benchmarks/quality.py --budget small     # under 15 min on 2 CPU cores
    python benchmarks/quality.py --budget medium    # the quickstart budget per run (several times --budget small)
    python benchmarks/quality.py --arms neural --seeds 0 1 2   # mean and spread over distillation seeds
    python benchmarks/quality.py --arms neural --methods ayf_emd --seeds 0 1 2 --grid-fraction 0 \
        --teacher-ckpt T --guide-ckpt G    # one ablation row on teachers saved by --save-teachers
    python benchmarks/quality.py --arms neural --methods ayf_emd recipe --seeds 0 1 2 \
        --teacher-ckpt T --guide-ckpt G    # the one-step recipe against AYF-EMD, quality and time

On the digits, every method of an arm gets the same budget (steps, batch, seed, learning rate,
student); ``--budget small`` gives the exact arm 600 steps and the (slower) neural arm 400:

- exact arm: the class-conditional Gaussian-mixture teacher (``GMMTeacher``) with its weaker
  mixture as the autoguidance guide, an MLP student: AYF-EMD, AYF-LMD, sCD, and AYF-EMD
  ablations (no tangent normalization, no tangent warmup, CFG instead of autoguidance, no guidance);
- neural arm: the digits U-Net teacher and guide (trained here at the budget's size unless
  ``--teacher-ckpt``/``--guide-ckpt`` are given), student = a copy of the teacher: AYF-EMD,
  AYF-LMD, sCD; ``(t, s)`` pairs 60% at ``s = t``, 25% on the 1/2/4/8-step sampling grids, the
  rest logit-normal(-0.8, 1) (``--diagonal-fraction``, ``--grid-fraction``; chosen on 3 seeds,
  README "What matters for quality"; one seed of the arm takes about 13 min on 2 cores). On request
  (``--methods``): the corrector runs and the one-step recipe (``recipe``: an AYF-LMD base, a GAN stage on
  the student's own 1- and 2-step samples, FID-tuned 2/4/8-step grids, timed as one run; ``recipe_free``:
  the same with no data read).

Each run reports FID (digits classifier features) and the relative flow-map error against the
teacher's 64-step Heun ODE at 1, 2, 4 and 8 steps, next to the teacher's own FID. With several
``--seeds`` every run is repeated per seed (the neural teacher and guide are trained once) and
``summary`` holds each method's mean and standard deviation. Prints one line per run and one JSON
object, and writes ``quality_<budget>.png`` (mean FID and flow-map error versus steps, the
teacher's FID as a dotted line).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402

from flowmap_lit.callbacks import EMA, FewStepFID, FlowMapError  # noqa: E402
from flowmap_lit.data import DigitsDataModule, PriorDataModule  # noqa: E402
from flowmap_lit.grid_search import HELD_OUT_SEED, fid_criterion, held_out_inputs, search_grid  # noqa: E402
from flowmap_lit.metrics import FID, build_feature_extractor, dataset_reference_stats  # noqa: E402
from flowmap_lit.modules import (  # noqa: E402
    AdversarialFinetuneModule,
    DistributionMatchingModule,
    FlowMapDistillModule,
    FlowMatchingModule,
)
from flowmap_lit.networks import MLP, Discriminator, build_network  # noqa: E402
from flowmap_lit.objectives import AYFEMD, AYFLMD, SCD, DistributionMatching, RpGAN  # noqa: E402
from flowmap_lit.teachers import GMMTeacher, NetworkTeacher  # noqa: E402
from flowmap_lit.time_pairs import TimePairSampler  # noqa: E402

BUDGETS = {  # distillation steps per run (exact / neural arm), batch, warmup, teacher/guide pretraining, eval samples
    # (and Heun steps of the teacher's reference ODE, 64 unless given)
    "tiny": dict(steps=20, neural_steps=20, batch=64, warmup=10, teacher_steps=30, guide_steps=10, eval_samples=100,
                 reference_steps=8),  # a smoke budget: an 8-step teacher reference
    "small": dict(steps=600, neural_steps=400, batch=128, warmup=200, teacher_steps=1000, guide_steps=300,
                  eval_samples=1000),
    "medium": dict(steps=2000, neural_steps=2000, batch=256, warmup=700, teacher_steps=3000, guide_steps=600,
                   eval_samples=2000),
}
STEPS = [1, 2, 4, 8]


def trainer(max_steps: int, callbacks: list, out: Path) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      default_root_dir=str(out), accelerator="cpu", devices=1)


def evaluate(module, dm, budget, data_root: Path, cache: dict) -> dict:
    """FID and flow-map error at 1/2/4/8 steps of the module as it is (the caller swaps in EMA weights).

    The teacher's reference ODE and its FID depend only on the teacher, the guide and the evaluation
    guidance, so the callbacks that hold them are kept in ``cache`` under that key and reused by
    every run that shares it (their noises and labels are seeded, so reuse changes no number).
    """
    key = (id(module.teacher), id(module.guide), module.guidance, module.eval_guidance)
    reference = budget.get("reference_steps", 64)
    if key not in cache:
        cache[key] = (
            FlowMapError(step_counts=STEPS, num_samples=budget["eval_samples"], reference_steps=reference,
                         print_table=False),
            FewStepFID(feature_path=str(data_root / "classifier.pt"), train_if_missing=True, step_counts=STEPS,
                       num_samples=budget["eval_samples"], print_table=False, teacher_steps=reference))
    fme, fid = cache[key]
    t = trainer(0, [fme, fid], data_root.parent)
    t.strategy.connect(module)
    t.datamodule = dm
    fid.setup(t, module, "validate")
    rows_fme, rows_fid = fme.evaluate(t, module), fid.evaluate(t, module)
    return {"fid": [r["fid"] for r in rows_fid], "flowmap_rel_error": [r["relative_error"] for r in rows_fme],
            "teacher_fid": fid.teacher_fid}


def distill(name: str, module: FlowMapDistillModule, dm, budget, data_root: Path, seed: int, steps: int,
            cache: dict) -> dict:
    pl.seed_everything(seed, verbose=False)
    ema = EMA(decay=0.995)
    start = time.perf_counter()
    trainer(steps, [ema], data_root.parent).fit(module, dm)
    seconds = time.perf_counter() - start
    with ema.averaged(module):
        result = evaluate(module, dm, budget, data_root, cache)
    result.update(method=name, seed=seed, train_seconds=round(seconds, 1))
    print(f"{name:<34} FID {' '.join(f'{v:7.2f}' for v in result['fid'])}   rel. error "
          f"{' '.join(f'{v:.4f}' for v in result['flowmap_rel_error'])}   ({seconds:.0f} s)", flush=True)
    return result


def exact_arm(budget, data_root: Path, seed: int, lr: float, cache: dict) -> list[dict]:
    if "exact teachers" not in cache:  # fitted once; kept alive so that their ids key the evaluation cache
        cache["exact teachers"] = (GMMTeacher(str(data_root), num_components=2),
                                   GMMTeacher(str(data_root), num_components=1, covariance_scale=1.5))
    teacher, guide = cache["exact teachers"]
    dm = DigitsDataModule(root=str(data_root), batch_size=budget["batch"], num_workers=1)
    opt = lambda p: torch.optim.Adam(p, lr=lr)  # noqa: E731

    def module(objective, guidance="autoguidance", warmup=budget["warmup"]):
        pl.seed_everything(seed, verbose=False)
        return FlowMapDistillModule(
            teacher, objective, student=MLP(num_classes=10), guide=guide if guidance == "autoguidance" else None,
            guidance=guidance, guidance_min=1.0 if guidance != "none" else 1.0,
            guidance_max=2.0 if guidance != "none" else 1.0, condition_on_guidance=guidance != "none",
            eval_guidance=1.5 if guidance != "none" else None, num_classes=10, warmup_steps=warmup,
            init_student_from_teacher=False, optimizer=opt)

    runs = [
        ("exact: AYF-EMD", module(AYFEMD())),
        ("exact: AYF-LMD", module(AYFLMD())),
        ("exact: sCD", module(SCD())),
        ("exact: AYF-EMD, no tangent norm", module(AYFEMD(tangent_norm="none"))),
        ("exact: AYF-EMD, no tangent warmup", module(AYFEMD(), warmup=0)),
        ("exact: AYF-EMD, CFG", module(AYFEMD(), guidance="cfg")),
        ("exact: AYF-EMD, no guidance", module(AYFEMD(), guidance="none")),
    ]
    out = []
    for name, m in runs:
        if "sCD" in name:
            m.sample_gamma = 1.0  # consistency multistep sampling
        out.append(distill(name, m, dm, budget, data_root, seed, budget["steps"], cache))
    return out


def train_flow_matching(make_net, steps: int, dm, data_root: Path, seed: int) -> NetworkTeacher:
    """Trains ``make_net()`` by flow matching. The seed is set before the network is built: its initial
    weights come from the global RNG, so building it first made the teacher depend on whatever the
    process had drawn before (two processes with one seed trained different teachers)."""
    pl.seed_everything(seed, verbose=False)
    net = make_net()
    module = FlowMatchingModule(net, num_classes=10, lr_warmup_steps=min(200, steps // 5),
                                optimizer=lambda p: torch.optim.Adam(p, lr=2e-3))
    ema = EMA(decay=0.999)
    trainer(steps, [ema], data_root.parent).fit(module, dm)
    with ema.averaged(module):
        net_copy = {k: v.clone() for k, v in module.net.state_dict().items()}
    module.net.load_state_dict(net_copy)
    return NetworkTeacher(net=module.net, num_classes=10)


TEACHER_ARCH, GUIDE_ARCH = {}, {"model_channels": 16}  # overrides of the tiny U-Net preset


def save_teacher(teacher: NetworkTeacher, overrides: dict, path: Path) -> None:
    """A checkpoint ``NetworkTeacher(path)`` reads (network config + weights), as the CLI writes them."""
    from flowmap_lit.networks.presets import UNET_PRESETS

    net = teacher.network
    config = {"class_path": f"{type(net).__module__}.{type(net).__name__}",
              "init_args": {**UNET_PRESETS["tiny"], **overrides}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"net": config, "num_classes": 10}}, path)


def neural_teachers(budget, data_root: Path, seed: int, teacher_ckpt: str | None,
                    guide_ckpt: str | None, save_dir: str | None = None) -> tuple[NetworkTeacher, NetworkTeacher]:
    """The digits U-Net teacher and its smaller guide: loaded, or trained here with ``seed`` (and
    saved to ``save_dir``, so that other runs can share them through ``--teacher-ckpt``/``--guide-ckpt``)."""
    dm_fm = DigitsDataModule(root=str(data_root), batch_size=128, num_workers=1)
    start = time.perf_counter()
    teacher = NetworkTeacher(teacher_ckpt) if teacher_ckpt else train_flow_matching(
        lambda: build_network("unet", "tiny", **TEACHER_ARCH), budget["teacher_steps"], dm_fm, data_root, seed)
    guide = NetworkTeacher(guide_ckpt) if guide_ckpt else train_flow_matching(
        lambda: build_network("unet", "tiny", **GUIDE_ARCH), budget["guide_steps"], dm_fm, data_root, seed)
    if save_dir:
        save_teacher(teacher, TEACHER_ARCH, Path(save_dir) / "teacher.ckpt")
        save_teacher(guide, GUIDE_ARCH, Path(save_dir) / "guide.ckpt")
    print(f"neural teacher and guide ready ({time.perf_counter() - start:.0f} s)", flush=True)
    return teacher, guide


def neural_settings(guide: NetworkTeacher, budget: dict, lr: float, diagonal_fraction: float = 0.6,
                    grid_fraction: float = 0.25, one_fraction: float = 0.0) -> dict:
    """The neural arm's distillation arguments, shared by every method (and benchmarks/second_stage.py):
    autoguidance from ``guide`` with scales in [1, 2] (1.5 at evaluation), the pair mix, Adam at ``lr``
    after the budget's warmup."""
    return dict(guide=guide, guidance="autoguidance", guidance_min=1.0, guidance_max=2.0,
                condition_on_guidance=True, eval_guidance=1.5, num_classes=10, warmup_steps=budget["warmup"],
                time_sampler=TimePairSampler(diagonal_fraction=diagonal_fraction, grid_fraction=grid_fraction,
                                             one_fraction=one_fraction),
                optimizer=lambda p: torch.optim.Adam(p, lr=lr))


NEURAL_METHODS = ("ayf_emd", "ayf_lmd", "scd", "ayf_emd_dm", "ayf_emd_dm_free", "recipe", "recipe_free")

# The one-step recipe (docs/results.md): AYF-LMD for a quarter of the budget's steps, then a GAN stage on the
# student's own 1- and 2-step samples (two thirds 1-step), then the 2/4/8-step grids tuned on held-out FID.
# Data-free (as measured): the base for the whole budget with its noisy points from the student's own jump, the
# reals from a pool of guided teacher samples the size of the digits' training split, a lower student rate.
RECIPE = dict(base_fraction=0.25, batches=300, lr=1e-3, adv_steps=[1, 1, 2], penalty_every=1, tune_steps=[2, 4, 8],
              tune_budget=14, tune_fraction=1.0)
RECIPE_FREE = dict(RECIPE, base_fraction=1.0, lr=3e-4, pool=1497)


def save_student(module, ema: EMA, path) -> None:
    """The module's EMA student weights, as a checkpoint ``init_checkpoint`` reads."""
    with ema.averaged(module):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {f"student.{k}": v for k, v in module.student.state_dict().items()}}, path)


def gan_stage(teacher: NetworkTeacher, objective, base: str, common: dict, *, disc_lr: float = 2e-4,
              penalty_every: int = 1, **kwargs) -> AdversarialFinetuneModule:
    """The neural arm's GAN stage on the student saved in ``base``: RpGAN (R1 = R2 = 1) with the digits
    discriminator at Adam ``disc_lr`` (betas 0, 0.99); ``common`` and ``kwargs`` go to the module."""
    return AdversarialFinetuneModule(
        teacher=teacher, objective=objective, init_checkpoint=base,
        discriminator=Discriminator(img_channels=1, img_resolution=8, channels=[64, 128], num_classes=10),
        adversarial=RpGAN(r1_gamma=1.0, r2_gamma=1.0, penalty_every=penalty_every),
        discriminator_optimizer=lambda ps: torch.optim.Adam(ps, lr=disc_lr, betas=(0.0, 0.99)), **kwargs, **common)


def tune_grids(module, dm, root: Path, steps: list[int], budget: int, seed: int, num: int = 1000) -> dict:
    """``{k: grid}`` minimizing the FID of k-step samples from held-out noise (seed ``10_000 + seed``),
    as ``python -m flowmap_lit schedule --criterion fid`` does; the module's grids are set to them."""
    extractor = build_feature_extractor("digits", str(root / "classifier.pt")).to(module.device)
    fid = FID(extractor).to(module.device)
    fid.set_reference(dataset_reference_stats(str(root), "train", extractor, device=module.device))
    noise, labels = held_out_inputs(module, num, HELD_OUT_SEED + seed, tuple(dm.shape))
    criterion = fid_criterion(module, noise, labels, fid, to_data=dm.denormalize)
    grids = {k: search_grid(criterion, k, budget, seed).grid for k in steps}
    module.schedules = {k: (grid, 0.0) for k, grid in grids.items()}
    return grids


def one_step_recipe(name: str, teacher: NetworkTeacher, guide: NetworkTeacher, dm, budget, data_root: Path,
                    seed: int, lr: float, cache: dict, settings: dict, free: bool, diagonal_fraction: float = 0.6,
                    grid_fraction: float = 0.25) -> dict:
    """The one-step recipe as one timed run: the AYF-LMD base (the arm's settings, ``lr``, for
    ``settings["base_fraction"]`` of the budget's steps), the GAN stage (``settings``) from its EMA weights with
    a fresh EMA, and the grid search (``tune_budget`` FID evaluations per step count on held-out noises,
    ``tune_fraction`` times the budget's evaluation samples). ``train_seconds`` is the three together
    (``base_seconds``, ``stage_seconds``, ``search_seconds``); the evaluations are not counted. ``fid`` is with
    the tuned grids, ``fid_uniform`` before them."""
    common = {**neural_settings(guide, budget, lr, diagonal_fraction, grid_fraction), "noise_seed": seed}
    states = "student" if free else "data"
    data = PriorDataModule(dm, batch_size=budget["batch"]) if free else dm  # labels only: no data read
    pl.seed_everything(seed, verbose=False)
    base = FlowMapDistillModule(teacher, AYFLMD(), states=states, **common)
    ema = EMA(decay=0.995)
    start = time.perf_counter()
    trainer(round(budget["neural_steps"] * settings["base_fraction"]), [ema], data_root.parent).fit(base, data)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "base.ckpt"
        save_student(base, ema, path)
        base_seconds = time.perf_counter() - start
        pl.seed_everything(seed, verbose=False)
        stage_common = {**common, "warmup_steps": 0,
                        "optimizer": lambda ps: torch.optim.Adam(ps, lr=settings["lr"])}
        module = gan_stage(teacher, AYFLMD(), str(path), stage_common, states=states,
                           penalty_every=settings["penalty_every"], adv_steps=settings["adv_steps"],
                           adv_real="teacher" if free else "data",
                           adv_real_pool=settings.get("pool", 0))
    del base
    ema = EMA(decay=0.995)
    start = time.perf_counter()
    trainer(2 * settings["batches"], [ema], data_root.parent).fit(module, data)  # both optimizers' steps count
    stage_seconds = time.perf_counter() - start
    with ema.averaged(module):
        uniform = evaluate(module, dm, budget, data_root, cache)
        start = time.perf_counter()
        grids = tune_grids(module, dm, data_root, settings["tune_steps"], settings["tune_budget"], seed,
                           round(budget["eval_samples"] * settings["tune_fraction"]))
        search_seconds = time.perf_counter() - start
        result = evaluate(module, dm, budget, data_root, cache)
    seconds = base_seconds + stage_seconds + search_seconds
    result.update(method=name, seed=seed, train_seconds=round(seconds, 1), base_seconds=round(base_seconds, 1),
                  stage_seconds=round(stage_seconds, 1), search_seconds=round(search_seconds, 1),
                  fid_uniform=uniform["fid"], flowmap_rel_error_uniform=uniform["flowmap_rel_error"],
                  grids={k: [round(float(t), 4) for t in g] for k, g in grids.items()}, settings=settings)
    print(f"{name:<34} FID {' '.join(f'{v:7.2f}' for v in result['fid'])}   rel. error "
          f"{' '.join(f'{v:.4f}' for v in result['flowmap_rel_error'])}   ({seconds:.0f} s: base {base_seconds:.0f}, "
          f"stage {stage_seconds:.0f}, search {search_seconds:.0f})", flush=True)
    return result


def neural_arm(budget, data_root: Path, seed: int, lr: float, teacher: NetworkTeacher, guide: NetworkTeacher,
               cache: dict, diagonal_fraction: float = 0.6, grid_fraction: float = 0.25,
               methods: tuple[str, ...] = ("ayf_emd", "ayf_lmd", "scd"), corrector: dict | None = None,
               recipe: dict | None = None) -> list[dict]:
    """The neural arm's runs. ``ayf_emd_dm``: AYF-EMD for the budget's steps, then ``corrector["batches"]``
    batches with the distribution-matching corrector mixed in (DistributionMatchingModule, dm_start);
    ``ayf_emd_dm_free``: the same run data-free (states: student, labels only from PriorDataModule);
    ``recipe`` / ``recipe_free``: the one-step recipe (``RECIPE`` / ``RECIPE_FREE``, with the values of
    ``recipe`` that are not None in their place)."""
    dm = DigitsDataModule(root=str(data_root), batch_size=budget["batch"], num_workers=1)
    corrector = corrector or {}
    common = neural_settings(guide, budget, lr, diagonal_fraction, grid_fraction)
    out = []
    for key, name, objective, gamma in (("ayf_emd", "neural: AYF-EMD", AYFEMD(), 0.0),
                                        ("ayf_lmd", "neural: AYF-LMD", AYFLMD(), 0.0),
                                        ("scd", "neural: sCD", SCD(), 1.0)):
        if key not in methods:
            continue
        pl.seed_everything(seed, verbose=False)
        m = FlowMapDistillModule(teacher, objective, sample_gamma=gamma, **common)
        out.append(distill(name, m, dm, budget, data_root, seed, budget["neural_steps"], cache))
    for key, name, states in (("ayf_emd_dm", "neural: AYF-EMD + corrector", "data"),
                              ("ayf_emd_dm_free", "neural: AYF-EMD + corrector, data-free", "student")):
        if key not in methods:
            continue
        pl.seed_everything(seed, verbose=False)
        extra = int(corrector.get("batches", budget["neural_steps"]))
        m = DistributionMatchingModule(
            teacher=teacher, objective=AYFEMD(), states=states, fake_init=corrector.get("fake_init", "teacher"),
            corrector=DistributionMatching(r_min=corrector.get("r_min", 0.02), r_max=corrector.get("r_max", 0.98)),
            dm_weight=corrector.get("weight", 0.1), dm_steps=corrector.get("steps", [1]),
            dm_start=budget["neural_steps"], fake_updates=corrector.get("fake_updates", 1),
            dm_lr_scale=corrector.get("lr_scale", 1.0),
            fake_optimizer=lambda p: torch.optim.Adam(p, lr=corrector.get("fake_lr", lr)), **common)
        data = dm if states == "data" else PriorDataModule(dm, batch_size=budget["batch"])
        steps = budget["neural_steps"] + extra  # global_step counts batches (the student's steps)
        out.append(distill(name, m, data, budget, data_root, seed, steps, cache))
    for key, name, settings, free in (("recipe", "neural: one-step recipe", RECIPE, False),
                                      ("recipe_free", "neural: one-step recipe, data-free", RECIPE_FREE, True)):
        if key in methods:
            settings = {**settings, **{k: v for k, v in (recipe or {}).items() if v is not None and k in settings}}
            out.append(one_step_recipe(name, teacher, guide, dm, budget, data_root, seed, lr, cache, settings, free,
                              diagonal_fraction, grid_fraction))
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        style = "--" if "sCD" in r["method"] else ":" if "," in r["method"] else "-"
        axes[0].plot(STEPS, r["fid"], style, marker="o", label=r["method"])
        axes[1].plot(STEPS, r["flowmap_rel_error"], style, marker="o", label=r["method"])
    for teacher_fid in sorted({r["teacher_fid"] for r in results}):
        axes[0].axhline(teacher_fid, color="gray", lw=0.8, ls=":")
        axes[0].annotate(f"teacher ODE {teacher_fid:.2f}", (STEPS[-1], teacher_fid), fontsize=7, color="gray",
                         ha="right", va="bottom")
    for ax, label in zip(axes, ["FID (digits features)", "relative flow-map error"]):
        ax.set(xscale="log", xlabel="sampling steps", ylabel=label, yscale="log")
        ax.minorticks_off()
        ax.set_xticks(STEPS, [str(k) for k in STEPS])
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(results: list[dict]) -> list[dict]:
    """Per method (in first-seen order): mean and standard deviation over seeds of FID and error (and of the
    recipes' FID on uniform grids), and the mean training seconds."""
    import statistics

    methods = list(dict.fromkeys(r["method"] for r in results))
    out = []
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        row = {"method": method, "seeds": [r["seed"] for r in runs], "teacher_fid": runs[0]["teacher_fid"]}
        for key in ("fid", "flowmap_rel_error", "fid_uniform"):
            if key not in runs[0]:
                continue
            columns = list(zip(*(r[key] for r in runs)))
            row[key] = [statistics.fmean(c) for c in columns]
            row[key + "_std"] = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns]
        row["train_seconds"] = round(statistics.fmean(r["train_seconds"] for r in runs), 1)
        out.append(row)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", default="small", choices=sorted(BUDGETS))
    p.add_argument("--data", default="data/digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="distillation seeds (the neural teacher and guide are trained once, with the first)")
    p.add_argument("--lr", type=float, default=3e-4, help="distillation learning rate (every method)")
    p.add_argument("--diagonal-fraction", type=float, default=0.6,
                   help="neural arm: fraction of (t, s) pairs at s = t (every method; the quickstart uses 0.75)")
    p.add_argument("--grid-fraction", type=float, default=0.25,
                   help="neural arm: fraction of sampling-grid pairs (t_i, t_i+1) of the 1/2/4/8-step grids")
    p.add_argument("--arms", nargs="+", default=["exact", "neural"], choices=["exact", "neural"])
    p.add_argument("--methods", nargs="+", default=["ayf_emd", "ayf_lmd", "scd"], choices=list(NEURAL_METHODS),
                   help="neural arm: the methods to run (ayf_emd_dm: with the corrector after the budget's steps; "
                        "ayf_emd_dm_free: the same, data-free; recipe: the one-step recipe, AYF-LMD then a GAN "
                        "stage then tuned grids, timed as one run; recipe_free: the same, data-free)")
    p.add_argument("--dm-batches", type=int, default=None,
                   help="neural arm, corrector methods: batches with the corrector after the budget's steps")
    p.add_argument("--dm-weight", type=float, default=0.1, help="corrector methods: weight of the corrector")
    p.add_argument("--dm-steps", type=int, nargs="+", default=[1],
                   help="corrector methods: step counts of the student samples it acts on")
    p.add_argument("--dm-fake-lr", type=float, default=None, help="corrector methods: the fake velocity's lr")
    p.add_argument("--dm-lr-scale", type=float, default=1.0,
                   help="corrector methods: factor on the student's lr once the corrector starts (dm_lr_scale)")
    p.add_argument("--dm-fake-init", default="teacher", choices=["teacher", "student"],
                   help="corrector methods: the fake velocity starts as the teacher or as the student")
    p.add_argument("--dm-fake-updates", type=int, default=1, help="corrector methods: fake steps per batch")
    p.add_argument("--recipe-batches", type=int, default=None,
                   help=f"recipe methods: batches of the GAN stage (default {RECIPE['batches']})")
    p.add_argument("--recipe-base-fraction", type=float, default=None,
                   help=f"recipe methods: the base's share of the budget's steps (default {RECIPE['base_fraction']})")
    p.add_argument("--recipe-penalty-every", type=int, default=None,
                   help="recipe methods: R1/R2 penalties on every this many discriminator steps (default 1)")
    p.add_argument("--recipe-tune-fraction", type=float, default=None,
                   help="recipe methods: the search's held-out noises, a share of the evaluation's samples (default 1)")
    p.add_argument("--recipe-tune-budget", type=int, default=None,
                   help=f"recipe methods: FID evaluations of the grid search per step count (default "
                        f"{RECIPE['tune_budget']})")
    p.add_argument("--recipe-pool", type=int, default=None,
                   help=f"recipe_free: teacher samples in the pool of reals (default {RECIPE_FREE['pool']})")
    p.add_argument("--teacher-ckpt", default=None)
    p.add_argument("--guide-ckpt", default=None)
    p.add_argument("--save-teachers", default=None,
                   help="neural arm: write the trained teacher.ckpt and guide.ckpt here")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    budget = BUDGETS[args.budget]
    data_root = Path(args.data).resolve()
    DigitsDataModule(root=str(data_root)).prepare_data()
    start = time.perf_counter()
    results, cache = [], {}
    teachers = None
    if "neural" in args.arms:
        teachers = neural_teachers(budget, data_root, args.seeds[0], args.teacher_ckpt, args.guide_ckpt,
                                   args.save_teachers)
    for seed in args.seeds:
        if "exact" in args.arms:
            results += exact_arm(budget, data_root, seed, args.lr, cache)
        if teachers is not None:
            corrector = {"weight": args.dm_weight, "steps": args.dm_steps, "fake_lr": args.dm_fake_lr or args.lr,
                         "lr_scale": args.dm_lr_scale, "fake_init": args.dm_fake_init,
                         "fake_updates": args.dm_fake_updates}
            if args.dm_batches is not None:
                corrector["batches"] = args.dm_batches
            results += neural_arm(budget, data_root, seed, args.lr, *teachers, cache, args.diagonal_fraction,
                                  args.grid_fraction, tuple(args.methods), corrector,
                                  {"batches": args.recipe_batches, "tune_budget": args.recipe_tune_budget,
                                   "pool": args.recipe_pool, "base_fraction": args.recipe_base_fraction,
                                   "penalty_every": args.recipe_penalty_every,
                                   "tune_fraction": args.recipe_tune_fraction})
    summary_rows = summarize(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(summary_rows, out / f"quality_{args.budget}.png")
    summary = {"budget": args.budget, **budget, "seeds": args.seeds, "lr": args.lr, "steps_evaluated": STEPS,
               "diagonal_fraction": args.diagonal_fraction, "grid_fraction": args.grid_fraction,
               "seconds": round(time.perf_counter() - start), "summary": summary_rows, "results": results,
               "plot": str(out / f"quality_{args.budget}.png")}
    (out / f"quality_{args.budget}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
