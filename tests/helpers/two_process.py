"""Everything the tests run with 2 CPU processes (gloo), in one process group: 2 processes forked from the
test process (torch and Lightning already imported: a fresh interpreter would import them again, ~10 s),
with the variables torchrun would set, so Lightning joins them instead of launching its own.

``launch(plan, out)``: ``plan["steps"]`` are strategies of ``distributed_step.py`` whose one-step results go
to ``out/{strategy}_{backend}.pt``; ``plan["fits"]`` are ``NAME: ARGS`` run in turn as ``python -m flowmap_lit
fit ARGS``. What each part logs through Lightning (both ranks) goes to ``out/logs/NAME.PID.log``
(``steps`` for the distributed steps).

``two_process_runs`` makes the runs of the tests: the DDP and FSDP2 steps of ``distributed_step.py``; a
tiny flow-matching teacher and its distillation under FSDP2 (teacher and guide read from the teacher's
checkpoint directory), whose data is the fixed global batch of ``distributed_step.py`` so the 2-process
distillation computes the single-process steps (the same config run in one process gives the reference
file); the digits guide config pretraining from scratch; the digits AYF-EMD distillation config, and its
resumption from its sharded checkpoint; the same config with a grid search (ScheduleSearch) at its validation.
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.helpers import ROOT
from tests.helpers.cli import cli, free_port
from tests.helpers.distributed_step import AUX, BACKENDS, FixedBatch, one_step

FSDP2 = ROOT / "configs/strategies/fsdp2.yaml"


class FixedDigitsBatch(FixedBatch):
    """``FixedBatch`` with the data description that checkpoints record for sampling (``data_info``)."""

    stats = {"shape": [1, 8, 8], "num_classes": 10}


COMMON = """\
seed_everything: 0
trainer:
  max_steps: 2
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  callbacks:
    - class_path: flowmap_lit.callbacks.EMA
      init_args: {decay: 0.9, warmup: false}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: %s, save_last: true, save_top_k: 0, every_n_train_steps: 2}
data:
  class_path: tests.helpers.two_process.FixedDigitsBatch
"""

TEACHER = COMMON + """\
model:
  class_path: flowmap_lit.modules.FlowMatchingModule
  init_args:
    num_classes: 10
    optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.01}}
    net:
      class_path: flowmap_lit.networks.EDM2UNet
      init_args: {img_channels: 1, img_resolution: 8, model_channels: 16, channel_mult: [1, 2], num_blocks: 1,
                  attn_resolutions: [4], num_classes: 10}
"""

DISTILL = COMMON + """\
model:
  class_path: flowmap_lit.modules.FlowMapDistillModule
  init_args:
    teacher: {class_path: flowmap_lit.teachers.NetworkTeacher, init_args: {checkpoint: %s}}
    guide: {class_path: flowmap_lit.teachers.NetworkTeacher, init_args: {checkpoint: %s, use_ema: false}}
    objective:  # (the one-pass tangent of tangent_pass: auto on CPU does not run through FSDP2's hooks)
      class_path: flowmap_lit.objectives.AYFEMD
      init_args: {jvp_backend: func, tangent_pass: two_pass}
    guidance: autoguidance
    guidance_min: 1.0
    guidance_max: 2.0
    condition_on_guidance: true
    eval_guidance: 1.5
    num_classes: 10
    warmup_steps: 0
    optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.1, momentum: 0.9}}
"""


def small_eval(dirpath, steps: int = 3, callbacks: str = "") -> str:
    """The digits distillation config made small: ``steps`` steps, a small flow-map error evaluation at the end,
    checkpoints in ``dirpath``, and ``callbacks`` (YAML list items) after the checkpoint callback."""
    return f"""\
trainer:
  max_steps: {steps}
  val_check_interval: {steps}
  limit_val_batches: 1
  num_sanity_val_steps: 0
  logger: false
  callbacks:
    - class_path: flowmap_lit.callbacks.EMA
    - class_path: flowmap_lit.callbacks.FlowMapError
      init_args: {{num_samples: 16, reference_steps: 4, batch_size: 16, step_counts: [1, 2]}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {dirpath}, save_last: true}}
{callbacks}data:
  init_args: {{batch_size: 16, num_workers: 1}}
"""


# The grid search of the 2-process ScheduleSearch test (flow-map error criterion, one validation after 2 steps).
SCHEDULE_SEARCH = {"budget": 8, "num_samples": 16}  # the 2 starting grids and one generation of 6
SCHEDULE_CALLBACK = f"""\
    - class_path: flowmap_lit.callbacks.ScheduleSearch
      init_args: {{step_counts: [2], criterion: flowmap_error, budget: {SCHEDULE_SEARCH["budget"]},
                  num_samples: {SCHEDULE_SEARCH["num_samples"]}, reference_steps: 4}}
