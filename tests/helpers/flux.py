"""Tiny random FLUX and SD3 transformers saved in the diffusers layout, and exported LoRA flow maps on them, for
the text-to-image tests (diffusers and peft imported on use)."""

from pathlib import Path

import torch

from tests.helpers.text import TINY, D, P

# Latents (4, 8, 8) pack into 16 patches of 16 channels; head dim 8 = the rotary axes' 2 + 2 + 4.
FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=D, pooled_projection_dim=P, guidance_embeds=True,
                 axes_dims_rope=(2, 2, 4))
SHAPE = [4, 8, 8]  # the latent shape both tiny transformers take


def tiny_transformer_dir(root, kind: str = "flux") -> Path:
    """A random (seed 0) ``FluxTransformer2DModel`` (``kind="flux"``) or ``SD3Transformer2DModel`` (``"sd3"``) in
    ``root/transformer`` with a flow-matching scheduler in ``root/scheduler``; returns ``root``."""
    import diffusers

    root = Path(root)
    torch.manual_seed(0)
    cls, config = ((diffusers.FluxTransformer2DModel, FLUX_TINY) if kind == "flux"
                   else (diffusers.SD3Transformer2DModel, TINY))
    cls(**config).save_pretrained(root / "transformer")
    diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(root / "scheduler")
    return root


def export_random_lora(base_dir, out, kind: str = "flux", grids: dict | None = None, gammas: dict | None = None,
                       seed: int = 0) -> Path:
    """An exported LoRA flow map (``flowmap.json`` + ``student.safetensors`` in ``out``) on the transformer in
    ``base_dir``, with random (seeded) adapters and gap embedding, so it differs from its teacher; ``grids`` and
    ``gammas``: tuned k-step grids shipped with it. FLUX takes the guidance scale 3.5 as an input (no guidance
    embedding); the SD3 student is conditioned on a guidance scale of 2."""
    from flowmap_lit.export import FORMAT, write_export
    from flowmap_lit.teachers import FluxTeacher, LoRAFlowMap, SD3Teacher

    teacher = FluxTeacher(path=str(base_dir)) if kind == "flux" else SD3Teacher(path=str(base_dir))
    student = LoRAFlowMap(rank=2, gap_hidden=16, guidance_embedding=kind != "flux")
    student.attach(teacher)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    config = {"base": teacher.export_config(), "format": FORMAT, "network": student.export_config(),
              "num_classes": 0, "condition_on_guidance": kind != "flux", "guidance": None if kind == "flux" else 2.0,
              "sample_gamma": 0.0,
              "schedules": {"format": "flowmap-lit-schedules/1", "grids": grids or {}, "gamma": gammas or {}},
              "data": {"shape": SHAPE, "normalize": False}}
    return write_export(config, student.own_state_dict(), out)
