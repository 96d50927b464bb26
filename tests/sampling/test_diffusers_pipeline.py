"""The diffusers pipeline of an exported flow map (flowmap_lit.diffusers_pipeline)."""

import pytest
import torch

from tests.helpers import tiny_vae


def test_diffusers_pipeline_round_trips_and_samples_like_the_flow_map(tmp_path):
    pytest.importorskip("diffusers")
    import flowmap_lit
    from flowmap_lit.diffusers_pipeline import FlowMapPipeline
    from flowmap_lit.export import FlowMap
    from flowmap_lit.grids import load_schedules
    from flowmap_lit.networks import MLP

    args = dict(img_channels=4, img_resolution=8, width=32, depth=2, num_classes=10)
    torch.manual_seed(0)
    data = {"shape": [4, 8, 8], "normalize": True, "mean": [0.1, -0.2, 0.0, 0.3], "std": [1.5, 0.5, 1.0, 2.0]}
    grid = [1.0, 0.8, 0.3, 0.05, 0.0]
    fm = FlowMap(MLP(**args), 10, True, 1.5, 0.0, load_schedules({"format": "flowmap-lit-schedules/1",
                                                                "grids": {"4": grid}}), data,
                 {"class_path": "flowmap_lit.networks.MLP", "init_args": args})
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    pipe = FlowMapPipeline.from_flowmap(fm, str(tmp_path / "vae"), scaling_factor=0.5)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = pipe(class_labels=[1, 2, 3], num_inference_steps=4, latents=latents, output_type="pt").images
    x = fm.sample(latents, torch.tensor([1, 2, 3]), steps=4)  # the tuned 4-step grid
    expected = (vae.decode(fm.denormalize(x) / 0.5).sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(images, expected, atol=1e-6) and images.shape == (3, 3, 16, 16)

    pipe.save_pretrained(tmp_path / "pipe")
    again = flowmap_lit.FlowMapPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    assert again.scheduler.grid(4)[0].tolist() == grid
    back = again(class_labels=[1, 2, 3], num_inference_steps=4, latents=latents, output_type="pt").images
    assert torch.equal(back, images)
    pil = again(class_labels=[4], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert pil[0].size == (16, 16)
