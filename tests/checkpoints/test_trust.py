"""Files name classes, never code: crafted exports and checkpoints run nothing and fail clearly."""

import json
from pathlib import Path

import pytest
import torch

from flowmap_lit.checkpoints.trust import UntrustedCodeError, check_trusted, is_trusted, named_paths
from tests.helpers import ROOT

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
FIXTURES = ROOT / "tests/fixtures/v0"


def crafted(marker: Path) -> dict:
    return {"class_path": "subprocess.run", "init_args": {"args": ["touch", str(marker)]}}


def test_what_files_may_name():
    assert is_trusted("flowmap_lit.networks.MLP") and is_trusted("torch.optim.Adam")
    assert is_trusted("lightning.pytorch.cli.instantiate_module")
    assert not is_trusted("subprocess.run") and not is_trusted("os.system")
    assert not is_trusted("flowmap_lit.cli.main")  # a function of the package (a command) is code, not a class
    assert not is_trusted("flowmap_lit_evil.Net")  # a prefix is not a package
    tree = {"_class_path": "a.B", "net": {"class_path": "c.D", "init_args": {"x": [{"class_path": "e.F"}]}}}
    assert named_paths(tree) == ["a.B", "c.D", "e.F"]
    with pytest.raises(UntrustedCodeError, match="'a.B' \\(and 2 more\\).*--trust-code"):
        check_trusted(tree, "file.ckpt")
    check_trusted(tree, "file.ckpt", trust_code=True)


def test_a_crafted_export_runs_nothing(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    from flowmap_lit.checkpoints import load_module
    from flowmap_lit.export import export_flowmap, load_flowmap

    monkeypatch.chdir(ROOT)
    out = export_flowmap(load_module(str(FIXTURES / "distill.ckpt")), tmp_path / "exported")
    assert load_flowmap(out) is not None  # the untouched export loads
    config = json.loads((out / "flowmap.json").read_text())
    marker = tmp_path / "ran"
    config["network"] = crafted(marker)
    (out / "flowmap.json").write_text(json.dumps(config))
    with pytest.raises(UntrustedCodeError, match="flowmap.json names 'subprocess.run'.*trust_code=True"):
        load_flowmap(out)
    assert not marker.exists()


def test_a_crafted_checkpoint_runs_nothing(tmp_path, monkeypatch, capsys):
    from flowmap_lit.checkpoints import load_module
    from flowmap_lit.cli import main

    monkeypatch.chdir(ROOT)
    ckpt = torch.load(FIXTURES / "distill.ckpt", weights_only=True)
    marker = tmp_path / "ran"
    ckpt["hyper_parameters"]["time_sampler"] = crafted(marker)
    path = tmp_path / "crafted.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(UntrustedCodeError, match="crafted.ckpt names 'subprocess.run'"):
        load_module(str(path))
    for command in (["sample", "--ckpt", str(path), "--out", str(tmp_path / "s")],
                    ["fit", "--config", "configs/digits/distill_ayf_emd.yaml", "--ckpt_path", str(path),
                     "--trainer.logger", "false", "--trainer.callbacks", "[]"]):
        with pytest.raises(SystemExit) as exit_:
            main(command)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "subprocess.run" in err and "Traceback" not in err, err
    assert not marker.exists()
    ckpt["hyper_parameters"]["_instantiator"] = "os.system"  # Lightning's instantiator is named by the file too
    torch.save(ckpt, path)
    with pytest.raises(UntrustedCodeError, match="os.system"):
        load_module(str(path))


def test_a_crafted_pipeline_config_runs_nothing(tmp_path):
    pytest.importorskip("diffusers")
    from flowmap_lit.diffusers_pipeline import FlowMapModel

    marker = tmp_path / "ran"
    with pytest.raises(UntrustedCodeError, match="config.json names 'subprocess.run'"):
        FlowMapModel(network=crafted(marker))
    assert not marker.exists()


def test_a_crafted_teacher_checkpoint_and_pipeline_index_run_nothing(tmp_path):
    from flowmap_lit.teachers import NetworkTeacher

    marker = tmp_path / "ran"
    ckpt = torch.load(FIXTURES / "teacher.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["net"] = crafted(marker)
    torch.save(ckpt, tmp_path / "teacher.ckpt")
    with pytest.raises(UntrustedCodeError, match="teacher.ckpt names 'subprocess.run'.*trust_code: true"):
        NetworkTeacher(str(tmp_path / "teacher.ckpt"))
    pytest.importorskip("diffusers")
    from flowmap_lit.diffusers_pipeline import FlowMapPipeline

    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe/model_index.json").write_text(json.dumps(
        {"_class_name": "FlowMapPipeline", "flowmap": ["antigravity", "Anything"],
         "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(UntrustedCodeError, match="flowmap: antigravity.Anything"):
        FlowMapPipeline.from_pretrained(tmp_path / "pipe")
    assert not marker.exists()
