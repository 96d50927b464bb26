"""Frozen teachers and guides behind one interface, ``velocity(x, t, class_labels) -> v``.

- ``base``: the interface, ``NetworkTeacher`` (our own checkpoints), the exact mixture teachers
  (``GMMTeacher``, ``GaussianTeacher``) and ``guided_velocity`` (autoguidance and CFG);
- ``analytic``: closed-form Gaussian and Gaussian-mixture velocities and flow maps (the exact
  teachers and the tests' ground truth);
- ``external``: adapters for other codebases' models (EDM2 pickles or state dicts, diffusers
  models with their schedulers), converted to this package's time and space conventions;
- ``text2image``: the SD3-family text-to-image teacher and its LoRA flow-map student.

Every class is importable from here (``flowmap_lit.teachers.GMMTeacher``), which is the path the
configs use. Optional dependencies (diffusers, peft, safetensors) are imported on first use.
"""

from .analytic import GaussianData, GaussianMixture
from .base import (
    ConvertedTeacher, GaussianTeacher, GMMTeacher, MixtureTeacher, NetworkTeacher, Teacher, guided_velocity,
    load_checkpoint, network_from_config, null_condition, read_split,
)
from .external import DiffusersTeacher, DiscreteVPConvention, EDM2Teacher, FlowMatchConvention, SchedulerTeacher
from .text2image import LoRAFlowMap, SD3Teacher

__all__ = [
    "ConvertedTeacher", "DiffusersTeacher", "DiscreteVPConvention", "EDM2Teacher", "FlowMatchConvention",
    "GaussianData", "GaussianMixture", "GaussianTeacher", "GMMTeacher", "LoRAFlowMap", "MixtureTeacher",
    "NetworkTeacher", "SchedulerTeacher", "SD3Teacher", "Teacher", "guided_velocity", "load_checkpoint",
    "network_from_config", "null_condition", "read_split",
]
