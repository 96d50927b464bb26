"""Tests for flowmap_lit.networks: shapes, zero-init s-branch, forward-AD, dtypes, presets."""

import copy
import threading

import pytest
import torch

from flowmap_lit.networks import (
    ConditionEmbedding,
    DiT,
    EDM2UNet,
    FourierTimeEmbedding,
    attention,
    build_network,
    forward_ad_safe_attention,
    math_only_active,
)
from flowmap_lit.networks.attention import reference_attention
from flowmap_lit.networks.mp import MPConv, MPEmbedding

ARCHS = ["unet", "dit", "mlp"]
# torch.func.jvp registers its decompositions with torch.jit.script, which warns on this torch.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")


def make_net(arch, channels=1, resolution=8, **kw):
    torch.manual_seed(0)
    return build_network(arch, "tiny", img_channels=channels, img_resolution=resolution, **kw)


def is_s_branch(name):
    return ".mlp_s." in name or ".mlp_g." in name


@torch.no_grad()
def randomize_zero_params_(net, include_s_branch=True, scale=0.5):
    """Give zero-initialized tensors (output gains, adaLN-Zero, s/guidance branches) random values,
    so derivatives and the s-dependence are not trivially zero."""
    gen = torch.Generator().manual_seed(1)
    for name, p in net.named_parameters():
        if is_s_branch(name) and not include_s_branch:
            continue
        if is_s_branch(name) or not p.any():
            fan_in = p[0].numel() if p.ndim >= 2 else 1
            p.copy_(scale / fan_in**0.5 * torch.randn(p.shape, generator=gen))
    return net


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


def test_attention_helper_forward_ad():
    gen = torch.Generator().manual_seed(4)
    q, k, v, tq, tk, tv = (torch.randn(2, 3, 16, 8, generator=gen) for _ in range(6))
    _, expected = torch.func.jvp(reference_attention, (q, k, v), (tq, tk, tv))
    assert not math_only_active()
    with forward_ad_safe_attention():
        assert math_only_active()
        out, tangent = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    assert not math_only_active()
    torch.testing.assert_close(out, reference_attention(q, k, v), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tangent, expected, rtol=1e-4, atol=1e-5)
    # Plain SDPA picks a fused kernel without a forward-AD rule on this torch (PITFALLS.md);
    # if a future torch adds one, it must at least agree.
    try:
        _, plain = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    except (NotImplementedError, RuntimeError):
        return
    torch.testing.assert_close(plain, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk_elements", [2**26, 3 * 16, 7])  # one block, several, a row at a time
def test_chunked_attention_tangent_equals_the_math_kernel(chunk_elements):
    """The closed-form, query-blocked attention tangent (networks/attention.py) equals forward AD
    through the math kernel, in float64, for every subset of tangent inputs, through both forward-AD
    front ends; the primal stays the fused kernel's value."""
    from torch.autograd import forward_ad

    gen = torch.Generator().manual_seed(5)
    q, k, v, tq, tk, tv = (torch.randn(2, 3, 16, 8, generator=gen, dtype=torch.float64) for _ in range(6))
    k, v, tk, tv = k[..., :12, :], v[..., :12, :], tk[..., :12, :], tv[..., :12, :]  # 16 queries, 12 keys
    for mask in [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)]:
        names = [i for i, m in enumerate(mask) if m]
        tangents = tuple((tq, tk, tv)[i] for i in names)

        def fn(op):
            def call(*args):
                qkv = [q, k, v]
                for i, a in zip(names, args):
                    qkv[i] = a
                return op(*qkv)
            return call

        primals = tuple((q, k, v)[i] for i in names)
        _, expected = torch.func.jvp(fn(reference_attention), primals, tangents)
        with forward_ad_safe_attention(form="chunked", chunk_elements=chunk_elements):
            out, tangent = torch.func.jvp(fn(attention), primals, tangents)
            with forward_ad.dual_level():
                dual = forward_ad.unpack_dual(fn(attention)(*(forward_ad.make_dual(p, u)
                                                              for p, u in zip(primals, tangents))))
        torch.testing.assert_close(tangent, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dual.tangent, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, reference_attention(q, k, v), rtol=1e-12, atol=1e-12)
    # float32 inputs: the tangent is computed in float32 and agrees with the float64 one
    with forward_ad_safe_attention(form="chunked", chunk_elements=chunk_elements):
        _, t32 = torch.func.jvp(attention, (q.float(), k.float(), v.float()), (tq.float(), tk.float(), tv.float()))
    _, t64 = torch.func.jvp(reference_attention, (q, k, v), (tq, tk, tv))
    assert t32.dtype == torch.float32 and rel_err(t32.double(), t64) < 1e-5


