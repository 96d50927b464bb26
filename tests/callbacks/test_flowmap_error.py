"""The FlowMapError callback (flowmap_lit.callbacks.FlowMapError): its rows are the direct computation, and
evaluating never shifts the training RNG stream. (Its velocity limit: tests/sampling/test_diagnostics.py.)"""

from types import SimpleNamespace

import pytest
import torch

from flowmap_lit.callbacks import FlowMapError
from flowmap_lit.modules import FlowMapDistillModule
from flowmap_lit.objectives import AYFEMD
from flowmap_lit.teachers import MixtureTeacher
from tests.helpers import MLPVelocity, small_mixture


def test_flow_map_error_callback_matches_direct_computation_and_leaves_the_rng_alone():
    torch.manual_seed(0)
    teacher = MixtureTeacher(small_mixture())
    module = FlowMapDistillModule(teacher, AYFEMD(), student=MLPVelocity((1, 2, 2)), init_student_from_teacher=False)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(shape=(1, 2, 2)), callbacks=[])
    cb = FlowMapError(step_counts=[1, 2], num_samples=64, reference_steps=16)
    state = torch.get_rng_state()
    rows = cb.evaluate(trainer, module)
    assert torch.equal(state, torch.get_rng_state())  # evaluation never shifts the training RNG stream
    noise, labels, ref = cb.reference(trainer, module)
    x = module.sample(noise, labels, num_steps=2)
    assert rows[1]["flowmap_mse"] == pytest.approx((x - ref).square().mean().item())
    assert ref.shape == (64, 1, 2, 2) and labels is None
