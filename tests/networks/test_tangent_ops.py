"""The lean tangent rules (flowmap_lit.networks.tangent_ops): same primal bits, tangents and gradients as the
native kernels, fewer kernel calls, and whole networks' JVPs unchanged."""

import pytest
import torch

from flowmap_lit.networks import build_network, forward_ad_safe_attention

ARCHS = ["unet", "dit", "mlp"]
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")


def make_net(arch, channels=1, resolution=8, **kw):
    torch.manual_seed(0)
    return build_network(arch, "tiny", img_channels=channels, img_resolution=resolution, **kw)


def _forward_ad_jvp(fn, primals, tangents):
    """JVP through torch.autograd.forward_ad (the second front end next to torch.func.jvp)."""
    from torch.autograd import forward_ad

    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(p, u) if u is not None else p for p, u in zip(primals, tangents)]
        return forward_ad.unpack_dual(fn(*duals)).tangent


@pytest.mark.parametrize("op", ["linear", "conv"])
@pytest.mark.parametrize("which", [(True, False, False), (False, True, False), (True, True, True),
                                   (False, False, True)])
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
