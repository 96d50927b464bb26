"""Attention under forward AD (flowmap_lit.networks.attention): the math kernel's and the chunked closed-form
tangent equal forward AD through the reference attention, the chunked form's gradient is the plain one, and
the forward-AD-safe flag is thread-local and nests."""

import threading

import pytest
import torch

from flowmap_lit.networks import attention, build_network, forward_ad_safe_attention, math_only_active
from flowmap_lit.networks.attention import reference_attention
from tests.helpers import randomize_zero_params_

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
    # Plain SDPA picks a fused kernel without a forward-AD rule on this torch (docs/pitfalls.md);
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

        def fn(op, names=names):
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
        f = lambda x_, t_, net=net, s=s, labels=labels: net(x_, t_, s, labels)  # noqa: E731
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
