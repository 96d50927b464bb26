"""FLUX.1 as a text-to-image teacher (flowmap_lit.teachers.flux) with the shared-weight LoRA flow-map student:
the diffusers conventions (packing, position ids, timestep, embedded guidance), F = v at step 0, the JVP, a
fit through the config, and the exported LoRA flow map, on a tiny random FluxTransformer2DModel."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from flowmap_lit.modules import FlowMapDistillModule
from flowmap_lit.objectives import AYFEMD
from tests.helpers import ROOT
from tests.helpers.cli import CHECKPOINTS, cli
from tests.helpers.flux import FLUX_TINY
from tests.helpers.text import cond_batch, write_text_dataset

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

from flowmap_lit.teachers import FluxTeacher, LoRAFlowMap  # noqa: E402
from flowmap_lit.teachers.flux import image_ids, pack_latents, unpack_latents  # noqa: E402

CONFIG = ROOT / "configs/text2image/distill_flux_lora.yaml"


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from tests.helpers.flux import tiny_transformer_dir

    return tiny_transformer_dir(tmp_path_factory.mktemp("flux"), "flux")


def test_pack_unpack_round_trip_and_match_the_pipeline():
    pipe = diffusers.FluxPipeline
    x = torch.randn(2, 4, 6, 10)
    packed = pack_latents(x)
    assert packed.shape == (2, 15, 16)
    assert torch.equal(packed, pipe._pack_latents(x, 2, 4, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(unpack_latents(packed, 6, 10), pipe._unpack_latents(packed, 6 * 8, 10 * 8, 8))
    assert torch.equal(image_ids(6, 10), pipe._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 4, 5, 4))


def test_flux_timestep_is_sigma():
    """FluxPipeline calls the transformer at ``timestep / 1000`` with the scheduler's timestep ``1000 sigma``:
    sigma itself, our t (the Euler step's output = noise - x0 = v: test_text2image.py's convention test)."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(4)
    torch.testing.assert_close(sched.timesteps / 1000, sched.sigmas[:-1])


def test_teacher_is_a_direct_diffusers_call_and_missing_dir_says_how_to_download(flux_dir, tmp_path):
    teacher = FluxTeacher(path=str(flux_dir))
    assert teacher.guidance_scale == 3.5 and not any(p.requires_grad for p in teacher.parameters())
    ref = diffusers.FluxTransformer2DModel.from_pretrained(str(flux_dir / "transformer"))
    pipe = diffusers.FluxPipeline
    x, t, c = torch.randn(3, 4, 8, 8), torch.rand(3), cond_batch(3)
    with torch.no_grad():  # as FluxPipeline.__call__ calls it: packed latents, timestep = sigma, guidance = 3.5
        out = ref(hidden_states=pipe._pack_latents(x, 3, 4, 8, 8), timestep=t, guidance=torch.full((3,), 3.5),
                  pooled_projections=c["pooled_projections"], encoder_hidden_states=c["encoder_hidden_states"],
                  txt_ids=torch.zeros(c["encoder_hidden_states"].shape[1], 3),
                  img_ids=pipe._prepare_latent_image_ids(3, 4, 4, "cpu", torch.float32), return_dict=False)[0]
        direct = pipe._unpack_latents(out, 8 * 8, 8 * 8, 8)
        v = teacher.velocity(x, t, None, **c)
        other = FluxTeacher(path=str(flux_dir), guidance_scale=1.0).velocity(x, t, None, **c)
    torch.testing.assert_close(v, direct, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(other, v)  # the guidance scale reaches the transformer
    with pytest.raises(FileNotFoundError, match="hf download black-forest-labs/FLUX.1-dev"):
        FluxTeacher(path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="guidance_scale"):
        FluxTeacher(path=str(flux_dir), guidance_scale=None)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        teacher.velocity(x, t)


def make_module(flux_dir, **kw):
    args = dict(guidance="cfg", guidance_min=1.0, guidance_max=3.0, condition_on_guidance=True)
    args.update(kw)
    return FlowMapDistillModule(FluxTeacher(path=str(flux_dir)), AYFEMD(), student=LoRAFlowMap(rank=2, gap_hidden=16),
                                warmup_steps=0, **args)


def test_lora_student_starts_at_the_teacher_and_shares_its_weights(flux_dir):
    module = make_module(flux_dir)
    x, t, c = torch.randn(4, 4, 8, 8), torch.rand(4), cond_batch(4)
    lam = torch.tensor([1.0, 1.5, 2.0, 3.0])
    v = module.teacher.velocity(x, t, None, **c)
    assert torch.equal(module.student_fn(None, lam, c)(x, t, t), v)  # exactly, at step 0
    assert torch.equal(module.student_fn(None, lam, c)(x, t, 0.3 * t), v)
    assert module.student.transformer is module.teacher.transformer  # one copy of the base weights
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in module.student.named_parameters() if ".lora_A." in n}
    assert {"transformer.single_transformer_blocks.0.proj_out", "transformer.single_transformer_blocks.0.proj_mlp",
            "transformer.single_transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.add_k_proj",
            "transformer.transformer_blocks.0.attn.to_add_out"} <= adapted
    assert "transformer.proj_out" not in adapted and len(adapted) == 8 + 5  # the default FLUX targets
    trainable = {n for n, p in module.student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("gap_embed.", "guidance_embed.")) for n in trainable)


