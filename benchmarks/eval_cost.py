"""What a Fréchet-distance evaluation of latent samples costs per sample: VAE decode + features.

    python benchmarks/eval_cost.py --resolution 512 --batch 4 --device cuda

Builds the real-size networks with random weights (nothing is downloaded; cost does not depend on
the weights): the SD-VAE decoder (``stabilityai/sd-vae-ft-mse``'s configuration, 4-channel latents
at 1/8 of the resolution), the FID Inception-v3 (``flowmap_lit/metrics/inception.py``) and DINOv2
ViT-L/14 (``facebook/dinov2-large``'s configuration), each through the package's own evaluation
code (``LatentDecoder``, ``InceptionFeatures``, ``DinoV2Features``). Times each stage per batch
(median of ``--repeats`` after one warm-up) and prints one JSON object with milliseconds per
sample, samples per second of the whole pipeline, and the hours a 50,000-sample evaluation at
one step count takes on one device (sampling itself not included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
DINOV2_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    patch_size=14, image_size=518, layerscale_value=1.0)
TINY_VAE = dict(SD_VAE, block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)  # --tiny (tests)
TINY_DINOV2 = dict(DINOV2_LARGE, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def build(workdir: Path, device: str, tiny: bool = False):
    """Random-weight decoder and feature networks saved and loaded through the package's loaders."""
    import diffusers
    from transformers import Dinov2Config, Dinov2Model

    from flowmap_lit.metrics.decode import LatentDecoder
    from flowmap_lit.metrics.features import DinoV2Features, InceptionFeatures
    from flowmap_lit.metrics.inception import FIDInceptionV3

    torch.manual_seed(0)
    diffusers.AutoencoderKL(**(TINY_VAE if tiny else SD_VAE)).save_pretrained(workdir / "vae")
    Dinov2Model(Dinov2Config(**(TINY_DINOV2 if tiny else DINOV2_LARGE))).save_pretrained(workdir / "dinov2")
    torch.save(FIDInceptionV3().state_dict(), workdir / "inception.pth")
    decoder = LatentDecoder(str(workdir / "vae"), batch_size=64).to(device)
    inception = InceptionFeatures(workdir / "inception.pth").to(device)
    return decoder, inception, DinoV2Features(workdir / "dinov2").to(device)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="narrow VAE and DINOv2 (a smoke run of the script, not a cost)")
    args = p.parse_args(argv)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        decoder, inception, dinov2 = build(Path(tmp), args.device, args.tiny)
        z = torch.randn(args.batch, 4, args.resolution // 8, args.resolution // 8, device=args.device)
        images = decoder(z)
        stages = {"vae_decode": lambda: decoder(z), "inception": lambda: inception(images),
                  "dinov2": lambda: dinov2(images)}
        ms = {}
        with torch.no_grad():
            for name, fn in stages.items():
                times = []
                for i in range(args.repeats + 1):
                    sync()
                    start = time.perf_counter()
                    fn()
                    sync()
                    if i:
                        times.append(time.perf_counter() - start)
                ms[name] = statistics.median(times) * 1000 / args.batch
    total = sum(ms.values())
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else
              f"cpu ({torch.get_num_threads()} threads)", "resolution": args.resolution, "batch": args.batch,
              "tiny": args.tiny,
              "repeats": args.repeats, "ms_per_sample": {k: round(v, 2) for k, v in ms.items()},
              "samples_per_s": round(1000 / total, 3), "hours_per_50k_per_step_count": round(50_000 * total / 3.6e6, 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
