"""``python -m flowmap_lit evaluate``: one row per step count (NFE, FID, flow-map error, speed), the same
numbers from 2 processes (torchrun) as from one, and srun's variables mapped to torch.distributed's."""

import json
import os

from tests.helpers.cli import cli, free_port, run_module


def test_evaluate_rows_and_the_same_numbers_from_two_processes(quickstart, tmp_path, capsys):
    rows = cli("evaluate", "--ckpt", quickstart.ckpt, "--steps", "1", "2", "--num", "100", "--reference-steps", "8",
               "--json", tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text()) == rows
    assert [r["nfe"] for r in rows] == [1, 2]
    assert all(r["fid"] > 0 and 0 < r["flowmap_rel_error"] and r["samples_per_s"] > 0 for r in rows)
    assert "flowmap_rel_error" in capsys.readouterr().out

    # The same evaluation by 2 processes (torchrun, gloo): each its own share, sums all-reduced.
    proc = run_module(["--nproc_per_node", "2", "--master_port", free_port(), "-m", "flowmap_lit", "evaluate",
                       "--run-dir", quickstart.ckpt.parent, "--out-dir", tmp_path / "eval2", "--steps", "1", "2",
                       "--num-samples", "100", "--reference-steps", "8"], cwd=tmp_path, timeout=300,
                      module="torch.distributed.run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "eval2/last.json").read_text())
    assert two["processes"] == 2 and (tmp_path / "eval2/distance_versus_steps.png").is_file()
    for one_row, two_row in zip(rows, two["rows"]):
        for key in ("fid", "flowmap_rel_error"):
            assert abs(two_row[key] - one_row[key]) <= 1e-6 * abs(one_row[key]), (key, one_row, two_row)


def test_srun_tasks_get_the_torch_distributed_variables(monkeypatch):
    """One srun task per GPU: evaluate maps SLURM's variables to torch.distributed's."""
    from flowmap_lit.commands.evaluate import launcher_env

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # (launcher_env writes them: the isolation fixture restores them)
    assert not launcher_env()
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "eval")
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/srun" if name == "srun" else None)
    assert launcher_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("9", "16", "1")
    assert os.environ["MASTER_ADDR"] == "gpu07" and int(os.environ["MASTER_PORT"]) > 1024
