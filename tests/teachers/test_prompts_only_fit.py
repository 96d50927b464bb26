"""Prompts-only (data-free) text-to-image distillation: ``configs/text2image/distill_flux_prompts.yaml`` fitted
through the command line on a dataset of prompt embeddings alone (``prepare text-prompts``), with a tiny random
FLUX (and SD3) transformer; no latent is read, only the LoRA adapters and the gap embedding train, and the
checkpoint exports as a flow map and a diffusers pipeline that sample alike."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flowmap_lit.data import read_stats
from tests.helpers import ROOT, tiny_vae
from tests.helpers.cli import cli
from tests.helpers.text import D, L, P, cond_batch

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

from tests.helpers.flux import SHAPE, tiny_transformer_dir  # noqa: E402

CONFIG = ROOT / "configs/text2image/distill_flux_prompts.yaml"
PROMPTS = ["a red cube", "two green balls", "a blue sky", "an orange cat", "a dog on grass", "night city",
           "snowy mountain", "a small boat", "yellow flowers", "a quiet street", "a white horse", "rain"]
# The config's evaluation callbacks replaced by a checkpoint every 2 steps (in ckpt/) and the batch recorder.
CALLBACKS = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: ckpt, save_last: true, every_n_train_steps: 2, save_top_k: -1, enable_version_counter: false}
    - class_path: tests.helpers.batches.BatchRecorder
"""
# The same run with an SD3 teacher: its default LoRA targets, no guidance input.
SD3 = """
model:
  init_args:
    teacher:
      class_path: flowmap_lit.teachers.SD3Teacher
      init_args: {path: null, dtype: float32}
    student:
      class_path: flowmap_lit.teachers.LoRAFlowMap
      init_args: {target_modules: null}
"""


def write_prompts(work):
    """A prompts-only dataset in ``work/prompts`` from precomputed embeddings (``prepare text-prompts
    --embeddings``): 12 prompts, no latents."""
    rng = np.random.default_rng(0)
    n = len(PROMPTS)
    np.savez(work / "embeds.npz", prompt_embeds=rng.standard_normal((n, L, D)).astype(np.float32),
             pooled_prompt_embeds=rng.standard_normal((n, P)).astype(np.float32),
             null_text_emb=rng.standard_normal((L, D)).astype(np.float32), null_text_pooled=np.zeros(P, np.float32))
    (work / "prompts.txt").write_text("\n".join(PROMPTS), encoding="utf-8")
    cli("prepare", "text-prompts", "--prompts", work / "prompts.txt", "--embeddings", work / "embeds.npz",
        "--out", work / "prompts", "--val-fraction", "0.25")
    return work / "prompts"


def fit_prompts(work, base, kind):
    """The prompts-only config fitted for 2 steps in ``work`` on ``base`` (a FLUX or SD3 folder)."""
    data = write_prompts(work)
    (work / "callbacks.yaml").write_text(CALLBACKS)
    extra = []
    if kind == "sd3":
        (work / "sd3.yaml").write_text(SD3)
        extra = ["--config", work / "sd3.yaml"]
    transformer = diffusers.FluxTransformer2DModel if kind == "flux" else diffusers.SD3Transformer2DModel
    fresh = transformer.from_pretrained(str(base / "transformer")).state_dict()
    cwd = os.getcwd()
    os.chdir(work)  # the checkpoint directory of CALLBACKS is relative
    try:
        run = cli("fit", "--config", CONFIG, *extra, "--config", work / "callbacks.yaml",
                  "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", "2",
                  "--trainer.logger", "false", "--trainer.limit_val_batches", "0",
                  "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                  "--model.init_args.teacher.init_args.path", base,
                  "--model.init_args.teacher.init_args.dtype", "float32",
                  "--model.init_args.student.init_args.rank", "2",
                  "--model.init_args.student.init_args.gap_hidden", "16", "--model.init_args.lr_warmup_steps", "0",
                  "--model.init_args.optimizer.init_args.lr", "0.01", "--data.init_args.root", data,
                  "--data.init_args.shape", str(SHAPE), "--data.init_args.num_workers", "0",
                  "--data.init_args.batch_size", "4")
    finally:
        os.chdir(cwd)
    recorder = next(cb for cb in run.trainer.callbacks if type(cb).__name__ == "BatchRecorder")
    return SimpleNamespace(dir=work, data=data, model=run.model, fresh=fresh, recorder=recorder)


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory):
    return tiny_transformer_dir(tmp_path_factory.mktemp("flux"), "flux")


@pytest.fixture(scope="module")
def flux_prompts_run(tmp_path_factory, flux_base):
    return fit_prompts(tmp_path_factory.mktemp("prompts_flux"), flux_base, "flux")


def check_data_free_fit(run):
    stats = read_stats(str(run.data))
    assert stats["kind"] == "prompts" and stats["shape"] is None  # the dataset holds no latents at all
    model = run.model
    assert model.global_step == 2 and model.states == "student" and model.sample_shape == tuple(SHAPE)
    # Every training batch came without data: labels, text conditioning and prompt strings only.
    assert run.recorder.keys == [["cond", "label", "prompt"]] * 2
    assert run.recorder.state_calls == 2  # each step drew its noisy points from noise (the student's own jump)
    assert model.null_cond is not None  # the empty prompt's embedding from the dataset
    # Only the adapters and the gap embedding changed; the base weights are bit-identical.
    base = {k.replace(".base_layer", ""): v for k, v in model.teacher.transformer.state_dict().items()
            if "lora_" not in k}
    assert set(base) == set(run.fresh) and all(torch.equal(base[k], run.fresh[k]) for k in run.fresh)
    lora_b = [p for n, p in model.student.named_parameters() if "lora_B" in n]  # zero at the start
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    assert model.student.gap_embed.fc1.weight.abs().sum() > 0
    ckpt = torch.load(run.dir / "ckpt/last.ckpt", weights_only=True, map_location="cpu")
    keys = set(ckpt["state_dict"])  # only the adapters and the gap embedding
    assert keys and all("lora_" in k or k.startswith("student.gap_embed.") for k in keys)


