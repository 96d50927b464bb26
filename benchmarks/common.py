"""Shared pieces of the benchmark scripts."""

from __future__ import annotations

import torch


def quickstart_like_module(seed: int = 0):
    """A module shaped like the quickstart: a random 20-component mixture teacher and guide on
    1x8x8 data, autoguidance with lam in [1, 2], an MLP student (3 x 768). Speed does not depend
    on what the weights learned, so no training or dataset is needed."""
    from flowmap_lit.modules import FlowMapDistillModule
    from flowmap_lit.networks import MLP
    from flowmap_lit.objectives import AYFEMD
    from flowmap_lit.teachers import MixtureTeacher
    from flowmap_lit.teachers.analytic import GaussianMixture

    torch.manual_seed(seed)
    k, d = 20, 64
    a = torch.randn(k, d, d, dtype=torch.float64) * 0.1
    gmm = GaussianMixture(torch.ones(k) / k, torch.randn(k, d), a @ a.transpose(1, 2) + 1e-3 * torch.eye(d),
                          (1, 8, 8), torch.arange(k) % 10)
    module = FlowMapDistillModule(MixtureTeacher(gmm), AYFEMD(), student=MLP(num_classes=10),
                                  guide=MixtureTeacher(gmm), guidance="autoguidance", guidance_min=1.0,
                                  guidance_max=2.0, condition_on_guidance=True, eval_guidance=1.5, num_classes=10,
                                  init_student_from_teacher=False)
    module.data_info = {"shape": [1, 8, 8]}
    return module
