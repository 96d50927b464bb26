"""Text-to-image flow-map distillation of a diffusers transformer with a LoRA student.

- ``SD3Teacher``: a diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5) as a frozen
  velocity teacher. diffusers' flow-matching convention is ours (docs/design.md section 1): it noises
  ``x = (1 - sigma) x0 + sigma * noise`` with ``sigma = t``, feeds ``timestep = t *
  num_train_timesteps`` (1000), and the network predicts ``noise - x0 = v``; the scheduler's
  Euler step is ``x <- x + (sigma_next - sigma) * model_output`` (``FlowMatchEulerDiscreteScheduler
  .step``), our ODE ``dx/dt = v``. The scheduler's ``shift`` only moves its sampling times.
- ``LoRAFlowMap``: the student ``F(x, t, s)`` = the SAME transformer object with peft LoRA adapters
  on its attention projections, plus zero-initialized embeddings of ``t - s`` (and of the guidance
  scale) added to the transformer's time embedding (a forward hook on ``time_text_embed``).
  LoRA's up-projection and the embeddings' last layers start at zero, so ``F(x, t, s) = v(x, t)``
  exactly at step 0 (docs/design.md section 2). The teacher runs the same module with the adapters
  disabled and no gap embedding: one copy of the base weights in memory, frozen; only the LoRA
  and embedding parameters train, and only they go into checkpoints. The same student serves any
  ``TransformerTeacher`` (SD3 here, FLUX in ``flowmap_lit.teachers.flux``): the teacher says how to
  call its transformer (``transformer_call``) and which projections get adapters by default.

Conditioning comes from the data (``batch["cond"]``: ``encoder_hidden_states`` (B, L, D) and
``pooled_projections`` (B, D'), precomputed text embeddings, see ``flowmap_lit/data/format.py``).
The gap embedding uses low frequencies (docs/design.md section 3, "Stability"); the base model's own
timestep embedding is the usual ``1000 t`` sinusoid, which the JVP differentiates as it is.

JVP (docs/design.md section 4): inside the tangent pass the student runs diffusers' SDPA calls on the math
kernel (fused kernels have no forward-AD rule), so ``jvp_backend: func`` works; a test checks it against
float64 finite differences on CPU.

peft and diffusers are optional (``pip install -e .[lora]``) and imported on first use.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from flowmap_lit.networks.attention import math_only_active
from flowmap_lit.networks.embeddings import FourierTimeEmbedding, batch_vector
from flowmap_lit.teachers.base import Teacher

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
DOWNLOAD_HINT = (
    "Download the transformer once (internet access and the model license on huggingface.co needed), e.g.\n"
    "  hf download stabilityai/stable-diffusion-3.5-medium --include 'transformer/*' 'scheduler/*' "
    "--local-dir models/sd3.5-medium\n"
    "(older huggingface_hub: huggingface-cli download ...), then set the teacher's path: models/sd3.5-medium"
)


def require_peft():
    """The ``peft`` package, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError as err:
        raise ImportError("the LoRA student needs peft: pip install 'peft>=0.10' (or pip install -e .[lora])") from err
    return peft


def _diffusers_class(name: str, teacher: str):
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(f"the {teacher} teacher needs diffusers: pip install 'diffusers>=0.27' "
                          "(or pip install -e .[lora])") from err
    return getattr(diffusers, name)


def _sd3_class():
    return _diffusers_class("SD3Transformer2DModel", "SD3")


def _dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def scheduler_timesteps(root: Path) -> int | None:
    """``num_train_timesteps`` of the scheduler config next to a transformer, if there is one."""
    for path in (root / "scheduler/scheduler_config.json", root.parent / "scheduler/scheduler_config.json"):
        if path.is_file():
            return int(json.loads(path.read_text()).get("num_train_timesteps", 1000))
    return None


