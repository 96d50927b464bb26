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
import importlib
import io
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowmap_lit.callbacks.ema import ema_state_from_checkpoint
from flowmap_lit.callbacks.sample_grid import make_grid, save_png, to_images
from flowmap_lit.flowmap import denormalize  # noqa: F401 - also this module's public name (notebook, evaluate)
from flowmap_lit.teachers import load_checkpoint


def load_module(ckpt_path: str, use_ema: bool = True, map_location: str = "cpu", allow_pickle: bool = False):
    """The LightningModule saved in ``ckpt_path`` (a checkpoint file, or a sharded checkpoint directory),
    in eval mode, with EMA weights when present."""
    ckpt = load_checkpoint(ckpt_path, allow_pickle)
    class_path = ckpt.get("hyper_parameters", {}).get("_class_path")
    if class_path is None:
        raise ValueError(
            f"{ckpt_path} does not record its module class; it was not written by "
            "`python -m flowmap_lit fit`. Load it in Python with YourModule.load_from_checkpoint."
        )
    module_name, _, cls_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    source = ckpt_path
    if Path(ckpt_path).is_dir():  # sharded (FSDP2): Lightning reads the consolidated dict, less the optimizers
        source = io.BytesIO()
        torch.save({k: v for k, v in ckpt.items() if k != "optimizer_states"}, source)
        source.seek(0)
    module = cls.load_from_checkpoint(source, map_location=map_location, weights_only=not allow_pickle)
    shadow = ema_state_from_checkpoint(ckpt) if use_ema else None
    if shadow is not None:
        module.ema_network().load_state_dict(shadow, strict=False)
    module.data_info = ckpt.get("data_info")
    module.checkpoint_hparams = ckpt.get("hyper_parameters", {})  # as written (configs, not the objects built)
    return module.eval()


def checkpoint_data_root(ckpt_path: str) -> str | None:
    """The dataset root recorded in a checkpoint (its data module's ``root``), or None."""
    hp = load_checkpoint(ckpt_path).get("datamodule_hyper_parameters", {})
    return hp.get("root") or hp.get("init_args", {}).get("root")


def use_schedules(module, path: str) -> None:
    """Sample ``module`` on the tuned grids of ``path`` (a file of ``python -m flowmap_lit.schedule``)."""
    if not hasattr(module, "set_schedules"):
        raise SystemExit(f"error: --schedules needs a distilled flow map; {type(module).__name__} samples its ODE "
                         "with a fixed solver grid")
    module.set_schedules(path)


PROMPT_KEYS = {"encoder_hidden_states": ("prompt_embeds", "encoder_hidden_states", "text_emb"),
               "pooled_projections": ("pooled_prompt_embeds", "pooled_projections", "text_pooled")}


def load_prompts(spec: str, module, data_root: str | None = None) -> dict[str, Tensor]:
    """Prompt embeddings ``{"encoder_hidden_states": (P, L, D), "pooled_projections": (P, D')}`` from an
    ``.npz`` file (diffusers' ``encode_prompt`` names or the dataset's) or ``"val"``: the validation
    split of ``data_root`` (default: the checkpoint's dataset)."""
    if spec == "val":
        from flowmap_lit.data import LatentDataModule
        from flowmap_lit.metrics.few_step import text_prompts

        root = data_root
        if root is None:
            raise ValueError("--prompts val needs the dataset: the checkpoint records none, pass --data ROOT")
        dm = LatentDataModule(root=root, num_workers=0, normalize=False)
        dm.setup("predict")
        prompts = text_prompts(dm, 10**9)
        if prompts is None:
            raise ValueError(f"--prompts val: the dataset {root} has no text embeddings")
        return prompts
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {spec}: no such file; pass an .npz of prompt embeddings (prompt_embeds "
                                "(P, L, D) and pooled_prompt_embeds (P, D'), from the pipeline's encode_prompt) "
                                "or 'val'")
    arrays = np.load(path)
    out = {}
    for target, names in PROMPT_KEYS.items():
        found = [n for n in names if n in arrays.files]
        if found:
            out[target] = torch.from_numpy(np.asarray(arrays[found[0]], dtype=np.float32))
    if "encoder_hidden_states" not in out:
        raise ValueError(f"{path} holds {arrays.files}; expected prompt_embeds (P, L, D) (and pooled_prompt_embeds "
                         "(P, D')), or the dataset's text_emb / text_pooled")
    if out["encoder_hidden_states"].ndim == 2:  # one prompt
        out = {k: v[None] for k, v in out.items()}
    return out


