"""Training-step cost against its parts: are there wasted passes?

    python benchmarks/step_cost.py --arch unet --preset tiny --batch 64

Times (median over interleaved repeats, after warm-up, one process) a flow-matching step and the
AYF-EMD, AYF-LMD and sCD steps with autoguidance, and each part alone: teacher forward, guide
forward, student JVP, student forward+backward+optimizer step. Prints a table and one JSON object:
each distillation step over the flow-matching step, and each step over the sum of its own parts
(the overhead; 1.0 means no pass is wasted).

With a forward-AD backend (``func``, ``forward_ad``) each distillation step is timed with the
tangent computed both ways (docs/design.md section 4): ``two_pass`` (grad forward + separate JVP)
and ``one_pass`` (one grad-enabled forward-mode pass whose primal is the trained output). Each row
also carries the activation memory the step keeps for its backward (bytes of the distinct tensors
saved by autograd, a device-independent proxy for peak activation memory).

``--compile`` adds the AYF-EMD two-pass step with ``compile_student: true`` (``torch.compile`` of
the student's grad forward and backward; the tangent pass stays eager) per backend, and a
flow-matching step with a compiled network; compiled rows carry ``compiled: true`` and also
``over_compiled_flow_matching``. Compilation happens in the warm-up repeats.

The row of what a config without ``jvp_backend``/``tangent_pass`` runs on this device carries
``default: true`` (marked ``*`` in the table). ``--out FILE`` also writes the JSON object there.
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
from flowmap_lit.jvp import jvp, primal_and_tangent  # noqa: E402
from flowmap_lit.modules import FlowMapDistillModule, FlowMatchingModule  # noqa: E402
from flowmap_lit.networks import build_network  # noqa: E402
from flowmap_lit.objectives import AYFEMD, AYFLMD, SCD  # noqa: E402
from flowmap_lit.teachers import NetworkTeacher  # noqa: E402


def randomize_(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill zero-initialized tensors so no branch is trivially zero (timing is then representative)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return net


def saved_for_backward_mb(fn) -> float:
    """MiB of the distinct tensors autograd saves while ``fn`` runs (the step's backward activations)."""
    seen: dict[tuple, int] = {}

    def pack(t):
        if t.numel():
            try:
                key, nbytes = (t.untyped_storage().data_ptr(), str(t.device)), t.untyped_storage().nbytes()
            except RuntimeError:  # a forward-AD dual view has no accessible storage: count its elements
                key, nbytes = ("tensor", id(t)), t.numel() * t.element_size()
            seen[key] = max(seen.get(key, 0), nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def passes(backend: str) -> list[str]:
    return ["two_pass"] if backend == "finite_difference" else ["two_pass", "one_pass"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="unet", choices=["unet", "dit", "mlp"])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=["forward_ad", "func", "finite_difference"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time compiled variants (compile_student)")
    p.add_argument("--out", type=Path, help="also write the JSON object to this file")
    args = p.parse_args(argv)
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup >= 1 (the first call compiles)")
    torch.manual_seed(0)
    dev = torch.device(args.device)
    net = randomize_(build_network(args.arch, args.preset)).to(dev)
    teacher = NetworkTeacher(net=net, num_classes=10)  # every tiny preset is the 10-class digits size
    guide = NetworkTeacher(net=randomize_(build_network(args.arch, args.preset), 1).to(dev), num_classes=10)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    x0 = torch.randn(args.batch, *shape, device=dev)
    labels = torch.randint(0, 10, (args.batch,), device=dev)
    batch = {"x": x0, "label": labels}
    t = torch.rand(args.batch, device=dev)
    s = t * torch.rand(args.batch, device=dev)
    x_t = interpolate(x0, torch.randn_like(x0), t)

    ops = {}

    def add_flow_matching_step(key: str, compiled: bool = False) -> None:
        fm = FlowMatchingModule(build_network(args.arch, args.preset).to(dev), num_classes=10)
        if compiled:
            fm.net = torch.compile(fm.net)
        fm_opt = torch.optim.Adam(fm.parameters(), lr=1e-4)

        def fm_step():
            loss = fm.training_step(batch, 0)
            fm_opt.zero_grad(set_to_none=True)
            loss.backward()
            fm_opt.step()

        ops[key] = fm_step

    add_flow_matching_step("flow_matching_step")
    if args.compile:
        add_flow_matching_step("flow_matching_step[compiled]", compiled=True)
    modules = {}
    memory = {}

    def add_step(key: str, objective, compiled: bool = False) -> FlowMapDistillModule:
        """A distillation step under ``key`` (timed, with its saved activations measured once)."""
        m = FlowMapDistillModule(teacher, objective, guide=guide, guidance="autoguidance", guidance_min=1.5,
                                 guidance_max=1.5, num_classes=10, warmup_steps=0, compile_student=compiled).to(dev)
        opt = torch.optim.Adam(m.student.parameters(), lr=1e-4)

        def step():
            loss, _ = m.step_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.mean().backward()
            opt.step()

        ops[key] = step
        memory[key] = saved_for_backward_mb(lambda: m.step_loss(batch)[0].mean())
        return m

    for backend in args.backends:
        for tangent_pass in passes(backend):
            for name, cls in (("ayf_emd", AYFEMD), ("ayf_lmd", AYFLMD), ("scd", SCD)):
                modules[(name, backend, tangent_pass)] = add_step(
                    f"{name}_step[{backend},{tangent_pass}]", cls(jvp_backend=backend, tangent_pass=tangent_pass))
    if args.compile:
        for backend in args.backends:
            modules[("ayf_emd", backend, "two_pass", "compiled")] = add_step(
                f"ayf_emd_step[{backend},two_pass,compiled]", AYFEMD(jvp_backend=backend), compiled=True)
    student = modules[(("ayf_emd", args.backends[0], "two_pass"))].student
    s_opt = torch.optim.Adam(student.parameters(), lr=1e-4)

    def teacher_fwd():
        teacher.velocity(x_t, t, labels)

    def guide_fwd():
        guide.velocity(x_t, t, labels)

    def fwd_bwd():
        out = student(x_t, t, s, class_labels=labels)
        s_opt.zero_grad(set_to_none=True)
        out.square().mean().backward()
        s_opt.step()

    def one_pass_fwd_bwd(tangents):
        F, _ = primal_and_tangent(lambda a, b, c: student(a, b, c, class_labels=labels), x_t, t, s, tangents)
        s_opt.zero_grad(set_to_none=True)
        F.square().mean().backward()
        s_opt.step()

    ops["part:teacher_forward"] = teacher_fwd
    ops["part:guide_forward"] = guide_fwd
    ops["part:student_forward_backward_step"] = fwd_bwd
    if args.compile:
        c_module = modules[("ayf_emd", args.backends[0], "two_pass", "compiled")]
        c_opt = torch.optim.Adam(c_module.student.parameters(), lr=1e-4)

        def compiled_fwd_bwd():
            out = c_module.compiled_student()(x_t, t, s, class_labels=labels)
            c_opt.zero_grad(set_to_none=True)
            out.square().mean().backward()
            c_opt.step()

        ops["part:student_forward_backward_step[compiled]"] = compiled_fwd_bwd
    v = torch.randn_like(x_t)
    for backend in args.backends:
        ops[f"part:student_jvp_t[{backend}]"] = lambda b=backend: jvp(
            lambda x, tt: student(x, tt, s, class_labels=labels), (x_t, t), (v, torch.ones_like(t)), backend=b)
        ops[f"part:student_jvp_s[{backend}]"] = lambda b=backend: jvp(
            lambda ss: student(x_t, t, ss, class_labels=labels), (s,), (torch.ones_like(s),), backend=b)
    ops["part:student_one_pass_forward_backward_step_t"] = lambda: one_pass_fwd_bwd({"x": v, "t": torch.ones_like(t)})
    ops["part:student_one_pass_forward_backward_step_s"] = lambda: one_pass_fwd_bwd({"s": torch.ones_like(s)})

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = {k: [] for k in ops}
    for i in range(args.warmup + args.repeats):
        for name, fn in ops.items():  # interleaved: every op sees the same machine state
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    fm_ms = med["flow_matching_step"]
    teachers_ms = med["part:teacher_forward"] + med["part:guide_forward"]
    rows = []
    default_objective = AYFEMD()  # what a config without jvp_backend / tangent_pass gets on this device
    default = (default_objective.jvp_backend,
               "one_pass" if default_objective.uses_one_pass(x_t) else "two_pass")
    for backend in args.backends:
        for tangent_pass in passes(backend):
            for name, jvp_key in (("ayf_emd", "t"), ("ayf_lmd", "s"), ("scd", "t")):
                key = f"{name}_step[{backend},{tangent_pass}]"
                step_ms = med[key]
                if tangent_pass == "two_pass":
                    parts = teachers_ms + med["part:student_forward_backward_step"] + \
                        med[f"part:student_jvp_{jvp_key}[{backend}]"]
                else:
                    parts = teachers_ms + med[f"part:student_one_pass_forward_backward_step_{jvp_key}"]
                rows.append({"step": name, "jvp_backend": backend, "tangent_pass": tangent_pass,
                             "ms": round(step_ms, 2), "over_flow_matching": round(step_ms / fm_ms, 2),
                             "sum_of_parts_ms": round(parts, 2), "over_sum_of_parts": round(step_ms / parts, 3),
                             "saved_for_backward_mib": round(memory[key], 2), "compiled": False,
                             "default": (backend, tangent_pass) == default})
    if args.compile:
        fm_c_ms = med["flow_matching_step[compiled]"]
        for backend in args.backends:
            key = f"ayf_emd_step[{backend},two_pass,compiled]"
            step_ms = med[key]
            parts = (teachers_ms + med["part:student_forward_backward_step[compiled]"]
                     + med[f"part:student_jvp_t[{backend}]"])
            rows.append({"step": "ayf_emd", "jvp_backend": backend, "tangent_pass": "two_pass", "compiled": True,
                         "ms": round(step_ms, 2), "over_flow_matching": round(step_ms / fm_ms, 2),
                         "over_compiled_flow_matching": round(step_ms / fm_c_ms, 2),
                         "sum_of_parts_ms": round(parts, 2), "over_sum_of_parts": round(step_ms / parts, 3),
                         "saved_for_backward_mib": round(memory[key], 2), "default": False})
    result = {"arch": args.arch, "preset": args.preset, "batch": args.batch, "device": str(dev),
              "threads": torch.get_num_threads(), "repeats": args.repeats,
              "median_ms": {k: round(v, 2) for k, v in med.items()}, "flow_matching_step_ms": round(fm_ms, 2),
              "steps": rows}
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'step':<10} {'jvp':<18} {'tangent':<18} {'ms':>8} {'/FM step':>9} {'parts ms':>9} {'/parts':>7} "
          f"{'saved MiB':>10}")
    for r in rows:
        tangent = r["tangent_pass"] + (", compiled" if r["compiled"] else "") + (" *" if r["default"] else "")
        print(f"{r['step']:<10} {r['jvp_backend']:<18} {tangent:<18} {r['ms']:>8.2f} "
              f"{r['over_flow_matching']:>9.2f} {r['sum_of_parts_ms']:>9.2f} {r['over_sum_of_parts']:>7.3f} "
              f"{r['saved_for_backward_mib']:>10.2f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