def load_transformer(cls, path: str, subfolder: str | None = None, dtype: str = "float32",
                     hint: str = DOWNLOAD_HINT) -> tuple[nn.Module, Path]:
    """``(transformer, its directory)``: a diffusers transformer class ``cls`` from a LOCAL directory,
    never the network.

    ``path`` is a pipeline directory (with ``transformer/`` and ``scheduler/``) or the transformer's
    own directory (``config.json`` + weights); ``subfolder`` overrides the guess. A missing
    directory is an error that says how to download it once (``hint``).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"teacher directory {root} does not exist. {hint}")
    if subfolder is None:
        subfolder = "transformer" if (root / "transformer/config.json").is_file() else None
    where = root / subfolder if subfolder else root
    if not (where / "config.json").is_file():
        raise FileNotFoundError(f"{where} has no config.json: not a diffusers transformer directory. {hint}")
    model = cls.from_pretrained(str(root), subfolder=subfolder, local_files_only=True, torch_dtype=_dtype(dtype))
    return model, where


def load_sd3_transformer(path: str, subfolder: str | None = None, dtype: str = "float32") -> tuple[nn.Module, int]:
    """``(SD3Transformer2DModel, num_train_timesteps)`` from a LOCAL directory (see ``load_transformer``)."""
    model, where = load_transformer(_sd3_class(), path, subfolder, dtype)
    return model, scheduler_timesteps(where) or 1000


@contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Runs the body with every peft adapter inside ``module`` switched off (the base model), then
    switches them back; the adapters' ``requires_grad`` flags are left exactly as they were."""
    if "peft" not in sys.modules:  # no adapter can exist
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def require_text(encoder_hidden_states: Tensor | None, pooled_projections: Tensor | None, model: str) -> None:
    if encoder_hidden_states is None or pooled_projections is None:
        raise ValueError(f"an {model} transformer needs text conditioning: encoder_hidden_states (B, L, D) and "
                         "pooled_projections (B, D') (batch['cond'] from a text-latent dataset, see "
                         "flowmap_lit/data/format.py)")


def run_in_weight_dtype(transformer: nn.Module, x: Tensor, call: Callable[[torch.dtype], Tensor]) -> Tensor:
    """``call(dtype)`` (which casts its inputs to ``dtype``, the transformer's), its output cast back to
    ``x``'s dtype.

    With low-precision (bf16/fp16) base weights and no autocast active (the JVP's tangent pass
    switches it off), the call runs under autocast to that dtype, so fp32 pieces (LoRA adapters,
    fp32 embeddings) meet the base weights in one dtype: the tangent pass is then as precise as the
    base weights, not fp32.
    """
    dtype = next(transformer.parameters()).dtype
    low = dtype in (torch.bfloat16, torch.float16) and not torch.is_autocast_enabled(x.device.type)
    with torch.autocast(x.device.type, dtype=dtype, enabled=low):
        out = call(dtype)
    return out.to(x.dtype)


def sd3_forward(transformer: nn.Module, x: Tensor, t: Tensor, timestep_scale: float,
                encoder_hidden_states: Tensor | None = None, pooled_projections: Tensor | None = None) -> Tensor:
    """The SD3 transformer's output ``noise - x0`` at our ``(x, t)``: ``timestep = t * timestep_scale``
    (inputs in the transformer's dtype, autocast as ``run_in_weight_dtype`` says)."""
    require_text(encoder_hidden_states, pooled_projections, "SD3")
    t = batch_vector(t, x).to(x.dtype)

    def call(dtype):
        return transformer(hidden_states=x.to(dtype), encoder_hidden_states=encoder_hidden_states.to(dtype),
                           pooled_projections=pooled_projections.to(dtype), timestep=t * timestep_scale,
                           return_dict=False)[0]

    return run_in_weight_dtype(transformer, x, call)


