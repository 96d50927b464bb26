"""JVPs (flowmap_lit.jvp): the backends agree with each other and with analytic derivatives, and with
dropout the tangent differentiates the very function that is trained (forked RNG)."""

import pytest
import torch

from flowmap_lit.jvp import RNGState, jvp
from tests.helpers import MLPVelocity

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
SHAPE = (1, 2, 3)


def batch(n=16, seed=1, min_gap=0.1):
    g = torch.Generator().manual_seed(seed)
    t = 0.2 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64)
    s = (t - min_gap) * torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    return x, t, s


def test_jvp_backends_agree_with_each_other_and_an_analytic_derivative():
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    u = torch.randn(4, 3, dtype=torch.float64)

    def fn(x, t):
        return torch.sin(t)[:, None] * x**2

    exact = 2 * x * u * torch.sin(t)[:, None] + torch.cos(t)[:, None] * x**2
    for backend in ("func", "forward_ad", "finite_difference"):
        d = jvp(fn, (x, t), (u, torch.ones_like(t)), backend=backend, fd_step=1e-6)
        assert torch.allclose(d, exact, atol=1e-8), backend

    # On a network: forward AD in fp32 vs float64 central differences.
    torch.manual_seed(0)
    net = MLPVelocity(SHAPE, 32)
    x, t, s = batch(8)
    v = torch.randn_like(x)
    ref = jvp(lambda a, b: net.double()(a, b, s), (x, t), (v, torch.ones_like(t)), "finite_difference", 1e-6)
    net = net.float()
    for backend in ("func", "forward_ad"):
        d = jvp(lambda a, b: net(a, b, s.float()), (x.float(), t.float()), (v.float(), torch.ones_like(t).float()),
                backend)
        assert ((d.double() - ref).norm() / ref.norm()) < 1e-5, backend


def test_dropout_masks_match_between_grad_forward_and_jvp():
    """With dropout, the JVP must differentiate the very F that is trained (forked RNG)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.Dropout(0.5), torch.nn.Linear(64, 3)).double()
    fn = lambda x, t: net(x) * t[:, None]  # noqa: E731
    x, t = torch.randn(5, 3, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    u = torch.randn_like(x)
    rng = RNGState()
    out = fn(x, t)
    d_func = jvp(fn, (x, t), (u, torch.ones_like(t)), "func", rng=rng)
    d_fd = jvp(fn, (x, t), (u, torch.ones_like(t)), "finite_difference", fd_step=1e-6, rng=rng)
    assert torch.allclose(d_func, d_fd, atol=1e-7)
    rng.restore()
    assert torch.equal(fn(x, t), out)
