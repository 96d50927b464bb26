"""The diffusers pipeline of an exported flow map (flowmap_lit.diffusers_pipeline)."""

import pytest
import torch

from tests.helpers import randomize_zero_params_, tiny_vae


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
    assert again.sampling_grid(4)[0].tolist() == grid
    back = again(class_labels=[1, 2, 3], num_inference_steps=4, latents=latents, output_type="pt").images
    assert torch.equal(back, images)
    pil = again(class_labels=[4], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert pil[0].size == (16, 16)


def tiny_flowmap(grids=None, gammas=None, sample_gamma=0.0):
    from flowmap_lit.export import FlowMap
    from flowmap_lit.grids import load_schedules
    from flowmap_lit.networks import MLP

    args = dict(img_channels=4, img_resolution=8, width=32, depth=2, num_classes=10)
    torch.manual_seed(0)
    data = {"shape": [4, 8, 8], "normalize": True, "mean": [0.1, -0.2, 0.0, 0.3], "std": [1.5, 0.5, 1.0, 2.0]}
    schedules = load_schedules({"format": "flowmap-lit-schedules/1", "grids": grids or {}, "gamma": gammas or {}})
    net = MLP(**args)
    randomize_zero_params_(net)  # zero-initialized output and s branches would make F = 0 and every grid alike
    return FlowMap(net, 10, True, 1.5, sample_gamma, schedules, data,
                   {"class_path": "flowmap_lit.networks.MLP", "init_args": args})


def pipeline_latents(pipe, fm, steps, gamma=None, seed=1):
    """(the pipeline's latents, FlowMap.sample's) from the same noise, grid, labels and generator."""
    from unittest import mock

    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2, 3])
    captured = {}
    decode = pipe.vae.decode

    def spy(z, *args, **kwargs):
        captured["z"] = z
        return decode(z, *args, **kwargs)

    with mock.patch.object(pipe.vae, "decode", spy):
        pipe(class_labels=labels, num_inference_steps=steps, latents=noise, gamma=gamma, output_type="pt",
             generator=torch.Generator().manual_seed(seed))
    x = fm.sample(noise, labels, steps=steps, gamma=gamma, generator=torch.Generator().manual_seed(seed))
    return captured["z"], fm.denormalize(x) / pipe.flowmap.config.scaling_factor


def test_pipeline_steps_with_diffusers_flow_map_euler_scheduler(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, "FlowMapEulerDiscreteScheduler"):
        pytest.skip("this diffusers has no FlowMapEulerDiscreteScheduler")
    from flowmap_lit.diffusers_pipeline import FlowMapPipeline

    tuned = [1.0, 0.8, 0.3, 0.05, 0.0]
    fm = tiny_flowmap({"4": tuned, "3": [1.0, 0.7, 0.2, 0.0]}, {"3": 0.5})
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    pipe = FlowMapPipeline.from_flowmap(fm, str(tmp_path / "vae"), scaling_factor=0.5)
    assert type(pipe.scheduler) is diffusers.FlowMapEulerDiscreteScheduler
    # The tuned 4-step grid, a uniform 2-step grid, the tuned 3-step grid with its gamma (re-noising), gamma 1.
    for steps, gamma in ((4, None), (2, None), (3, None), (2, 1.0)):
        got, expected = pipeline_latents(pipe, fm, steps, gamma)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    pipe.scheduler.set_timesteps(sigmas=pipe._scheduler_sigmas(pipe.sampling_grid(4)[0]))
    assert pipe.scheduler.sigmas.tolist() == tuned  # the tuned grid is the scheduler's sigmas
    # A different tuned grid changes the samples (the grid is really used).
    plain = tiny_flowmap()
    other, _ = pipeline_latents(FlowMapPipeline.from_flowmap(plain, vae, scaling_factor=0.5), plain, 4)
    assert not torch.allclose(other, pipeline_latents(pipe, fm, 4)[0], atol=1e-3)

    pipe.save_pretrained(tmp_path / "pipe")
    again = FlowMapPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    assert type(again.scheduler) is diffusers.FlowMapEulerDiscreteScheduler
    assert again.sampling_grid(4)[0].tolist() == tuned and again.sampling_grid(3)[1] == 0.5
    for steps in (4, 3):
        got, expected = pipeline_latents(again, fm, steps)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # A shift reshapes the uniform grids only.
    again.scheduler = diffusers.FlowMapEulerDiscreteScheduler(shift=3.0)
    assert again.sampling_grid(4)[0].tolist() == tuned
    shifted = again.sampling_grid(2)[0]
    torch.testing.assert_close(shifted, torch.tensor([1.0, 0.75, 0.0], dtype=torch.float64))
    got, _ = pipeline_latents(again, fm, 4)
    torch.testing.assert_close(got, pipeline_latents(pipe, fm, 4)[1], rtol=1e-5, atol=1e-5)


def test_pipeline_falls_back_to_its_own_scheduler_without_the_diffusers_class(tmp_path, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    import flowmap_lit.diffusers_pipeline as dp

    monkeypatch.setattr(diffusers, "FlowMapEulerDiscreteScheduler", None, raising=False)  # an older diffusers
    assert dp.flowmap_scheduler_class() is None
    tuned = [1.0, 0.8, 0.3, 0.05, 0.0]
    fm = tiny_flowmap({"4": tuned})
    vae = tiny_vae()
    pipe = dp.FlowMapPipeline.from_flowmap(fm, vae, scaling_factor=0.5)
    assert isinstance(pipe.scheduler, dp.FlowMapGridScheduler)
    for steps in (4, 2):
        got, expected = pipeline_latents(pipe, fm, steps)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)  # FlowMap.sample itself
    pipe.save_pretrained(tmp_path / "pipe")
    monkeypatch.undo()  # a pipeline saved with the fallback loads and samples the same with any diffusers
    again = dp.FlowMapPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    assert isinstance(again.scheduler, dp.FlowMapGridScheduler) and again.sampling_grid(4)[0].tolist() == tuned
    got, expected = pipeline_latents(again, fm, 4)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
