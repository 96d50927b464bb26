"""flowmap_lit: flow map distillation (Align Your Flow) for PyTorch Lightning."""

from flowmap_lit import _moved

__version__ = "0.1.0"

_moved.install()  # old module paths (stored checkpoints, configs) keep resolving

_LAZY = {  # imported on first use: ``import flowmap_lit`` stays light, and diffusers optional
    "load_flowmap": "flowmap_lit.export",
    "FlowMap": "flowmap_lit.flowmap",
    "FlowMapPipeline": "flowmap_lit.diffusers_pipeline",  # diffusers resolves pipeline components by top-level name
    "FlowMapModel": "flowmap_lit.diffusers_pipeline",
    "FlowMapGridScheduler": "flowmap_lit.diffusers_pipeline",
    "FlowMapTextPipeline": "flowmap_lit.diffusers_pipeline",
    "FlowMapAdapterModel": "flowmap_lit.diffusers_pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flowmap_lit' has no attribute {name!r}")
