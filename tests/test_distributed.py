"""Distributed training is the single-process computation: one AYF-EMD step under DDP and FSDP2
(2 CPU processes, gloo) gives the parameter update and EMA of one process on the global batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from distributed_step import BACKENDS, GAN, one_step  # noqa: E402

SCRIPT = Path(__file__).parent / "distributed_step.py"


def relative_error(a: dict, b: dict) -> float:
    num = sum((a[k] - b[k]).double().square().sum() for k in b)
    den = sum(b[k].double().square().sum() for k in b)
    return float((num / den).sqrt())


@pytest.fixture(scope="module")
def single():
    return {backend: one_step("single", backend) for backend in BACKENDS + [GAN]}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_step_equals_the_single_process_step(strategy, single, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), strategy, str(tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for backend in BACKENDS + [GAN]:
        got, ref = torch.load(tmp_path / f"{strategy}_{backend}.pt"), single[backend]
        assert got["world_size"] == 2 and got["sharded"] == (strategy == "fsdp")
        update = {k: got["after"][k] - got["before"][k] for k in ref["after"]}
        ref_update = {k: ref["after"][k] - ref["before"][k] for k in ref["after"]}
        assert relative_error(got["before"], ref["before"]) == 0.0
        assert sum(v.square().sum() for v in ref_update.values()) > 0  # the step moved the weights
        assert relative_error(update, ref_update) < 1e-5, (strategy, backend)
        assert relative_error(got["ema"], ref["ema"]) < 1e-5, (strategy, backend)
        if backend == GAN:  # the discriminator's step too (replicated, its gradients averaged over the ranks)
            d_update = {k: got["disc_after"][k] - got["disc_before"][k] for k in got["disc_after"]}
            d_ref = {k: ref["disc_after"][k] - ref["disc_before"][k] for k in ref["disc_after"]}
            assert sum(v.square().sum() for v in d_ref.values()) > 0
            assert relative_error(d_update, d_ref) < 1e-5, (strategy, "discriminator")
