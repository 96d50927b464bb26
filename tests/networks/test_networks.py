"""The networks (flowmap_lit.networks): shapes, zero-init s-branch, forward AD against finite differences,
dtypes, presets, activation checkpointing, the MLP's modulation and preconditioning. (Attention's tangent:
test_attention.py; the lean tangent rules: test_tangent_ops.py.)"""

import copy

import pytest
import torch

from flowmap_lit.networks import (
    ConditionEmbedding,
    DiT,
    EDM2UNet,
    FourierTimeEmbedding,
    build_network,
    forward_ad_safe_attention,
)
from flowmap_lit.networks.mp import MPConv, MPEmbedding
from tests.helpers import randomize_zero_params_

ARCHS = ["unet", "dit", "mlp"]
# torch.func.jvp registers its decompositions with torch.jit.script, which warns on this torch.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")


def make_net(arch, channels=1, resolution=8, **kw):
    torch.manual_seed(0)
    return build_network(arch, "tiny", img_channels=channels, img_resolution=resolution, **kw)


def inputs(channels=1, resolution=8, batch=3):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, channels, resolution, resolution, generator=gen)
    t = torch.rand(batch, generator=gen) * 0.8 + 0.2
    s = t * torch.rand(batch, generator=gen)
    labels = torch.tensor([0, 3, 10])[:batch]  # 10 is the null token of the 10-class tiny presets
    guidance = 1 + 2 * torch.rand(batch, generator=gen)
    return x, t, s, labels, guidance


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("channels,resolution", [(1, 8), (4, 16)])
def test_output_shape(arch, channels, resolution):
    net = randomize_zero_params_(make_net(arch, channels, resolution))
    x, t, s, labels, guidance = inputs(channels, resolution)
    outs = [
        net(x, t),
        net(x, t, s),
        net(x, t, class_labels=labels),
        net(x, t, s, labels, guidance),
        net(x, 0.5, 0.25, 3, 2.0),  # Python scalars broadcast
        net(x, torch.tensor(0.5), torch.tensor(0.1)),  # 0-dim tensors broadcast
    ]
    for y in outs:
        assert y.shape == x.shape and torch.isfinite(y).all()
    assert not torch.equal(outs[0], outs[1])  # s matters once the s-branch is nonzero


@pytest.mark.parametrize("arch", ARCHS)
def test_unconditional_mode(arch):
    net = randomize_zero_params_(make_net(arch, num_classes=0))
    assert net.emb.class_emb is None
    x, t, s, _, _ = inputs()
    assert net(x, t, s).shape == x.shape


def test_dit_learned_pos_embed():
    net = make_net("dit", learn_pos_embed=True)
    assert "pos_embed" in dict(net.named_parameters())
    x, t, *_ = inputs()
    assert net(x, t).shape == x.shape


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_init_s_embedding(arch):
    x, t, s, labels, guidance = inputs()
    # Fresh net (other zero-initialized parts randomized so the output is not trivially 0).
    net = randomize_zero_params_(make_net(arch), include_s_branch=False).eval()
    ref = net(x, t, class_labels=labels)
    assert ref.abs().max() > 0
    assert torch.equal(net(x, t, s, labels), ref)
    assert torch.equal(net(x, t, s, labels, guidance), ref)

    # A teacher whose s/guidance branches are random: s=None still means s=t exactly.
    teacher = randomize_zero_params_(make_net(arch)).eval()
    v = teacher(x, t, class_labels=labels)
    assert torch.equal(teacher(x, t, t, labels), v)
    assert not torch.equal(teacher(x, t, s, labels), v)
    assert not torch.equal(teacher(x, t, class_labels=labels, guidance=guidance), v)

    # Student from the teacher's weights: zero_init_s_embedding really zeros the branches.
    student = make_net(arch).eval()
    student.load_state_dict(teacher.state_dict())
    student.zero_init_s_embedding()
    assert torch.equal(student(x, t, s, labels, guidance), v)


@pytest.mark.parametrize("arch", ARCHS)
def test_jvp_matches_float64_finite_differences(arch):
    net = randomize_zero_params_(make_net(arch)).eval()
    x, t, s, labels, _ = inputs(batch=2)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    ones = torch.ones_like(t)

    def jvp(model, dtype):
        args = [a.to(dtype) for a in (x, t, v, ones)]
        with forward_ad_safe_attention():
            f = lambda x_, t_: model(x_, t_, s.to(dtype), labels)  # noqa: E731
            return torch.func.jvp(f, (args[0], args[1]), (args[2], args[3]))[1]

    net64 = copy.deepcopy(net).double()
    xd, td, vd, sd, h = x.double(), t.double(), v.double(), s.double(), 1e-6
    with torch.no_grad():
        fd = (net64(xd + h * vd, td + h, sd, labels) - net64(xd - h * vd, td - h, sd, labels)) / (2 * h)
    assert fd.abs().max() > 0
    assert rel_err(jvp(net64, torch.float64), fd) < 1e-5
    assert rel_err(jvp(net, torch.float32).double(), fd) < 1e-3