def test_chunked_attention_gradient_and_network_jvp():
    """The chunked form's backward (used by the one-pass tangent) is the plain attention gradient,
    and a DiT's and a U-Net's JVP is the same with either form."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 10, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w = torch.randn(2, 2, 10, 4, generator=gen, dtype=torch.float64)
    with forward_ad_safe_attention(form="chunked", chunk_elements=8):
        grads = torch.autograd.grad((attention(q, k, v) * w).sum(), (q, k, v))
    expected = torch.autograd.grad((reference_attention(q, k, v) * w).sum(), (q, k, v))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for arch in ("dit", "unet"):
        net = randomize_zero_params_(make_net(arch)).double().eval()
        x, t, s, labels, _ = inputs(batch=2)
        x, t, s = x.double(), t.double(), s.double()
        u = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        f = lambda x_, t_: net(x_, t_, s, labels)  # noqa: E731
        tangents = {}
        for form in ("math", "chunked"):
            with forward_ad_safe_attention(form=form, chunk_elements=5):
                tangents[form] = torch.func.jvp(f, (x, t), (u, torch.ones_like(t)))[1]
        assert tangents["math"].abs().max() > 0
        assert rel_err(tangents["chunked"], tangents["math"]) < 1e-10, arch
    with pytest.raises(ValueError, match="'math' or 'chunked'"):
        with forward_ad_safe_attention(form="flash"):
            pass


def test_forward_ad_safe_flag_is_thread_local_and_nests():
    seen = []
    with forward_ad_safe_attention():
        worker = threading.Thread(target=lambda: seen.append(math_only_active()))
        worker.start()
        worker.join()
        with forward_ad_safe_attention(enabled=False):
            assert not math_only_active()
        assert math_only_active()
    assert seen == [False]


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
    x0, eps = sd * torch.randn(200_000, 1, 1, 1, dtype=torch.float64), torch.randn(200_000, 1, 1, 1, dtype=torch.float64)
    for tt in (0.1, 0.5, 0.9):
        c_in, c_skip, c_out = flowmap_preconditioning(torch.tensor(tt, dtype=torch.float64),
                                                      torch.tensor(tt, dtype=torch.float64), sd)
        x_t = interpolate(x0, eps, tt)
        assert abs((c_in * x_t).std() - 1) < 0.01 and abs(((eps - x0 - c_skip * x_t) / c_out).std() - 1) < 0.01
    torch.nn.init.normal_(net.out.weight, std=0.1)  # the network's part is scaled by c_out and carries grads
    net(x, t, t * 0.5).square().sum().backward()
    assert net.out.weight.grad.abs().sum() > 0


def _forward_ad_jvp(fn, primals, tangents):
    """JVP through torch.autograd.forward_ad (the second front end next to torch.func.jvp)."""
    from torch.autograd import forward_ad

    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(p, u) if u is not None else p for p, u in zip(primals, tangents)]
        return forward_ad.unpack_dual(fn(*duals)).tangent


@pytest.mark.parametrize("op", ["linear", "conv"])
@pytest.mark.parametrize("which", [(True, False, False), (False, True, False), (True, True, True), (False, False, True)])
def test_lean_tangent_rules_equal_native_forward_ad_and_autograd(op, which):
    """Linear/conv with the lean rule: same primal bits, same tangent (any operand subset, both
    front ends) and same gradients as the native kernels, in float64."""
    from flowmap_lit.networks.tangent_ops import conv2d, lean_tangents, linear

    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    if op == "linear":
        primals = (rand(3, 5, 7), rand(4, 7), rand(4))
        fn = lambda x, w, b: linear(x, w, b)  # noqa: E731
    else:
        primals = (rand(2, 3, 6, 6), rand(4, 3, 3, 3), rand(4))
        fn = lambda x, w, b: conv2d(x, w, b, stride=2, padding=1)  # noqa: E731
    tangents = [rand(*p.shape) if on else None for p, on in zip(primals, which)]
    ref = _forward_ad_jvp(fn, primals, tangents)  # native rules (outside lean_tangents)
    with lean_tangents():
        assert torch.equal(fn(*primals), torch.func.jvp(fn, primals, tuple(
            u if u is not None else torch.zeros_like(p) for p, u in zip(primals, tangents)))[0])
        def only_tangent_inputs(*given):  # torch.func.jvp: the inputs without a tangent are constants
            it = iter(given)
            return fn(*[next(it) if on else p for p, on in zip(primals, which)])

        lean_func = torch.func.jvp(only_tangent_inputs, tuple(p for p, on in zip(primals, which) if on),
                                   tuple(u for u in tangents if u is not None))[1]
        lean_fwad = _forward_ad_jvp(fn, primals, tangents)
    torch.testing.assert_close(lean_func, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lean_fwad, ref, rtol=1e-12, atol=1e-12)
    grads = []
    for lean in (False, True):
        leaves = [p.clone().requires_grad_() for p in primals]
        with lean_tangents(lean):
            fn(*leaves).sin().sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for g_native, g_lean in zip(*grads):
        torch.testing.assert_close(g_lean, g_native, rtol=1e-12, atol=1e-12)


def test_lean_tangent_rules_skip_the_zero_weight_tangent():
    """The point of the rules: a convolution's JVP runs two convolutions (primal + input tangent),
    not three, and a linear layer's two matrix products, not four."""
    from torch.profiler import ProfilerActivity, profile

    from flowmap_lit.networks.tangent_ops import conv2d, lean_tangents, linear

    x, w, u = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(2, 3, 8, 8)
    xl, wl, ul = torch.randn(5, 7), torch.randn(6, 7), torch.randn(5, 7)

    def count(fn, primal, tangent, names):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            torch.func.jvp(fn, (primal,), (tangent,))
        return sum(e.count for e in prof.key_averages() if e.key in names)

    conv = lambda a: conv2d(a, w, padding=1)  # noqa: E731
    lin = lambda a: linear(a, wl)  # noqa: E731
    with lean_tangents():
        assert count(conv, x, u, {"aten::convolution"}) == 2
        assert count(lin, xl, ul, {"aten::mm", "aten::addmm"}) == 2
    assert count(conv, x, u, {"aten::convolution"}) >= 3  # the native rule, for contrast


