"""``python -m flowmap_lit consolidate``: one checkpoint file from a sharded (FSDP2) checkpoint directory,
and errors that name the problem and the fix."""

import shutil

import pytest
import torch

from flowmap_lit.checkpoints import load_checkpoint
from flowmap_lit.commands.consolidate import main as consolidate_main
from tests.helpers import assert_same
from tests.helpers.cli import cli


def test_consolidate_command_writes_one_file_and_its_errors_name_the_fix(two_process, tmp_path, capsys):
    out = tmp_path / "full/last.ckpt"
    assert cli("consolidate", two_process["distill"], out) == out
    printed = capsys.readouterr().out
    assert "step 2" in printed and "EMA weights: yes" in printed
    assert_same(torch.load(out, map_location="cpu", weights_only=True), load_checkpoint(two_process["distill"]))

    def error(*argv) -> str:
        with pytest.raises(SystemExit) as exc:
            consolidate_main([str(a) for a in argv])
        return str(exc.value)

    assert "exists" in error(two_process["distill"], out) and "--overwrite" in error(two_process["distill"], out)
    assert consolidate_main([str(two_process["teacher"]), str(out), "--overwrite"]) == out
    assert "net.out_conv.weight" in torch.load(out, weights_only=True)["state_dict"]
    assert not list(out.parent.glob("*.partial"))

    message = error(tmp_path / "nowhere", tmp_path / "x.ckpt")
    assert "does not exist" in message and ".metadata" in message and "meta.pt" in message
    message = error(two_process["tmp"] / "distill", tmp_path / "x.ckpt")  # the directory of checkpoints
    assert "not a sharded checkpoint directory" in message and ".distcp" in message
    assert str(two_process["distill"]) in message  # points at the checkpoint inside
    assert "already one checkpoint file" in error(two_process["single"], tmp_path / "x.ckpt")
    partial = tmp_path / "partial.ckpt"
    shutil.copytree(two_process["distill"], partial)
    (partial / "meta.pt").unlink()
    assert "incomplete" in error(partial, tmp_path / "x.ckpt")
    damaged = tmp_path / "damaged.ckpt"
    shutil.copytree(two_process["distill"], damaged)
    shard = damaged / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert "damaged" in error(damaged, tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()
