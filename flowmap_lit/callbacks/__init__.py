"""Callbacks: weight EMA, sample grids (evaluation callbacks follow the same pattern)."""

from flowmap_lit.callbacks.ema import EMA, ema_state_from_checkpoint
from flowmap_lit.callbacks.sample_grid import SampleGrid, make_grid, save_png, to_images

__all__ = ["EMA", "SampleGrid", "ema_state_from_checkpoint", "make_grid", "save_png", "to_images"]
