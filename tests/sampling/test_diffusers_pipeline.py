"""The diffusers pipelines of an exported flow map (flowmap_lit.diffusers_pipeline): class-conditional
(FlowMapPipeline) and text-conditioned LoRA flow maps of FLUX and SD3 (FlowMapTextPipeline)."""

import json
import os

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


# --- The text-conditioned pipeline of an exported LoRA flow map (FlowMapTextPipeline) ------------------------------

TUNED = {"4": [1.0, 0.8, 0.3, 0.05, 0.0], "3": [1.0, 0.7, 0.2, 0.0]}


@pytest.fixture(scope="module", params=["flux", "sd3"])
def lora_export(request, tmp_path_factory):
    """``(kind, base model folder, export folder)``: a tiny random FLUX or SD3 transformer and an exported LoRA
    flow map on it with random adapters and tuned 4- and 3-step grids (gamma 0.5 on the 3-step one)."""
    pytest.importorskip("peft")
    pytest.importorskip("diffusers")
    from tests.helpers.flux import export_random_lora, tiny_transformer_dir

    root = tmp_path_factory.mktemp(request.param)
    base = tiny_transformer_dir(root / "base", request.param)
    return request.param, base, export_random_lora(base, root / "exported", request.param, TUNED, {"3": 0.5})


def text_latents(pipe, fm, steps, cond, gamma=None, seed=0, per_prompt=1):
    """The pipeline's latents (``output_type="latent"``) and ``FlowMap.sample``'s from the same noise, prompts
    (each repeated ``per_prompt`` times, side by side) and generator."""
    n = cond["encoder_hidden_states"].shape[0] * per_prompt
    noise = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    got = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
               num_inference_steps=steps, num_images_per_prompt=per_prompt, latents=noise, gamma=gamma,
               generator=torch.Generator().manual_seed(seed), output_type="latent").images
    repeated = {k: v.repeat_interleave(per_prompt, 0) for k, v in cond.items()}
    expected = fm.sample(noise, steps=steps, gamma=gamma, cond=repeated, generator=torch.Generator().manual_seed(seed))
    return got, expected


def test_text_pipeline_samples_like_the_exported_lora_flow_map_and_round_trips(lora_export, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from flowmap_lit.diffusers_pipeline import FlowMapAdapterModel, FlowMapPipeline, FlowMapTextPipeline
    from flowmap_lit.export import load_flowmap
    from tests.helpers.text import cond_batch

    kind, base, exported = lora_export
    fm = load_flowmap(exported)
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    pipe = FlowMapTextPipeline.from_flowmap(fm, str(tmp_path / "vae"), scaling_factor=0.5, shift_factor=0.1)
    if hasattr(diffusers, "FlowMapEulerDiscreteScheduler"):
        assert type(pipe.scheduler) is diffusers.FlowMapEulerDiscreteScheduler
    cond = cond_batch(2, seed=3)
    # The tuned 4-step grid, a uniform 2-step grid, the tuned 3-step grid with its gamma, gamma 1; 2 per prompt.
    for steps, gamma, per_prompt in ((4, None, 1), (2, None, 2), (3, None, 1), (2, 1.0, 1)):
        got, expected = text_latents(pipe, fm, steps, cond, gamma, per_prompt=per_prompt)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert pipe.sampling_grid(4)[0].tolist() == TUNED["4"] and pipe.sampling_grid(3)[1] == 0.5
    tuned, _ = text_latents(pipe, fm, 4, cond)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    uniform = fm.sample(noise, steps=4, schedule=torch.linspace(1, 0, 5, dtype=torch.float64), cond=cond)
    assert not torch.allclose(tuned, uniform, atol=1e-4)  # the tuned grid is really used
    # Decoded: x / scaling_factor + shift_factor through the VAE.
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    images = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
                  num_inference_steps=2, latents=noise, output_type="pt").images
    x = fm.sample(noise, steps=2, cond=cond)
    expected = (vae.decode(x / 0.5 + 0.1).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)
    assert images.shape == (2, 3, 16, 16)
    # One prompt: (L, D) and (D',) embeddings; the noise drawn from the generator in the export's shape.
    pil = pipe(prompt_embeds=cond["encoder_hidden_states"][0], pooled_prompt_embeds=cond["pooled_projections"][0],
               num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 1 and pil[0].size == (16, 16)

    # save_pretrained writes the adapters and flowmap.json, never the base model; from_pretrained samples the same.
    pipe.save_pretrained(tmp_path / "pipe")
    folder = tmp_path / "pipe/flowmap"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "flowmap.json", "student.safetensors"]
    assert (folder / "student.safetensors").stat().st_size < 200_000
    assert json.loads((folder / "flowmap.json").read_text())["base"]["init_args"]["path"] == str(base.resolve())
    again = FlowMapTextPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    assert isinstance(again.flowmap, FlowMapAdapterModel) and again.flowmap.config.shift_factor == 0.1
    assert again.sampling_grid(4)[0].tolist() == TUNED["4"]
    for steps in (4, 3):
        got, expected = text_latents(again, fm, steps, cond)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    back = again(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
                 num_inference_steps=2, latents=noise, output_type="pt").images
    torch.testing.assert_close(back, images, rtol=0, atol=0)
    # The export folder itself loads as the flow map; the base model moved: base_path points to it.
    assert torch.equal(load_flowmap(folder).sample(noise, steps=2, cond=cond), x)
    moved = tmp_path / "moved"
    os.symlink(base, moved)
    elsewhere = FlowMapTextPipeline.from_pretrained(str(tmp_path / "pipe"), base_path=str(moved))
    assert elsewhere.flowmap.flowmap.base_config["init_args"]["path"] == str(moved.resolve())
    # No VAE: latents only. The class-conditional pipeline refuses an adapter flow map.
    latent_only = FlowMapTextPipeline.from_flowmap(fm)
    with pytest.raises(ValueError, match="no VAE"):
        latent_only(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"])
    with pytest.raises(ValueError, match="text conditioning"):
        latent_only(num_inference_steps=1)
    with pytest.raises(ValueError, match="FlowMapTextPipeline"):
        FlowMapPipeline.from_flowmap(fm, vae)
    if kind == "sd3":  # a student conditioned on the guidance scale takes guidance_scale
        other, _ = text_latents(latent_only, fm, 2, cond)
        scaled = latent_only(prompt_embeds=cond["encoder_hidden_states"],
                             pooled_prompt_embeds=cond["pooled_projections"], num_inference_steps=2,
                             guidance_scale=4.0, output_type="latent",
                             latents=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))).images
        assert not torch.allclose(scaled, other)


