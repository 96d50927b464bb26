"""A distilled flow map outside Lightning: safetensors weights, a JSON config, one call to load.

    python -m flowmap_lit export --ckpt checkpoints/quickstart/last.ckpt --out exported/quickstart \\
        [--schedules checkpoints/quickstart/schedules.json]

writes ``OUT/student.safetensors`` (the EMA student) and ``OUT/flowmap.json`` (the network's class
and arguments, the data normalization and shape, the classes, the guidance scale the student was
evaluated with, the sampler's gamma and the tuned k-step grids). Then, with neither Lightning nor
the training config::

    from flowmap_lit.export import load_flowmap
    fm = load_flowmap("exported/quickstart")
    x = fm.sample(torch.randn(16, *fm.shape), labels, steps=4)    # normalized data space
    images = fm.denormalize(x)

gives the checkpoint's own samples bit for bit for the same noise and grid. A LoRA student that
shares a text-to-image teacher's weights (``LoRAFlowMap`` on an ``SD3Teacher`` or ``FluxTeacher``)
exports only its own weights (the adapters and the gap/guidance embeddings) and references the
base model by its path (``"base"`` in ``flowmap.json``; never copied): ``load_flowmap`` builds the
teacher from that path, attaches the student and loads the adapters, and ``fm.sample(noise,
steps=k, cond={"encoder_hidden_states": ..., "pooled_projections": ...})`` gives the checkpoint's
samples bit for bit. For latent data a
diffusers pipeline (``flowmap_lit.diffusers_pipeline.FlowMapPipeline``) wraps the flow map, a VAE and the
grids (``--vae DIR`` writes it too, to ``OUT/pipeline``); for an adapter student it is
``FlowMapTextPipeline`` (prompt embeddings in, the base model referenced by its path). docs/design.md
section 11.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from flowmap_lit.flowmap import FlowMap, instantiate
from flowmap_lit.grids import load_schedules, schedules_doc

FORMAT = "flowmap-lit-flowmap/1"
WEIGHTS, CONFIG = "student.safetensors", "flowmap.json"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exn:
        raise ImportError("exported flow maps are safetensors files: pip install 'flowmap_lit[export]'") from exn
    return safetensors.torch


def student_config(module) -> dict:
    """``{"class_path", "init_args"}`` of a distilled module's student, from its hyperparameters or
    (for a student copied from the teacher) from the teacher's checkpoint; a student sharing the
    teacher's weights (LoRA) describes itself (``export_config``)."""
    if getattr(module, "shared_student", False):
        return _exportable(getattr(module, "student", None), "student").export_config()
    hparams = getattr(module, "checkpoint_hparams", None) or module.hparams
    cfg = hparams.get("student")
    if isinstance(cfg, dict) and "class_path" in cfg:
        return cfg
    teacher_cfg = getattr(module.teacher, "net_config", None)
    if cfg is None and isinstance(teacher_cfg, dict):
        return teacher_cfg
    raise ValueError("the checkpoint records no architecture for its student (it was built in Python, not from a "
                     "config); export needs one: train with `python -m flowmap_lit fit --config ...`")


def _exportable(obj, role: str):
    if not callable(getattr(obj, "export_config", None)):
        raise ValueError(f"the {role} ({type(obj).__name__}) of this adapter student cannot describe itself "
                         "(export_config); only LoRAFlowMap adapters on an SD3Teacher or FluxTeacher are exported")
    return obj


def base_config(module) -> dict | None:
    """The teacher whose network a shared-weight (adapter) student wraps, ``{"class_path", "init_args"}``
    with the base model's local path; None for a standalone student."""
    if not getattr(module, "shared_student", False):
        return None
    return _exportable(getattr(module, "teacher", None), "teacher").export_config()


def flowmap_config(module, schedules: dict[int, tuple[Tensor, float]] | None = None) -> dict:
    scheds = module.schedules if schedules is None else schedules
    base = base_config(module)
    return {
        **({"base": base} if base is not None else {}),
        "format": FORMAT,
        "network": student_config(module),
        "num_classes": int(module.num_classes),
        "condition_on_guidance": bool(module.condition_on_guidance),
        "guidance": None if module.guidance == "none" else float(module.eval_guidance),
        "sample_gamma": float(module.sample_gamma),
        "schedules": schedules_doc(scheds),
        "data": getattr(module, "data_info", None) or {},
    }


def export_flowmap(module, out: str | Path, schedules: str | Path | None = None) -> Path:
    """Write ``module``'s student (its weights as loaded: :func:`load_module` puts the EMA in) to ``out``."""
    config = flowmap_config(module, load_schedules(schedules) if schedules is not None else None)
    net = module.ema_network()
    # An adapter student: the adapters and embeddings only; the base model stays where its path says.
    return write_export(config, net.own_state_dict() if "base" in config else net, out)


