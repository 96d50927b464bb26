"""Compute (and cache next to the shards) the reference statistics of a dataset split, once.

    python -m flowmap_lit reference --data data/imagenet512 --split train \\
        --feature inception dinov2 --feature-path /models/pt_inception-2015-12-05-6726825d.pth /models/dinov2-large \\
        --vae /models/sd-vae-ft-mse --num 50000 --device cuda

Streams the split's latents (or images) from the shards in order, decodes latents with the local
VAE, and writes one ``fid_ref_{network}_{split}[_{num}].pt`` per feature network into the dataset
directory: exactly the file ``FewStepFID`` and ``python -m flowmap_lit evaluate`` look for with the
same ``feature``/``vae``/``reference_samples`` settings (the key inside names the weights, the
decoder, the split and the data, so a stale file is recomputed, never silently reused). Run it
before a multi-GPU job so that no rank spends the job's time on it.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> list[dict]:
    from flowmap_lit.metrics import build_feature_extractor, dataset_reference_stats, reference_cache_path
    from flowmap_lit.metrics.features import FEATURE_KINDS, DecodedFeatures

    p = argparse.ArgumentParser(prog="python -m flowmap_lit reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset directory (shards + stats.json)")
    p.add_argument("--split", default="train")
    p.add_argument("--feature", nargs="+", default=["inception"], choices=FEATURE_KINDS)
    p.add_argument("--feature-path", nargs="+", default=None, help="one weights path per --feature")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory (latent datasets)")
    p.add_argument("--vae-scaling-factor", type=float, default=1.0)
    p.add_argument("--vae-shift-factor", type=float, default=0.0)
    p.add_argument("--num", type=int, default=None, help="the first NUM samples of the split (default: all)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    paths = args.feature_path or [None] * len(args.feature)
    if len(paths) != len(args.feature):
        p.error(f"{len(args.feature)} --feature kinds but {len(paths)} --feature-path values; give one per kind")
    decoder = None
    if args.vae is not None:
        from flowmap_lit.metrics.decode import LatentDecoder

        decoder = LatentDecoder(args.vae, args.vae_scaling_factor, args.vae_shift_factor).to(args.device)
    rows = []
    for kind, path in zip(args.feature, paths):
        extractor = build_feature_extractor(kind, path).to(args.device)
        net = DecodedFeatures(extractor, decoder) if decoder is not None else extractor
        start = time.perf_counter()
        stats = dataset_reference_stats(args.data, args.split, net, batch_size=args.batch_size, device=args.device,
                                        num_samples=args.num)
        row = {"feature": kind, "file": str(reference_cache_path(args.data, net, args.split, args.num)),
               "num_samples": int(stats["num_samples"]), "seconds": round(time.perf_counter() - start, 1)}
        print(f"{kind}: {row['num_samples']} samples -> {row['file']} ({row['seconds']} s)")
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
