"""Distillation objectives, one per file, all behind ``Objective`` (see base.py).

Choose one in a config by ``class_path``, e.g. ``flowmap_lit.objectives.AYFEMD``.
"""

from flowmap_lit.objectives.adversarial import RpGAN
from flowmap_lit.objectives.ayf_emd import AYFEMD
from flowmap_lit.objectives.ayf_lmd import AYFLMD
from flowmap_lit.objectives.base import Objective, ObjectiveOutput, TangentObjective
from flowmap_lit.objectives.discrete_emd import DiscreteEMD
from flowmap_lit.objectives.distribution_matching import DistributionMatching
from flowmap_lit.objectives.flow_matching import FlowMatching
from flowmap_lit.objectives.scd import SCD
from flowmap_lit.objectives.weighting import Weighting

__all__ = ["AYFEMD", "AYFLMD", "SCD", "DiscreteEMD", "DistributionMatching", "FlowMatching", "Objective",
           "ObjectiveOutput", "RpGAN", "TangentObjective", "Weighting"]
