"""A diffusers pipeline around an exported flow map: student + VAE + k-step grids (needs diffusers).

    from flowmap_lit.diffusers_pipeline import FlowMapPipeline
    pipe = FlowMapPipeline.from_pretrained("exported/imagenet/pipeline")    # a local directory
    images = pipe(class_labels=[207, 360], num_inference_steps=4).images    # PIL images

Components, each saved with ``save_pretrained`` in its own folder:

- ``flowmap``: :class:`FlowMapModel`, a diffusers ``ModelMixin`` holding the network of an export
  (its class and arguments, classes, guidance, gamma, tuned grids and data normalization in its config);
- ``vae``: the ``AutoencoderKL`` that decodes the latents;
- ``scheduler``: diffusers' own ``FlowMapEulerDiscreteScheduler`` (diffusers 0.42 ships it), whose
  step ``x_r = x_t + (r - t) u(x_t, t, r)`` is our ``f(x, t, s) = x + (s - t) F(x, t, s)`` with
  ``sigma = t``. The k-step grid (the tuned one where the export has one, else uniform) goes in as
  its ``sigmas``; a ``shift`` other than 1 in its config reshapes the uniform grids only (tuned
  grids are used as they are). Older diffusers without that class get :class:`FlowMapGridScheduler`,
  which holds the grids itself, and pipelines saved with it keep loading and sampling as before.

Gamma sampling (partial re-noising, ``flowmap_lit.solvers.gamma_sample``): diffusers' scheduler
has no re-noising step, so each step jumps with the scheduler to ``s~`` (its any-step
``r_timestep``) and the pipeline re-noises up to the next time itself; ``gamma = 0`` (the default)
is the scheduler's plain step. Either way the samples are :meth:`flowmap_lit.flowmap.FlowMap.sample`'s
(the checkpoint's own sampler) from the same noise on the same grid; the latents are then
un-normalized with the data statistics, divided by ``scaling_factor`` and decoded.

Text-conditioned adapter flow maps (a ``LoRAFlowMap`` on an SD3 or FLUX transformer) have their own
pipeline, :class:`FlowMapTextPipeline`::

    pipe = FlowMapTextPipeline.from_pretrained("exported/flux_lora/pipeline")
    images = pipe(prompt_embeds=t5, pooled_prompt_embeds=pooled, num_inference_steps=4).images

Its ``flowmap`` component, :class:`FlowMapAdapterModel`, is an export directory (``flowmap.json``,
the adapters in ``student.safetensors``) that references the base transformer by its local path,
never copying it; the same scheduler steps it with the same grids; the VAE decodes
``x / scaling_factor + shift_factor`` (the SD3 and FLUX latents' convention), or ``output_type="latent"``
returns the latents. Prompt text needs a local text-encoder folder (``text_encoder_path``); otherwise the
embeddings come in as diffusers' ``prompt_embeds`` and ``pooled_prompt_embeds``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ConfigMixin, DiffusionPipeline, ModelMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from flowmap_lit.checkpoints.trust import UntrustedCodeError
from flowmap_lit.flowmap import FlowMap, instantiate
from flowmap_lit.grids import check_grid, load_schedules, schedules_doc
from flowmap_lit.interpolant import uniform_schedule


def flowmap_scheduler_class():
    """diffusers' ``FlowMapEulerDiscreteScheduler``, or None where this diffusers has none (older releases)."""
    import diffusers

    return getattr(diffusers, "FlowMapEulerDiscreteScheduler", None)


class FlowMapModel(ModelMixin, ConfigMixin):
    """The flow map network as a diffusers model (``save_pretrained``/``from_pretrained``)."""

    @register_to_config
    def __init__(self, network: dict, num_classes: int = 0, condition_on_guidance: bool = False,
                 guidance: float | None = None, sample_gamma: float = 0.0, data: dict | None = None,
                 scaling_factor: float = 1.0, schedules: dict | None = None) -> None:
        super().__init__()
        # config.json comes with the pipeline: only this package's networks are built from it (a network of
        # another package: build the FlowMap with load_flowmap(..., trust_code=True) and use from_flowmap)
        net = instantiate(network, "the pipeline's flow map config.json")
        tuned = load_schedules(schedules) if schedules else None  # the JSON of flowmap_lit.grids (schedules_doc)
        self.flowmap = FlowMap(net, num_classes, condition_on_guidance, guidance, sample_gamma, tuned, data=data)

    def forward(self, x, t, s, class_labels=None, guidance=None):
        return self.flowmap(x, t, s, class_labels, guidance)


