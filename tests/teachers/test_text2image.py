"""Text-conditioned distillation (flowmap_lit.teachers.text2image): the SD3 teacher adapter, the LoRA
flow-map student, fitting the text-to-image config with its evaluation callbacks and exact resume, and
sampling from text prompts. (The text-conditioned shards: tests/data/test_text_shards.py.)"""

import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flowmap_lit.data import LatentDataModule, write_dataset
from flowmap_lit.modules import FlowMapDistillModule
from flowmap_lit.objectives import AYFEMD
from tests.helpers import ROOT, tiny_dinov2, tiny_vae
from tests.helpers.cli import CHECKPOINTS, cli
from tests.helpers.text import TINY, D, L, P, cond_batch, text_arrays, write_text_dataset

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

from flowmap_lit.teachers.text2image import LoRAFlowMap, SD3Teacher  # noqa: E402


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    torch.manual_seed(0)
    diffusers.SD3Transformer2DModel(**TINY).save_pretrained(root / "transformer")
    diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(root / "scheduler")
    return root


def test_sd3_convention_matches_flow_match_euler_scheduler():
    """diffusers' flow-matching Euler step is x + (sigma_next - sigma) * model_output: with the exact
    output noise - x0 (our v) it lands on (1 - sigma_next) x0 + sigma_next noise, so output = our v."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(4)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigma, sigma_next = float(sched.sigmas[1]), float(sched.sigmas[2])
    assert abs(float(sched.timesteps[1]) - 1000 * sigma) < 1e-3  # timestep = sigma * num_train_timesteps
    x = (1 - sigma) * x0 + sigma * noise
    sched._step_index = 1
    out = sched.step(noise - x0, sched.timesteps[1], x).prev_sample
    torch.testing.assert_close(out, (1 - sigma_next) * x0 + sigma_next * noise, rtol=1e-5, atol=1e-5)


def test_teacher_is_a_direct_diffusers_call_and_missing_dir_says_how_to_download(teacher_dir, tmp_path):
    teacher = SD3Teacher(path=str(teacher_dir))
    assert teacher.timestep_scale == 1000.0 and not any(p.requires_grad for p in teacher.parameters())
    ref = diffusers.SD3Transformer2DModel.from_pretrained(str(teacher_dir / "transformer"))
    x, t, c = torch.randn(3, 4, 8, 8), torch.rand(3), cond_batch(3)
    with torch.no_grad():
        direct = ref(hidden_states=x, encoder_hidden_states=c["encoder_hidden_states"],
                     pooled_projections=c["pooled_projections"], timestep=t * 1000).sample
        v = teacher.velocity(x, t, None, **c)
    # Same weights and inputs; another model object may sum in another order (1e-7 differences).
    torch.testing.assert_close(v, direct, rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="hf download"):
        SD3Teacher(path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        teacher.velocity(x, t)


def make_module(teacher_dir, guidance="cfg", null_cond=None):
    teacher = SD3Teacher(path=str(teacher_dir))
    module = FlowMapDistillModule(teacher, AYFEMD(), student=LoRAFlowMap(rank=2, gap_hidden=16), guidance=guidance,
                                  guidance_min=1.0, guidance_max=3.0, condition_on_guidance=True, warmup_steps=0)
    module.null_cond = null_cond
    return module


def test_lora_student_starts_at_the_teacher_shares_weights_and_cfg_uses_the_null_prompt(teacher_dir):
    module = make_module(teacher_dir)
    x, t, c = torch.randn(4, 4, 8, 8), torch.rand(4), cond_batch(4)
    lam = torch.tensor([1.0, 1.5, 2.0, 3.0])
    v = module.teacher.velocity(x, t, None, **c)
    F_tt = module.student_fn(None, lam, c)(x, t, t)
    F_ts = module.student_fn(None, lam, c)(x, t, 0.3 * t)
    assert torch.equal(F_tt, v) and torch.equal(F_ts, v)  # exactly, at step 0
    assert module.student.transformer is module.teacher.transformer  # one copy of the base weights
    trainable = {n for n, p in module.student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("gap_embed.", "guidance_embed.")) for n in trainable)
    opt = module.configure_optimizers()["optimizer"]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)

    # CFG: lam v(c) + (1 - lam) v(null prompt); zeros when the dataset stored no null prompt.
    null = {"encoder_hidden_states": torch.randn(L, D), "pooled_projections": torch.randn(P)}
    for stored in (null, None):
        module.null_cond = stored
        guided = module.teacher_fn(None, lam, c)(x, t)
        n = stored or {k: torch.zeros_like(v[0]) for k, v in c.items()}
        v_null = module.teacher.velocity(x, t, None, **{k: n[k].expand_as(v) for k, v in c.items()})
        lam_b = lam.view(-1, 1, 1, 1)
        torch.testing.assert_close(guided, lam_b * v + (1 - lam_b) * v_null, rtol=1e-5, atol=1e-5)

    # Autoguidance: the guide (a weaker text model) gets the same text.
    guide = SD3Teacher(config=TINY, seed=1)
    module.guide, module.guidance = guide.freeze(), "autoguidance"
    guided = module.teacher_fn(None, lam, c)(x, t)
    lam_b = lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(guided, lam_b * v + (1 - lam_b) * guide.velocity(x, t, None, **c), rtol=1e-5, atol=1e-5)


def test_jvp_backends_agree_on_the_lora_student(teacher_dir):
    from flowmap_lit.jvp import jvp

    module = make_module(teacher_dir)
    with torch.no_grad():  # a trained-looking student, so every branch carries a derivative
        for p in module.student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 0.4]), cond_batch(2)
    fn = module.student_fn(None, torch.tensor([1.0, 2.0]), c)
    s = torch.tensor([0.2, 0.1])
    tangents = (torch.randn_like(x), torch.ones(2), torch.zeros(2))
    d_func = jvp(fn, (x, t, s), tangents, backend="func")
    module.double()
    fn64 = module.student_fn(None, torch.tensor([1.0, 2.0], dtype=torch.float64),
                             {k: v.double() for k, v in c.items()})
    d_fd = jvp(fn64, (x.double(), t.double(), s.double()), [u.double() for u in tangents],
               backend="finite_difference", fd_step=1e-5)
    torch.testing.assert_close(d_func.double(), d_fd, rtol=1e-3, atol=1e-3 * d_fd.abs().max().item())


def _fit(data, teacher_dir, steps, *extra):
    args = ["fit", "--config", str(ROOT / "configs/text2image/distill_lora.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", str(steps),
            "--trainer.logger", "false", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--model.init_args.teacher.init_args.path", str(teacher_dir),
            "--model.init_args.teacher.init_args.dtype", "float32",
            "--model.init_args.student.init_args.rank", "2", "--model.init_args.student.init_args.gap_hidden", "16",
            "--model.init_args.lr_warmup_steps", "0", "--model.init_args.optimizer.init_args.lr", "0.01",
            "--data.init_args.root", str(data), "--data.init_args.num_workers", "0",
            "--data.init_args.batch_size", "4", *extra]
    return cli(*args)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, teacher_dir):
    """The text-to-image LoRA config fitted for 4 steps on a tiny text dataset, checkpoints every 2 steps in
    ``ckpt/`` (all kept): ``dir``, ``data``, ``model`` (the fitted module), ``fresh`` (the teacher's weights
    before the fit)."""
    work = tmp_path_factory.mktemp("lora")
    write_text_dataset(work / "t2i")
    (work / "ckpt.yaml").write_text(CHECKPOINTS)
    fresh = diffusers.SD3Transformer2DModel.from_pretrained(str(teacher_dir / "transformer")).state_dict()
    cwd = os.getcwd()
    os.chdir(work)  # the checkpoint directory of CHECKPOINTS is relative
    try:
        model = _fit(work / "t2i", teacher_dir, 4, "--config", work / "ckpt.yaml").model
    finally:
        os.chdir(cwd)
    return SimpleNamespace(dir=work, data=work / "t2i", model=model, fresh=fresh)


def test_fit_trains_only_the_adapters_and_resumes_exactly(lora_run, teacher_dir, tmp_path, monkeypatch):
    model, fresh = lora_run.model, lora_run.fresh
    assert model.null_cond is not None  # the empty prompt from null_text.npz
    base = {k.replace(".base_layer", ""): v for k, v in model.teacher.transformer.state_dict().items()
            if "lora_" not in k}
    assert set(base) == set(fresh) and all(torch.equal(base[k], fresh[k]) for k in fresh)  # teacher unchanged
    lora_b = [p for n, p in model.student.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b) and model.student.gap_embed.fc1.weight.abs().sum() > 0
    ckpt = torch.load(lora_run.dir / "ckpt/last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 4 and "null_cond" in ckpt
    keys = set(ckpt["state_dict"])  # only the adapters and the student's own embeddings
    assert keys and all("lora_" in k or k.startswith(("student.gap_embed.", "student.guidance_embed.")) for k in keys)
    final = {k: v.clone() for k, v in model.student.state_dict().items()}

    # As if killed after step 2: `--ckpt_path last` finds the step-2 checkpoint and steps 3-4 repeat exactly.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(lora_run.dir / "ckpt", tmp_path / "ckpt")
    (tmp_path / "ckpt/last.ckpt").unlink()
    (tmp_path / "ckpt/epoch=0-step=2.ckpt").rename(tmp_path / "ckpt/last.ckpt")
    resumed = _fit(lora_run.data, teacher_dir, 4, "--config", lora_run.dir / "ckpt.yaml", "--ckpt_path", "last").model
    assert resumed.global_step == 4
    for k, v in resumed.student.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_low_precision_base_weights_run_under_autocast_outside_it():
    """bf16 base weights with fp32 adapters: a call without autocast (the JVP's tangent pass) is
    run under autocast to the weights' dtype, so fp32 and bf16 tensors never meet in a matmul."""
    from flowmap_lit.teachers.text2image import sd3_forward

    class Recorder(torch.nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
            self.seen = None

        def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict):
            self.seen = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), hidden_states.dtype)
            return (hidden_states,)

    x, cond = torch.randn(2, 4, 2, 2), (torch.randn(2, 3, 8), torch.randn(2, 8))
    for dtype, autocast in ((torch.bfloat16, True), (torch.float32, False)):
        rec = Recorder(dtype)
        out = sd3_forward(rec, x, torch.rand(2), 1000.0, *cond)
        assert rec.seen[0] == autocast and rec.seen[2] == dtype and out.dtype == torch.float32
        if autocast:
            assert rec.seen[1] == torch.bfloat16