def test_time_embedding_float32_under_autocast():
    t = torch.rand(5)
    fourier = FourierTimeEmbedding(32)
    plain_emb = ConditionEmbedding(48, num_classes=10, fourier_channels=32)
    mp_emb = ConditionEmbedding(48, num_classes=10, fourier_channels=32, magnitude_preserving=True)
    expected = [m(t) for m in (fourier, plain_emb, mp_emb)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = [fourier(t.bfloat16()), plain_emb(t, 0.5 * t, torch.arange(5)), mp_emb(t)]
    for g in got:
        assert g.dtype == torch.float32
    assert torch.equal(got[2], expected[2])
    assert fourier.freqs.max().item() == pytest.approx(16.0) and fourier.freqs.min().item() == pytest.approx(0.5)
    for arch in ARCHS:  # whole networks run under bf16 autocast
        net = randomize_zero_params_(make_net(arch))
        x, t, s, labels, _ = inputs()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x, t, s, labels)
        assert y.shape == x.shape and torch.isfinite(y).all()
        y = net.to(torch.bfloat16)(x.bfloat16(), t, s, labels)  # bf16 weights ("bf16-true")
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_force_normalize_unet():
    net = randomize_zero_params_(make_net("unet")).train()
    with torch.no_grad():  # make the raw weights far from normalized
        for m in net.modules():
            if isinstance(m, (MPConv, MPEmbedding)):
                m.weight.mul_(torch.rand(m.weight.shape[0], *[1] * (m.weight.ndim - 1)) * 3 + 0.1)
    x, t, s, labels, _ = inputs()
    before = {k: p.clone() for k, p in net.state_dict().items()}
    net.eval()
    y0 = net(x, t, s, labels)
    for k, p in net.state_dict().items():  # forward never rewrites weights
        assert torch.equal(p, before[k])
    net.force_normalize_()
    torch.testing.assert_close(net(x, t, s, labels), y0, rtol=1e-5, atol=1e-5)
    for m in net.modules():
        if isinstance(m, (MPConv, MPEmbedding)):
            w = m.weight.flatten(1)
            rms = w.norm(dim=1) / w.shape[1] ** 0.5
            torch.testing.assert_close(rms, torch.ones_like(rms))
    DiT().force_normalize_()  # no-op on the DiT, present for a uniform callback


def count(arch, preset):
    with torch.device("meta"):
        net = build_network(arch, preset)
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    "arch,preset,published",
    [
        ("unet", "xs", 125e6),
        ("unet", "s", 280e6),
        ("unet", "m", 498e6),
        ("dit", "s", 33e6),
        ("dit", "b", 130e6),
        ("dit", "l", 458e6),
        ("dit", "xl", 675e6),
    ],
)
def test_preset_parameter_counts(arch, preset, published):
    assert abs(count(arch, preset) / published - 1) < 0.1


def test_tiny_presets_and_build_errors():
    assert count("unet", "tiny") < 1e6 and count("dit", "tiny") < 1e6
    assert isinstance(build_network("unet", "tiny"), EDM2UNet)
    assert isinstance(build_network("dit", "tiny"), DiT)
    with pytest.raises(ValueError, match="unknown arch"):
        build_network("resnet", "tiny")
    with pytest.raises(ValueError, match="unknown dit preset"):
        build_network("dit", "huge")


