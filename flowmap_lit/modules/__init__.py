"""The LightningModules, one file each, and what they share:

- ``pretrain``: ``FlowMatchingModule``, flow-matching pretraining of teachers and guides;
- ``distill``: ``FlowMapDistillModule``, flow-map distillation from a frozen teacher and guide with a
  selectable objective (docs/design.md section 7);
- ``finetune``: ``AdversarialFinetuneModule``, distillation plus a relativistic GAN loss;
- ``common``: plain hyperparameters, seeded noise, data info, shape checks, learning-rate schedules.

Configs name the classes from here (``flowmap_lit.modules.FlowMapDistillModule``).
"""

from .distill import FlowMapDistillModule
from .finetune import AdversarialFinetuneModule
from .pretrain import FlowMatchingModule

__all__ = ["AdversarialFinetuneModule", "FlowMapDistillModule", "FlowMatchingModule"]