def test_scalar_scaling_is_bitwise_the_operator_and_differentiates():
    from flowmap_lit.networks.tangent_ops import scale, unscale

    x = torch.randn(1001)
    for c in (0.596, 2**-0.5, 3.0):
        assert torch.equal(scale(x, c), x * c) and torch.equal(unscale(x, c), x / c)
    u = torch.randn(1001)
    torch.testing.assert_close(torch.func.jvp(lambda a: unscale(a, 0.596), (x,), (u,))[1], u / 0.596)


@pytest.mark.parametrize("arch", ARCHS)
def test_network_jvp_with_lean_rules_equals_native(arch):
    """Whole networks (float64): the tangent pass with the lean rules equals native forward AD and
    the primal is bitwise unchanged."""
    from flowmap_lit.networks.tangent_ops import lean_tangents

    net = make_net(arch).double()
    for p in net.parameters():  # no zero-initialized branch hides a term
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    s = t * 0.5
    labels = torch.tensor([1, 2, 3])
    u, ut = torch.randn_like(x), torch.ones_like(t)
    fn = lambda a, b: net(a, b, s, class_labels=labels)  # noqa: E731
    with forward_ad_safe_attention():
        ref_out, ref = torch.func.jvp(fn, (x, t), (u, ut))
        with lean_tangents():
            out, lean = torch.func.jvp(fn, (x, t), (u, ut))
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(lean, ref, rtol=1e-10, atol=1e-12)