def test_class_path_instantiation():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--net", type=torch.nn.Module)
    cfg = parser.parse_object(
        {
            "net": {
                "class_path": "flowmap_lit.networks.EDM2UNet",
                "init_args": {"model_channels": 16, "channel_mult": [1, 2], "attn_resolutions": [4]},
            }
        }
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    net = instantiate(cfg).net
    assert isinstance(net, EDM2UNet) and net(torch.randn(2, 1, 8, 8), 0.5).shape == (2, 1, 8, 8)


def test_mp_sum_promotes_mixed_precision_inputs():
    """Under CUDA autocast a block's skip input can be fp32 and its conv output bf16 (lerp does not promote)."""
    from flowmap_lit.networks.mp import mp_sum

    a, b = torch.randn(4), torch.randn(4)
    out = mp_sum(a, b.bfloat16(), 0.3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, mp_sum(a, b.bfloat16().float(), 0.3))


def test_activation_checkpointing_is_bypassed_without_grad(monkeypatch):
    """Without grad (the JVP's tangent pass) checkpointed blocks are called directly: some torch
    versions' checkpoint has no forward-AD rule even under no_grad. With grad it checkpoints."""
    import torch.utils.checkpoint as ckpt

    from flowmap_lit.distributed import apply_activation_checkpointing
    from flowmap_lit.jvp import jvp

    net = build_network("unet", "tiny")
    ref = copy.deepcopy(net)
    apply_activation_checkpointing(net)
    calls = []
    original = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    labels = torch.tensor([1, 2])
    fn = lambda m: (lambda xx, tt: m(xx, tt, 0.5 * tt, class_labels=labels))  # noqa: E731
    u = torch.randn_like(x)
    tangent = jvp(fn(net), (x, t), (u, torch.ones_like(t)))
    assert not calls
    torch.testing.assert_close(tangent, jvp(fn(ref), (x, t), (u, torch.ones_like(t))), rtol=0, atol=0)
    net(x, t, 0.5 * t, class_labels=labels).sum().backward()
    assert calls


def test_mlp_scale_shift_modulation_starts_as_the_additive_network_and_trains():
    from flowmap_lit.networks import MLP

    torch.manual_seed(0)
    shift = MLP(num_classes=10, width=64, depth=2)
    torch.manual_seed(0)
    film = MLP(num_classes=10, width=64, depth=2, modulation="scale_shift")
    torch.nn.init.normal_(shift.out.weight, std=0.1)
    film.out.weight.data.copy_(shift.out.weight)
    x, t, labels = torch.randn(5, 1, 8, 8), torch.rand(5), torch.randint(10, (5,))
    s = t * torch.rand(5)
    torch.testing.assert_close(film(x, t, s, labels), shift(x, t, s, labels), rtol=0, atol=0)
    film(x, t, s, labels).square().sum().backward()
    assert all(lin.weight.grad.abs().sum() > 0 for lin in film.scales)
    # the tangent along t sees the scale path (forward AD through both branches)
    film.scales[0].weight.data.normal_(0, 0.1)
    _, dt = torch.func.jvp(lambda tt: film(x, tt, s, labels), (t,), (torch.ones_like(t),))
    eps = 1e-3
    fd = (film(x, t + eps, s, labels) - film(x, t - eps, s, labels)) / (2 * eps)
    torch.testing.assert_close(dt, fd, rtol=2e-2, atol=2e-3)
    with pytest.raises(ValueError, match="modulation"):
        MLP(modulation="film")


def test_mlp_preconditioning_starts_at_the_exact_gaussian_flow_map():
    """With precondition=True a zero network is the exact flow map of N(0, sigma_data^2 I), at
    s < t and at s = t (the velocity); c_in and c_out give unit-variance input and target."""
    from flowmap_lit.interpolant import flowmap_preconditioning, interpolate
    from flowmap_lit.networks import MLP
    from flowmap_lit.teachers.analytic import GaussianData

    sd = 0.7
    net = MLP(num_classes=0, width=32, depth=1, precondition=True, sigma_data=sd).double()
    data = GaussianData(torch.zeros(1, 8, 8, dtype=torch.float64), torch.full((1, 8, 8), sd, dtype=torch.float64))
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([1.0, 0.9, 0.5, 0.3, 0.2, 0.05], dtype=torch.float64)
    for s in (t * torch.rand(6, dtype=torch.float64), torch.zeros_like(t), t.clone()):
        f = x - (t - s).reshape(-1, 1, 1, 1) * net(x, t, s)
        torch.testing.assert_close(f, data.flow_map(x, t, s), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net(x, t, t), data.velocity(x, t), rtol=1e-12, atol=1e-12)
    x0 = sd * torch.randn(200_000, 1, 1, 1, dtype=torch.float64)
    eps = torch.randn(200_000, 1, 1, 1, dtype=torch.float64)
    for tt in (0.1, 0.5, 0.9):
        c_in, c_skip, c_out = flowmap_preconditioning(torch.tensor(tt, dtype=torch.float64),
                                                      torch.tensor(tt, dtype=torch.float64), sd)
        x_t = interpolate(x0, eps, tt)
        assert abs((c_in * x_t).std() - 1) < 0.01 and abs(((eps - x0 - c_skip * x_t) / c_out).std() - 1) < 0.01
    torch.nn.init.normal_(net.out.weight, std=0.1)  # the network's part is scaled by c_out and carries grads
    net(x, t, t * 0.5).square().sum().backward()
    assert net.out.weight.grad.abs().sum() > 0
