"""Teachers from diffusers, converted exactly to our velocity (docs/design.md section 1).

- ``DiffusersTeacher``: a diffusers ``UNet2DModel`` or ``DiTTransformer2DModel`` read from a local
  directory, with its scheduler config telling how the model was trained.
- ``DiscreteVPConvention`` / ``FlowMatchConvention``: how a model of a diffusers scheduler is called
  at our ``(x_t, t)`` and how its output maps back to ``v = eps - x0``. ``SchedulerTeacher`` wraps any
  network with a convention (and is the base of ``DiffusersTeacher``; other adapters can reuse both).
  EDM2 networks are in ``flowmap_lit.teachers.edm2``.

Our time: ``x_t = (1 - t) x0 + t eps`` (``t = 0`` data, ``t = 1`` noise), ``v = eps - x0``.
Every conversion below is exact for the posterior means: ``E[eps | x_t]`` and ``E[x0 | x_t]`` are the
same whichever invertible rescaling of ``x_t`` the model sees, and ``v`` is affine in them. Guidance
(CFG, autoguidance) is a linear combination of teacher outputs, so it commutes with the conversion:
CFG on our velocity equals CFG on the model's epsilon (or v, or sample) prediction.

Nothing here downloads: models are read from local files only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from flowmap_lit.interpolant import eps_to_velocity, expand_like, x0_to_velocity
from flowmap_lit.teachers.base import Teacher, our_time, teacher_space, teacher_time, velocity_from_teacher_space

# ============================================================================ scheduler conventions


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``(xp, fp)`` at ``x`` (``xp`` increasing, ``x`` inside)."""
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x_lo, x_hi, f_lo, f_hi = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f_lo + (x - x_lo) / (x_hi - x_lo) * (f_hi - f_lo)


