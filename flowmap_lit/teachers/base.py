"""Frozen teachers and guides behind one interface: ``velocity(x, t, class_labels) -> v``.

- ``NetworkTeacher``: a velocity network from a ``FlowMatchingModule`` checkpoint (EMA weights
  by default), or any network passed in with its weights.
- ``GMMTeacher``: the exact velocity of a Gaussian mixture fitted to a dataset (docs/design.md section 6):
  an instant, exact teacher; a mixture with fewer components or wider covariances is its guide.
- ``guided_velocity``: autoguidance and classifier-free guidance (docs/design.md section 1), for class
  labels or keyword conditioning (text embeddings; CFG's null is the empty prompt's embedding).

Teachers are frozen: eval mode, no grads, never in the optimizer, and their weights are not
copied into the distillation checkpoints (they are rebuilt from their own source).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from flowmap_lit.teachers.analytic import GaussianData, GaussianMixture
from flowmap_lit.callbacks.ema import ema_state_from_checkpoint
from flowmap_lit.interpolant import edm_inputs, eps_to_velocity, x0_to_velocity


class Teacher(nn.Module):
    """A frozen velocity model. Subclasses implement ``velocity``."""

    num_classes: int = 0

    def freeze(self) -> "Teacher":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "Teacher":  # always stays in eval mode
        return super().train(False)

    def velocity(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, **cond: Tensor) -> Tensor:
        """``v(x, t)``; ``cond``: extra conditioning by keyword (text embeddings, ``batch["cond"]``),
        accepted by text-conditioned teachers only."""
        raise NotImplementedError

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, **cond: Tensor) -> Tensor:
        return self.velocity(x, t, class_labels, **cond)

    @property
    def network(self) -> nn.Module | None:
        """The underlying network a student can be initialized from, if any."""
        return None


def load_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict:
    """``torch.load`` a checkpoint with ``weights_only=True`` unless pickles are allowed.

    A directory is a sharded checkpoint (written under FSDP2's ``ModelParallelStrategy``): it is
    consolidated in memory into the dict of the single-file form (``flowmap_lit.consolidate``), read
    with the same ``weights_only`` rule.
    """
    path = Path(path)
    if path.is_dir():
        from flowmap_lit.consolidate import load_distributed_checkpoint

        return load_distributed_checkpoint(path, allow_pickle)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist. Train it first (e.g. python -m flowmap_lit fit --config "
            "configs/digits/teacher.yaml) or point the config at an existing file."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:  # unpickling errors have many types
        if allow_pickle:
            raise
        raise RuntimeError(
            f"could not load {path} with weights_only=True ({err}). If you trust this file, set "
            "allow_pickle: true on the teacher to load arbitrary pickled objects."
        ) from err


def network_from_config(config: dict) -> nn.Module:
    """Instantiate a network from a ``{"class_path": ..., "init_args": {...}}`` dict."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(nn.Module, "net", fail_untyped=False)
    cfg = parser.parse_object({"net": config})
    return parser.instantiate(cfg).net


class NetworkTeacher(Teacher):
    """A trained velocity network, frozen.

    Give ``checkpoint`` (a ``FlowMatchingModule`` checkpoint written by ``python -m flowmap_lit
    fit``: its network config is read from the checkpoint) and/or ``net`` (the architecture, when
    the checkpoint lacks it, or a network with weights already loaded when ``checkpoint`` is None).
    """

    def __init__(
        self,
        checkpoint: str | None = None,  # a Lightning checkpoint of a FlowMatchingModule (file or sharded directory)
        net: nn.Module | None = None,  # architecture (optional with a checkpoint made by the CLI)
        use_ema: bool = True,  # load the EMA weights when the checkpoint has them
        num_classes: int | None = None,  # classes of the network; None: from the checkpoint, else 0
        allow_pickle: bool = False,  # load the checkpoint with weights_only=False (trusted files only)
    ) -> None:
        super().__init__()
        if checkpoint is None and net is None:
            raise ValueError("NetworkTeacher needs a checkpoint path, a net, or both")
        hparams = {}
        self.net_config: dict | None = None  # {"class_path", "init_args"} of the network, when the checkpoint has it
        if checkpoint is not None:
            ckpt = load_checkpoint(checkpoint, allow_pickle)
            hparams = ckpt.get("hyper_parameters", {})
            if isinstance(hparams.get("net"), dict):
                self.net_config = hparams["net"]
            if net is None:
                if not isinstance(hparams.get("net"), dict):
                    raise ValueError(
                        f"{checkpoint} does not record its network config; give the architecture as "
                        "teacher net: {class_path: ..., init_args: ...}"
                    )
                net = network_from_config(hparams["net"])
            state = ema_state_from_checkpoint(ckpt) if use_ema else None
            if state is None:
                prefix = "net."
                state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise RuntimeError(
                    f"{checkpoint} does not match the teacher architecture: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}"
                )
        self.net = net
        self.checkpoint = checkpoint
        self.num_classes = num_classes if num_classes is not None else int(hparams.get("num_classes", 0))
        self.freeze()

    @property
    def network(self) -> nn.Module:
        return self.net

    def velocity(self, x, t, class_labels=None):
        labels = class_labels if self.num_classes > 0 else None
        return self.net(x, t, class_labels=labels)


class ConvertedTeacher(Teacher):
    """A network of another parameterization, converted exactly to the velocity of docs/design.md section 1.

    ``prediction`` says what ``net`` returns:

    - ``"velocity"``: ``v = eps - x0`` at ``net(x_t, t, class_labels=...)`` (our own convention);
    - ``"eps"``: the noise, ``v = (eps_hat - x_t) / (1 - t)``, called as ``net(x_t, t, ...)``;
    - ``"x0"``: the clean data, ``v = (x_t - x0_hat) / t``, called as ``net(x_t, t, ...)``;
    - ``"edm"``: an EDM/EDM2 denoiser ``D(x_sigma; sigma)`` (x0-prediction with sigma conditioning),
      called as ``net(x_t / (1 - t), sigma, class_labels=...)`` with ``sigma = t / (1 - t)``,
      then ``v = (x_t - D) / t``.

    Divisions by ``t`` or ``1 - t`` clamp ``t`` to ``[T_MIN, T_MAX]`` (``flowmap_lit.interpolant``).
    Only a ``"velocity"`` network can initialize a student (``network``); for the others, give the
    student explicitly.
    """

    PREDICTIONS = ("velocity", "eps", "x0", "edm")

    def __init__(
        self,
        net: nn.Module,  # the network, weights loaded
        prediction: str = "velocity",  # "velocity" | "eps" | "x0" | "edm" (see the class docstring)
        num_classes: int = 0,  # classes of the network; 0: unconditional
    ) -> None:
        super().__init__()
        if prediction not in self.PREDICTIONS:
            raise ValueError(f"prediction must be one of {self.PREDICTIONS}, got {prediction!r}")
        self.net, self.prediction, self.num_classes = net, prediction, num_classes

    @property
    def network(self) -> nn.Module | None:
        return self.net if self.prediction == "velocity" else None

    def velocity(self, x, t, class_labels=None):
        labels = class_labels if self.num_classes > 0 else None
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        if self.prediction == "edm":
            x_sigma, sigma = edm_inputs(x, t)
            return x0_to_velocity(self.net(x_sigma, sigma, class_labels=labels), x, t)
        out = self.net(x, t, class_labels=labels)
        if self.prediction == "eps":
            return eps_to_velocity(out, x, t)
        if self.prediction == "x0":
            return x0_to_velocity(out, x, t)
        return out


def read_split(root: str, split: str = "train", normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """All samples of a split as arrays ``(x (N, C, H, W) float32, labels (N,) int64)``, in order."""
    from flowmap_lit.data import LatentDataModule

    dm = LatentDataModule(root=root, val_split=split, num_workers=0, val_batch_size=4096,
                          normalize=normalize, val_posterior="mean")
    xs, ys = [], []
    for batch in dm.split_loader():  # the whole split, also inside a process group (not this rank's share)
        xs.append(batch["x"].numpy())
        ys.append(batch["label"].numpy())
    return np.concatenate(xs), np.concatenate(ys)


class MixtureTeacher(Teacher):
    """The exact velocity of a given ``GaussianMixture`` (docs/design.md section 6)."""

    def __init__(self, mixture: GaussianMixture) -> None:
        super().__init__()
        self.gmm = mixture
        self.num_classes = mixture.num_classes
        self.freeze()

    def velocity(self, x, t, class_labels=None):
        return self.gmm.velocity(x, t, class_labels)

    def sample(self, n: int, class_labels: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples of the data distribution the teacher transports to."""
        return self.gmm.sample(n, class_labels, generator)


class GaussianTeacher(Teacher):
    """Gaussian data ``N(mu, diag(c^2))``: closed-form velocity AND flow map (docs/design.md section 6),
    the reference the flow-map diagnostics (``flowmap_lit.diagnostics``) use exactly."""

    def __init__(self, data: GaussianData) -> None:
        super().__init__()
        self.data = data
        self.freeze()

    def velocity(self, x, t, class_labels=None):
        return self.data.velocity(x, t)

    def flow_map(self, x: Tensor, t: Tensor, s: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """The exact ODE solution from ``x`` at ``t`` read at ``s``."""
        return self.data.flow_map(x, t, s)


class GMMTeacher(MixtureTeacher):
    """Exact velocity of a full-covariance Gaussian mixture fitted to a dataset's training split.

    With ``per_class=True`` the mixture has ``num_components`` components per class and is
    class-conditional (the null label mixes all classes, so CFG works too). The fit is
    deterministic given ``seed``; it is redone at construction (a second or two for the digits).
    """

    def __init__(
        self,
        data_root: str = "data/digits",  # dataset directory (shards + stats.json), normalized as in training
        num_components: int = 2,  # components (per class when per_class)
        per_class: bool = True,  # class-conditional mixture
        covariance_scale: float = 1.0,  # widen every component (> 1 makes a weaker guide)
        reg_covar: float = 1e-3,  # added to covariance diagonals (normalized units)
        split: str = "train",  # split to fit
        seed: int = 0,  # EM initialization seed
        prepare_digits_if_missing: bool = True,  # write a built-in dataset when a data_root named after it ("digits", "shapes") has none
    ) -> None:
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        if covariance_scale <= 0:
            raise ValueError(f"covariance_scale must be > 0 (> 1 widens the components for a weaker guide), "
                             f"got {covariance_scale}")
        if reg_covar < 0:
            raise ValueError(f"reg_covar must be >= 0, got {reg_covar}")
        root = Path(data_root)
        if not (root / "stats.json").is_file():
            from flowmap_lit.data.prepare import BUILTIN_DATASETS

            if not (prepare_digits_if_missing and root.name in BUILTIN_DATASETS):
                raise FileNotFoundError(
                    f"GMMTeacher: no dataset at {data_root} ({root / 'stats.json'} is missing). Fix data_root, or "
                    "make the dataset first (python -m flowmap_lit.data.prepare ... --out DIR); only a directory "
                    f"named after a built-in dataset ({', '.join(sorted(BUILTIN_DATASETS))}) is prepared automatically")
            BUILTIN_DATASETS[root.name][0](str(root))
        x, y = read_split(str(root), split)
        super().__init__(GaussianMixture.fit(x, y if per_class else None, num_components, x.shape[1:],
                                             covariance_scale=covariance_scale, reg_covar=reg_covar, seed=seed))


def guided_velocity(teacher: Teacher, guide: Teacher | None, x: Tensor, t: Tensor,
                    class_labels: Tensor | None, lam: Tensor | None, kind: str,
                    cond: dict[str, Tensor] | None = None, null_cond: dict[str, Tensor] | None = None) -> Tensor:
    """``lam * v_teacher + (1 - lam) * v_guide`` (docs/design.md section 1), computed without grad.

    ``kind``: ``"autoguidance"`` (guide = the weaker model, same label and ``cond``), ``"cfg"``
    (guide = the teacher with the null label ``num_classes``, or, for text conditioning, with
    ``null_cond``: the empty prompt's embeddings, one per key without batch dimension; zeros when
    None), or ``"none"`` (the teacher alone). ``cond``: keyword conditioning of the teacher
    (``batch["cond"]``, e.g. ``encoder_hidden_states``); None for class/unconditional teachers.
    """
    kw = cond or {}
    with torch.no_grad():
        if kind == "none" or lam is None:
            return teacher.velocity(x, t, class_labels, **kw).float()
        lam_b = lam.float().reshape(-1, *([1] * (x.ndim - 1)))
        if kind == "autoguidance":
            if guide is None:
                raise ValueError("guidance 'autoguidance' needs a guide model")
            v_t, v_g = teacher.velocity(x, t, class_labels, **kw), guide.velocity(x, t, class_labels, **kw)
        elif kind == "cfg" and cond:
            both = {k: torch.cat([v, null_condition(null_cond, k, v)]) for k, v in cond.items()}
            labels = None if class_labels is None else torch.cat([class_labels, class_labels])
            v = teacher.velocity(torch.cat([x, x]), torch.cat([t, t]), labels, **both)
            v_t, v_g = v.chunk(2)
        elif kind == "cfg":
            if teacher.num_classes == 0 or class_labels is None:
                raise ValueError("classifier-free guidance needs a class-conditional teacher and labels "
                                 "(or text conditioning, batch['cond'])")
            null = torch.full_like(class_labels, teacher.num_classes)
            v = teacher.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([class_labels, null]))
            v_t, v_g = v.chunk(2)
        else:
            raise ValueError(f"unknown guidance {kind!r}; use 'autoguidance', 'cfg' or 'none'")
        return lam_b * v_t.float() + (1 - lam_b) * v_g.float()


def null_condition(null_cond: dict[str, Tensor] | None, key: str, like: Tensor) -> Tensor:
    """The null (empty-prompt) value of conditioning ``key``, broadcast to the batch of ``like``;
    zeros when ``null_cond`` has none (a dataset without a stored empty-prompt embedding)."""
    if null_cond is None or key not in null_cond:
        return torch.zeros_like(like)
    null = null_cond[key].to(device=like.device, dtype=like.dtype)
    if tuple(null.shape) != tuple(like.shape[1:]):
        raise ValueError(f"null condition {key!r} has shape {tuple(null.shape)}, the batch has {tuple(like.shape[1:])}")
    return null.expand_as(like)
