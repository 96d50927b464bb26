"""Evaluation at scale (flowmap_lit.metrics): seeded noise independent of the process count, latent decoding, DINOv2
features from a local directory, and 2-process distances equal to 1-process ones."""


import pytest
import torch

from flowmap_lit.metrics import FID, build_feature_extractor, dataset_reference_stats, reference_stats
from flowmap_lit.metrics.decode import LatentDecoder
from flowmap_lit.metrics.features import DecodedFeatures, DinoV2Features
from flowmap_lit.metrics.few_step import rank_share, seeded_noise
from tests.helpers import tiny_dinov2, tiny_vae_dir
from tests.helpers.latents import latent_dataset


@pytest.mark.parametrize("blocked", [False, True])
def test_seeded_noise_does_not_depend_on_the_process_count(blocked, monkeypatch):
    import flowmap_lit.metrics.few_step as few_step

    n, shape = 100, (1, 3, 3)
    if blocked:  # several seeded blocks, shares straddling them
        monkeypatch.setattr(few_step, "BLOCK_ELEMENTS", 9 * 7)
    else:  # one block: exactly the single generator draw of an unsharded evaluation
        gen = torch.Generator().manual_seed(5)
        noise = torch.randn((n, *shape), generator=gen)
        assert torch.equal(seeded_noise(range(n), n, shape, 5, 10)[0], noise)
    ref = seeded_noise(range(n), n, shape, 5, 10)
    for world in (2, 3, 7):
        shares = [rank_share(n, r, world) for r in range(world)]
        assert sum(len(s) for s in shares) == n and shares[0].start == 0 and shares[-1].stop == n
        parts = [seeded_noise(s, n, shape, 5, 10) for s in shares]
        assert torch.equal(torch.cat([p[0] for p in parts]), ref[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), ref[1])
    assert not torch.equal(seeded_noise(range(n), n, shape, 6, 10)[0], ref[0])
    balanced = seeded_noise(range(10, 20), n, shape, 5, 4, labels="balanced")[1]
    assert balanced.tolist() == [i % 4 for i in range(10, 20)]


def test_dinov2_features_from_a_local_directory(tmp_path):
    from transformers import Dinov2Model

    path = tiny_dinov2(tmp_path / "dinov2")
    ext = build_feature_extractor("dinov2", path)
    assert isinstance(ext, DinoV2Features) and ext.num_features == 32 and not ext.training
    images = torch.rand(3, 3, 20, 20) * 2 - 1
    feats = ext(images)
    assert feats.shape == (3, 32) and feats.dtype == torch.float64
    # EDM2's preprocessing by hand: uint8 pixels, [0, 1], bicubic antialiased 224, ImageNet mean/std, CLS token
    x = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).float() / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x - mean) / std
    ref = Dinov2Model.from_pretrained(path).eval()(pixel_values=x).pooler_output
    torch.testing.assert_close(feats, ref.double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(ext(images[:, :1]), ext(images[:, :1].expand(-1, 3, -1, -1)))  # gray -> RGB
    with pytest.raises(FileNotFoundError, match="huggingface-cli download facebook/dinov2-large"):
        build_feature_extractor("dinov2", tmp_path / "missing")


def test_latent_decoder_undoes_the_stored_scaling(tmp_path):
    from flowmap_lit.checkpoints.vae import load_vae

    path = tiny_vae_dir(tmp_path / "vae")
    dec = LatentDecoder(str(path), scaling_factor=1.5, shift_factor=0.1, batch_size=3)
    z = torch.randn(5, 4, 4, 4)
    expected = load_vae(str(path)).decode(z / 1.5 + 0.1).sample.clamp(-1, 1)
    torch.testing.assert_close(dec(z), expected)
    assert dec(z).shape == (5, 3, 8, 8) and not list(dec.state_dict())  # weights stay out of checkpoints
    with pytest.raises(ValueError, match="latents \\(N, 4, h, w\\)"):
        dec(torch.randn(2, 3, 4, 4))
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        LatentDecoder(str(tmp_path / "none"))
    other = LatentDecoder(str(path), scaling_factor=2.0)
    dino = build_feature_extractor("dinov2", tiny_dinov2(tmp_path / "dinov2"))
    assert DecodedFeatures(dino, dec).extractor_id != DecodedFeatures(dino, other).extractor_id


def test_reference_of_decoded_latents_and_fid_of_the_set_against_itself(tmp_path):
    data = tmp_path / "data"
    latents = latent_dataset(data)
    decoder = LatentDecoder(str(tiny_vae_dir(tmp_path / "vae")))
    dino = build_feature_extractor("dinov2", tiny_dinov2(tmp_path / "dinov2"))
    net = DecodedFeatures(dino, decoder)
    stats = dataset_reference_stats(data, "train", net, batch_size=32)  # streamed from 3 shards, decoded
    assert stats["num_samples"] == len(latents)
    direct = reference_stats(dino, [decoder(torch.from_numpy(latents))])
    torch.testing.assert_close(stats["mean"], direct["mean"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(stats["cov"], direct["cov"], rtol=1e-5, atol=1e-8)
    cached = sorted(p.name for p in data.glob("fid_ref_*.pt"))
    assert cached == ["fid_ref_dinov2_decoded_train.pt"]
    first = dataset_reference_stats(data, "train", net, num_samples=50)
    assert first["num_samples"] == 50 and len(list(data.glob("fid_ref_*.pt"))) == 2
    fid = FID(dino)
    fid.set_reference(stats)
    fid.update_fake(decoder(torch.from_numpy(latents)))
    assert abs(fid.compute()) < 1e-3  # the set against its own statistics


def test_two_process_distances_equal_one_process(tmp_path):
    """Each process decodes and embeds its own share; the float64 sums are all-reduced: 2 processes
    give the 1-process distance (to 1e-6), with no image leaving its process."""
    from tests.helpers.fid_two_process import NUM, RESOLUTION, SHAPE, distances

    tiny_vae_dir(tmp_path / "vae")
    dino = DinoV2Features(tiny_dinov2(tmp_path / "dinov2"), resolution=RESOLUTION)
    decoder = LatentDecoder(str(tmp_path / "vae"))
    real = torch.randn(NUM, *SHAPE, generator=torch.Generator().manual_seed(9))
    torch.save(reference_stats(dino, [decoder(real)]), tmp_path / "reference.pt")
    for world in (1, 2):  # this process (one thread, as the forked ones), then 2 forked gloo processes
        distances(world, str(tmp_path), str(tmp_path / f"rows{world}.pt"))
    results = {world: torch.load(tmp_path / f"rows{world}.pt") for world in (1, 2)}
    for k, value in results[1].items():
        assert value > 0 and abs(results[2][k] - value) <= 1e-6 * abs(value), (k, value, results[2][k])
    assert results[1][1] != results[1][2]