def test_config_fits_with_text_conditioned_evaluation_callbacks(tmp_path, teacher_dir, monkeypatch):
    """The config's own callbacks (flow-map error, FD_DINOv2 of VAE-decoded samples, sample grids) run
    text-conditioned on a tiny model: only the sample counts are made small."""
    import yaml

    monkeypatch.chdir(tmp_path)
    write_text_dataset(tmp_path / "t2i")
    tiny_vae(16).save_pretrained(tmp_path / "models/sd3.5-medium/vae")  # the config's relative paths
    tiny_dinov2(tmp_path / "models/dinov2-large")
    config = yaml.safe_load((ROOT / "configs/text2image/distill_lora.yaml").read_text())
    small = {"FlowMapError": {"num_samples": 6, "reference_steps": 4, "step_counts": [1, 2]},
             "FewStepFID": {"num_samples": 12, "step_counts": [1, 2]},
             "SampleGrid": {"num_samples": 4, "num_steps": [1]}}
    for cb in config["trainer"]["callbacks"]:
        cb["init_args"].update(small.get(cb["class_path"].rsplit(".", 1)[-1], {}))
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "ckpt")
    (tmp_path / "t2i.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": config["trainer"]["callbacks"]}}))
    run = _fit(tmp_path / "t2i", teacher_dir, 2, "--config", str(tmp_path / "t2i.yaml"))
    callbacks = {type(cb).__name__: cb for cb in run.trainer.callbacks}
    rows = callbacks["FewStepFID"].results
    assert [r["steps"] for r in rows] == [1, 2] and all(r["fd_dinov2"] > 0 for r in rows)
    errors = callbacks["FlowMapError"].results
    assert [r["steps"] for r in errors] == [1, 2] and all(0 < r["relative_error"] for r in errors)
    assert callbacks["FlowMapError"]._cond["encoder_hidden_states"].shape == (6, L, D)
    assert callbacks["SampleGrid"].last_paths and callbacks["SampleGrid"].last_paths[0].is_file()
    assert list((tmp_path / "t2i").glob("fid_ref_dinov2_decoded_train*.pt"))


