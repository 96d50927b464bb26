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


class FlowMapPipeline(DiffusionPipeline):
    """k-step class-conditional sampling with a distilled flow map, decoded by a VAE."""

    model_cpu_offload_seq = "flowmap->vae"

    def __init__(self, flowmap: FlowMapModel, vae: AutoencoderKL, scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(flowmap=flowmap, vae=vae, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, trust_code: bool = False, **kwargs):
        """diffusers' ``from_pretrained``, after checking that a local ``model_index.json`` names only
        components of flowmap_lit and diffusers: diffusers imports whatever library a component names."""
        index = Path(pretrained_model_name_or_path) / "model_index.json"
        if not trust_code and index.is_file():
            components = {k: v for k, v in json.loads(index.read_text()).items()
                          if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None}
            foreign = sorted(f"{k}: {v[0]}.{v[1]}" for k, v in components.items()
                             if v[0].split(".")[0] not in ("flowmap_lit", "diffusers"))
            if foreign:
                raise UntrustedCodeError(f"{index} names components outside flowmap_lit and diffusers ({foreign}); "
                                         "loading them would import code that the file chooses. If you trust the "
                                         "file's source, pass trust_code=True.")
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_flowmap(cls, fm: FlowMap, vae: str | AutoencoderKL, scaling_factor: float = 1.0) -> FlowMapPipeline:
        """Wrap an exported :class:`~flowmap_lit.flowmap.FlowMap` (``load_flowmap``) and a VAE (or its local
        directory)."""
        if fm.network_config is None:
            raise ValueError("the flow map does not record its network config; load it with "
                             "flowmap_lit.export.load_flowmap")
        if isinstance(vae, str):
            from flowmap_lit.checkpoints.vae import load_vae

            vae = load_vae(vae)
        doc = schedules_doc(fm.schedules)
        model = FlowMapModel(fm.network_config, fm.num_classes, fm.condition_on_guidance, fm.guidance,
                             fm.sample_gamma, fm.data, scaling_factor, doc if fm.schedules else None)
        model.flowmap.net.load_state_dict(fm.net.state_dict())
        euler = flowmap_scheduler_class()
        if euler is not None:
            scheduler = euler(num_train_timesteps=1000, shift=1.0)
        else:  # an older diffusers: the grids travel in our own scheduler
            scheduler = FlowMapGridScheduler(grids=doc["grids"], gammas=doc["gamma"], sample_gamma=fm.sample_gamma)
        return cls(flowmap=model.eval(), vae=vae.eval(), scheduler=scheduler)

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

    def _scheduler_sample(self, latents: torch.Tensor, labels, grid: torch.Tensor, gamma: float,
                          guidance: float | None, generator: torch.Generator | None) -> torch.Tensor:
        """``FlowMap.sample`` with the steps taken by diffusers' ``FlowMapEulerDiscreteScheduler``."""
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        fm, scheduler = self.flowmap.flowmap, self.scheduler
        x = latents if latents.dtype in (torch.float32, torch.float64) else latents.float()
        scale = fm.guidance if guidance is None else guidance
        lam = None
        if fm.condition_on_guidance and scale is not None:
            lam = torch.full((x.shape[0],), float(scale), device=x.device)
        if fm.num_classes == 0:
            labels = None
        elif labels is None:
            raise ValueError(f"this flow map is class-conditional ({fm.num_classes} classes): pass class_labels")
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
            velocity = fm(x, t_vec, s_vec, labels, lam).to(x.dtype)
            if gamma == 0.0:
                x = scheduler.step(velocity, timestep, x).prev_sample
                continue
            r_timestep = torch.tensor(target * num_train, dtype=torch.float64, device=x.device)
            x_jump = scheduler.step(velocity, timestep, x, r_timestep=r_timestep).prev_sample
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if t_next > 0 else 0.0
            x = (1 - t_next) * (x_jump / (1 - target) + gamma * sigma_next * z)
        return x

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
        if isinstance(self.scheduler, FlowMapGridScheduler):
            x = fm.sample(latents.to(device), labels, schedule=grid, gamma=gamma, guidance=guidance_scale,
                          generator=generator)
        else:
            x = self._scheduler_sample(latents.to(device), labels, grid, gamma, guidance_scale, generator)
        z = fm.denormalize(x) / self.flowmap.config.scaling_factor
        images = self.vae.decode(z.to(self.vae.dtype)).sample.float()
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            out = images
        else:
            arr = images.permute(0, 2, 3, 1).cpu().numpy()
            out = arr if output_type == "np" else self.numpy_to_pil(arr)
        return FlowMapPipelineOutput(images=out) if return_dict else (out,)
