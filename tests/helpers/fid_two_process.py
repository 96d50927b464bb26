"""Few-step distances of a fixed latent sampler computed by ``world`` gloo processes (decode with a local VAE,
DINOv2 features, float64 all-reduce), for tests/metrics/test_eval_scale.py.

``distances(world, root, out)``: one process computes in this one; several are forked from it (nothing to
import again), each with one intra-op thread (a forked process must not use its parent's OpenMP threads).
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NUM, SHAPE, STEPS = 64, (4, 4, 4), (1, 2)
RESOLUTION = 56  # DINOv2's input side here: 4 x 4 patches keep the test fast


def sampler(noise, labels, num_steps):
    """A deterministic stand-in for a k-step sampler (any function of the noise and labels)."""
    return torch.tanh(noise) * (1.0 - 0.2 * num_steps) + 0.05 * labels.float()[:, None, None, None]


def worker(rank: int, world: int, root: str, out: str, port: int) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from flowmap_lit.metrics import FID
    from flowmap_lit.metrics.decode import LatentDecoder
    from flowmap_lit.metrics.features import DinoV2Features
    from flowmap_lit.metrics.few_step import rank_share, sampler_distances, seeded_noise

    decoder = LatentDecoder(os.path.join(root, "vae"), batch_size=5)
    fid = FID(DinoV2Features(os.path.join(root, "dinov2"), resolution=RESOLUTION))
    fid.set_reference(torch.load(os.path.join(root, "reference.pt")))
    noise, labels = seeded_noise(rank_share(NUM, rank, world), NUM, SHAPE, seed=3, num_classes=10)
    rows = {k: sampler_distances({"fd_dinov2": fid}, sampler, noise, labels, batch_size=7, to_images=decoder,
                                 num_steps=k)["fd_dinov2"] for k in STEPS}
    if rank == 0:
        torch.save(rows, out)
    if world > 1:
        dist.destroy_process_group()


def distances(world: int, root: str, out: str) -> None:
    """The distances of ``world`` processes into ``out`` (``{steps: distance}``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if world == 1:
        worker(0, 1, root, out, port)
    else:
        mp.start_processes(worker, args=(world, root, out, port), nprocs=world, start_method="fork")
