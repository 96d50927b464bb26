"""flowmap_lit: flow map distillation (Align Your Flow) for PyTorch Lightning."""

__version__ = "0.1.0"
