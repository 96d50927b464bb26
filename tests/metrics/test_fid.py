"""The digits classifier, feature extractors and FID (flowmap_lit.metrics), also under DDP."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from flowmap_lit.metrics import (
    FID,
    DigitsFeatures,
    InceptionFeatures,
    build_feature_extractor,
    dataset_reference_stats,
    frechet_distance,
    load_digits_classifier,
    load_or_compute_reference_stats,
    reference_stats,
)
from flowmap_lit.metrics.digits_classifier import accuracy
from flowmap_lit.metrics.features import FeatureExtractor


@pytest.fixture(scope="module")
def digits(digits_classifier):
    """A fresh digits dataset and a classifier trained on it for 10 epochs (tests/conftest.py)."""
    return digits_classifier


@pytest.fixture(scope="module")
def fid(digits):
    """FID with the train split as reference."""
    metric = FID(DigitsFeatures(digits["path"]))
    metric.set_reference(reference_stats(metric.extractor, [digits["train"][:700], digits["train"][700:]]))
    return metric


def fid_of(metric, images):
    metric.reset_fake()
    metric.update_fake(images)
    return metric.compute()


def test_classifier_trains_saves_and_reloads_with_same_logits(digits):
    result = digits["result"]
    assert result["accuracy"] > 0.9 and result["seconds"] < 60
    payload = torch.load(digits["path"], weights_only=True)
    assert payload["format"] == 1 and payload["kind"] == "digits_classifier"
    assert payload["val_accuracy"] == pytest.approx(result["accuracy"])
    loaded = load_digits_classifier(digits["path"])
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = digits["val"]
    with torch.no_grad():
        assert torch.equal(loaded(x), result["model"](x))
    assert accuracy(loaded, x, digits["val_labels"]) == pytest.approx(result["accuracy"])
    assert loaded.features(x).shape == (len(x), 128)


def test_missing_classifier_error_names_path_and_command(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="python -m flowmap_lit classifier") as err:
        load_digits_classifier(missing)
    assert str(missing) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_feature_extractor("digits", missing)
    with pytest.raises(ValueError, match="unknown feature extractor"):
        build_feature_extractor("clip", None)


def test_fid_is_zero_on_reference_data_and_large_on_corrupted_data(digits, fid):
    train, val = digits["train"], digits["val"]
    same = fid_of(fid, train)                            # identical feature sums: 0 up to float64 rounding
    baseline = fid_of(fid, val)                          # held-out data: finite-sample bias only (300 images)
    kernel = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]).div(16)[None, None]
    noise = torch.randn(val.shape, generator=torch.Generator().manual_seed(0))
    corrupted = {
        "shift": fid_of(fid, torch.roll(val, 1, -1)),
        "noise": fid_of(fid, (val + 0.5 * noise).clamp(-1, 1)),
        "blur": fid_of(fid, F.conv2d(F.pad(val, [1] * 4, mode="replicate"), kernel)),
    }
    assert abs(same) < 1e-6 and abs(same) < 1e-3 * min(corrupted.values())
    assert 0 < baseline < min(corrupted.values()) / 3, (baseline, corrupted)


def test_torchmetrics_value_matches_frechet_distance(digits, fid):
    feats = fid.extractor(digits["val"])
    assert feats.dtype == torch.float64 and feats.shape == (300, 128)
    ref = reference_stats(fid.extractor, [digits["train"]])
    expected = frechet_distance(ref["mean"], ref["cov"], feats.mean(0), torch.cov(feats.T))
    assert fid_of(fid, digits["val"]) == pytest.approx(expected, rel=1e-8)
    n = ref["num_samples"]                               # raw sums give the same reference
    sums = {"sum": n * ref["mean"], "cov_sum": (n - 1) * ref["cov"] + n * torch.outer(ref["mean"], ref["mean"]),
            "num_samples": n}
    other = FID(fid.extractor)
    other.set_reference(sums)
    assert fid_of(other, digits["val"]) == pytest.approx(expected, rel=1e-8)


def test_reset_fake_keeps_reference_and_set_reference_refreshes(digits, fid):
    real_sum = fid.metric.real_features_sum.clone()
    first = fid_of(fid, digits["val"][:150])
    fid.reset_fake()
    assert int(fid.metric.fake_features_num_samples) == 0
    assert torch.equal(fid.metric.real_features_sum, real_sum) and int(fid.metric.real_features_num_samples) == 1497
    assert fid_of(fid, digits["val"][:150]) == pytest.approx(first, rel=1e-12)
    fresh = FID(fid.extractor)
    with pytest.raises(RuntimeError, match="set_reference"):
        fresh.update_fake(digits["val"])
        fresh.compute()
    fresh.set_reference(reference_stats(fid.extractor, [digits["val"]]))
    assert abs(fresh.compute()) < 1e-6                   # the cached result of an old reference is not reused


def test_extractor_is_frozen_and_not_in_a_module_state_dict(digits, fid):
    holder = torch.nn.Module()
    holder.fid = fid                                     # a plain object: not a submodule
    holder.layer = torch.nn.Linear(2, 2)
    holder.train()
    fid.metric.train()
    assert set(holder.state_dict()) == {"layer.weight", "layer.bias"}
    assert not fid.extractor.training and not any(p.requires_grad for p in fid.extractor.parameters())


def test_reference_stats_cache_reused_and_keyed(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        x = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(len(calls)))
        return {"mean": x.mean(0), "cov": torch.cov(x.T), "num_samples": 50}

    path = tmp_path / "fid_ref_test_train.pt"
    first = load_or_compute_reference_stats(path, "digits-abc", compute)
    second = load_or_compute_reference_stats(path, "digits-abc", compute)
    assert len(calls) == 1 and torch.equal(first["cov"], second["cov"])
    saved = torch.load(path, weights_only=True)
    assert saved["key"] == {"extractor_id": "digits-abc"} and saved["mean"].dtype == torch.float64
    third = load_or_compute_reference_stats(path, "digits-xyz", compute)
    assert len(calls) == 2 and not torch.equal(first["mean"], third["mean"])
    load_or_compute_reference_stats(path, "digits-xyz", compute, extra_key={"split": "val"})
    assert len(calls) == 3
    path.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable"):
        load_or_compute_reference_stats(path, "digits-xyz", compute)
    assert len(calls) == 4 and not list(tmp_path.glob("*.tmp*"))


def test_dataset_reference_stats_cached_next_to_shards(digits, fid):
    stats = dataset_reference_stats(digits["root"], "val", fid.extractor)
    cache = digits["root"] / "fid_ref_digits_val.pt"
    assert cache.is_file() and stats["num_samples"] == 300
    key = torch.load(cache, weights_only=True)["key"]
    assert key["split"] == "val" and key["extractor_id"] == fid.extractor.extractor_id
    mtime = cache.stat().st_mtime_ns
    again = dataset_reference_stats(digits["root"], "val", fid.extractor)
    assert cache.stat().st_mtime_ns == mtime and torch.equal(again["cov"], stats["cov"])


def test_inception_features_fail_clearly_and_never_download(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        InceptionFeatures(None)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_feature_extractor("inception", tmp_path / "missing.pth")
    weights = tmp_path / "weights.pth"
    torch.save({}, weights)
    monkeypatch.setattr("torchmetrics.utilities.imports._TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
        InceptionFeatures(weights, implementation="torch-fidelity")


def test_inception_features_with_local_random_weights(tmp_path, monkeypatch):
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    weights, empty = tmp_path / "inception.pth", tmp_path / "empty.pth"
    torch.save({}, empty)
    with monkeypatch.context() as m:                     # a randomly initialized network, saved as a weights file
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    torch.save(net.state_dict(), weights)
    extractor = InceptionFeatures(weights, implementation="torch-fidelity")
    feats = extractor(torch.rand(2, 1, 8, 8) * 2 - 1)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64 and not extractor.training
    InceptionFeatures(weights)  # the package's own network reads torch-fidelity's file (same names)


def test_builtin_inception_reads_a_weights_file_in_the_published_layout(tmp_path):
    """The package's FID Inception-v3 (no torchvision): a random network saved in the layout of
    pt_inception-2015-12-05-6726825d.pth (torchvision names, BatchNorm counters, a 1008-way head)
    loads through InceptionFeatures; a file of another network fails with a message naming the file."""
    from flowmap_lit.metrics.inception import FIDInceptionV3

    torch.manual_seed(0)
    net = FIDInceptionV3()
    state = dict(net.state_dict())
    state.update({"fc.weight": torch.randn(1008, 2048), "fc.bias": torch.zeros(1008)})
    weights = tmp_path / "pt_inception.pth"
    torch.save(state, weights)
    extractor = build_feature_extractor("inception", weights)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = extractor(images)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64 and not extractor.training
    x = torch.nn.functional.interpolate((images * 127.5 + 128).clamp(0, 255).to(torch.uint8).float() / 127.5 - 1,
                                        size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        h = net.eval().Conv2d_2b_3x3(net.Conv2d_2a_3x3(net.Conv2d_1a_3x3(x)))
        h = torch.nn.functional.max_pool2d(h, 3, stride=2)
        h = torch.nn.functional.max_pool2d(net.Conv2d_4a_3x3(net.Conv2d_3b_1x1(h)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            h = getattr(net, f"Mixed_{name}")(h)
            assert h.shape[1] == {"5b": 256, "5c": 288, "5d": 288, "6a": 768, "7a": 1280}.get(name, h.shape[1])
    torch.testing.assert_close(feats, h.mean((2, 3)).double())
    assert h.shape[1:] == (2048, 8, 8)  # 299 px -> 8 x 8 x 2048 before the pool
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth does not hold the FID Inception-v3 weights"):
        build_feature_extractor("inception", tmp_path / "other.pth")


class _Linear(FeatureExtractor):
    num_features = 6

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 6)
        self.freeze()

    def extract(self, x):
        return self.proj(x.flatten(1))


def _ddp_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 1, 4, 4, generator=g), torch.randn(40, 1, 4, 4, generator=g) + 0.3


def _single(fid, ref, fake):
    local = FID(fid.extractor, sync_on_compute=False)
    feats = local.extractor(ref)
    local.set_reference({"mean": feats.mean(0), "cov": torch.cov(feats.T), "num_samples": 64})
    local.update_fake(fake)
    return local.compute()


def _ddp_rank(rank, port, out, skews):
    """One of 2 gloo processes (forked from the test's): FID with the reference shifted by ``rank * skew``."""
    torch.set_num_threads(1)  # a forked process must not use its parent's OpenMP threads
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    for skew in skews:
        torch.manual_seed(0)
        fid = FID(_Linear())
        ref, fake = _ddp_data()
        ref_feats = fid.extractor(ref) + (rank * skew)
        fid.set_reference({"mean": ref_feats.mean(0), "cov": torch.cov(ref_feats.T), "num_samples": 64})
        fid.update_fake(fake[rank::2])
        try:
            value = fid.compute()
        except RuntimeError as err:
            value = str(err)
        results[skew] = {"value": value, "single": _single(fid, ref, fake)}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_fid(tmp_path_factory):
    """FID computed by 2 gloo processes: with one reference on both ranks (skew 0) and with references that
    differ across the ranks (skew 1); and the single-process FID of the same data."""
    out = tmp_path_factory.mktemp("ddp_fid") / "out.pt"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_rank, args=(port, str(out), [0.0, 1.0]), nprocs=2, start_method="fork")
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("skew", [0.0, 1.0])
def test_fid_under_ddp_syncs_fake_and_checks_reference(ddp_fid, skew):
    result = ddp_fid[skew]
    if skew == 0.0:                                       # fake features summed over ranks, reference kept once
        assert result["value"] == pytest.approx(result["single"], rel=1e-9)
    else:                                                 # different references on the ranks: a clear error
        assert "differ across ranks" in result["value"]