class DiscreteVPConvention:
    """A model trained on a discrete variance-preserving schedule (DDPM/DDIM/Euler/... with betas).

    diffusers noises ``x_vp = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps`` at integer timestep ``k``.
    Equal signal-to-noise ratio maps it to our time: ``sigma = t / (1 - t) = sqrt((1 - abar) / abar)``,
    so with ``r = sqrt((1 - t)^2 + t^2)``:

    - model input ``x_vp = x_t / r`` (``= x_t / (1 - t) / sqrt(1 + sigma^2)``);
    - timestep: the fractional ``k`` whose ``log sigma_k`` equals ``log sigma``, interpolating
      ``log sigma`` linearly over the table (the model's timestep embedding is continuous);
    - output: ``alpha = (1 - t) / r``, ``s = t / r`` and
      ``epsilon``: ``v = (eps_hat - x_t) / (1 - t)``;
      ``sample``: ``v = (x_t - x0_hat) / t``;
      ``v_prediction`` (``v_vp = alpha eps - s x0``): ``v = ((2t - 1) x_t / r + v_vp) / r``
      (``= eps_hat - x0_hat`` with ``x0_hat = alpha x_vp - s v_vp``, ``eps_hat = s x_vp + alpha v_vp``).

    The model is defined only on its table's noise levels, so ``t`` is clamped to
    ``[t(sigma_min), t(sigma_max)]`` (e.g. ``[0.0099, 0.9937]`` for the linear 1e-4..0.02 schedule of
    1000 steps): outside, the teacher returns the velocity at the nearest end of that range.
    Levels with ``abar = 0`` (zero terminal SNR) are left out of the table.
    """

    PREDICTIONS = ("epsilon", "v_prediction", "sample")

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str = "epsilon") -> None:
        if prediction_type not in self.PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {self.PREDICTIONS}, got {prediction_type!r}")
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        keep = (abar > 0) & (abar < 1)
        steps = torch.arange(len(abar), dtype=torch.float64)[keep]
        log_sigma = 0.5 * (torch.log1p(-abar[keep]) - torch.log(abar[keep]))
        if len(steps) < 2 or not bool((log_sigma[1:] > log_sigma[:-1]).all()):
            raise ValueError("alphas_cumprod must decrease strictly along the timesteps")
        self.prediction_type = prediction_type
        self.log_sigmas, self.steps = log_sigma, steps
        sig = log_sigma[[0, -1]].exp()
        self.t_min, self.t_max = (sig / (1 + sig)).tolist()
        self._tables: dict = {}

    def _table(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._tables:
            self._tables[device] = (self.log_sigmas.to(device), self.steps.to(device))
        return self._tables[device]

    def clamp_time(self, t: Tensor) -> Tensor:
        """``t`` clamped to the noise levels of the table."""
        return t.clamp(self.t_min, self.t_max)

    def timestep(self, t: Tensor) -> Tensor:
        """Fractional diffusers timestep (float64) of our time ``t`` (clamped)."""
        t = self.clamp_time(t.to(torch.float64))
        log_sigmas, steps = self._table(t.device)
        return _interp(torch.log(t) - torch.log1p(-t), log_sigmas, steps)

    def model_inputs(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_vp, timestep)`` to call the model with at our ``(x_t, t)``."""
        t64 = self.clamp_time(t.to(torch.float64))
        r = torch.sqrt((1 - t64) ** 2 + t64**2)
        return x_t / expand_like(r, x_t).to(x_t.dtype), self.timestep(t64)

    def to_velocity(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Our ``v = eps - x0`` from the model output ``out`` at ``model_inputs(x_t, t)``."""
        t = self.clamp_time(t.to(torch.float64)).to(x_t.dtype)
        if self.prediction_type == "epsilon":
            return eps_to_velocity(out, x_t, t)
        if self.prediction_type == "sample":
            return x0_to_velocity(out, x_t, t)
        tt = expand_like(t, x_t)
        r = torch.sqrt((1 - tt) ** 2 + tt**2)
        return ((2 * tt - 1) * x_t / r + out) / r


class FlowMatchConvention:
    """A rectified-flow model of diffusers' ``FlowMatchEulerDiscreteScheduler``.

    diffusers noises ``x = (1 - sigma) x0 + sigma eps`` and trains the model on ``eps - x0`` at
    ``timestep = sigma * num_train_timesteps``: our convention exactly, with ``sigma = t``. The
    model input is ``x_t`` itself and its output is our ``v``. The scheduler's ``shift`` (and
    dynamic shifting) only moves the sampling time grid, not this correspondence. ``t`` is only
    clamped to ``[0, 1]``.
    """

    def __init__(self, num_train_timesteps: int = 1000) -> None:
        self.num_train_timesteps = num_train_timesteps
        self.t_min, self.t_max = 0.0, 1.0

    def clamp_time(self, t: Tensor) -> Tensor:
        return t.clamp(0.0, 1.0)

    def model_inputs(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return x_t, self.clamp_time(t.to(torch.float64)) * self.num_train_timesteps

    def to_velocity(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return out


def load_scheduler(path: str | Path):
    """A diffusers scheduler from a local ``scheduler_config.json`` (or the directory holding it)."""
    import diffusers

    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "scheduler_config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"scheduler config {file} does not exist. A diffusers pipeline directory has it at "
            "<dir>/scheduler/scheduler_config.json; give the scheduler directory or file explicitly otherwise."
        )
    config = json.loads(file.read_text())
    name = config.get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"{file}: unknown diffusers scheduler class {name!r}")
    return cls.from_config(config)


def convention_from_scheduler(scheduler, prediction_type: str | None = None):
    """The convention of models trained with ``scheduler`` (a diffusers scheduler object).

    Flow-matching schedulers give ``FlowMatchConvention``; any scheduler with ``alphas_cumprod``
    (built from its betas: linear, scaled_linear, squaredcos_cap_v2, ...) gives
    ``DiscreteVPConvention`` with the scheduler's ``prediction_type`` unless one is given.
    """
    name = type(scheduler).__name__
    config = scheduler.config
    if "FlowMatch" in name:
        if prediction_type not in (None, "flow", "velocity"):
            raise ValueError(f"{name} models predict the velocity; prediction_type {prediction_type!r} does not apply")
        return FlowMatchConvention(int(config.num_train_timesteps))
    if getattr(scheduler, "alphas_cumprod", None) is not None:
        prediction_type = prediction_type or config.get("prediction_type", "epsilon")
        return DiscreteVPConvention(scheduler.alphas_cumprod, prediction_type)
    raise ValueError(f"scheduler {name} has neither a flow-matching nor a discrete beta schedule")


# ============================================================================ teachers of conventions


class SchedulerTeacher(Teacher):
    """Any network of a scheduler convention, as a velocity teacher (docs/design.md section 1).

    ``net`` is called as ``net(x_in, timestep, class_labels=...)`` (override ``call_model`` for
    other signatures) and may return a tensor, a tuple or an object with ``.sample``; an output
    with twice the input channels (learned variance, as in DiT) keeps the first half.

    ``data_scale = a`` says the teacher was trained on ``a * x0`` where ``x0`` is our data (e.g.
    raw SD-VAE latents with ``a = 0.18215``). The noise is not scaled, so this is a change of time,
    exact for a scalar ``a``: with ``k = (1 - t) + a t`` the teacher sees ``x_T = a x_t / k`` at
    ``t_T = a t / k``, returns ``v_T``, and ``x0_T = x_T - t_T v_T``, ``eps = x_T + (1 - t_T) v_T``,
    ``v = eps - x0_T / a`` (``teacher_space``, ``velocity_from_teacher_space``). Our ``t`` is
    clamped where the convention clamps the teacher's time.

    Args:
        net: The network, called as net(x_in, timestep, class_labels=...).
        convention: How net is called at our (x_t, t) and how its output maps back to our velocity:
            a DiscreteVPConvention or FlowMatchConvention (e.g. convention_from_scheduler).
        num_classes: Classes of the network (label num_classes is its null label); 0:
            unconditional, no labels are passed.
        data_scale: a > 0: the teacher was trained on a * x0 of our data x0, an exact change of
            time (raw SD-VAE latents: 0.18215).
    """

    def __init__(self, net: nn.Module, convention, num_classes: int = 0, data_scale: float = 1.0) -> None:
        super().__init__()
        if data_scale <= 0:
            raise ValueError(f"data_scale must be > 0, got {data_scale}")
        self.net, self.convention = net, convention
        self.num_classes, self.data_scale = num_classes, float(data_scale)
        self.freeze()

    def call_model(self, x_in: Tensor, timestep: Tensor, class_labels: Tensor | None) -> Tensor:
        out = self.net(x_in, timestep, class_labels=class_labels)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return getattr(out, "sample", out)

    def _model_dtype(self, x: Tensor) -> torch.dtype:
        param = next(self.net.parameters(), None)
        return x.dtype if param is None else param.dtype

    def velocity(self, x, t, class_labels=None):
        a, conv = self.data_scale, self.convention
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
        t = our_time(conv.clamp_time(teacher_time(t, a)), a)  # our time, inside the teacher's range
        x_T, t_T = teacher_space(x, t, a)
        x_in, timestep = conv.model_inputs(x_T, t_T)
        dtype = self._model_dtype(x)
        labels = class_labels if self.num_classes > 0 else None
        out = self.call_model(x_in.to(dtype), timestep.to(torch.float64 if dtype == torch.float64 else torch.float32),
                              labels)
        if out.shape[1] == 2 * x.shape[1]:  # learned-variance channels (DiT): keep the mean prediction
            out = out[:, : x.shape[1]]
        return velocity_from_teacher_space(conv.to_velocity(out.to(x.dtype), x_T, t_T), x_T, t_T, a)


# ------------------------------------------------------------------------------------- diffusers

MODEL_CLASSES = {  # config.json _class_name -> diffusers class we load it with
    "UNet2DModel": "UNet2DModel",
    "DiTTransformer2DModel": "DiTTransformer2DModel",
    "Transformer2DModel": "DiTTransformer2DModel",  # DiT checkpoints saved before the dedicated class
}


def _missing_model(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} {path} does not exist. flowmap_lit reads diffusers models from local directories only: "
        "download the model once where there is internet, e.g. `huggingface-cli download facebook/DiT-XL-2-256 "
        "--local-dir /models/DiT-XL-2-256`, and set teacher path to that directory."
    )


