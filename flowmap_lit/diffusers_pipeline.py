"""A diffusers pipeline around an exported flow map: student + VAE + k-step grids (needs diffusers).

    from flowmap_lit.diffusers_pipeline import FlowMapPipeline
    pipe = FlowMapPipeline.from_pretrained("exported/imagenet/pipeline")    # a local directory
    images = pipe(class_labels=[207, 360], num_inference_steps=4).images    # PIL images

Components, each saved with ``save_pretrained`` in its own folder:

- ``flowmap``: :class:`FlowMapModel`, a diffusers ``ModelMixin`` holding the network of an export
  (its class and arguments, classes, guidance, gamma and data normalization in its config);
- ``vae``: the ``AutoencoderKL`` that decodes the latents;
- ``scheduler``: :class:`FlowMapGridScheduler`, the tuned grids (uniform where none was tuned).

Sampling is :meth:`flowmap_lit.export.FlowMap.sample` (the checkpoint's own sampler); the latents
are un-normalized with the data statistics, divided by ``scaling_factor`` and decoded.
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
from flowmap_lit.grids import check_grid, schedules_doc
from flowmap_lit.interpolant import uniform_schedule


class FlowMapModel(ModelMixin, ConfigMixin):
    """The flow map network as a diffusers model (``save_pretrained``/``from_pretrained``)."""

    @register_to_config
    def __init__(self, network: dict, num_classes: int = 0, condition_on_guidance: bool = False,
                 guidance: float | None = None, sample_gamma: float = 0.0, data: dict | None = None,
                 scaling_factor: float = 1.0) -> None:
        super().__init__()
        # config.json comes with the pipeline: only this package's networks are built from it (a network of
        # another package: build the FlowMap with load_flowmap(..., trust_code=True) and use from_flowmap)
        net = instantiate(network, "the pipeline's flow map config.json")
        self.flowmap = FlowMap(net, num_classes, condition_on_guidance, guidance, sample_gamma, data=data)

    def forward(self, x, t, s, class_labels=None, guidance=None):
        return self.flowmap(x, t, s, class_labels, guidance)


class FlowMapGridScheduler(SchedulerMixin, ConfigMixin):
    """The k-step time grids ``1 = t_0 > ... > t_k = 0`` (and gammas) the flow map samples on."""

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

    def __init__(self, flowmap: FlowMapModel, vae: AutoencoderKL, scheduler: FlowMapGridScheduler) -> None:
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
        model = FlowMapModel(fm.network_config, fm.num_classes, fm.condition_on_guidance, fm.guidance,
                             fm.sample_gamma, fm.data, scaling_factor)
        model.flowmap.net.load_state_dict(fm.net.state_dict())
        doc = schedules_doc(fm.schedules)
        scheduler = FlowMapGridScheduler(grids=doc["grids"], gammas=doc["gamma"], sample_gamma=fm.sample_gamma)
        return cls(flowmap=model.eval(), vae=vae.eval(), scheduler=scheduler)

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
        grid, tuned_gamma = self.scheduler.grid(num_inference_steps)
        x = fm.sample(latents.to(device), labels, schedule=grid, gamma=tuned_gamma if gamma is None else gamma,
                      guidance=guidance_scale, generator=generator)
        z = fm.denormalize(x) / self.flowmap.config.scaling_factor
        images = self.vae.decode(z.to(self.vae.dtype)).sample.float()
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            out = images
        else:
            arr = images.permute(0, 2, 3, 1).cpu().numpy()
            out = arr if output_type == "np" else self.numpy_to_pil(arr)
        return FlowMapPipelineOutput(images=out) if return_dict else (out,)
