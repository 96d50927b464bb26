"""Sample from a trained checkpoint: PNG grids and an ``.npz`` per run.

    python -m flowmap_lit sample --ckpt checkpoints/quickstart/last.ckpt --steps 1 2 4 8 \\
        --num 100 --guidance 1.5 --seed 0 --out samples/quickstart

Works for ``FlowMapDistillModule`` checkpoints (k-step flow-map or gamma sampling) and for
``FlowMatchingModule`` checkpoints (k-step Heun ODE; ``--guidance`` is the CFG scale). The module
is rebuilt from the hyperparameters stored in the checkpoint (so relative paths in it, such as a
teacher's ``data_root``, resolve against the current directory), with the EMA weights by default.

Text-to-image checkpoints take their prompts as precomputed embeddings: ``--prompts FILE.npz``
(``prompt_embeds`` (P, L, D) and ``pooled_prompt_embeds`` (P, D'), as a diffusers pipeline's
``encode_prompt`` returns them; the dataset names ``text_emb``/``text_pooled`` and the transformer's
``encoder_hidden_states``/``pooled_projections`` work too) or ``--prompts val`` (the stored
embeddings of the checkpoint's dataset's validation split); sample ``i`` takes prompt ``i % P``.
``--vae DIR`` decodes latent samples for the PNG grids (and adds ``images_{k}step`` to the npz).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from flowmap_lit.callbacks.sample_grid import make_grid, save_png, to_images
from flowmap_lit.checkpoints import checkpoint_data_root, load_module
from flowmap_lit.commands.common import count_type, steps_type, warn_guidance
from flowmap_lit.flowmap import denormalize  # noqa: F401 - also this module's public name (notebook, evaluate)
from flowmap_lit.generate import generate, load_prompts


def use_schedules(module, path: str) -> None:
    """Sample ``module`` on the tuned grids of ``path`` (a file of ``python -m flowmap_lit schedule``)."""
    if not hasattr(module, "set_schedules"):
        raise SystemExit(f"error: --schedules needs a distilled flow map; {type(module).__name__} samples its ODE "
                         "with a fixed solver grid")
    module.set_schedules(path)


def main(argv: list[str] | None = None) -> dict[int, Path]:
    p = argparse.ArgumentParser(prog="python -m flowmap_lit sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by python -m flowmap_lit fit (file or sharded "
                                                 "directory)")
    p.add_argument("--steps", type=steps_type, nargs="+", default=[1, 2, 4, 8], help="step counts (NFE for flow maps)")
    p.add_argument("--num", type=count_type, default=100, help="samples per step count")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale lam (default: the module's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (same noise for every step count)")
    p.add_argument("--out", default="samples", help="output directory")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--allow-pickle", action="store_true", help="load with weights_only=False (trusted files only)")
    p.add_argument("--schedules", default=None, help="tuned grids from python -m flowmap_lit schedule (default: "
                                                     "the checkpoint's, else uniform)")
    p.add_argument("--prompts", default=None, help="text checkpoints: an .npz of prompt embeddings, or 'val' (the "
                                                   "dataset's validation prompts)")
    p.add_argument("--data", default=None, help="--prompts val: the dataset root (default: the checkpoint's)")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory: decode latents for the PNGs")
    p.add_argument("--vae-scaling-factor", type=float, default=1.0)
    p.add_argument("--vae-shift-factor", type=float, default=0.0)
    p.add_argument("--trust-code", action="store_true", help="build classes the checkpoint names outside flowmap_lit "
                                                             "and torch.optim (trusted files only)")
    args = p.parse_args(argv)
    module = load_module(args.ckpt, use_ema=not args.no_ema, map_location=args.device, allow_pickle=args.allow_pickle,
                         trust_code=args.trust_code)
    if args.schedules:
        use_schedules(module, args.schedules)
    prompts = None
    if args.prompts:
        root = args.data or (checkpoint_data_root(args.ckpt) if args.prompts == "val" else None)
        prompts = load_prompts(args.prompts, module, root)
    warn_guidance(module, args.guidance)
    noise, labels, samples = generate(module, args.num, args.steps, args.guidance, args.seed, prompts=prompts)
    decoder = None
    if args.vae:
        from flowmap_lit.metrics.decode import LatentDecoder

        decoder = LatentDecoder(args.vae, args.vae_scaling_factor, args.vae_shift_factor).to(module.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    arrays = {}
    for k, x in samples.items():
        x = denormalize(x, module.data_info)
        arrays[f"x_{k}step"] = x.cpu().numpy()
        if decoder is not None:
            x = decoder(x)
            arrays[f"images_{k}step"] = x.cpu().numpy()
        paths[k] = out / f"samples_{k}step.png"
        save_png(make_grid(to_images(x)), paths[k], upscale=4 if decoder is None else 1)
        print(f"{k} step(s): {paths[k]}")
    arrays["noise"] = noise.cpu().numpy()
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    if prompts is not None:
        arrays["prompt_index"] = np.arange(args.num) % len(prompts["encoder_hidden_states"])
    np.savez(out / "samples.npz", **arrays)
    print(f"arrays: {out / 'samples.npz'} (keys {sorted(arrays)})")
    return paths


if __name__ == "__main__":
    main()