"""


def digits_distill_args(teacher_guide, *extra) -> list[str]:
    """``fit`` arguments of configs/digits/distill_ayf_emd.yaml from the ``digits_teacher_guide`` checkpoints."""
    return ["--config", str(ROOT / "configs/digits/distill_ayf_emd.yaml"), *map(str, extra),
            "--model.init_args.teacher.init_args.checkpoint", str(teacher_guide.teacher),
            "--model.init_args.guide.init_args.checkpoint", str(teacher_guide.guide),
            "--data.init_args.root", str(teacher_guide.digits)]


class LogTo:
    """Lightning's messages (both loggers) also into ``path`` while in the block."""

    loggers = ("lightning.pytorch", "lightning.fabric")

    def __init__(self, path: Path) -> None:
        self.handler = logging.FileHandler(path)

    def __enter__(self):
        for name in self.loggers:
            logging.getLogger(name).addHandler(self.handler)
        return logging.getLogger(self.loggers[0])

    def __exit__(self, *exc) -> None:
        for name in self.loggers:
            logging.getLogger(name).removeHandler(self.handler)
        self.handler.close()


def run_plan(plan: dict, out: Path) -> None:
    """One rank's part of ``launch``. Each fit's log ends with the line ``fit done: GLOBAL_RANK: r, MEMBER:
    r+1/world_size`` of its trainer (Lightning logs "Initializing distributed" once, in the first part: the
    later ones use its process group)."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with LogTo(logs / f"steps.{os.getpid()}.log"):
        for strategy in plan["steps"]:
            for backend in BACKENDS + list(AUX):
                result = one_step(strategy, backend)
                if result is not None:
                    torch.save(result, out / f"{strategy}_{backend}.pt")
    for name, args in plan["fits"].items():
        with LogTo(logs / f"{name}.{os.getpid()}.log") as log:
            trainer = cli("fit", *args).trainer
            rank, world = trainer.global_rank, trainer.world_size
            log.info(f"fit done: GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/{world}")


def _rank(rank: int, plan: dict, out: Path, port: int) -> None:
    """A forked rank: torchrun's variables, one intra-op thread (a forked process must not use the OpenMP
    threads of its parent; the networks are tiny anyway), then its part of the plan."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    run_plan(plan, out)


def launch(plan: dict, out: Path) -> dict[str, str]:
    """Runs ``plan`` with 2 forked processes (working directory ``out``); returns each part's log (both ranks)."""
    cwd = os.getcwd()
    os.chdir(out)
    gc.collect()
    gc.freeze()  # the children's garbage collector leaves the inherited objects alone (no copy of their pages)
    try:
        mp.start_processes(_rank, args=(plan, out, free_port()), nprocs=2, start_method="fork")
    finally:
        gc.unfreeze()
        os.chdir(cwd)
    names = ["steps", *plan["fits"]]
    return {name: "".join(p.read_text() for p in sorted((out / "logs").glob(f"{name}.*.log"))) for name in names}


def two_process_runs(tmp: Path, teacher_guide) -> dict:
    """The 2-process runs of the tests (``launch``) and the single-process distillation; returns the
    checkpoints (``teacher``, ``distill``, ``single``, ``digits``: directories but the single-process file),
    the directory of the distributed steps' results (``steps``), the logs (``logs``), the digits guide's
    ``default_root_dir`` (``guide_root``) and ``tmp``."""
    teacher_dir = tmp / "teacher/last.ckpt"
    configs = {"teacher": TEACHER % (tmp / "teacher"),
               "distill": DISTILL % (tmp / "distill", teacher_dir, teacher_dir),
               "single": DISTILL % (tmp / "single", teacher_dir, teacher_dir),
               "small_eval": small_eval(tmp / "digits_ckpt"),
               "schedule_eval": small_eval(tmp / "schedule_ckpt", 2, SCHEDULE_CALLBACK)}
    for name, text in configs.items():
        (tmp / f"{name}.yaml").write_text(text)
    two = ["--config", str(FSDP2), "--trainer.devices", "2"]
    digits = digits_distill_args(teacher_guide, "--config", FSDP2, "--config", tmp / "small_eval.yaml",
                                 "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    fits = {
        "teacher": ["--config", str(tmp / "teacher.yaml"), *two],
        "distill": ["--config", str(tmp / "distill.yaml"), *two],
        "guide": ["--config", str(ROOT / "configs/digits/guide.yaml"), *two, "--trainer.accelerator", "cpu",
                  "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                  "--trainer.callbacks", "[]", "--trainer.logger", "false", "--data.init_args.root",
                  str(tmp / "guide_digits"), "--trainer.default_root_dir", str(tmp / "guide")],
        "digits": digits,
        "digits_resumed": [*digits, "--trainer.max_steps", "4", "--ckpt_path", "last"],
        "schedule": digits_distill_args(teacher_guide, "--config", FSDP2, "--config", tmp / "schedule_eval.yaml",
                                        "--trainer.devices", "2", "--trainer.accelerator", "cpu",
                                        # Adam steps of 0.01 on every weight: a student far enough from the
                                        # teacher that the grids' errors differ by more than rounding
                                        "--model.init_args.optimizer.init_args.lr", "0.01"),
    }
    steps = tmp / "steps"
    steps.mkdir()
    logs = launch({"steps": ["ddp", "fsdp"], "fits": fits}, steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli("fit", "--config", tmp / "single.yaml", "--trainer.devices", "1")
    finally:
        torch.set_num_threads(threads)
    return {"tmp": tmp, "logs": logs, "steps": steps, "teacher": teacher_dir, "distill": tmp / "distill/last.ckpt",
            "single": tmp / "single/last.ckpt", "digits": tmp / "digits_ckpt/last.ckpt", "guide_root": tmp / "guide",
            "schedule": tmp / "schedule_ckpt"}