def write_export(config: dict, weights, out: str | Path) -> Path:
    """``out/flowmap.json`` (``config``) and ``out/student.safetensors``: ``weights`` is the network (saved with
    safetensors' ``save_model``) or, for an adapter student, the dict of its own tensors."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(weights, dict):
        _safetensors().save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(out / WEIGHTS))
    else:
        _safetensors().save_model(weights, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(config, indent=1))
    return out


def loaded_config(fm: FlowMap) -> dict:
    """The ``flowmap.json`` of a loaded :class:`FlowMap` (what :func:`load_flowmap` read, the base model's path
    as it was found), to write it again with :func:`write_export`."""
    if fm.network_config is None:
        raise ValueError("the flow map does not record its network config; load it with "
                         "flowmap_lit.export.load_flowmap")
    return {
        **({"base": fm.base_config} if fm.base_config is not None else {}),
        "format": FORMAT,
        "network": fm.network_config,
        "num_classes": int(fm.num_classes),
        "condition_on_guidance": bool(fm.condition_on_guidance),
        "guidance": fm.guidance,
        "sample_gamma": float(fm.sample_gamma),
        "schedules": schedules_doc(fm.schedules),
        "data": dict(fm.data),
    }


def load_flowmap(path: str | Path, device: str | torch.device = "cpu", trust_code: bool = False,
                 base_path: str | Path | None = None) -> FlowMap:
    """The :class:`FlowMap` written by :func:`export_flowmap` (or ``python -m flowmap_lit export``).

    Loading runs no code from the directory: the weights are safetensors, and the network is built
    only when ``flowmap.json`` names a class of this package (another class needs ``trust_code=True``).
    An adapter (LoRA) export reads its base model from the path it records; ``base_path`` points it
    elsewhere (the same model moved or on another machine)."""
    load_model = _safetensors().load_model
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} is not an exported flow map (it needs {CONFIG} and {WEIGHTS}); write one "
                                "with `python -m flowmap_lit export --ckpt CKPT --out DIR`")
    config = json.loads((path / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG} has format {config.get('format')!r}, expected {FORMAT!r}")

    if base_path is not None:
        if "base" not in config:
            raise ValueError(f"{path} is a standalone flow map: it has no base model to point base_path to")
        config["base"]["init_args"]["path"] = str(base_path)

    def load_weights(net):
        try:
            if "base" in config:
                load_adapters(net, _safetensors().load_file(str(path / WEIGHTS), device=str(device)), path / WEIGHTS)
            else:
                load_model(net, str(path / WEIGHTS), device=str(device))
        except Exception as err:  # safetensors raises its own error types for a damaged header or size
            if type(err).__name__ != "SafetensorError" and not isinstance(err, (OSError, ValueError, RuntimeError)):
                raise
            raise ValueError(f"{path / WEIGHTS} is not a readable safetensors file of this network (truncated, "
                             f"corrupt or from another export?): {err}. Export it again with `python -m flowmap_lit "
                             "export --ckpt CKPT --out DIR`.") from err

    return flowmap_from_config(config, load_weights, device, source=str(path / CONFIG), trust_code=trust_code)


def load_adapters(net, state: dict[str, Tensor], source) -> None:
    """Load a shared-weight student's own weights; every one of them, and nothing else, must be there."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    shared = set(net.shared_state_keys())
    missing = [k for k in missing if k not in shared]
    if missing or unexpected:
        raise ValueError(f"{source} does not hold this adapter student's weights (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}): a LoRA of another rank, targets or base model?")


def flowmap_from_config(config: dict, load_weights, device="cpu", source: str = "the flow map config",
                        trust_code: bool = False) -> FlowMap:
    teacher = instantiate(config["base"], source, trust_code) if config.get("base") else None
    net = instantiate(config["network"], source, trust_code)
    if teacher is not None:  # a shared-weight student: adapters on the base model, which loads from its path
        net.attach(teacher)
    load_weights(net)
    grids = config.get("schedules") or {}
    schedules = load_schedules(grids) if grids.get("grids") else {}
    base = teacher.export_config() if teacher is not None and hasattr(teacher, "export_config") else config.get("base")
    return FlowMap(net, config["num_classes"], config["condition_on_guidance"], config["guidance"],
                   config["sample_gamma"], schedules, config.get("data"), config["network"], base).to(device)


if __name__ == "__main__":  # the former command form; the command lives in flowmap_lit.commands
    import sys

    from flowmap_lit._moved import run_moved_command

    run_moved_command("flowmap_lit.export", "export", sys.argv[1:])
