"""Distributed training is the single-process computation: one AYF-EMD step (and one batch of the adversarial
finetune, its fakes from x_t or the student's own 1- and 2-step samples, and of the distribution-matching
corrector) under DDP and FSDP2 (2 CPU processes, gloo) gives the parameter update and EMA of one process on the
global batch."""

import pytest
import torch

from tests.helpers import relative_error
from tests.helpers.distributed_step import AUX, BACKENDS, one_step


@pytest.fixture(scope="module")
def single():
    return {backend: one_step("single", backend) for backend in BACKENDS + list(AUX)}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_step_equals_the_single_process_step(strategy, single, two_process):
    """The 2-process steps come from the ``two_process`` launch (DDP, then FSDP2, in one process group)."""
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in two_process["logs"]["steps"]
    for backend in BACKENDS + list(AUX):
        got, ref = torch.load(two_process["steps"] / f"{strategy}_{backend}.pt"), single[backend]
        assert got["world_size"] == 2 and got["sharded"] == (strategy == "fsdp")
        update = {k: got["after"][k] - got["before"][k] for k in ref["after"]}
        ref_update = {k: ref["after"][k] - ref["before"][k] for k in ref["after"]}
        assert relative_error(got["before"], ref["before"]) == 0.0
        assert sum(v.square().sum() for v in ref_update.values()) > 0  # the step moved the weights
        assert relative_error(update, ref_update) < 1e-5, (strategy, backend)
        assert relative_error(got["ema"], ref["ema"]) < 1e-5, (strategy, backend)
        if backend in AUX:  # the discriminator's or fake velocity's step too (replicated, gradients averaged)
            d_update = {k: got["aux_after"][k] - got["aux_before"][k] for k in got["aux_after"]}
            d_ref = {k: ref["aux_after"][k] - ref["aux_before"][k] for k in ref["aux_after"]}
            assert sum(v.square().sum() for v in d_ref.values()) > 0
            assert relative_error(d_update, d_ref) < 1e-5, (strategy, AUX[backend])