class TransformerTeacher(Teacher):
    """A frozen text-conditioned diffusers transformer: what SD3 and FLUX teachers share.

    A subclass names its diffusers class (``diffusers_class``), its download hint, its default LoRA
    targets (``lora_targets``) and how our ``(x, t, cond)`` becomes a call of the transformer
    (``transformer_call``: a picklable ``fn(transformer, x, t, **cond) -> v``, which a
    ``LoRAFlowMap`` student calls on the same module with its adapters on). ``velocity`` always runs
    the base model, adapters off.
    """

    diffusers_class = ""
    model_name = ""
    download_hint = DOWNLOAD_HINT
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS

    def _build(self, path: str | None, config: dict | None, subfolder: str | None, dtype: str,
               seed: int) -> Path | None:
        """Sets ``self.transformer`` from ``path`` or ``config``; returns the transformer's directory."""
        name = type(self).__name__
        if (path is None) == (config is None):
            raise ValueError(f"{name} needs exactly one of path (a local diffusers directory) and config")
        cls = _diffusers_class(self.diffusers_class, self.model_name)
        where = None
        if path is not None:
            transformer, where = load_transformer(cls, path, subfolder, dtype, self.download_hint)
        else:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                transformer = cls.from_config(config)
            if _dtype(dtype) != torch.float32:
                transformer = transformer.to(_dtype(dtype))
        self.transformer = transformer
        self.num_classes = 0
        self.init_args = dict(path=path, config=config, subfolder=subfolder, dtype=dtype, seed=seed)
        return where

    def freeze(self) -> TransformerTeacher:
        """Eval mode and no grads for the base weights (adapters a student adds stay trainable)."""
        self.eval()
        for name, p in self.named_parameters():
            if "lora_" not in name:
                p.requires_grad_(False)
        return self

    @property
    def network(self) -> nn.Module:
        return self.transformer

    @property
    def transformer_call(self) -> Callable[..., Tensor]:
        raise NotImplementedError

    def export_config(self) -> dict:
        """``{"class_path", "init_args"}`` that builds this teacher again (the base model of an exported
        LoRA flow map is referenced this way, by its path, never copied)."""
        args = dict(self.init_args)
        if args.get("path") is not None:
            resolved = Path(args["path"]).expanduser()
            args["path"] = str(resolved.resolve()) if resolved.is_dir() else args["path"]
        return {"class_path": f"flowmap_lit.teachers.{type(self).__name__}", "init_args": args}

    def velocity(self, x, t, class_labels=None, encoder_hidden_states=None, pooled_projections=None):
        with adapters_disabled(self.transformer):
            return self.transformer_call(self.transformer, x, t, encoder_hidden_states=encoder_hidden_states,
                                         pooled_projections=pooled_projections)


