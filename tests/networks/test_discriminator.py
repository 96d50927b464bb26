"""The discriminator of the adversarial finetune (flowmap_lit.networks.Discriminator): shapes, class
conditioning, errors, and a frozen VAE decoder in front of it (DecodeLatents)."""

import json

import pytest
import torch
from torch.nn import functional as F

from flowmap_lit.networks import Discriminator
from flowmap_lit.objectives import RpGAN
from tests.helpers import tiny_vae


def test_discriminator_shapes_conditioning_and_errors():
    d = Discriminator(img_channels=4, img_resolution=16, num_classes=10)
    assert [b.conv1.out_channels for b in d.blocks] == [128, 256]
    x = torch.randn(6, 4, 16, 16)  # 6 is not a multiple of the minibatch-std group (4): group 2
    out = d(x, torch.arange(6))
    assert out.shape == (6,)
    assert not torch.allclose(out, d(x, torch.zeros(6, dtype=torch.long)))  # the class matters
    d(x)  # no labels: the null class
    with pytest.raises(ValueError, match="img_channels"):
        d(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="power of two"):
        Discriminator(img_resolution=12)
    with pytest.raises(ValueError, match="channels needs 3 entries"):
        Discriminator(img_resolution=16, channels=[8, 8])


def test_discriminator_on_decoded_images(tmp_path):
    """DecodeLatents: un-normalize with the dataset statistics, decode with a local VAE, and let the
    generator's gradient flow back through the frozen decoder to the latents."""
    pytest.importorskip("diffusers")
    from flowmap_lit.checkpoints.vae import load_vae
    from flowmap_lit.networks import DecodeLatents

    tiny_vae(16).save_pretrained(tmp_path / "vae")
    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 1.0, 0.5, 1.5]
    (tmp_path / "stats.json").write_text(json.dumps({"mean": mean, "std": std}))
    decode = DecodeLatents(str(tmp_path / "vae"), stats_root=str(tmp_path), downsample=2)
    d = Discriminator(img_channels=3, img_resolution=8, channels=[8, 8], input_transform=decode)
    assert not any(k.startswith("input_transform.vae") for k in d.state_dict())  # the VAE is not checkpointed
    assert all(p.requires_grad for p in d.parameters())  # only D's own weights are parameters

    x = torch.randn(2, 4, 8, 8, requires_grad=True)  # normalized latents of 16 x 16 images
    ref_vae = load_vae(str(tmp_path / "vae"))
    z = x.detach() * torch.tensor(std).reshape(1, 4, 1, 1) + torch.tensor(mean).reshape(1, 4, 1, 1)
    expected = F.avg_pool2d(ref_vae.decode(z).sample, 2)
    torch.testing.assert_close(decode(x), expected)
    RpGAN().generator_loss(d, torch.randn(2, 4, 8, 8), x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="never downloads"):
        DecodeLatents(str(tmp_path / "missing"))
