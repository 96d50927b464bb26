"""Converted teachers (flowmap_lit.teachers.base.ConvertedTeacher): other parameterizations (epsilon, x0, EDM
denoiser) convert exactly to our velocity: each is checked on Gaussian data, whose eps, x0 and denoiser
predictions are known in closed form."""

import pytest
import torch
from torch import nn

from flowmap_lit.interpolant import expand_like
from flowmap_lit.modules import FlowMapDistillModule
from flowmap_lit.objectives import AYFEMD
from flowmap_lit.teachers import ConvertedTeacher
from flowmap_lit.teachers.analytic import GaussianData

DATA = GaussianData(torch.tensor([[[1.0, -0.5], [0.3, 2.0]]], dtype=torch.float64),
                    torch.tensor([[[0.5, 1.0], [0.2, 0.8]]], dtype=torch.float64))


class ExactPrediction(nn.Module):
    """The exact E[eps | x_t], E[x0 | x_t] (called with t) or EDM denoiser E[x0 | x0 + sigma n] (called with sigma)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x, t, class_labels=None):
        mu, c2 = DATA.mu.to(x.dtype), DATA.c.to(x.dtype) ** 2
        if self.kind == "edm":  # t is sigma here; x is x_sigma = x0 + sigma * n
            sigma2 = expand_like(t, x) ** 2
            return mu + c2 / (c2 + sigma2) * (x - mu)
        m_t, s_t = DATA.moments(t, x)
        tt = expand_like(t, x)
        if self.kind == "x0":  # Cov(x0, x_t) = (1 - t) c^2
            return mu + (1 - tt) * c2 / s_t**2 * (x - m_t)
        if self.kind == "eps":  # Cov(eps, x_t) = t
            return tt / s_t**2 * (x - m_t)
        return DATA.velocity(x, t)


@pytest.mark.parametrize("kind", ["velocity", "eps", "x0", "edm"])
def test_conversion_gives_the_exact_velocity(kind):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(256, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x = torch.randn(256, 1, 2, 2, generator=g, dtype=torch.float64) * 2
    v = ConvertedTeacher(ExactPrediction(kind), prediction=kind).velocity(x, t)
    exact = DATA.velocity(x, t)
    assert ((v - exact).abs().max() / exact.abs().max()).item() < 1e-12
    wrong = ConvertedTeacher(ExactPrediction(kind), prediction="x0" if kind != "x0" else "eps").velocity(x, t)
    assert ((wrong - exact).abs().max() / exact.abs().max()).item() > 1e-2  # the conversion matters


def test_only_velocity_networks_initialize_a_student_and_bad_predictions_fail():
    with pytest.raises(ValueError, match="prediction must be one of"):
        ConvertedTeacher(ExactPrediction("eps"), prediction="v")
    with pytest.raises(ValueError, match="no network weights"):
        FlowMapDistillModule(ConvertedTeacher(ExactPrediction("eps"), prediction="eps"), AYFEMD())
