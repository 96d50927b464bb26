"""Export a distilled flow map: safetensors weights and a JSON config (``flowmap_lit.export``), and
optionally a diffusers pipeline.

    python -m flowmap_lit export --ckpt checkpoints/quickstart/last.ckpt --out exported/quickstart \\
        [--schedules checkpoints/quickstart/schedules.json] [--vae DIR]

With ``--vae`` the pipeline (``flowmap_lit.diffusers_pipeline``) steps with diffusers'
``FlowMapEulerDiscreteScheduler`` (its own ``FlowMapGridScheduler`` on diffusers without it), the
tuned grids going in as the scheduler's sigmas: ``FlowMapPipeline`` for a standalone student
(class labels), ``FlowMapTextPipeline`` for an adapter (LoRA) student of an SD3 or FLUX transformer
(prompt embeddings; the base model referenced by its path, as in the export).
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

from flowmap_lit.checkpoints import load_module
from flowmap_lit.export import CONFIG, WEIGHTS, export_flowmap, load_flowmap


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m flowmap_lit export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="FlowMapDistillModule checkpoint written by python -m flowmap_lit fit")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--schedules", default=None, help="tuned grids (python -m flowmap_lit schedule) to ship with it")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory: also write OUT/pipeline")
    p.add_argument("--scaling-factor", type=float, default=None,
                   help="latents are divided by it before decoding; default: 1, or for a text (LoRA) flow map the "
                        "VAE config's scaling_factor")
    p.add_argument("--shift-factor", type=float, default=None,
                   help="text (LoRA) flow maps: added to the latents after the division, before decoding; default: "
                        "the VAE config's shift_factor (0 without one)")
    p.add_argument("--text-encoder", default=None,
                   help="text (LoRA) flow maps: local folder of the text encoders (a diffusers pipeline folder with "
                        "text_encoder*/ and tokenizer*/) that the pipeline encodes prompt strings with")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--allow-pickle", action="store_true", help="load with weights_only=False (trusted files only)")
    p.add_argument("--trust-code", action="store_true", help="build classes the checkpoint names outside flowmap_lit "
                                                             "and torch.optim (trusted files only)")
    args = p.parse_args(argv)
    module = load_module(args.ckpt, use_ema=not args.no_ema, allow_pickle=args.allow_pickle,
                         trust_code=args.trust_code)
    if not hasattr(module, "set_schedules"):
        raise SystemExit(f"error: {args.ckpt} is not a distilled flow map (FlowMapDistillModule)")
    adapter = bool(getattr(module, "shared_student", False))
    if not adapter and (args.shift_factor is not None or args.text_encoder is not None):
        raise SystemExit("error: --shift-factor and --text-encoder are for text (LoRA) flow maps")
    out = export_flowmap(module, args.out, args.schedules)
    print(f"flow map: {out / WEIGHTS}, {out / CONFIG}")
    if args.vae:
        from flowmap_lit.diffusers_pipeline import FlowMapPipeline, FlowMapTextPipeline

        del module  # the pipeline loads the export again (an adapter student: its base model too)
        gc.collect()
        flowmap = load_flowmap(out, trust_code=args.trust_code)
        if adapter:
            pipe = FlowMapTextPipeline.from_flowmap(flowmap, args.vae, scaling_factor=args.scaling_factor,
                                                    shift_factor=args.shift_factor,
                                                    text_encoder_path=(str(Path(args.text_encoder).resolve())
                                                                       if args.text_encoder else None))
        else:
            scaling = 1.0 if args.scaling_factor is None else args.scaling_factor
            pipe = FlowMapPipeline.from_flowmap(flowmap, args.vae, scaling_factor=scaling)
        pipe.save_pretrained(out / "pipeline")
        print(f"diffusers pipeline: {out / 'pipeline'} (scheduler: {type(pipe.scheduler).__name__})")
    return out


if __name__ == "__main__":
    main()