class SD3Teacher(TransformerTeacher):
    """A diffusers ``SD3Transformer2DModel`` as a frozen text-conditioned velocity teacher.

    Give ``path`` (a local directory written by ``save_pretrained`` or downloaded from the Hub; see
    ``load_sd3_transformer``) or ``config`` (the transformer's config dict: random weights, seeded,
    for tests). ``velocity(x, t, encoder_hidden_states=..., pooled_projections=...)`` always runs the
    base model, even while a ``LoRAFlowMap`` student has adapters on the same module.

    Args:
        path: Local diffusers directory (never downloaded): a pipeline root (with transformer/ and
            scheduler/) or the transformer's own folder; exactly one of path and config.
        config: An SD3Transformer2DModel config dict: a transformer with random (seeded) weights,
            for tests, instead of path.
        subfolder: Folder of the transformer inside path; None: "transformer" if present, else
            path itself.
        num_train_timesteps: The transformer is called at timestep = t * num_train_timesteps; None:
            the value in the scheduler config next to the transformer, else 1000.
        dtype: Dtype of the base weights: "float32", "bfloat16" or "float16".
        seed: Initialization seed of a transformer built from config.
    """

    diffusers_class, model_name = "SD3Transformer2DModel", "SD3"

    def __init__(
        self,
        path: str | None = None,
        config: dict | None = None,
        subfolder: str | None = None,
        num_train_timesteps: int | None = None,
        dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        super().__init__()
        where = self._build(path, config, subfolder, dtype, seed)
        steps = (scheduler_timesteps(where) if where is not None else None) or 1000
        self.timestep_scale = float(num_train_timesteps or steps)
        self.init_args["num_train_timesteps"] = num_train_timesteps
        self.freeze()

    @property
    def transformer_call(self) -> Callable[..., Tensor]:
        return functools.partial(sd3_forward, timestep_scale=self.timestep_scale)


def resolve_targets(net: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the ``nn.Linear`` modules of ``net`` that ``targets`` name: a target is a name
    suffix (``to_q`` matches ``transformer_blocks.0.attn.to_q``) or, with ``*``/``?``/``[``, a glob
    over the full name (``single_transformer_blocks.*.proj_out``)."""

    def hit(name: str, target: str) -> bool:
        if any(c in target for c in "*?["):
            return fnmatch.fnmatchcase(name, target)
        return name == target or name.endswith("." + target)

    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and any(hit(n, t) for t in targets)]
    unused = [t for t in targets if not any(hit(n, t) for n in names)]
    if not names or unused:
        raise ValueError(f"LoRA target modules {unused or list(targets)} match no nn.Linear of "
                         f"{type(net).__name__}")
    return names


class GapEmbedding(nn.Module):
    """``MLP(fourier(u))`` with ``fourier(0) = 0`` and bias-free layers, the last zero-initialized:
    it is exactly 0 at step 0 for every ``u``, and exactly 0 at ``u = 0`` always."""

    def __init__(self, out_dim: int, channels: int = 64, hidden: int = 256, max_freq: float = 16.0) -> None:
        super().__init__()
        self.fourier = FourierTimeEmbedding(channels, min_freq=0.5, max_freq=max_freq, zero_at_origin=True)
        self.fc0 = nn.Linear(channels, hidden, bias=False)
        self.fc1 = nn.Linear(hidden, out_dim, bias=False)
        nn.init.zeros_(self.fc1.weight)

    def forward(self, u: Tensor) -> Tensor:
        with torch.autocast(u.device.type, enabled=False):  # float32 embeddings (docs/design.md section 2)
            e = self.fourier(u.float())
            return self.fc1(nn.functional.silu(self.fc0(e)))


class LoRAFlowMap(nn.Module):
    """Flow-map student ``F(x, t, s)`` sharing the teacher's transformer (see the module docstring).

    Built empty from the config; ``FlowMapDistillModule`` calls ``attach(teacher)`` (because
    ``shares_teacher_weights``), which injects the LoRA adapters into ``teacher.network`` in place,
    freezes its base weights and adds the gap (and guidance) embeddings. Any ``TransformerTeacher``
    (``SD3Teacher``, ``FluxTeacher``) works: the student calls the transformer as the teacher does.

    Args:
        rank: LoRA rank r of the adapters.
        alpha: LoRA alpha: the adapters' update is scaled by alpha / rank; None: alpha = rank.
        target_modules: Modules of the transformer that get adapters: name suffixes (to_q matches
            every attention's to_q) or globs over the full name (single_transformer_blocks.*.proj_out);
            nn.Linear only. None: the teacher's default, for SD3 the joint-attention projections (to_q,
            to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out), for FLUX those and
            the single blocks' proj_mlp and proj_out.
        lora_dropout: Dropout on the adapters' input; 0 keeps the JVP pass and the grad pass
            identical.
        gap_channels: Fourier features of the gap t - s (and of lam - 1 for the guidance embedding).
        gap_hidden: Hidden width of the gap (and guidance) embedding MLP.
        gap_max_freq: Highest angular frequency of those features per unit t (the lowest is 0.5);
            keep it low: the JVP differentiates through it (docs/design.md section 3, Stability).
        guidance_embedding: Also embed the guidance scale lam (for condition_on_guidance: true).
    """

    shares_teacher_weights = True

    def __init__(
        self,
        rank: int = 16,
        alpha: float | None = None,
        target_modules: Sequence[str] | None = None,
        lora_dropout: float = 0.0,
        gap_channels: int = 64,
        gap_hidden: int = 256,
        gap_max_freq: float = 16.0,
        guidance_embedding: bool = True,
    ) -> None:
        super().__init__()
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.target_modules = None if target_modules is None else list(target_modules)
        self.lora_dropout = lora_dropout
        self.gap_args = dict(channels=gap_channels, hidden=gap_hidden, max_freq=gap_max_freq)
        self.use_guidance_embedding = guidance_embedding
        self.init_args = dict(rank=rank, alpha=alpha, target_modules=self.target_modules, lora_dropout=lora_dropout,
                              gap_channels=gap_channels, gap_hidden=gap_hidden, gap_max_freq=gap_max_freq,
                              guidance_embedding=guidance_embedding)
        self.transformer: nn.Module | None = None
        self.gap_embed: GapEmbedding | None = None
        self.guidance_embed: GapEmbedding | None = None
        self.transformer_call: Callable[..., Tensor] | None = None  # the teacher's, set by attach
        self._temb_extra: Tensor | None = None

    def export_config(self) -> dict:
        """``{"class_path", "init_args"}`` of this student (built empty; ``attach`` it to its teacher)."""
        return {"class_path": "flowmap_lit.teachers.LoRAFlowMap", "init_args": dict(self.init_args)}

    def attach(self, teacher: Teacher) -> None:
        """Wrap ``teacher.network`` (an SD3 or FLUX transformer) in place: LoRA on it, base weights frozen."""
        peft = require_peft()
        net = teacher.network
        call = getattr(teacher, "transformer_call", None)
        if net is None or not hasattr(net, "time_text_embed") or call is None:
            raise TypeError(f"LoRAFlowMap needs a TransformerTeacher (SD3Teacher, FluxTeacher) whose transformer has "
                            f"a time_text_embed; {type(teacher).__name__} has {type(net).__name__}")
        if self.transformer is not None:
            raise RuntimeError("this LoRAFlowMap is already attached to a teacher")
        targets = self.target_modules or list(getattr(teacher, "lora_targets", DEFAULT_TARGETS))
        names = resolve_targets(net, targets)
        # A regular expression of the full names: peft matches exactly these modules, no others.
        config = peft.LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.lora_dropout,
                                 target_modules="|".join(re.escape(n) for n in names), init_lora_weights=True)
        peft.inject_adapter_in_model(config, net)
        for name, p in net.named_parameters():
            p.requires_grad_("lora_" in name)
            if "lora_" in name and p.dtype != torch.float32:  # train adapters in fp32 over bf16 base weights
                p.data = p.data.float()
        self.transformer = net
        self.transformer_call = call
        dim = net.time_text_embed.timestep_embedder.linear_2.out_features
        device = next(net.parameters()).device
        self.gap_embed = GapEmbedding(dim, **self.gap_args).to(device)
        if self.use_guidance_embedding:
            self.guidance_embed = GapEmbedding(dim, **self.gap_args).to(device)
        net.time_text_embed.register_forward_hook(self._add_to_temb)

    def _add_to_temb(self, module: nn.Module, inputs, output: Tensor) -> Tensor | None:
        if self._temb_extra is None:  # a teacher call: the time embedding as it is
            return None
        return output + self._temb_extra.to(output.dtype)

    def zero_init_s_embedding(self) -> None:
        """Zero the last layers of the gap/guidance embeddings and the LoRA up-projections (F = v)."""
        with torch.no_grad():
            for emb in (self.gap_embed, self.guidance_embed):
                if emb is not None:
                    emb.fc1.weight.zero_()
            for name, p in self.transformer.named_parameters():
                if "lora_B" in name:
                    p.zero_()

    def shared_state_keys(self) -> list[str]:
        """State-dict keys of the teacher's base weights (not stored in distillation checkpoints)."""
        return [f"transformer.{k}" for k in self.transformer.state_dict() if "lora_" not in k]

    def own_state_dict(self) -> dict[str, Tensor]:
        """The student's own weights: the adapters and the gap/guidance embeddings, not the base model."""
        shared = set(self.shared_state_keys())
        return {k: v for k, v in self.state_dict().items() if k not in shared}

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, class_labels=None, guidance=None,
                encoder_hidden_states: Tensor | None = None, pooled_projections: Tensor | None = None) -> Tensor:
        if self.transformer is None:
            raise RuntimeError("LoRAFlowMap is not attached to a teacher (FlowMapDistillModule does it)")
        t = batch_vector(t, x)
        s = t if s is None else batch_vector(s, x)
        extra = self.gap_embed(t - s)
        if guidance is not None:
            if self.guidance_embed is None:
                raise ValueError("guidance given but the student has no guidance embedding (guidance_embedding: true)")
            extra = extra + self.guidance_embed(batch_vector(guidance, x) - 1)
        self._temb_extra = extra
        cond = dict(encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections)
        try:
            if math_only_active():  # inside a JVP: diffusers calls SDPA, whose fused kernels have no forward AD
                with sdpa_kernel(SDPBackend.MATH):
                    return self.transformer_call(self.transformer, x, t, **cond)
            return self.transformer_call(self.transformer, x, t, **cond)
        finally:
            self._temb_extra = None
