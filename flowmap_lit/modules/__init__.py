"""The LightningModules, one file each, and what they share:

- ``pretrain``: ``FlowMatchingModule``, flow-matching pretraining of teachers and guides;
- ``distill``: ``FlowMapDistillModule``, flow-map distillation from a frozen teacher and guide with a
  selectable objective (docs/design.md section 7);
- ``finetune``: ``AdversarialFinetuneModule``, distillation plus a relativistic GAN loss;
- ``corrector``: ``DistributionMatchingModule``, distillation plus a distribution-matching corrector;
- ``two_player``: what those two share (a second network with its own optimizer);
- ``common``: plain hyperparameters, seeded noise, data info, shape checks, learning-rate schedules.

Configs name the classes from here (``flowmap_lit.modules.FlowMapDistillModule``).
"""

from .corrector import DistributionMatchingModule
from .distill import FlowMapDistillModule
from .finetune import AdversarialFinetuneModule
from .pretrain import FlowMatchingModule

__all__ = ["AdversarialFinetuneModule", "DistributionMatchingModule", "FlowMapDistillModule", "FlowMatchingModule"]
