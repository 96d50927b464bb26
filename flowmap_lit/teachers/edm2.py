"""EDM2 teachers: an EDM2 network pickle (``network-snapshot-*.pkl``: a dict whose ``"ema"`` entry is
the preconditioned denoiser ``D(x_sigma; sigma, one-hot class)``), or a plain state dict plus its
architecture, converted exactly to our velocity through ``ConvertedTeacher``'s ``"edm"`` conversion
(docs/design.md section 1). Nothing here downloads: models are read from local files only."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from flowmap_lit.teachers.base import ConvertedTeacher, teacher_space, velocity_from_teacher_space


class OneHotLabels(nn.Module):
    """Calls an EDM2 denoiser ``D(x, sigma, class_labels)`` with integer labels made one-hot.

    Label ``k < label_dim`` becomes the unit vector ``e_k``; the null label ``label_dim`` (ours:
    ``num_classes``) becomes the all-zero vector, which is what EDM2's preconditioning feeds its
    network for ``class_labels=None``. Only a network trained with label dropout to zero vectors
    has a meaningful unconditional output there: the published EDM2 ImageNet models were not
    (they use autoguidance with a smaller EDM2 model, not classifier-free guidance).
    """

    def __init__(self, denoiser: nn.Module, label_dim: int) -> None:
        super().__init__()
        self.denoiser, self.label_dim = denoiser, label_dim

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if self.label_dim == 0:
            return self.denoiser(x, sigma, None)
        if class_labels is None:
            one_hot = torch.zeros(x.shape[0], self.label_dim, device=x.device, dtype=torch.float32)
        else:  # label_dim + 1 columns, the last (null) dropped
            one_hot = nn.functional.one_hot(class_labels.long(), self.label_dim + 1)[:, : self.label_dim].float()
        return self.denoiser(x, sigma, one_hot)


def _unpickle(path: Path, source_dir: str | None) -> object:
    if source_dir is not None:
        source = str(Path(source_dir).expanduser().resolve())
        if not Path(source).is_dir():
            raise FileNotFoundError(f"source_dir {source} is not a directory (give a local clone of NVlabs/edm2)")
        if source not in sys.path:
            sys.path.insert(0, source)  # stays: pickled classes may import more modules on first call
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"unpickling {path} needs the module {err.name!r}, which is not importable. EDM2 pickles refer to "
            "EDM2's own source code (torch_utils, training, dnnlib): clone it once, e.g. `git clone "
            "https://github.com/NVlabs/edm2 /path/to/edm2`, and set source_dir: /path/to/edm2 on the teacher."
            + (f" (source_dir {source_dir} was given but does not provide it.)" if source_dir else "")
        ) from err


def _load_state_dict(path: Path, key: str) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for k in (key, "state_dict"):  # a state dict saved under a key, e.g. {"ema": {...}}
        if isinstance(state.get(k), dict):
            return state[k]
    return state


class EDM2Teacher(ConvertedTeacher):
    """An EDM2 denoiser ``D(x_sigma; sigma, one-hot class)`` as a velocity teacher (docs/design.md section 1).

    ``v(x_t, t) = (x_t - D(x_t / (1 - t); t / (1 - t))) / t`` via ``ConvertedTeacher(prediction="edm")``.

    ``path`` is either

    - an EDM2 network pickle (``.pkl``: ``network-snapshot-*.pkl``, the denoiser under ``key``,
      default ``"ema"``). Unpickling runs code from the file and imports EDM2's modules, so it
      needs ``allow_pickle: true`` (trusted files only) and EDM2's source on ``sys.path``
      (``source_dir``: a local clone of NVlabs/edm2); or
    - a plain state dict (``.pt``/``.pth`` read with ``weights_only=True``, or ``.safetensors``)
      of the architecture ``net`` (any module called as ``net(x, sigma, one_hot_labels)``).

    Integer labels become one-hot vectors of size ``label_dim``; the null label ``num_classes``
    becomes the zero vector (see ``OneHotLabels``: meaningful only for networks trained with it).
    ``data_scale = a``: the denoiser was trained on ``a * x0`` of our data ``x0`` (an exact change of
    time, see ``teacher_space``). EDM2's latents are raw SD-VAE latents standardized per channel with
    EDM2's fixed constants to std 0.5, so with ``normalize: true`` data (std 1 per channel, our own
    dataset statistics) ``a = 0.5`` matches only as far as the two sets of statistics agree.
    The teacher has no velocity network to copy: give the student explicitly.

    Args:
        path: Local file of the denoiser (never downloaded): an EDM2 network pickle (.pkl), or a state
            dict (.pt/.pth read with weights_only=True, or .safetensors) of the architecture net.
        allow_pickle: Allow loading a .pkl, which executes code stored in the file (trusted files
            only); a .pkl needs it.
        source_dir: Local clone of NVlabs/edm2, put on sys.path so that a pickle's classes import;
            None: EDM2's modules must be importable already.
        key: Entry of the pickled dict (or of the state dict) that holds the denoiser ("ema" in
            EDM2's snapshots); a state-dict file with neither it nor a "state_dict" entry is read
            whole.
        net: The denoiser architecture for a state dict, called as net(x, sigma, one_hot_labels);
            ignored for a pickle.
        num_classes: Classes of the teacher (our null label num_classes becomes the zero one-hot
            vector); None: the denoiser's label_dim.
        data_scale: a > 0: the denoiser was trained on a * x0 of our data x0 (an exact change of
            time). EDM2's latents have std 0.5, so for normalize: true data (std 1) about 0.5.
    """

    def __init__(
        self,
        path: str,
        allow_pickle: bool = False,
        source_dir: str | None = None,
        key: str = "ema",
        net: nn.Module | None = None,
        num_classes: int | None = None,
        data_scale: float = 1.0,
    ) -> None:
        if data_scale <= 0:
            raise ValueError(f"data_scale must be > 0, got {data_scale}")
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(
                f"EDM2 network {file} does not exist. Download the snapshot (e.g. edm2-img512-s-*.pkl from the "
                "EDM2 release) once to a local path and point teacher path at it."
            )
        if file.suffix == ".pkl":
            if not allow_pickle:
                raise ValueError(
                    f"{file} is a pickle: loading it executes code stored in the file. If you trust it, set "
                    "allow_pickle: true on the teacher (and source_dir: a local clone of NVlabs/edm2); otherwise "
                    "convert it to a state dict (.pt/.safetensors) and give the architecture as net."
                )
            data = _unpickle(file, source_dir)
            denoiser = data[key] if isinstance(data, dict) else data
            if not isinstance(denoiser, nn.Module):
                raise TypeError(f"{file}[{key!r}] is a {type(denoiser).__name__}, not a denoiser nn.Module")
        else:
            if net is None:
                raise ValueError(f"{file} is a state dict: give the denoiser architecture as net")
            missing, unexpected = net.load_state_dict(_load_state_dict(file, key), strict=False)
            if missing or unexpected:
                raise RuntimeError(f"{file} does not match net: missing {missing[:5]}, unexpected {unexpected[:5]}")
            denoiser = net
        label_dim = int(getattr(denoiser, "label_dim", 0) or 0)
        classes = label_dim if num_classes is None else num_classes
        super().__init__(OneHotLabels(denoiser, label_dim), prediction="edm", num_classes=classes)
        self.path, self.data_scale = str(file), float(data_scale)
        self.freeze()

    def velocity(self, x, t, class_labels=None):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        x_T, t_T = teacher_space(x, t, self.data_scale)
        return velocity_from_teacher_space(super().velocity(x_T, t_T, class_labels), x_T, t_T, self.data_scale)