def test_lora_student_jvp_matches_float64_central_differences(flux_dir):
    from flowmap_lit.jvp import jvp

    module = make_module(flux_dir)
    with torch.no_grad():  # a trained-looking student, so every branch carries a derivative
        for p in module.student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x, t, s, c = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 0.4]), torch.tensor([0.2, 0.1]), cond_batch(2)
    lam = torch.tensor([1.0, 2.0])
    tangents = (torch.randn_like(x), torch.ones(2), torch.zeros(2))
    d_fwd = jvp(module.student_fn(None, lam, c), (x, t, s), tangents, backend="forward_ad")
    d_func = jvp(module.student_fn(None, lam, c), (x, t, s), tangents, backend="func")
    module.double()
    fn64 = module.student_fn(None, lam.double(), {k: v.double() for k, v in c.items()})
    d_fd = jvp(fn64, (x.double(), t.double(), s.double()), [u.double() for u in tangents],
               backend="finite_difference", fd_step=1e-5)
    for d in (d_fwd, d_func):
        torch.testing.assert_close(d.double(), d_fd, rtol=1e-3, atol=1e-3 * d_fd.abs().max().item())


def test_bf16_base_weights_take_the_tangent_pass_in_bf16_with_fp32_adapters():
    from flowmap_lit.jvp import jvp

    teacher = FluxTeacher(config=FLUX_TINY, dtype="bfloat16")
    module = FlowMapDistillModule(teacher, AYFEMD(), student=LoRAFlowMap(rank=2, gap_hidden=16), guidance="none",
                                  warmup_steps=0)
    lora = [p for n, p in module.student.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert next(module.teacher.transformer.parameters()).dtype == torch.bfloat16
    seen = []
    hook = module.teacher.transformer.transformer_blocks[0].attn.to_q.register_forward_hook(
        lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 0.4]), cond_batch(2)
    tangents = (torch.randn_like(x), torch.ones(2), torch.zeros(2))
    tangent = jvp(module.student_fn(None, None, c), (x, t, 0.5 * t), tangents, backend="forward_ad")
    hook.remove()
    assert seen == [(torch.bfloat16, torch.bfloat16)]  # the adapted projection ran in bf16 inside the tangent pass
    assert tangent.dtype == torch.float32 and torch.isfinite(tangent).all() and tangent.abs().sum() > 0


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, flux_dir):
    """The FLUX LoRA config fitted for 2 steps on a tiny text dataset through the command line (its
    evaluation callbacks replaced by a checkpoint every 2 steps, in ``ckpt/``)."""
    work = tmp_path_factory.mktemp("flux_lora")
    write_text_dataset(work / "t2i")
    (work / "ckpt.yaml").write_text(CHECKPOINTS)
    fresh = diffusers.FluxTransformer2DModel.from_pretrained(str(flux_dir / "transformer")).state_dict()
    cwd = os.getcwd()
    os.chdir(work)  # the checkpoint directory of CHECKPOINTS is relative
    try:
        model = cli("fit", "--config", CONFIG, "--config", work / "ckpt.yaml",
                    "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", "2",
                    "--trainer.logger", "false", "--trainer.limit_val_batches", "0",
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                    "--model.init_args.teacher.init_args.path", flux_dir,
                    "--model.init_args.teacher.init_args.dtype", "float32",
                    "--model.init_args.student.init_args.rank", "2", "--model.init_args.student.init_args.gap_hidden",
                    "16", "--model.init_args.lr_warmup_steps", "0", "--model.init_args.optimizer.init_args.lr", "0.01",
                    "--data.init_args.root", work / "t2i", "--data.init_args.num_workers", "0",
                    "--data.init_args.batch_size", "4").model
    finally:
        os.chdir(cwd)
    return SimpleNamespace(dir=work, model=model, fresh=fresh)


