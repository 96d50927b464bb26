"""Evaluate checkpoints across step counts: FID / FD_DINOv2, flow-map error, NFE and sampling speed.

    python -m flowmap_lit evaluate --ckpt checkpoints/quickstart/last.ckpt --steps 1 2 4 8

prints one row per step count: NFE (network evaluations per sample: k for a flow map, 2k for a
Heun teacher), Fréchet distances against the data's reference statistics (digits classifier
features by default; ``--feature inception dinov2 --feature-path WEIGHTS DIR`` for real images,
``--vae DIR`` to decode latents first), the flow-map error against the teacher's ODE from the same
noise (distilled checkpoints), and samples per second of the sampler alone. ``--json`` also writes
the rows to a file.

Text-conditioned checkpoints sample ``i`` with the stored embeddings of validation prompt
``i % --num-prompts`` of their dataset (``--data``, default the checkpoint's; a prompts-only dataset
of ``prepare text-prompts`` works too), as the training callbacks do; ``--clip DIR`` (a local
transformers CLIP directory) adds the CLIP score of the decoded samples against the prompts' text,
at every step count.

At the scale papers report (50,000 samples per step count), launch it on every GPU (torchrun, or
srun with one task per GPU):

    torchrun --nproc_per_node 8 -m flowmap_lit evaluate --run-dir checkpoints/imagenet512/distill_ayf_emd_s \\
        --num-samples 50000 --feature inception dinov2 --feature-path /models/pt_inception.pth /models/dinov2-large \\
        --vae /models/sd-vae-ft-mse --out-dir eval/distill_ayf_emd_s

Each process generates a contiguous share of the samples (sample ``i``'s noise and label depend
only on ``--seed`` and ``i``), decodes and embeds it, and the float64 feature sums and error sums
are all-reduced: 1 and N processes give the same numbers. ``--run-dir DIR`` evaluates every checkpoint
of a run (``*.ckpt`` files or sharded checkpoint directories, in step order), writing one JSON per
checkpoint and a distance-versus-steps plot into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist

from flowmap_lit.callbacks.flowmap_error import format_table
from flowmap_lit.checkpoints import checkpoint_data_root as _data_root
from flowmap_lit.checkpoints import load_module
from flowmap_lit.commands.common import at_least, steps_type, warn_guidance
from flowmap_lit.commands.sample import use_schedules
from flowmap_lit.data import read_stats
from flowmap_lit.flowmap import denormalize


def launcher_env() -> bool:
    """Whether this process is one of several started by torchrun or srun; for srun, sets the
    variables torch.distributed reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) from SLURM's,
    the way Lightning's ``SLURMEnvironment`` resolves them."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun (or a launcher that sets the variables)
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in os.environ:
        return False
    from lightning.fabric.plugins.environments import SLURMEnvironment

    slurm = SLURMEnvironment(auto_requeue=False)
    os.environ.update(RANK=str(slurm.global_rank()), WORLD_SIZE=str(slurm.world_size()),
                      LOCAL_RANK=str(slurm.local_rank()), MASTER_ADDR=slurm.main_address,
                      MASTER_PORT=str(slurm.main_port))
    return True


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: list[float], device) -> list[float]:
    """Sums over all processes (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _rank_world()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def build_metrics(data_root: str, features: list[str], feature_paths: list[str | None], device,
                  decoder=None, reference_samples: int | None = None) -> dict:
    """``{metric name: FID}`` with reference statistics of ``data_root``'s train split (cached; rank 0
    computes them first when several processes run)."""
    from flowmap_lit.metrics import FID, build_feature_extractor, dataset_reference_stats
    from flowmap_lit.metrics.features import METRIC_NAMES, DecodedFeatures

    rank, world = _rank_world()
    metrics = {}
    for kind, path in zip(features, feature_paths):
        if kind == "digits" and path is None:
            path = str(Path(data_root) / "classifier.pt")
        extractor = build_feature_extractor(kind, path).to(device)
        net = DecodedFeatures(extractor, decoder) if decoder is not None else extractor
        for turn in (0, 1):  # rank 0 computes and caches; then the others read the cache
            if (rank == 0) == (turn == 0):
                stats = dataset_reference_stats(data_root, "train", net, device=device, num_samples=reference_samples)
            if world > 1:
                dist.barrier()
        metric = FID(extractor).to(device)
        metric.set_reference(stats)
        metrics[METRIC_NAMES[kind]] = metric
    return metrics


def dataset_prompts(data_root: str, count: int, shape: list[int] | None = None
                    ) -> tuple[dict[str, torch.Tensor] | None, list[str] | None]:
    """``(embeddings, texts)`` of the first ``count`` validation prompts of ``data_root`` (texts None where the
    dataset stores no prompt text), or ``(None, None)`` for a dataset without text."""
    from flowmap_lit.data import open_datamodule
    from flowmap_lit.metrics.few_step import text_prompts_with_text

    dm = open_datamodule(data_root, shape, num_workers=0, normalize=False)
    dm.setup("validate")
    return text_prompts_with_text(dm, count)


@torch.no_grad()
def evaluate(module, steps: list[int], num: int = 2000, metrics: dict | None = None, reference_steps: int = 128,
             guidance: float | None = None, seed: int = 0, batch_size: int = 500, decoder=None,
             prompts: tuple[dict[str, torch.Tensor] | None, list[str] | None] | None = None) -> list[dict]:
    """Rows ``{steps, nfe, <metric names>, flowmap_rel_error, samples_per_s}`` (None where not
    applicable), over this process's share of ``num`` samples and every other process's.

    ``prompts``: ``(embeddings, texts)`` of text-conditioned modules (``dataset_prompts``); sample ``i``
    takes prompt ``i % P``, and a metric with ``set_prompts`` (the CLIP score) gets each sample's text."""
    from flowmap_lit.metrics.few_step import (
        image_distances,
        prompt_cond,
        prompt_texts,
        rank_share,
        seeded_noise,
        slice_cond,
    )

    rank, world = _rank_world()
    info = getattr(module, "data_info", None) or {}
    if not info.get("shape"):
        raise ValueError("the checkpoint records no data shape (data_info); it was not written by "
                         "python -m flowmap_lit fit")
    share = rank_share(num, rank, world)
    noise, labels = seeded_noise(share, num, tuple(info["shape"]), seed,
                                 getattr(module, "num_classes", 0), labels="balanced")
    embeddings, texts = prompts if prompts is not None else (None, None)
    cond = prompt_cond(embeddings, share, module.device)
    for name, metric in (metrics or {}).items():
        if hasattr(metric, "set_prompts"):
            if texts is None:
                raise ValueError(f"{name} scores samples against their prompts' text: a text-conditioned checkpoint "
                                 "whose dataset stores the prompts (write_dataset(..., prompts=...), prepare "
                                 "text-array with a prompt array, or prepare text-prompts)")
            metric.set_prompts(prompt_texts(texts, share))
    noise = noise.to(module.device)
    labels = labels.to(module.device) if labels is not None else None
    kwargs = {} if guidance is None else {"guidance": guidance}

    def to_images(x):
        x = denormalize(x, module.data_info)
        return decoder(x) if decoder is not None else x

    def draw(sampler, **kw):
        parts = [sampler(noise[i:i + batch_size], labels[i:i + batch_size] if labels is not None else None,
                         **slice_cond(cond, slice(i, i + batch_size)), **kw)
                 for i in range(0, len(noise), batch_size)]
        return torch.cat(parts) if parts else noise

    reference = draw(module.teacher_sample, num_steps=reference_steps, **kwargs) \
        if hasattr(module, "teacher_sample") else None
    heun_teacher = not hasattr(module, "teacher_sample")  # a FlowMatchingModule samples with Heun
    rows = []
    for k in steps:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        start = time.perf_counter()
        x = draw(module.sample, num_steps=k, **kwargs)
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        seconds = max(_all_sum([time.perf_counter() - start], module.device)[0] / world, 1e-12)
        row = {"steps": k, "nfe": 2 * k if heun_teacher else k, **dict.fromkeys(metrics or ["fid"]),
               "flowmap_rel_error": None, "samples_per_s": num / seconds}
        if metrics:
            row.update(image_distances(metrics, x.split(batch_size), to_images))
        if reference is not None:
            err, ref = _all_sum([(x - reference).double().square().sum().item(),
                                 reference.double().square().sum().item()], module.device)
            row["flowmap_rel_error"] = err / ref
        rows.append(row)
    return rows


