"""A distilled flow map outside Lightning: safetensors weights, a JSON config, one call to load.

    python -m flowmap_lit.export --ckpt checkpoints/quickstart/last.ckpt --out exported/quickstart \\
        [--schedules checkpoints/quickstart/schedules.json]

writes ``OUT/student.safetensors`` (the EMA student) and ``OUT/flowmap.json`` (the network's class
and arguments, the data normalization and shape, the classes, the guidance scale the student was
evaluated with, the sampler's gamma and the tuned k-step grids). Then, with neither Lightning nor
the training config::

    from flowmap_lit.export import load_flowmap
    fm = load_flowmap("exported/quickstart")
    x = fm.sample(torch.randn(16, *fm.shape), labels, steps=4)    # normalized data space
    images = fm.denormalize(x)

gives the checkpoint's own samples bit for bit for the same noise and grid. For latent data a
diffusers pipeline (``flowmap_lit.pipeline.FlowMapPipeline``) wraps the flow map, a VAE and the
grids (``--vae DIR`` writes it too, to ``OUT/pipeline``). docs/design.md section 11.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from flowmap_lit.flowmap import FlowMap, instantiate
from flowmap_lit.schedule import load_schedules, schedules_doc

FORMAT = "flowmap-lit-flowmap/1"
WEIGHTS, CONFIG = "student.safetensors", "flowmap.json"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exn:
        raise ImportError("exported flow maps are safetensors files: pip install 'flowmap_lit[export]'") from exn
    return safetensors.torch


def student_config(module) -> dict:
    """``{"class_path", "init_args"}`` of a distilled module's student, from its hyperparameters or
    (for a student copied from the teacher) from the teacher's checkpoint."""
    if getattr(module, "shared_student", False):
        raise ValueError("this student is a set of adapters on the teacher's network (e.g. text LoRA); export "
                         "covers standalone students only: merge the adapters into the network first")
    hparams = getattr(module, "checkpoint_hparams", None) or module.hparams
    cfg = hparams.get("student")
    if isinstance(cfg, dict) and "class_path" in cfg:
        return cfg
    teacher_cfg = getattr(module.teacher, "net_config", None)
    if cfg is None and isinstance(teacher_cfg, dict):
        return teacher_cfg
    raise ValueError("the checkpoint records no architecture for its student (it was built in Python, not from a "
                     "config); export needs one: train with `python -m flowmap_lit fit --config ...`")


def flowmap_config(module, schedules: dict[int, tuple[Tensor, float]] | None = None) -> dict:
    scheds = module.schedules if schedules is None else schedules
    return {
        "format": FORMAT,
        "network": student_config(module),
        "num_classes": int(module.num_classes),
        "condition_on_guidance": bool(module.condition_on_guidance),
        "guidance": None if module.guidance == "none" else float(module.eval_guidance),
        "sample_gamma": float(module.sample_gamma),
        "schedules": schedules_doc(scheds),
        "data": getattr(module, "data_info", None) or {},
    }


def export_flowmap(module, out: str | Path, schedules: str | Path | None = None) -> Path:
    """Write ``module``'s student (its weights as loaded: :func:`load_module` puts the EMA in) to ``out``."""
    save_model = _safetensors().save_model
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = flowmap_config(module, load_schedules(schedules) if schedules is not None else None)
    save_model(module.ema_network(), str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(config, indent=1))
    return out


def load_flowmap(path: str | Path, device: str | torch.device = "cpu") -> FlowMap:
    """The :class:`FlowMap` written by :func:`export_flowmap` (or ``python -m flowmap_lit.export``)."""
    load_model = _safetensors().load_model
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} is not an exported flow map (it needs {CONFIG} and {WEIGHTS}); write one "
                                "with `python -m flowmap_lit.export --ckpt CKPT --out DIR`")
    config = json.loads((path / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG} has format {config.get('format')!r}, expected {FORMAT!r}")
    return flowmap_from_config(config, lambda net: load_model(net, str(path / WEIGHTS), device=str(device)), device)


def flowmap_from_config(config: dict, load_weights, device="cpu") -> FlowMap:
    net = instantiate(config["network"])
    load_weights(net)
    grids = config.get("schedules") or {}
    schedules = load_schedules(grids) if grids.get("grids") else {}
    return FlowMap(net, config["num_classes"], config["condition_on_guidance"], config["guidance"],
                   config["sample_gamma"], schedules, config.get("data"), config["network"]).to(device)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m flowmap_lit.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="FlowMapDistillModule checkpoint written by python -m flowmap_lit fit")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--schedules", default=None, help="tuned grids (python -m flowmap_lit.schedule) to ship with it")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory: also write OUT/pipeline")
    p.add_argument("--scaling-factor", type=float, default=1.0, help="latents are divided by it before decoding")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--allow-pickle", action="store_true", help="load with weights_only=False (trusted files only)")
    args = p.parse_args(argv)
    from flowmap_lit.commands.sample import load_module

    module = load_module(args.ckpt, use_ema=not args.no_ema, allow_pickle=args.allow_pickle)
    if not hasattr(module, "set_schedules"):
        raise SystemExit(f"error: {args.ckpt} is not a distilled flow map (FlowMapDistillModule)")
    out = export_flowmap(module, args.out, args.schedules)
    print(f"flow map: {out / WEIGHTS}, {out / CONFIG}")
    if args.vae:
        from flowmap_lit.pipeline import FlowMapPipeline

        pipe = FlowMapPipeline.from_flowmap(load_flowmap(out), args.vae, scaling_factor=args.scaling_factor)
        pipe.save_pretrained(out / "pipeline")
        print(f"diffusers pipeline: {out / 'pipeline'}")
    return out


if __name__ == "__main__":
    main()
