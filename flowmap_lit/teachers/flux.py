"""FLUX.1 as a text-to-image teacher: ``FluxTeacher``, for the shared-weight ``LoRAFlowMap`` student.

diffusers' ``FluxTransformer2DModel`` and ``FluxPipeline`` (0.42), against our conventions:

- **Time.** FLUX noises ``x = (1 - sigma) x0 + sigma noise`` (``FlowMatchEulerDiscreteScheduler``) and
  its transformer predicts ``noise - x0``: with ``sigma = t`` that is our ``v`` (the scheduler's Euler
  step ``x + (sigma_next - sigma) * output`` is our ODE ``dx/dt = v``, docs/design.md section 1). The
  pipeline passes ``timestep = sigma`` (its scheduler timestep ``1000 sigma`` divided by 1000) and the
  transformer multiplies it by 1000 inside: we pass ``t`` as it is. The scheduler's (dynamic) shift
  only moves its sampling times.
- **Latents.** Our latents are ``(B, C, H, W)``; the transformer sees 2x2 patches, ``(B, HW/4, 4C)``
  (``pack_latents``/``unpack_latents``, the pipeline's ``_pack_latents``/``_unpack_latents``), with
  image position ids ``(0, row, col)`` on the ``H/2 x W/2`` grid and text position ids of zeros.
- **Guidance.** FLUX.1 [dev] is guidance-distilled: the guidance scale is an input of the
  transformer (``guidance``, multiplied by 1000 inside, as the pipeline passes its
  ``guidance_scale``), here the teacher's ``guidance_scale``; the student is called with the same
  scale, so the teacher's guidance is distilled as it is (``guidance: none`` in the distillation).
  FLUX.1 [schnell] has no guidance input: ``guidance_scale: null``.
- **Text.** ``encoder_hidden_states`` (the T5 sequence, (B, L, 4096)) and ``pooled_projections``
  (CLIP's pooled embedding, (B, 768)) come from the data (``batch["cond"]``), as for SD3.

The JVP runs diffusers' attention on the SDPA math kernel inside the tangent pass (``LoRAFlowMap``),
with bf16 base weights in bf16 and the adapters in fp32 (``run_in_weight_dtype``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from flowmap_lit.networks.embeddings import batch_vector
from flowmap_lit.teachers.text2image import DEFAULT_TARGETS, TransformerTeacher, require_text, run_in_weight_dtype

FLUX_TARGETS = (*DEFAULT_TARGETS, "proj_mlp", "single_transformer_blocks.*.proj_out")
FLUX_DOWNLOAD_HINT = (
    "Download the transformer once (internet access and the model license on huggingface.co needed), e.g.\n"
    "  hf download black-forest-labs/FLUX.1-dev --include 'transformer/*' 'scheduler/*' "
    "--local-dir models/flux.1-dev\n"
    "(older huggingface_hub: huggingface-cli download ...), then set the teacher's path: models/flux.1-dev"
)


def pack_latents(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, (H/2)(W/2), 4C)``: 2x2 patches, row-major, channels then the patch's
    rows and columns (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs latents into 2x2 patches: height and width must be even, got {h} x {w}")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, height: int, width: int) -> Tensor:
    """The inverse of ``pack_latents``: ``(B, (H/2)(W/2), 4C)`` -> ``(B, C, H, W)``."""
    b, _, d = x.shape
    x = x.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Position ids ``(0, row, col)`` of the ``(H/2) x (W/2)`` patches, ``((H/2)(W/2), 3)``
    (``FluxPipeline._prepare_latent_image_ids``)."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def flux_forward(transformer: nn.Module, x: Tensor, t: Tensor, guidance_scale: float | None = None,
                 encoder_hidden_states: Tensor | None = None, pooled_projections: Tensor | None = None) -> Tensor:
    """The FLUX transformer's output ``noise - x0 = v`` at our ``(x, t)``, ``x`` of shape (B, C, H, W):
    packed, called at ``timestep = t`` (it multiplies by 1000 inside) and ``guidance = guidance_scale``,
    unpacked (inputs in the transformer's dtype, autocast as ``run_in_weight_dtype`` says)."""
    require_text(encoder_hidden_states, pooled_projections, "FLUX")
    _, _, height, width = x.shape
    t = batch_vector(t, x).to(x.dtype)

    def call(dtype):
        guidance = None
        if guidance_scale is not None:
            guidance = torch.full((x.shape[0],), float(guidance_scale), device=x.device, dtype=torch.float32)
        out = transformer(hidden_states=pack_latents(x).to(dtype), timestep=t.to(dtype), guidance=guidance,
                          encoder_hidden_states=encoder_hidden_states.to(dtype),
                          pooled_projections=pooled_projections.to(dtype),
                          txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=x.device, dtype=dtype),
                          img_ids=image_ids(height, width, x.device, dtype), return_dict=False)[0]
        return unpack_latents(out, height, width)

    return run_in_weight_dtype(transformer, x, call)


class FluxTeacher(TransformerTeacher):
    """A diffusers ``FluxTransformer2DModel`` (FLUX.1 [dev]) as a frozen text-conditioned velocity teacher.

    ``velocity(x, t, encoder_hidden_states=..., pooled_projections=...)`` takes latents (B, C, H, W)
    (packed into 2x2 patches for the transformer) and always runs the base model, even while a
    ``LoRAFlowMap`` student has adapters on the same module.

    Args:
        path: Local diffusers directory (never downloaded): a pipeline root (with transformer/ and
            scheduler/) or the transformer's own folder; exactly one of path and config.
        config: A FluxTransformer2DModel config dict: a transformer with random (seeded) weights, for
            tests, instead of path.
        subfolder: Folder of the transformer inside path; None: "transformer" if present, else
            path itself.
        guidance_scale: The embedded guidance scale of a guidance-distilled transformer (FLUX.1 [dev]:
            3.5, its pipeline's default), fed to the teacher and to the student; null for a
            transformer without guidance input (guidance_embeds: false, FLUX.1 [schnell]).
        dtype: Dtype of the base weights: "float32", "bfloat16" or "float16".
        seed: Initialization seed of a transformer built from config.
    """

    diffusers_class, model_name = "FluxTransformer2DModel", "FLUX"
    download_hint = FLUX_DOWNLOAD_HINT
    lora_targets = FLUX_TARGETS

    def __init__(
        self,
        path: str | None = None,
        config: dict | None = None,
        subfolder: str | None = None,
        guidance_scale: float | None = 3.5,
        dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._build(path, config, subfolder, dtype, seed)
        embeds = bool(getattr(self.transformer.config, "guidance_embeds", False))
        if embeds and guidance_scale is None:
            raise ValueError("this FLUX transformer is guidance-distilled (guidance_embeds: true, FLUX.1 [dev]): "
                             "give guidance_scale (e.g. 3.5)")
        if not embeds and guidance_scale is not None:
            raise ValueError("this FLUX transformer has no guidance input (guidance_embeds: false, e.g. FLUX.1 "
                             "[schnell]): set guidance_scale: null")
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.init_args["guidance_scale"] = guidance_scale
        self.freeze()

    @property
    def transformer_call(self) -> Callable[..., Tensor]:
        return functools.partial(flux_forward, guidance_scale=self.guidance_scale)