class DiffusersTeacher(SchedulerTeacher):
    """A diffusers ``UNet2DModel`` or ``DiTTransformer2DModel`` read from a local directory.

    ``path`` is a pipeline directory (``<path>/transformer`` or ``<path>/unet``, and
    ``<path>/scheduler``) or a model directory (its ``config.json`` at the top; then give
    ``scheduler``). The class comes from ``config.json``'s ``_class_name`` unless ``model_class``
    is given; the scheduler config fixes the convention (``DiscreteVPConvention`` or
    ``FlowMatchConvention``). Models load with ``local_files_only=True``: nothing is downloaded.

    Class labels: a DiT's null class (classifier-free guidance) is ``num_embeds_ada_norm``, equal
    to our null label ``num_classes``. A ``UNet2DModel`` takes ``class_labels`` when
    ``num_class_embeds`` is set; our null label then exists only if its last embedding is the
    null class: set ``num_classes: num_class_embeds - 1`` for such a model.
    The teacher has no velocity network to copy: give the student explicitly.

    Args:
        path: Local directory (never downloaded): a pipeline directory, or a model directory (then
            give scheduler).
        subfolder: The model's folder inside path; None: path itself when it holds config.json,
            else transformer/ or unet/.
        model_class: "UNet2DModel" or "DiTTransformer2DModel" ("Transformer2DModel" is read as a
            DiT); None: config.json's _class_name.
        scheduler: Scheduler directory or scheduler_config.json, whose config fixes the convention;
            None: <path>/scheduler.
        prediction_type: Overrides the scheduler config's prediction type: "epsilon", "v_prediction"
            or "sample" (discrete schedules only: flow-matching models predict the velocity).
        num_classes: Classes of the teacher (our null label num_classes); None: the config's
            num_embeds_ada_norm (DiT) or num_class_embeds (UNet2DModel, which has a null class only
            if its last embedding is one: then set num_class_embeds - 1).
        data_scale: a > 0: the teacher was trained on a * x0 of our data x0, an exact change of
            time (raw SD-VAE latents: 0.18215).
        dtype: Dtype of the weights: "float32", "bfloat16" or "float16".
    """

    def __init__(
        self,
        path: str,
        subfolder: str | None = None,
        model_class: str | None = None,
        scheduler: str | None = None,
        prediction_type: str | None = None,
        num_classes: int | None = None,
        data_scale: float = 1.0,
        dtype: str = "float32",
    ) -> None:
        import diffusers

        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        root = Path(path).expanduser()
        if not root.is_dir():
            raise _missing_model(root, "diffusers model directory")
        if subfolder is not None:
            model_dir = root / subfolder
        elif (root / "config.json").is_file():
            model_dir = root
        else:
            model_dir = next((root / s for s in ("transformer", "unet") if (root / s / "config.json").is_file()),
                             root / "transformer")
        if not (model_dir / "config.json").is_file():
            raise _missing_model(model_dir / "config.json", "model config")
        config = json.loads((model_dir / "config.json").read_text())
        name = model_class or config.get("_class_name", "")
        if name not in MODEL_CLASSES:
            raise ValueError(f"{model_dir}: model class {name!r} is not supported; use one of {sorted(MODEL_CLASSES)}")
        if name == "Transformer2DModel" and config.get("norm_type") != "ada_norm_zero":
            raise ValueError(f"{model_dir}: a Transformer2DModel is read as a DiT only with norm_type ada_norm_zero")
        cls = getattr(diffusers, MODEL_CLASSES[name])
        net = cls.from_pretrained(str(model_dir), local_files_only=True, torch_dtype=getattr(torch, dtype))
        sched_path = Path(scheduler).expanduser() if scheduler is not None else root / "scheduler"
        convention = convention_from_scheduler(load_scheduler(sched_path), prediction_type)
        self.is_unet = cls.__name__ == "UNet2DModel"
        if num_classes is None:
            key = "num_class_embeds" if self.is_unet else "num_embeds_ada_norm"
            num_classes = int(config.get(key) or 0)
        self.class_embeds = int(config.get("num_class_embeds") or 0) if self.is_unet else None
        super().__init__(net, convention, num_classes, data_scale)
        self.path, self.sample_size = str(root), config.get("sample_size")
        self.in_channels = config.get("in_channels")

    def call_model(self, x_in, timestep, class_labels):
        if self.is_unet:
            no_null = class_labels is not None and self.num_classes >= self.class_embeds
            if no_null and bool((class_labels >= self.class_embeds).any()):
                raise ValueError(
                    f"this UNet2DModel has {self.class_embeds} class embeddings and no null class: classifier-free "
                    "guidance is unavailable (use autoguidance), or set num_classes to num_class_embeds - 1 if its "
                    "last embedding is the null class"
                )
            return self.net(x_in, timestep, class_labels=class_labels, return_dict=False)[0]
        return self.net(x_in, timestep=timestep, class_labels=class_labels, return_dict=False)[0]