class FlowMapGridScheduler(SchedulerMixin, ConfigMixin):
    """The k-step time grids ``1 = t_0 > ... > t_k = 0`` (and gammas) the flow map samples on: the
    pipeline's scheduler where diffusers has no ``FlowMapEulerDiscreteScheduler`` (and in pipelines
    saved that way)."""

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(self, grids: dict | None = None, gammas: dict | None = None, sample_gamma: float = 0.0) -> None:
        for k, g in (grids or {}).items():
            check_grid(g, int(k))
        self.timesteps = uniform_schedule(1)

    def grid(self, num_inference_steps: int) -> tuple[torch.Tensor, float]:
        key = str(num_inference_steps)
        grids, gammas = self.config.grids or {}, self.config.gammas or {}
        if key in grids:
            return check_grid(grids[key], num_inference_steps), float(gammas.get(key, self.config.sample_gamma))
        return uniform_schedule(num_inference_steps), float(self.config.sample_gamma)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.timesteps = self.grid(num_inference_steps)[0].to(device)


class FlowMapPipelineOutput(BaseOutput):
    images: list | torch.Tensor


def _check_components(path, trust_code: bool) -> None:
    """Refuse a local ``model_index.json`` that names components outside flowmap_lit and diffusers (diffusers
    imports whatever library a component names) unless ``trust_code``."""
    index = Path(path) / "model_index.json"
    if trust_code or not index.is_file():
        return
    components = {k: v for k, v in json.loads(index.read_text()).items()
                  if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None}
    foreign = sorted(f"{k}: {v[0]}.{v[1]}" for k, v in components.items()
                     if v[0].split(".")[0] not in ("flowmap_lit", "diffusers"))
    if foreign:
        raise UntrustedCodeError(f"{index} names components outside flowmap_lit and diffusers ({foreign}); "
                                 "loading them would import code that the file chooses. If you trust the "
                                 "file's source, pass trust_code=True.")


def _default_scheduler(fm: FlowMap) -> SchedulerMixin:
    """diffusers' ``FlowMapEulerDiscreteScheduler``, or, on an older diffusers, our own that holds the grids."""
    euler = flowmap_scheduler_class()
    if euler is not None:
        return euler(num_train_timesteps=1000, shift=1.0)
    doc = schedules_doc(fm.schedules)
    return FlowMapGridScheduler(grids=doc["grids"], gammas=doc["gamma"], sample_gamma=fm.sample_gamma)