def test_text_pipeline_falls_back_to_its_own_scheduler_without_the_diffusers_class(lora_export, tmp_path,
                                                                                  monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    import flowmap_lit.diffusers_pipeline as dp
    from flowmap_lit.export import load_flowmap
    from tests.helpers.text import cond_batch

    fm = load_flowmap(lora_export[2])
    monkeypatch.setattr(diffusers, "FlowMapEulerDiscreteScheduler", None, raising=False)  # an older diffusers
    pipe = dp.FlowMapTextPipeline.from_flowmap(fm)
    assert isinstance(pipe.scheduler, dp.FlowMapGridScheduler)
    cond = cond_batch(2, seed=3)
    for steps in (4, 3, 2):
        got, expected = text_latents(pipe, fm, steps, cond)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)  # FlowMap.sample itself
    pipe.save_pretrained(tmp_path / "pipe")
    monkeypatch.undo()
    again = dp.FlowMapTextPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    assert isinstance(again.scheduler, dp.FlowMapGridScheduler) and again.sampling_grid(4)[0].tolist() == TUNED["4"]
    got, expected = text_latents(again, fm, 4, cond)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_text_pipeline_encodes_prompt_strings_with_a_local_encoder_folder(lora_export, tmp_path):
    pytest.importorskip("transformers")
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from flowmap_lit.data import encode_prompts
    from flowmap_lit.diffusers_pipeline import FlowMapTextPipeline
    from flowmap_lit.export import load_flowmap
    from tests.helpers.clip import text_config, tiny_tokenizer
    from tests.helpers.text import D, P

    kind, _, exported = lora_export
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=54, d_model=D, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                 pad_token_id=1, eos_token_id=1, decoder_start_token_id=0))
    if kind == "flux":  # T5's tokens (width D), CLIP-L's pooled output (width P)
        encoders = [CLIPTextModel(text_config(hidden=P)), t5]
    else:  # [CLIP-L | CLIP-G | zeros] widths 2 + 2 of D, pooled projections 3 + 3 = P, then T5's tokens
        encoders = [CLIPTextModelWithProjection(text_config(hidden=2, projection=3)),
                    CLIPTextModelWithProjection(text_config(hidden=2, projection=3)), t5]
    root = tmp_path / "encoders"
    for i, model in enumerate(encoders):
        suffix = "" if i == 0 else f"_{i + 1}"
        model.eval().save_pretrained(str(root / f"text_encoder{suffix}"))
        tiny_tokenizer(root / f"tokenizer{suffix}")
    fm = load_flowmap(exported)
    pipe = FlowMapTextPipeline.from_flowmap(fm, text_encoder_path=str(root), clip_max_length=12, t5_max_length=7)
    prompts = ["a red cube", "a dog"]
    tokens, pooled = encode_prompts(prompts, root, kind, clip_max_length=12, t5_max_length=7)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    got = pipe(prompt=prompts, num_inference_steps=2, latents=noise, output_type="latent").images
    cond = {"encoder_hidden_states": torch.from_numpy(tokens), "pooled_projections": torch.from_numpy(pooled)}
    torch.testing.assert_close(got, fm.sample(noise, steps=2, cond=cond), rtol=1e-5, atol=1e-5)
    pipe.save_pretrained(tmp_path / "pipe")  # the encoder folder and its settings travel in model_index.json
    again = FlowMapTextPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert again.config.text_encoder_path == str(root) and again.config.t5_max_length == 7
    torch.testing.assert_close(again(prompt=prompts, num_inference_steps=2, latents=noise, output_type="latent")
                               .images, got, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no text encoder"):
        FlowMapTextPipeline.from_flowmap(fm)(prompt="a cat")