def test_fit_through_the_config_trains_only_the_adapters(flux_run):
    model, fresh = flux_run.model, flux_run.fresh
    assert model.global_step == 2
    base = {k.replace(".base_layer", ""): v for k, v in model.teacher.transformer.state_dict().items()
            if "lora_" not in k}
    assert set(base) == set(fresh) and all(torch.equal(base[k], fresh[k]) for k in fresh)  # teacher unchanged
    assert any(p.abs().sum() > 0 for n, p in model.student.named_parameters() if "lora_B" in n)
    assert model.student.gap_embed.fc1.weight.abs().sum() > 0
    ckpt = torch.load(flux_run.dir / "ckpt/last.ckpt", weights_only=True, map_location="cpu")
    keys = set(ckpt["state_dict"])  # only the adapters and the gap embedding
    assert keys and all("lora_" in k or k.startswith("student.gap_embed.") for k in keys)


def test_exported_lora_flowmap_reproduces_the_checkpoint_bit_for_bit(flux_run, flux_dir, tmp_path):
    from flowmap_lit.checkpoints import load_module
    from flowmap_lit.export import CONFIG as FLOWMAP_JSON
    from flowmap_lit.export import WEIGHTS, export_flowmap, load_flowmap

    module = load_module(str(flux_run.dir / "ckpt/last.ckpt"))
    out = export_flowmap(module, tmp_path / "exported")
    config = json.loads((out / FLOWMAP_JSON).read_text())
    assert config["base"]["class_path"] == "flowmap_lit.teachers.FluxTeacher"
    assert config["base"]["init_args"]["path"] == str(flux_dir.resolve())  # referenced, not copied
    assert config["network"]["class_path"] == "flowmap_lit.teachers.LoRAFlowMap"
    assert (out / WEIGHTS).stat().st_size < 200_000 and not (out / "transformer").exists()

    fm = load_flowmap(out)
    noise, c = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)), cond_batch(3, seed=5)
    for steps in (1, 2):
        with torch.no_grad():
            direct = module.sample(noise, None, num_steps=steps, cond=c)
        assert torch.equal(fm.sample(noise, steps=steps, cond=c), direct)
    # The base model moved: base_path points the export to it.
    moved = tmp_path / "moved"
    os.symlink(flux_dir, moved)
    assert torch.equal(load_flowmap(out, base_path=moved).sample(noise, steps=1, cond=c),
                       module.sample(noise, None, num_steps=1, cond=c))
