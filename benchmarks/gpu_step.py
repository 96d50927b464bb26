"""Distillation step cost on one GPU at ImageNet-512 size, the bf16 error of the JVP, and a LoRA step.

    python benchmarks/gpu_step.py --preset s --guide-preset xs --batch 32

1. **Step cost.** An EDM2-sized U-Net student (a copy of a randomly initialized teacher of the
   same size) with autoguidance from a smaller guide: one AYF-EMD training step (teacher and
   guide forwards, the student's JVP, forward, backward, Adam) in fp32 and under bf16 autocast
   (Lightning's ``precision: bf16-mixed``), with and without activation checkpointing. Reports
   samples/s (median of ``--repeats`` steps after ``--warmup``) and peak GPU memory; an
   out-of-memory configuration is reported as such.
2. **JVP precision.** ``dF/dt`` along the AYF-EMD tangent ``(v, 1, 0)``, computed in fp32 (what
   ``flowmap_lit.jvp`` does, autocast off) and under bf16 autocast (what it avoids), against a
   float64 copy of the student; also the forward ``F`` itself in bf16.
3. **Adversarial finetune step** (``--parts finetune``): the same student with a discriminator on
   the latents (``AdversarialFinetuneModule``: fakes, a discriminator step with R1/R2, then the
   student step with the GAN term), bf16 autocast, against the plain distillation step of the same
   module in the same run.
4. **LoRA step** (``--lora``): a randomly initialized SD3-style transformer (bf16 base weights)
   with a ``LoRAFlowMap`` student sharing them, at 1024 px latents (16 x 128 x 128, 4096 tokens)
   with random text embeddings: the step time and memory of the text-to-image path, and that
   ``F(x, t, s) = v(x, t)`` at step 0.

Weights are random: this measures cost and numerical error, not quality. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowmap_lit.interpolant import interpolate  # noqa: E402
from flowmap_lit.jvp import jvp  # noqa: E402
from flowmap_lit.modules import FlowMapDistillModule  # noqa: E402
from flowmap_lit.networks import build_network  # noqa: E402
from flowmap_lit.networks.attention import forward_ad_safe_attention  # noqa: E402
from flowmap_lit.objectives import AYFEMD  # noqa: E402
from flowmap_lit.teachers import NetworkTeacher  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import randomize_  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def build(args, dev: torch.device, checkpointing: bool) -> FlowMapDistillModule:
    torch.manual_seed(0)
    nc = 1000 if args.preset not in ("tiny", "small") else 10
    teacher = NetworkTeacher(net=randomize_(build_network("unet", args.preset)), num_classes=nc)
    guide = NetworkTeacher(net=randomize_(build_network("unet", args.guide_preset), 1), num_classes=nc)
    module = FlowMapDistillModule(teacher, AYFEMD(), guide=guide, guidance="autoguidance", guidance_min=1.0,
                                  guidance_max=2.0, condition_on_guidance=True, num_classes=nc, warmup_steps=0,
                                  activation_checkpointing=checkpointing)
    module.configure_model()
    randomize_(module.student, 2)  # no branch trivially zero
    return module.to(dev)


def batch_for(module: FlowMapDistillModule, n: int, dev: torch.device) -> dict:
    net = module.student
    shape = (n, net.img_channels, net.img_resolution, net.img_resolution)
    return {"x": torch.randn(shape, device=dev), "label": torch.randint(0, module.num_classes, (n,), device=dev)}


def time_steps(step, dev: torch.device, warmup: int, repeats: int) -> tuple[float, float | None]:
    """(median seconds per step, peak GiB) of ``step()``."""
    for _ in range(warmup):
        step()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_gib(dev)


def step_cost(args, dev: torch.device) -> list[dict]:
    rows = []
    for checkpointing in (False, True):
        module = build(args, dev, checkpointing)
        opt = torch.optim.Adam([p for p in module.student.parameters() if p.requires_grad], lr=1e-5)
        batch = batch_for(module, args.batch, dev)
        for precision in ("fp32", "bf16-mixed"):
            def step(module=module, batch=batch, opt=opt, precision=precision):  # bound now, called below
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                    loss, _ = module.step_loss(batch)
                loss.mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            row = {"precision": precision, "activation_checkpointing": checkpointing, "batch": args.batch}
            try:
                seconds, peak = time_steps(step, dev, args.warmup, args.repeats)
                row.update(seconds_per_step=round(seconds, 4), samples_per_s=round(args.batch / seconds, 1),
                           peak_gib=None if peak is None else round(peak, 2))
            except torch.cuda.OutOfMemoryError:
                row["result"] = "out of memory"
            opt.zero_grad(set_to_none=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
        module = opt = batch = step = None  # free this configuration's memory before building the next
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def finetune_cost(args, dev: torch.device) -> dict:
    from flowmap_lit.modules.finetune import AdversarialFinetuneModule
    from flowmap_lit.networks import Discriminator

    torch.manual_seed(0)
    nc = 1000 if args.preset not in ("tiny", "small") else 10
    teacher = NetworkTeacher(net=randomize_(build_network("unet", args.preset)), num_classes=nc)
    guide = NetworkTeacher(net=randomize_(build_network("unet", args.guide_preset), 1), num_classes=nc)
    net = teacher.network
    disc = Discriminator(img_channels=net.img_channels, img_resolution=net.img_resolution, num_classes=nc)
    module = AdversarialFinetuneModule(
        discriminator=disc, teacher=teacher, objective=AYFEMD(), guide=guide, guidance="autoguidance",
        guidance_min=1.0, guidance_max=2.0, condition_on_guidance=True, num_classes=nc, warmup_steps=0,
        activation_checkpointing=args.finetune_checkpointing)
    module.configure_model()
    randomize_(module.student, 2)
    module = module.to(dev)
    g_opt = torch.optim.Adam([p for p in module.student.parameters() if p.requires_grad], lr=1e-5)
    d_opt = torch.optim.Adam(module.discriminator.parameters(), lr=1e-5, betas=(0.0, 0.99))
    batch = batch_for(module, args.batch, dev)
    autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)  # noqa: E731

    def distill_step():
        with autocast():
            loss, _ = module.step_loss(batch)
        loss.mean().backward()
        g_opt.step()
        g_opt.zero_grad(set_to_none=True)

    def finetune_step():  # what AdversarialFinetuneModule.training_step runs, without Lightning
        with autocast():
            module.adversarial_step(batch, g_opt, d_opt, lambda loss: loss.backward())

    out = {"batch": args.batch, "precision": "bf16-mixed", "activation_checkpointing": args.finetune_checkpointing,
           "discriminator_params_M": round(sum(p.numel() for p in disc.parameters()) / 1e6, 2)}
    for name, step in (("distill", distill_step), ("finetune", finetune_step)):
        try:
            seconds, peak = time_steps(step, dev, args.warmup, args.repeats)
            out[name] = {"seconds_per_step": round(seconds, 4), "peak_gib": None if peak is None else round(peak, 2)}
        except torch.cuda.OutOfMemoryError:
            out[name] = {"result": "out of memory"}
            g_opt.zero_grad(set_to_none=True)
            d_opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    if "seconds_per_step" in out["distill"] and "seconds_per_step" in out["finetune"]:
        ratio = out["finetune"]["seconds_per_step"] / out["distill"]["seconds_per_step"]
        out["finetune_over_distill"] = round(ratio, 2)
    print(json.dumps(out), flush=True)
    return out


def relative(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def jvp_precision(args, dev: torch.device) -> dict:
    module = build(args, dev, checkpointing=False)
    batch = batch_for(module, args.jvp_batch, dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    t, s = module.time_sampler(args.jvp_batch, device=dev, generator=gen)
    x_t = interpolate(batch["x"], torch.randn(batch["x"].shape, device=dev, generator=gen), t)
    labels, lam = batch["label"], 1.0 + torch.rand(args.jvp_batch, device=dev, generator=gen)
    with torch.no_grad():
        v = module.teacher_fn(labels, lam)(x_t, t)
    student = module.student.eval()

    def fn(net, dtype):
        return lambda x, tt: net(x, tt, s.to(dtype), class_labels=labels, guidance=lam.to(dtype))

    student64 = build(args, dev, checkpointing=False).student.eval().double()
    with torch.no_grad():
        ref = jvp(fn(student64, torch.float64), (x_t.double(), t.double()), (v.double(), torch.ones_like(t).double()))
        F_ref = fn(student64, torch.float64)(x_t.double(), t.double())
    del student64
    fp32 = jvp(fn(student, torch.float32), (x_t, t), (v, torch.ones_like(t)))
    with torch.no_grad(), forward_ad_safe_attention(), torch.autocast(dev.type, dtype=torch.bfloat16):
        bf16 = torch.func.jvp(fn(student, torch.float32), (x_t, t), (v, torch.ones_like(t)))[1]
        F_bf16 = fn(student, torch.float32)(x_t, t)
    with torch.no_grad():
        F_fp32 = fn(student, torch.float32)(x_t, t)
    out = {"batch": args.jvp_batch, "jvp_rel_error_fp32": relative(fp32, ref),
           "jvp_rel_error_bf16": relative(bf16, ref),
           "forward_rel_error_fp32": relative(F_fp32, F_ref), "forward_rel_error_bf16": relative(F_bf16, F_ref)}
    print(json.dumps(out), flush=True)
    return out


def lora_step(args, dev: torch.device) -> dict:
    from flowmap_lit.teachers.text2image import LoRAFlowMap, SD3Teacher

    cfg = dict(sample_size=args.lora_latent, patch_size=2, in_channels=16, out_channels=16, num_layers=args.lora_layers,
               attention_head_dim=64, num_attention_heads=args.lora_heads, joint_attention_dim=4096,
               caption_projection_dim=64 * args.lora_heads, pooled_projection_dim=2048, pos_embed_max_size=96)
    teacher = SD3Teacher(config=cfg, dtype="bfloat16" if dev.type == "cuda" else "float32").to(dev)
    module = FlowMapDistillModule(teacher, AYFEMD(), student=LoRAFlowMap(rank=args.lora_rank), guidance="none",
                                  warmup_steps=0).to(dev)
    n, tokens = args.lora_batch, 333
    x = torch.randn(n, 16, args.lora_latent, args.lora_latent, device=dev)
    cond = {"encoder_hidden_states": torch.randn(n, tokens, 4096, device=dev),
            "pooled_projections": torch.randn(n, 2048, device=dev)}
    batch = {"x": x, "label": torch.zeros(n, dtype=torch.long, device=dev), "cond": cond}
    t = torch.rand(n, device=dev)
    with torch.no_grad():
        student, teacher = module.student_fn(None, None, cond), module.teacher_fn(None, None, cond)
        exact = torch.equal(student(x, t, 0.5 * t), teacher(x, t))
    trainable = [p for p in module.student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-5)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss, _ = module.step_loss(batch)
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {"layers": args.lora_layers, "hidden": 64 * args.lora_heads,
           "latent": [16, args.lora_latent, args.lora_latent],
           "batch": n, "lora_rank": args.lora_rank, "base_params_M": round(sum(p.numel() for p in teacher.parameters()
                                                                                if not p.requires_grad) / 1e6, 1),
           "trainable_params_M": round(sum(p.numel() for p in trainable) / 1e6, 2), "F_equals_v_at_init": exact}
    try:
        seconds, peak = time_steps(step, dev, 1, args.repeats)
        out.update(seconds_per_step=round(seconds, 4), peak_gib=None if peak is None else round(peak, 2))
        loss, _ = module.step_loss(batch)
        out["loss_finite"] = bool(torch.isfinite(loss).all())
    except torch.cuda.OutOfMemoryError:
        out["result"] = "out of memory"
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="s", help="EDM2 U-Net size of teacher and student (xs, s, m; tiny on CPU)")
    p.add_argument("--guide-preset", default="xs")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--jvp-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lora", action="store_true", help="also time the SD3-style LoRA step")
    p.add_argument("--lora-layers", type=int, default=12)
    p.add_argument("--lora-heads", type=int, default=24)
    p.add_argument("--lora-latent", type=int, default=128)
    p.add_argument("--lora-batch", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--parts", nargs="*", default=["step", "jvp"], choices=["step", "jvp", "finetune"])
    p.add_argument("--finetune-checkpointing", action="store_true",
                   help="activation checkpointing in the finetune part")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    torch.backends.cudnn.allow_tf32 = False
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "preset": args.preset, "guide_preset": args.guide_preset}
    if "step" in args.parts:
        result["step"] = step_cost(args, dev)
    if "jvp" in args.parts:
        result["jvp"] = jvp_precision(args, dev)
    if "finetune" in args.parts:
        result["finetune"] = finetune_cost(args, dev)
    if args.lora:
        result["lora"] = lora_step(args, dev)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