def test_text_conditioned_evaluation_uses_the_stored_prompts(tmp_path):
    """Sample i is conditioned on validation prompt i % count, whatever the process's share."""
    from flowmap_lit.metrics.few_step import prompt_cond, text_prompts

    _, _, _ = write_text_dataset(tmp_path / "t2i")
    dm = LatentDataModule(root=str(tmp_path / "t2i"), num_workers=0, normalize=False)
    dm.setup("validate")
    prompts = text_prompts(dm, 5)
    _, (tv, pv) = text_arrays(8, 1)
    assert torch.equal(prompts["encoder_hidden_states"], torch.from_numpy(tv[:5]).half().float()) or \
        torch.allclose(prompts["encoder_hidden_states"].float(), torch.from_numpy(tv[:5]), atol=1e-2)
    cond = prompt_cond(prompts, range(3, 8))
    assert torch.equal(cond["pooled_projections"], prompts["pooled_projections"][[3, 4, 0, 1, 2]])
    assert text_prompts(LatentDataModule(root=str(write_plain(tmp_path / "plain")), num_workers=0), 4) is None


def write_plain(root):
    x = np.random.default_rng(0).standard_normal((8, 4, 8, 8)).astype(np.float32)
    write_dataset(str(root), {"train": (x, np.zeros(8, int)), "val": (x, np.zeros(8, int))}, 0, samples_per_shard=8)
    return root


