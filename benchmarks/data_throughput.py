"""Samples per second streamed from WebDataset shards, against what a training step consumes.

    python benchmarks/data_throughput.py --num-samples 4000 --shape 4 32 32

Writes synthetic latent shards (or reads ``--root``), then times the training stream of
``LatentDataModule`` with 0, 1 and 2 workers (after its first batch, so worker start-up is
reported separately), and the consumption rate of the quickstart's training step (samples/s
of ``FlowMapDistillModule`` with the exact mixture teacher, when ``--step-rate`` is given).
Prints a table and one JSON object.

    python benchmarks/data_throughput.py --digits

times the quickstart's own loader instead: the digits at batch 256, whose epochs are 5 batches
long (each epoch restarts the stream and refills the 1000-sample shuffle buffer), over 20 epochs,
with the in-memory shard cache on (the default) and off (``cache_mb=0``), 0 and 1 workers.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flowmap_lit.data import LatentDataModule, write_dataset  # noqa: E402


def stream_rate(root: str, workers: int, batch: int, batches: int) -> dict:
    dm = LatentDataModule(root=root, batch_size=batch, num_workers=workers,
                          train_samples_per_epoch=batch * (batches + 1))
    dm.setup("fit")
    start = time.perf_counter()
    it = iter(dm.train_dataloader())
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)["x"].shape[0]
    seconds = time.perf_counter() - start
    del it  # stop this loader's workers before the next one forks (else they inherit its iterator)
    gc.collect()
    return {"workers": workers, "samples_per_s": round(n / seconds), "first_batch_s": round(first, 3)}


def epoch_rate(root: str, workers: int, cache_mb: float, epochs: int = 20, batch: int = 256) -> dict:
    """Batches/s of whole epochs of the digits training loader, as the quickstart iterates it."""
    from flowmap_lit.data import DigitsDataModule

    dm = DigitsDataModule(root=root, batch_size=batch, num_workers=workers, cache_mb=cache_mb)
    dm.setup("fit")
    loader = dm.train_dataloader()
    start, n = time.perf_counter(), 0
    for _ in range(epochs):
        n += sum(1 for _ in loader)
    seconds = time.perf_counter() - start
    del loader
    gc.collect()
    return {"workers": workers, "cache_mb": cache_mb, "batches_per_s": round(n / seconds, 1)}


def digits_main(workers: list[int], epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        from flowmap_lit.data import prepare_digits

        root = str(Path(tmp) / "digits")
        prepare_digits(root)
        rows = [epoch_rate(root, w, c, epochs) for w in workers for c in (64.0, 0.0)]
    for r in rows:
        print(f"workers={r['workers']} cache_mb={r['cache_mb']:>4}: {r['batches_per_s']:>6} batches/s")
    result = {"dataset": "digits", "batch": 256, "batches_per_epoch": 5, "streams": rows}
    print(json.dumps(result))
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="existing shard directory (default: write synthetic shards)")
    p.add_argument("--num-samples", type=int, default=4000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--shape", type=int, nargs=3, default=[4, 32, 32])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=25)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--step-rate", action="store_true", help="also time the quickstart step's consumption")
    p.add_argument("--digits", action="store_true", help="time the quickstart's digits loader (epochs of 5 batches)")
    p.add_argument("--epochs", type=int, default=20, help="--digits: epochs timed per configuration")
    args = p.parse_args(argv)
    if args.digits:
        return digits_main([w for w in args.workers if w <= 1] or [0], args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = str(Path(tmp) / "shards")
            rng = np.random.default_rng(0)
            x = rng.standard_normal((args.num_samples, *args.shape), dtype=np.float32)
            y = rng.integers(0, 10, args.num_samples)
            write_dataset(root, {"train": (x, y)}, num_classes=10, source="benchmark",
                          samples_per_shard=-(-args.num_samples // args.shards))
        rows = [stream_rate(root, w, args.batch, args.batches) for w in args.workers]
    result = {"shape": args.shape, "batch": args.batch, "num_samples": args.num_samples, "shards": args.shards,
              "streams": rows}
    if args.step_rate:
        result["quickstart_step_samples_per_s"] = quickstart_step_rate()
    for r in rows:
        print(f"workers={r['workers']}: {r['samples_per_s']:>8} samples/s (first batch after {r['first_batch_s']} s)")
    if args.step_rate:
        print(f"quickstart training step consumes {result['quickstart_step_samples_per_s']} samples/s")
    print(json.dumps(result))
    return result


def quickstart_step_rate(steps: int = 20, batch: int = 256) -> int:
    """Samples/s one AYF-EMD step of the quickstart consumes (exact mixture teacher, MLP student)."""
    import torch
    from common import quickstart_like_module

    m = quickstart_like_module()
    opt = torch.optim.Adam(m.student.parameters(), lr=3e-4)
    batch_data = {"x": torch.randn(batch, 1, 8, 8), "label": torch.randint(0, 10, (batch,))}
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        loss, _ = m.step_loss(batch_data)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
    return round(steps * batch / (time.perf_counter() - start))


if __name__ == "__main__":
    main()
