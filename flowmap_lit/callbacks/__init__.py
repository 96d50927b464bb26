"""Callbacks: weight EMA, run checkpoints, sample grids, flow-map error and FID across step counts, tuned
k-step grids."""

from flowmap_lit.callbacks.checkpoint import RunCheckpoint
from flowmap_lit.callbacks.diagnostics import FlowMapDiagnostics
from flowmap_lit.callbacks.ema import EMA
from flowmap_lit.callbacks.fid import FewStepFID
from flowmap_lit.callbacks.flowmap_error import FlowMapError
from flowmap_lit.callbacks.sample_grid import SampleGrid, make_grid, save_png, to_images
from flowmap_lit.callbacks.schedule import ScheduleSearch

__all__ = ["EMA", "FewStepFID", "FlowMapDiagnostics", "FlowMapError", "RunCheckpoint", "SampleGrid", "ScheduleSearch",
           "make_grid", "save_png", "to_images"]