def test_sample_command_writes_text_conditioned_samples(lora_run, tmp_path):
    """``python -m flowmap_lit sample --prompts FILE.npz`` (diffusers' encode_prompt names) and
    ``--prompts val``: sample i is the module's sample from noise i with prompt i % P."""
    from flowmap_lit.checkpoints import load_module

    prompts = cond_batch(2, seed=4)
    np.savez(tmp_path / "prompts.npz", prompt_embeds=prompts["encoder_hidden_states"].numpy(),
             pooled_prompt_embeds=prompts["pooled_projections"].numpy())
    tiny_vae(16).save_pretrained(tmp_path / "vae")
    ckpt = str(lora_run.dir / "ckpt/last.ckpt")
    cli("sample", "--ckpt", ckpt, "--steps", "1", "--num", "3", "--prompts", tmp_path / "prompts.npz",
        "--vae", tmp_path / "vae", "--out", tmp_path / "out")
    arrays = np.load(tmp_path / "out/samples.npz")
    assert arrays["x_1step"].shape == (3, 4, 8, 8) and arrays["prompt_index"].tolist() == [0, 1, 0]
    assert arrays["images_1step"].shape == (3, 3, 16, 16) and (tmp_path / "out/samples_1step.png").is_file()
    module = load_module(ckpt)
    noise = torch.from_numpy(arrays["noise"])
    with torch.no_grad():
        direct = module.sample(noise, None, num_steps=1,
                               cond={k: v[[0, 1, 0]] for k, v in prompts.items()})
    torch.testing.assert_close(torch.from_numpy(arrays["x_1step"]), direct)
    cli("sample", "--ckpt", ckpt, "--steps", "1", "--num", "2", "--prompts", "val", "--out", tmp_path / "val")
    assert np.load(tmp_path / "val/samples.npz")["prompt_index"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="expected prompt_embeds"):
        np.savez(tmp_path / "bad.npz", other=np.zeros(3))
        cli("sample", "--ckpt", ckpt, "--num", "1", "--prompts", tmp_path / "bad.npz", "--out", tmp_path / "b")


def test_exported_lora_flowmap_references_the_base_model_and_reproduces_the_checkpoint(lora_run, teacher_dir,
                                                                                       tmp_path):
    """``python -m flowmap_lit export`` of the SD3 LoRA student: the adapters and embeddings only, the base
    model referenced by its path; the loaded flow map samples like the checkpoint's module, bit for bit."""
    import json

    from safetensors.torch import load_file, save_file

    from flowmap_lit.checkpoints import load_module
    from flowmap_lit.export import CONFIG, WEIGHTS, load_flowmap

    ckpt = str(lora_run.dir / "ckpt/last.ckpt")
    out = tmp_path / "exported"
    cli("export", "--ckpt", ckpt, "--out", out)
    config = json.loads((out / CONFIG).read_text())
    assert config["base"] == {"class_path": "flowmap_lit.teachers.SD3Teacher",
                              "init_args": {"path": str(teacher_dir.resolve()), "config": None, "subfolder": None,
                                            "dtype": "float32", "seed": 0, "num_train_timesteps": None}}
    weights = load_file(str(out / WEIGHTS))
    assert weights and all("lora_" in k or k.startswith(("gap_embed.", "guidance_embed.")) for k in weights)

    module, fm = load_module(ckpt), load_flowmap(out)
    assert fm.guidance == module.eval_guidance and fm.condition_on_guidance
    noise, c = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2)), cond_batch(3, seed=6)
    for steps in (1, 3):
        assert torch.equal(fm.sample(noise, steps=steps, cond=c), module.sample(noise, None, num_steps=steps, cond=c))

    # Weights of another student are refused, naming what is missing.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CONFIG).write_text((out / CONFIG).read_text())
    save_file({k: v for k, v in weights.items() if not k.startswith("gap_embed.")}, str(tmp_path / "bad" / WEIGHTS))
    with pytest.raises(ValueError, match="missing.*gap_embed"):
        load_flowmap(tmp_path / "bad")
