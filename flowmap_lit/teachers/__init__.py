"""Frozen teachers and guides behind one interface, ``velocity(x, t, class_labels) -> v``.

- ``base``: the interface (``Teacher``), ``ConvertedTeacher`` (eps, x0 or EDM denoisers converted
  exactly to our velocity) and ``guided_velocity`` (autoguidance and CFG);
- ``network``: ``NetworkTeacher``, a velocity network from this package's own checkpoints;
- ``mixture``: the exact teachers ``GMMTeacher`` and ``GaussianTeacher`` (mixtures fitted to a dataset);
- ``analytic``: closed-form Gaussian and Gaussian-mixture velocities and flow maps (the exact
  teachers and the tests' ground truth);
- ``edm2``: EDM2 pickles or state dicts; ``diffusers_models``: diffusers models with their
  schedulers; both converted to this package's time and space conventions;
- ``text2image``: the SD3-family text-to-image teacher and the LoRA flow-map student that shares a
  text-to-image teacher's weights; ``flux``: the FLUX.1 teacher for that student.

Every class is importable from here (``flowmap_lit.teachers.GMMTeacher``), which is the path the
configs use. Optional dependencies (diffusers, peft, safetensors) are imported on first use.
"""

from .analytic import GaussianData, GaussianMixture
from .base import ConvertedTeacher, Teacher, guided_velocity, null_condition
from .diffusers_models import DiffusersTeacher, DiscreteVPConvention, FlowMatchConvention, SchedulerTeacher
from .edm2 import EDM2Teacher
from .flux import FluxTeacher
from .mixture import GaussianTeacher, GMMTeacher, MixtureTeacher
from .network import NetworkTeacher, network_from_config
from .text2image import LoRAFlowMap, SD3Teacher, TransformerTeacher

__all__ = [
    "ConvertedTeacher", "DiffusersTeacher", "DiscreteVPConvention", "EDM2Teacher", "FlowMatchConvention", "FluxTeacher",
    "GaussianData", "GaussianMixture", "GaussianTeacher", "GMMTeacher", "LoRAFlowMap", "MixtureTeacher",
    "NetworkTeacher", "SchedulerTeacher", "SD3Teacher", "Teacher", "TransformerTeacher", "guided_velocity",
    "network_from_config", "null_condition",
]
