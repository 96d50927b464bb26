"""A small CNN classifier of the 8x8 digits, whose penultimate activations are the digits FID features.

Create it once per dataset (about 10 s on 2 CPU cores)::

    python -m flowmap_lit classifier --data data/digits --out data/digits/classifier.pt

Inputs are raw data in [-1, 1] (``read_split(root, split, normalize=False)``), not the normalized
latents the flow models see: undo the normalization (``LatentDataModule.denormalize``) first.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMAT = 1                                 # version of the saved file layout
KIND = "digits_classifier"                 # "kind" field of the saved file


def create_command(out_path: str | Path = "data/digits/classifier.pt", data_root: str | Path = "data/digits") -> str:
    """The shell command that trains and writes the classifier file."""
    return f"python -m flowmap_lit classifier --data {data_root} --out {out_path}"


class DigitsClassifier(nn.Module):
    """conv3x3 -> conv3x3 -> 2x2 max-pool -> linear (feature layer, ReLU) -> linear logits.

    ``features(x)`` are the ReLU activations of the feature layer, (N, feature_dim).
    """

    def __init__(
        self,
        in_channels: int = 1,              # image channels
        image_size: int = 8,               # image side length in pixels (even)
        channels: tuple[int, int] | list[int] = (32, 64),  # widths of the two conv layers
        feature_dim: int = 128,            # width of the penultimate (feature) layer
        num_classes: int = 10,             # number of logits
        dropout: float = 0.3,              # dropout on the features during training only
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.config = dict(in_channels=in_channels, image_size=image_size, channels=[c1, c2],
                           feature_dim=feature_dim, num_classes=num_classes, dropout=dropout)
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * (image_size // 2) ** 2, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (N, feature_dim) of images (N, C, H, W) in [-1, 1]."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (N, num_classes)."""
        return self.head(self.drop(self.features(x)))


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]^2, filling with -1 (background)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Fraction of correctly classified images (model in eval mode)."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / len(x)


def train_digits_classifier(
    data_root: str | Path,                 # dataset directory with train/val shards (prepare digits)
    out_path: str | Path | None,           # where to save the classifier file; None: do not save
    epochs: int = 40,                      # passes over the train split
    batch_size: int = 64,                  # images per step
    lr: float = 2e-3,                      # peak AdamW learning rate (one-cycle: 10% warm-up, cosine decay)
    weight_decay: float = 1e-4,            # AdamW weight decay
    max_shift: int = 1,                    # augmentation: random translations of up to this many pixels
    seed: int = 0,                         # seed of the initialization, shuffling and augmentation
    num_threads: int = 1,                  # torch intra-op threads while training (1 is fastest for this tiny net)
) -> dict:
    """Train on the train split, measure held-out accuracy on the val split, save to ``out_path``.

    Returns ``{"accuracy": val accuracy, "train_accuracy", "seconds", "epochs", "out_path", "model"}``
    (the trained model, eval mode).
    """
    from flowmap_lit.data import read_split

    start = time.perf_counter()
    x_np, y_np = read_split(str(data_root), "train", normalize=False)
    xv_np, yv_np = read_split(str(data_root), "val", normalize=False)
    x, y = torch.from_numpy(x_np).float(), torch.from_numpy(y_np).long()
    xv, yv = torch.from_numpy(xv_np).float(), torch.from_numpy(yv_np).long()
    num_classes = int(max(y.max(), yv.max())) + 1

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG stream untouched
            model = _fit(x, y, num_classes, epochs, batch_size, lr, weight_decay, max_shift, seed)
    finally:
        torch.set_num_threads(prev_threads)
    result = dict(accuracy=accuracy(model, xv, yv), train_accuracy=accuracy(model, x, y),
                  seconds=time.perf_counter() - start, epochs=epochs,
                  out_path=None if out_path is None else str(out_path))
    if out_path is not None:
        save_digits_classifier(model, out_path, val_accuracy=result["accuracy"],
                               train=dict(data_root=str(data_root), epochs=epochs, batch_size=batch_size, lr=lr,
                                          weight_decay=weight_decay, max_shift=max_shift, seed=seed))
    result["model"] = model
    return result


def _fit(x: Tensor, y: Tensor, num_classes: int, epochs: int, batch_size: int, lr: float, weight_decay: float,
         max_shift: int, seed: int) -> DigitsClassifier:
    """The training loop of ``train_digits_classifier`` (AdamW, one-cycle schedule, random shifts)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitsClassifier(in_channels=x.shape[1], image_size=x.shape[-1], num_classes=num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(random_shift(x[idx], max_shift, gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def save_digits_classifier(
    model: DigitsClassifier,               # the trained classifier
    path: str | Path,                      # output file
    val_accuracy: float,                   # its held-out accuracy, stored in the file
    train: dict | None = None,             # training settings, stored in the file
) -> None:
    """Write ``{"format", "kind", "config", "state_dict", "val_accuracy", "train"}`` atomically.

    The file loads with ``torch.load(path, weights_only=True)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "kind": KIND, "config": dict(model.config), "val_accuracy": float(val_accuracy),
               "train": dict(train or {}),
               "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_digits_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> DigitsClassifier:
    """The saved classifier, frozen (eval mode, ``requires_grad=False``)."""
    path = Path(path)
    if not path.is_file():
        data_root = path.parent if (path.parent / "stats.json").is_file() else "data/digits"  # the dataset it sits in
        raise FileNotFoundError(f"digits classifier {path} does not exist. "
                                f"Create it with: {create_command(path, data_root)}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("kind") != KIND or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a digits classifier file (format {FORMAT}); recreate it with: "
                         f"{create_command(path)}")
    model = DigitsClassifier(**payload["config"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    model.requires_grad_(False)
    return model


if __name__ == "__main__":  # the former command form; the command lives in flowmap_lit.commands
    import sys

    from flowmap_lit._moved import run_moved_command

    run_moved_command("flowmap_lit.metrics.digits_classifier", "classifier", sys.argv[1:])