@torch.no_grad()
def generate(module, num: int, steps: list[int], guidance: float | None = None, seed: int = 0,
             labels: Tensor | None = None, shape: tuple[int, ...] | None = None,
             batch_size: int = 500, prompts: dict[str, Tensor] | None = None
             ) -> tuple[Tensor, Tensor | None, dict[int, Tensor]]:
    """``(noise, labels, {k: samples})``: the same seeded noise and labels for every step count.

    Labels default to ``arange(num) % num_classes`` (one column per class in a grid); with
    ``prompts`` (text embeddings, see ``load_prompts``) sample ``i`` takes prompt ``i % P``.
    """
    info = getattr(module, "data_info", None) or {}
    shape = tuple(shape or info.get("shape") or ())
    if not shape:
        raise ValueError("the checkpoint records no data shape; pass shape=(C, H, W)")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((num, *shape), generator=gen).to(module.device)
    k_classes = getattr(module, "num_classes", 0)
    if labels is None and k_classes:
        labels = torch.arange(num) % k_classes
    labels = labels.to(module.device) if labels is not None else None
    kwargs = {} if guidance is None else {"guidance": guidance}
    from flowmap_lit.metrics.few_step import prompt_cond, slice_cond

    cond = prompt_cond(prompts, range(num), module.device)
    out = {}
    for k in steps:
        parts = []
        for i in range(0, num, batch_size):
            lab = labels[i:i + batch_size] if labels is not None else None
            parts.append(module.sample(noise[i:i + batch_size], lab, num_steps=k,
                                       **slice_cond(cond, slice(i, i + batch_size)), **kwargs))
        out[k] = torch.cat(parts)
    return noise, labels, out


def main(argv: list[str] | None = None) -> dict[int, Path]:
    p = argparse.ArgumentParser(prog="python -m flowmap_lit sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by python -m flowmap_lit fit (file or sharded "
                                                 "directory)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="step counts (NFE for flow maps)")
    p.add_argument("--num", type=int, default=100, help="samples per step count")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale lam (default: the module's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (same noise for every step count)")
    p.add_argument("--out", default="samples", help="output directory")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--allow-pickle", action="store_true", help="load with weights_only=False (trusted files only)")
    p.add_argument("--schedules", default=None, help="tuned grids from python -m flowmap_lit.schedule (default: "
                                                     "the checkpoint's, else uniform)")
    p.add_argument("--prompts", default=None, help="text checkpoints: an .npz of prompt embeddings, or 'val' (the "
                                                   "dataset's validation prompts)")
    p.add_argument("--data", default=None, help="--prompts val: the dataset root (default: the checkpoint's)")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory: decode latents for the PNGs")
    p.add_argument("--vae-scaling-factor", type=float, default=1.0)
    p.add_argument("--vae-shift-factor", type=float, default=0.0)
    args = p.parse_args(argv)
    module = load_module(args.ckpt, use_ema=not args.no_ema, map_location=args.device, allow_pickle=args.allow_pickle)
    if args.schedules:
        use_schedules(module, args.schedules)
    prompts = None
    if args.prompts:
        root = args.data or (checkpoint_data_root(args.ckpt) if args.prompts == "val" else None)
        prompts = load_prompts(args.prompts, module, root)
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