def _step_of(path: Path) -> int:
    match = re.search(r"step=(\d+)", path.name)
    return int(match.group(1)) if match else -1


def run_checkpoints(run_dir: str) -> list[Path]:
    """Every checkpoint of a run directory (``*.ckpt`` files and sharded ``*.ckpt`` directories), by step."""
    found = sorted(Path(run_dir).glob("*.ckpt"), key=lambda p: (_step_of(p), p.name))
    if not found:
        raise FileNotFoundError(f"no *.ckpt checkpoints in {run_dir}; pass --run-dir the ModelCheckpoint dirpath of a "
                                "run, or --ckpt one checkpoint")
    return found


def _plot(results: dict[str, list[dict]], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        for ckpt, rows in results.items():
            ax.plot([r["steps"] for r in rows], [r[name] for r in rows], "o-", label=ckpt)
        steps = [r["steps"] for r in next(iter(results.values()))]
        ax.set(xscale="log", xticks=steps, xticklabels=steps, xlabel="steps", ylabel=name)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m flowmap_lit evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help="checkpoint written by python -m flowmap_lit fit (file or sharded directory)")
    which.add_argument("--run-dir", dest="run",
                       help="a run's checkpoint directory: evaluate every *.ckpt in it (needs --out-dir)")
    p.add_argument("--out-dir", default=None, help="--run-dir: one JSON per checkpoint and the plot go here")
    p.add_argument("--steps", type=steps_type, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--num-samples", "--num", dest="num", type=at_least(2, "a sample count (FID needs two)"),
                   default=2000,
                   help="samples per step count over all processes (under torchrun spell it --num-samples: "
                        "torchrun takes --num for its own --numa-binding)")
    p.add_argument("--batch-size", type=int, default=500, help="samples per sampler call")
    p.add_argument("--data", default=None, help="dataset root for the distances (default: the checkpoint's)")
    p.add_argument("--no-fid", action="store_true", help="skip the Fréchet distances")
    p.add_argument("--feature", nargs="+", default=["digits"], choices=["digits", "inception", "dinov2"])
    p.add_argument("--feature-path", nargs="+", default=None,
                   help="one weights path per --feature (digits: DATA/classifier.pt)")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory: decode latent samples")
    p.add_argument("--vae-scaling-factor", type=float, default=1.0)
    p.add_argument("--vae-shift-factor", type=float, default=0.0)
    p.add_argument("--reference-samples", type=int, default=None, help="reference statistics from the first N "
                                                                      "training samples (default: all)")
    p.add_argument("--reference-steps", type=int, default=128, help="Heun steps of the teacher reference")
    p.add_argument("--clip", default=None, help="text checkpoints: a local transformers CLIP directory (e.g. "
                                                "models/clip-vit-large-patch14): also the CLIP score of the samples "
                                                "against their prompts' text")
    p.add_argument("--clip-batch-size", type=int, default=64, help="images per CLIP call")
    p.add_argument("--num-prompts", type=int, default=1000, help="text checkpoints: sample i takes validation prompt "
                                                                 "i %% N of the dataset")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when there is a GPU, else cpu")
    p.add_argument("--schedules", default=None, help="tuned grids from python -m flowmap_lit schedule (default: "
                                                     "the checkpoint's, else uniform)")
    p.add_argument("--trust-code", action="store_true", help="build classes the checkpoint names outside flowmap_lit "
                                                             "and torch.optim (trusted files only)")
    args = p.parse_args(argv)
    paths = args.feature_path or [None] * len(args.feature)
    if len(paths) != len(args.feature):
        p.error(f"{len(args.feature)} --feature kinds but {len(paths)} --feature-path values; give one per kind")
    if args.run and not args.out_dir:
        p.error("--run-dir needs --out-dir (one JSON per checkpoint and the plot are written there)")
    started_group = False
    if launcher_env() and not dist.is_initialized():  # torchrun, or one srun task per GPU
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        started_group = True
    rank, world = _rank_world()
    device = args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    ckpts = run_checkpoints(args.run) if args.run else [Path(args.ckpt)]
    decoder = None
    if args.vae and (not args.no_fid or args.clip):
        from flowmap_lit.metrics.decode import LatentDecoder

        decoder = LatentDecoder(args.vae, args.vae_scaling_factor, args.vae_shift_factor).to(device)
    metrics = None
    data_root = args.data or _data_root(str(ckpts[0]))
    stats = {}  # the dataset: its prompts for text checkpoints (not needed otherwise with --no-fid)
    if data_root is not None and (not args.no_fid or args.clip or (Path(data_root) / "stats.json").is_file()):
        stats = read_stats(data_root)
    text = "text" in stats
    if stats.get("kind") == "prompts" and not args.no_fid:
        p.error(f"{data_root} holds prompts only, no latents to take FID reference statistics from: pass --no-fid "
                "(the CLIP score, --clip, needs no reference)")
    if args.clip and not text:
        p.error(f"--clip scores text-conditioned samples against their prompts; the dataset {data_root} has no text")
    if data_root is not None and not args.no_fid:
        metrics = build_metrics(data_root, args.feature, paths, device, decoder, args.reference_samples)
    if args.clip:
        from flowmap_lit.metrics.clip_score import CLIPScore

        metrics = {**(metrics or {}), "clip_score": CLIPScore(args.clip, args.clip_batch_size).to(device)}
    results = {}
    try:
        for ckpt in ckpts:
            module = load_module(str(ckpt), map_location=device, trust_code=args.trust_code)
            if args.schedules:
                use_schedules(module, args.schedules)
            warn_guidance(module, args.guidance)
            prompts = None
            if text:
                shape = (module.data_info or {}).get("shape")
                prompts = dataset_prompts(data_root, min(args.num_prompts, args.num), shape)
            rows = evaluate(module, args.steps, args.num, metrics, args.reference_steps, args.guidance, args.seed,
                            args.batch_size, decoder, prompts)
            results[ckpt.name] = rows
            if rank == 0:
                names = ["steps", "nfe", *(metrics or {}), "flowmap_rel_error", "samples_per_s"]
                print((f"{ckpt}:\n" if args.run else "")
                      + format_table([{k: ("-" if v is None else v) for k, v in r.items()} for r in rows], names))
                if args.out_dir:
                    out = Path(args.out_dir)
                    out.mkdir(parents=True, exist_ok=True)
                    payload = {"checkpoint": str(ckpt), "step": _step_of(ckpt), "num_samples": args.num,
                               "processes": world, "features": args.feature, "vae": args.vae, "rows": rows}
                    (out / f"{ckpt.name.removesuffix('.ckpt')}.json").write_text(json.dumps(payload, indent=2))
        if rank == 0 and args.json:
            Path(args.json).write_text(json.dumps(rows if not args.run else results, indent=2))
        if rank == 0 and args.out_dir and metrics:
            _plot(results, list(metrics), Path(args.out_dir) / "distance_versus_steps.png")
    finally:
        if started_group:
            dist.destroy_process_group()
    return rows if not args.run else results


if __name__ == "__main__":
    main()