def _postprocess(images: torch.Tensor, output_type: str, numpy_to_pil):
    images = (images / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    return arr if output_type == "np" else numpy_to_pil(arr)


class _FlowMapSampling:
    """What both pipelines share: the k-step grids and the steps with the scheduler (``self.flowmap.flowmap`` is
    the :class:`FlowMap`, ``self.scheduler`` diffusers' ``FlowMapEulerDiscreteScheduler`` or our
    :class:`FlowMapGridScheduler`)."""

    def sampling_grid(self, num_inference_steps: int) -> tuple[torch.Tensor, float]:
        """The ``num_inference_steps``-step time grid (float64, 1 to 0) and its gamma: the tuned ones where
        the export has them (in the flow map's config, or a :class:`FlowMapGridScheduler`), else uniform
        (reshaped by the diffusers scheduler's ``shift`` when it is not 1) and the model's gamma."""
        if isinstance(self.scheduler, FlowMapGridScheduler):
            return self.scheduler.grid(num_inference_steps)
        fm = self.flowmap.flowmap
        if num_inference_steps in fm.schedules:
            return fm.grid(num_inference_steps)
        shift = float(getattr(self.scheduler.config, "shift", 1.0))
        grid = uniform_schedule(num_inference_steps)
        if shift != 1.0:
            grid = self.scheduler.apply_shift(grid)
        return grid, float(fm.sample_gamma)

    def _scheduler_sigmas(self, grid: torch.Tensor) -> list[float]:
        """The ``sigmas`` that make the scheduler's schedule ``grid``: its ``shift`` is applied to them, so
        they are the grid mapped through the inverse shift (the grid itself when the shift is 1)."""
        shift = float(getattr(self.scheduler.config, "shift", 1.0))
        sigmas = grid[:-1]
        if shift != 1.0:
            sigmas = sigmas / (shift - (shift - 1.0) * sigmas)
        return sigmas.tolist()

    def _lam(self, n: int, guidance: float | None, device) -> torch.Tensor | None:
        fm = self.flowmap.flowmap
        scale = fm.guidance if guidance is None else guidance
        if fm.condition_on_guidance and scale is not None:
            return torch.full((n,), float(scale), device=device)
        return None

    def _sample(self, latents: torch.Tensor, labels, grid: torch.Tensor, gamma: float, guidance: float | None,
                generator: torch.Generator | None, cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``FlowMap.sample`` on ``grid``: by the flow map itself under a :class:`FlowMapGridScheduler`, else with
        the steps taken by diffusers' ``FlowMapEulerDiscreteScheduler``."""
        fm = self.flowmap.flowmap
        if isinstance(self.scheduler, FlowMapGridScheduler):
            return fm.sample(latents, labels, schedule=grid, gamma=gamma, guidance=guidance, generator=generator,
                             cond=cond)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        scheduler = self.scheduler
        x = latents if latents.dtype in (torch.float32, torch.float64) else latents.float()
        lam = self._lam(x.shape[0], guidance, x.device)
        if fm.num_classes == 0:
            labels = None
        elif labels is None:
            raise ValueError(f"this flow map is class-conditional ({fm.num_classes} classes): pass class_labels")
        cond = cond or {}
        scheduler.set_timesteps(sigmas=self._scheduler_sigmas(grid), device=x.device)
        sigmas = scheduler.sigmas.double().cpu()
        if not torch.allclose(sigmas, grid, rtol=0, atol=1e-12):
            raise ValueError(f"the scheduler's sigmas {sigmas.tolist()} are not the grid {grid.tolist()}")
        num_train = scheduler.config.num_train_timesteps
        batch = x.shape[0]
        for i, timestep in enumerate(scheduler.timesteps):
            t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
            target = t_next
            if gamma > 0.0:  # jump to s~ with sigma(s~) = sqrt(1 - gamma^2) sigma(t_next), then re-noise
                sigma_next = t_next / (1 - t_next)
                sigma_jump = (1 - gamma**2) ** 0.5 * sigma_next
                target = sigma_jump / (1 + sigma_jump)
            t_vec = torch.full((batch,), t_cur, device=x.device, dtype=x.dtype)
            s_vec = torch.full((batch,), target, device=x.device, dtype=x.dtype)
            velocity = fm(x, t_vec, s_vec, labels, lam, **cond).to(x.dtype)
            if gamma == 0.0:
                x = scheduler.step(velocity, timestep, x).prev_sample
                continue
            r_timestep = torch.tensor(target * num_train, dtype=torch.float64, device=x.device)
            x_jump = scheduler.step(velocity, timestep, x, r_timestep=r_timestep).prev_sample
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if t_next > 0 else 0.0
            x = (1 - t_next) * (x_jump / (1 - target) + gamma * sigma_next * z)
        return x


class FlowMapPipeline(_FlowMapSampling, DiffusionPipeline):
    """k-step class-conditional sampling with a distilled flow map, decoded by a VAE."""

    model_cpu_offload_seq = "flowmap->vae"

    def __init__(self, flowmap: FlowMapModel, vae: AutoencoderKL, scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(flowmap=flowmap, vae=vae, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, trust_code: bool = False, **kwargs):
        """diffusers' ``from_pretrained``, after checking that a local ``model_index.json`` names only
        components of flowmap_lit and diffusers: diffusers imports whatever library a component names."""
        _check_components(pretrained_model_name_or_path, trust_code)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_flowmap(cls, fm: FlowMap, vae: str | AutoencoderKL, scaling_factor: float = 1.0) -> FlowMapPipeline:
        """Wrap an exported :class:`~flowmap_lit.flowmap.FlowMap` (``load_flowmap``) and a VAE (or its local
        directory)."""
        if fm.network_config is None:
            raise ValueError("the flow map does not record its network config; load it with "
                             "flowmap_lit.export.load_flowmap")
        if getattr(fm.net, "shares_teacher_weights", False):
            raise ValueError("this flow map is an adapter (LoRA) student of a text-to-image transformer: wrap it "
                             "with flowmap_lit.diffusers_pipeline.FlowMapTextPipeline.from_flowmap")
        if isinstance(vae, str):
            from flowmap_lit.checkpoints.vae import load_vae

            vae = load_vae(vae)
        doc = schedules_doc(fm.schedules)
        model = FlowMapModel(fm.network_config, fm.num_classes, fm.condition_on_guidance, fm.guidance,
                             fm.sample_gamma, fm.data, scaling_factor, doc if fm.schedules else None)
        model.flowmap.net.load_state_dict(fm.net.state_dict())
        return cls(flowmap=model.eval(), vae=vae.eval(), scheduler=_default_scheduler(fm))

    @torch.no_grad()
    def __call__(self, class_labels=None, num_inference_steps: int = 4, num_images: int | None = None,
                 guidance_scale: float | None = None, gamma: float | None = None,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        fm = self.flowmap.flowmap
        device = fm.device
        labels = None
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, device=device).long().flatten()
        n = num_images or (labels.numel() if labels is not None else 1)
        if latents is None:
            latents = torch.randn((n, *fm.shape), generator=generator, device=device)
        grid, tuned_gamma = self.sampling_grid(num_inference_steps)
        gamma = tuned_gamma if gamma is None else gamma
        x = self._sample(latents.to(device), labels, grid, gamma, guidance_scale, generator)
        z = fm.denormalize(x) / self.flowmap.config.scaling_factor
        images = self.vae.decode(z.to(self.vae.dtype)).sample.float()
        out = _postprocess(images, output_type, self.numpy_to_pil)
        return FlowMapPipelineOutput(images=out) if return_dict else (out,)


class FlowMapAdapterModel(ModelMixin, ConfigMixin):
    """An exported adapter flow map as a diffusers model: a ``LoRAFlowMap`` on the base transformer of an
    ``SD3Teacher`` or ``FluxTeacher``, which is referenced by its local path and never copied.

    Its folder is an export directory (``flowmap.json`` and the adapters in ``student.safetensors``, as
    ``python -m flowmap_lit export`` writes them, so ``load_flowmap`` reads it too) plus diffusers'
    ``config.json`` (the VAE's ``scaling_factor`` and ``shift_factor``). ``from_pretrained`` builds the base
    transformer from the path in ``flowmap.json`` (``base_path=`` points it elsewhere) and loads the adapters;
    it builds only classes of this package unless ``trust_code=True``.
    """

    ignore_for_config = ["flowmap"]

    @register_to_config
    def __init__(self, scaling_factor: float = 1.0, shift_factor: float = 0.0, flowmap: FlowMap | None = None) -> None:
        super().__init__()
        if flowmap is None:
            raise ValueError("FlowMapAdapterModel wraps a loaded adapter flow map: build it with from_pretrained "
                             "(a folder it saved) or FlowMapAdapterModel(flowmap=load_flowmap(EXPORT_DIR))")
        if not getattr(flowmap.net, "shares_teacher_weights", False) or not callable(
                getattr(flowmap.net, "own_state_dict", None)):
            raise ValueError(f"FlowMapAdapterModel takes an adapter (LoRA) flow map, not {type(flowmap.net).__name__}"
                             "; use FlowMapModel / FlowMapPipeline for a standalone network")
        if flowmap.network_config is None or flowmap.base_config is None:
            raise ValueError("the flow map does not record its network and base model; load it with "
                             "flowmap_lit.export.load_flowmap")
        self.flowmap = flowmap

    def forward(self, x, t, s, guidance=None, **cond):
        return self.flowmap(x, t, s, None, guidance, **cond)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """``config.json``, ``flowmap.json`` and the adapters (``student.safetensors``); not the base model."""
        from flowmap_lit.export import loaded_config, write_export

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.save_config(out)
        write_export(loaded_config(self.flowmap), self.flowmap.net.own_state_dict(), out)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, base_path: str | None = None, trust_code: bool = False,
                        device: str | torch.device = "cpu", **kwargs) -> FlowMapAdapterModel:
        """The model saved in the local folder ``pretrained_model_name_or_path`` (diffusers' loading options
        such as ``torch_dtype`` are ignored: the base model's dtype is the one its teacher records)."""
        from flowmap_lit.export import load_flowmap

        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a local FlowMapAdapterModel folder (it never downloads)")
        config = cls.load_config(str(folder))
        fm = load_flowmap(folder, device=device, trust_code=trust_code, base_path=base_path)
        return cls(scaling_factor=config.get("scaling_factor", 1.0), shift_factor=config.get("shift_factor", 0.0),
                   flowmap=fm).eval()


def prompt_style(fm: FlowMap) -> str:
    """How prompts are encoded for the base model of an adapter flow map: "flux" for a ``FluxTeacher``, else "sd3"."""
    name = str((fm.base_config or {}).get("class_path", ""))
    return "flux" if name.rsplit(".", 1)[-1] == "FluxTeacher" else "sd3"


class FlowMapTextPipeline(_FlowMapSampling, DiffusionPipeline):
    """k-step text-to-image sampling with an exported adapter (LoRA) flow map of an SD3 or FLUX transformer.

    Components: ``flowmap`` (:class:`FlowMapAdapterModel`: the adapters, the base transformer referenced by its
    path), ``scheduler`` (diffusers' ``FlowMapEulerDiscreteScheduler``, or :class:`FlowMapGridScheduler` on an
    older diffusers) and, optionally, ``vae`` (an ``AutoencoderKL``; without one only ``output_type="latent"``
    works). ``text_encoder_path`` is the local folder of the text encoders (a diffusers pipeline folder with
    ``text_encoder*/`` and ``tokenizer*/``, or one encoder) that turns ``prompt`` strings into embeddings as
    ``prepare text-prompts --encoder`` does (``prompt_style``: "sd3" or "flux", by default the base
    model's); without it the embeddings come
    in as ``prompt_embeds`` (P, L, D) and ``pooled_prompt_embeds`` (P, D'), what the model's pipeline's
    ``encode_prompt`` returns.
    """

    model_cpu_offload_seq = "flowmap->vae"
    _optional_components = ["vae"]

    def __init__(self, flowmap: FlowMapAdapterModel, scheduler: SchedulerMixin, vae: AutoencoderKL | None = None,
                 text_encoder_path: str | None = None, prompt_style: str | None = None, clip_max_length: int = 77,
                 t5_max_length: int | None = None) -> None:
        super().__init__()
        self.register_modules(flowmap=flowmap, scheduler=scheduler, vae=vae)
        self.register_to_config(text_encoder_path=text_encoder_path, prompt_style=prompt_style,
                                clip_max_length=clip_max_length, t5_max_length=t5_max_length)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, trust_code: bool = False,
                        base_path: str | None = None, **kwargs):
        """diffusers' ``from_pretrained`` of a local folder (components checked as ``FlowMapPipeline`` does);
        ``base_path`` points the adapters to their base model where it has moved."""
        _check_components(pretrained_model_name_or_path, trust_code)
        if "flowmap" not in kwargs:
            kwargs["flowmap"] = FlowMapAdapterModel.from_pretrained(
                Path(pretrained_model_name_or_path) / "flowmap", base_path=base_path, trust_code=trust_code)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_flowmap(cls, fm: FlowMap, vae: str | AutoencoderKL | None = None, scaling_factor: float | None = None,
                     shift_factor: float | None = None, **config) -> FlowMapTextPipeline:
        """Wrap an exported adapter flow map (``load_flowmap``) and, optionally, a VAE (or its local directory).
        ``scaling_factor`` and ``shift_factor``: the latents decode as ``x / scaling_factor + shift_factor``;
        None: the VAE config's (SD3: 1.5305, 0.0609; FLUX: 0.3611, 0.1159), else 1 and 0. ``config``: the
        pipeline's ``text_encoder_path``, ``prompt_style``, ``clip_max_length``, ``t5_max_length``."""
        if isinstance(vae, str):
            from flowmap_lit.checkpoints.vae import load_vae

            vae = load_vae(vae)
        vae_config = getattr(vae, "config", None)
        if scaling_factor is None:
            scaling_factor = float(getattr(vae_config, "scaling_factor", None) or 1.0)
        if shift_factor is None:
            shift_factor = float(getattr(vae_config, "shift_factor", None) or 0.0)
        model = FlowMapAdapterModel(scaling_factor=scaling_factor, shift_factor=shift_factor, flowmap=fm)
        return cls(flowmap=model.eval(), scheduler=_default_scheduler(fm),
                   vae=vae.eval() if vae is not None else None, **config)

    def encode_prompt(self, prompt: str | list[str], device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prompt_embeds, pooled_prompt_embeds)`` of ``prompt`` from the local ``text_encoder_path`` folder
        (``flowmap_lit.data.encode_prompts``)."""
        if self.config.text_encoder_path is None:
            raise ValueError("this pipeline has no text encoder: pass prompt_embeds and pooled_prompt_embeds, or "
                             "build it with text_encoder_path=DIR (a local folder of the encoders)")
        from flowmap_lit.data import encode_prompts

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        style = self.config.prompt_style or prompt_style(self.flowmap.flowmap)
        tokens, pooled = encode_prompts(prompts, self.config.text_encoder_path, style,
                                        clip_max_length=self.config.clip_max_length,
                                        t5_max_length=self.config.t5_max_length, device=str(device or "cpu"))
        return (torch.from_numpy(tokens).to(device),
                None if pooled is None else torch.from_numpy(pooled).to(device))

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None, num_inference_steps: int = 4,
                 num_images_per_prompt: int = 1, guidance_scale: float | None = None, gamma: float | None = None,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Samples for each prompt (``num_images_per_prompt`` each, a prompt's images side by side, as diffusers
        orders them): ``prompt`` (with a ``text_encoder_path``) or its embeddings ``prompt_embeds`` (P, L, D) and
        ``pooled_prompt_embeds`` (P, D'). ``latents``: the initial noise (B, C, H, W), else drawn with
        ``generator`` in the flow map's shape. ``output_type``: "pil", "np", "pt" (decoded images in [0, 1]) or
        "latent" (the sampled latents, as the transformer sees them). ``guidance_scale``: the scale a student
        trained conditioned on guidance is fed (None: the export's)."""
        fm = self.flowmap.flowmap
        device = fm.device
        if prompt is not None:
            if prompt_embeds is not None:
                raise ValueError("pass prompt or prompt_embeds, not both")
            prompt_embeds, pooled_prompt_embeds = self.encode_prompt(prompt, device)
        if prompt_embeds is None or pooled_prompt_embeds is None:
            raise ValueError("the flow map needs text conditioning: prompt_embeds (P, L, D) and pooled_prompt_embeds "
                             "(P, D'), or prompt with a text encoder")
        if prompt_embeds.ndim == 2:
            prompt_embeds, pooled_prompt_embeds = prompt_embeds[None], pooled_prompt_embeds.reshape(1, -1)
        cond = {"encoder_hidden_states": prompt_embeds.to(device, torch.float32),
                "pooled_projections": pooled_prompt_embeds.to(device, torch.float32)}
        cond = {k: v.repeat_interleave(num_images_per_prompt, dim=0) for k, v in cond.items()}
        n = cond["encoder_hidden_states"].shape[0]
        if latents is None:
            if not fm.shape:
                raise ValueError("the flow map records no latent shape: pass latents (B, C, H, W)")
            latents = torch.randn((n, *fm.shape), generator=generator, device=device)
        if latents.shape[0] != n:
            raise ValueError(f"{latents.shape[0]} latents for {n} samples (prompts x num_images_per_prompt)")
        grid, tuned_gamma = self.sampling_grid(num_inference_steps)
        gamma = tuned_gamma if gamma is None else gamma
        x = self._sample(latents.to(device), None, grid, gamma, guidance_scale, generator, cond)
        if output_type == "latent":
            out = x
        else:
            if self.vae is None:
                raise ValueError("this pipeline has no VAE: pass output_type='latent', or build it with a vae")
            config = self.flowmap.config
            z = x / config.scaling_factor + config.shift_factor
            images = self.vae.decode(z.to(self.vae.dtype)).sample.float()
            out = _postprocess(images, output_type, self.numpy_to_pil)
        return FlowMapPipelineOutput(images=out) if return_dict else (out,)