def test_prompts_only_fit_reads_no_latents_and_trains_only_the_adapters(flux_prompts_run):
    check_data_free_fit(flux_prompts_run)


def test_prompts_only_fit_with_an_sd3_teacher(tmp_path):
    base = tiny_transformer_dir(tmp_path / "sd3", "sd3")
    work = tmp_path / "work"
    work.mkdir()
    run = fit_prompts(work, base, "sd3")
    assert type(run.model.teacher).__name__ == "SD3Teacher"
    check_data_free_fit(run)


def test_prompts_only_checkpoint_exports_a_text_pipeline(flux_prompts_run, flux_base, tmp_path):
    """``export --vae`` of the LoRA checkpoint writes the flow map and a ``FlowMapTextPipeline``; the pipeline's
    latents are the loaded flow map's and the checkpoint's from the same noise and prompts."""
    from flowmap_lit.checkpoints import load_module
    from flowmap_lit.diffusers_pipeline import FlowMapTextPipeline
    from flowmap_lit.export import load_flowmap

    ckpt = flux_prompts_run.dir / "ckpt/last.ckpt"
    vae = tiny_vae(16)
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "exported"
    cli("export", "--ckpt", ckpt, "--out", out, "--vae", tmp_path / "vae", "--scaling-factor", "0.3611",
        "--shift-factor", "0.1159")
    pipe = FlowMapTextPipeline.from_pretrained(str(out / "pipeline"), local_files_only=True)
    assert pipe.flowmap.config.scaling_factor == 0.3611 and pipe.flowmap.config.shift_factor == 0.1159
    fm, module = load_flowmap(out), load_module(str(ckpt))
    assert fm.shape == tuple(SHAPE) and fm.base_config["init_args"]["path"] == str(flux_base.resolve())
    noise, c = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1)), cond_batch(3, seed=5)
    for steps in (1, 2):
        got = pipe(prompt_embeds=c["encoder_hidden_states"], pooled_prompt_embeds=c["pooled_projections"],
                   num_inference_steps=steps, latents=noise, output_type="latent").images
        expected = fm.sample(noise, steps=steps, cond=c)
        with torch.no_grad():
            assert torch.equal(expected, module.sample(noise, None, num_steps=steps, cond=c))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    images = pipe(prompt_embeds=c["encoder_hidden_states"], pooled_prompt_embeds=c["pooled_projections"],
                  num_inference_steps=1, latents=noise, output_type="pt").images
    z = fm.sample(noise, steps=1, cond=c) / 0.3611 + 0.1159
    torch.testing.assert_close(images, (vae.decode(z).sample / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-4)


def test_config_evaluation_callbacks_run_on_prompts_only_data(tmp_path, flux_base, monkeypatch):
    """The config's own callbacks (flow-map error against the teacher's ODE, the CLIP score of VAE-decoded
    samples, sample grids) run on prompts-only data with a tiny VAE and an untrained tiny CLIP: only the sample
    counts are made small."""
    pytest.importorskip("transformers")
    import yaml

    from tests.helpers.clip import tiny_clip

    monkeypatch.chdir(tmp_path)
    data = write_prompts(tmp_path)
    tiny_vae(16).save_pretrained(tmp_path / "models/flux.1-dev/vae")  # the config's relative paths
    tiny_clip(tmp_path / "models/clip-vit-large-patch14", steps=0)
    config = yaml.safe_load(CONFIG.read_text())
    small = {"FlowMapError": {"num_samples": 3, "reference_steps": 2, "step_counts": [1, 2]},
             "FewStepFID": {"num_samples": 3, "num_prompts": 3, "step_counts": [1, 2]},
             "SampleGrid": {"num_samples": 2, "num_steps": [1]}}
    for cb in config["trainer"]["callbacks"]:
        cb["init_args"].update(small.get(cb["class_path"].rsplit(".", 1)[-1], {}))
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "ckpt")
    (tmp_path / "small.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": config["trainer"]["callbacks"]}}))
    run = cli("fit", "--config", CONFIG, "--config", tmp_path / "small.yaml", "--trainer.accelerator", "cpu",
              "--trainer.precision", "32-true", "--trainer.max_steps", "2", "--trainer.logger", "false",
              "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--model.init_args.teacher.init_args.path", flux_base,
              "--model.init_args.teacher.init_args.dtype", "float32", "--model.init_args.student.init_args.rank", "2",
              "--model.init_args.student.init_args.gap_hidden", "16", "--data.init_args.root", data,
              "--data.init_args.shape", str(SHAPE), "--data.init_args.num_workers", "0",
              "--data.init_args.batch_size", "4")
    callbacks = {type(cb).__name__: cb for cb in run.trainer.callbacks}
    rows = callbacks["FewStepFID"].results
    assert [r["steps"] for r in rows] == [1, 2] and all(0 <= r["clip_score"] <= 100 for r in rows)
    errors = callbacks["FlowMapError"].results
    assert [r["steps"] for r in errors] == [1, 2] and all(0 < r["relative_error"] for r in errors)
    assert callbacks["SampleGrid"].last_paths and callbacks["SampleGrid"].last_paths[0].is_file()
