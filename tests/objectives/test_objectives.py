"""The distillation objectives checked against exact answers (docs/design.md sections 3, 4 and 6)."""

import pytest
import torch

from flowmap_lit.jvp import RNGState
from flowmap_lit.objectives import AYFEMD, AYFLMD, SCD, DiscreteEMD, FlowMatching, Weighting
from tests.helpers import ExactGaussianStudent, MLPVelocity, gaussian

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
SHAPE = (1, 2, 3)


def batch(n=16, seed=1, min_gap=0.1):
    g = torch.Generator().manual_seed(seed)
    t = 0.2 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64)
    s = (t - min_gap) * torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    return x, t, s


def tangent(obj, student, data, x, t, s, r=1.0):
    F = student(x, t, s).detach()
    with torch.no_grad():
        return obj.tangent(student, data.velocity, x, t, s, F, r, RNGState())


@pytest.mark.parametrize("objective", [AYFEMD, AYFLMD])
@pytest.mark.parametrize("backend", ["func", "forward_ad", "finite_difference"])
def test_exact_flow_map_has_zero_tangent_and_a_perturbed_one_does_not(objective, backend):
    data = gaussian()
    x, t, s = batch()
    obj = objective(jvp_backend=backend, fd_step=1e-5)
    g_exact = tangent(obj, ExactGaussianStudent(data), data, x, t, s)
    g_wrong = tangent(obj, ExactGaussianStudent(data, perturb=0.05), data, x, t, s)
    scale = g_wrong.abs().max().item()
    tol = 1e-9 if backend != "finite_difference" else 1e-6
    assert g_exact.abs().max().item() < tol * max(scale, 1.0)
    assert scale > 1e-2
    # With r < 1 the exact map keeps a pull (1 - r) toward the teacher velocity: g != 0.
    assert tangent(obj, ExactGaussianStudent(data), data, x, t, s, r=0.5).abs().max() > 1e-3


def grads(objective, student, teacher, x, t, s, r=1.0):
    student.zero_grad()
    objective(student, teacher, x, t, objective.select_s(t, s), r=r).loss.mean().backward()
    return torch.cat([p.grad.flatten() for p in student.parameters()])


def test_discrete_emd_gradient_tends_to_the_continuous_one():
    torch.manual_seed(0)
    data = gaussian()
    student = MLPVelocity(SHAPE, 32).double()
    x, t, s = batch(32)
    cont = grads(AYFEMD(tangent_norm="none", weighting=Weighting(power=2)), student, data.velocity, x, t, s)
    errors = []
    for delta in (1e-2, 1e-3, 1e-4):
        disc = grads(DiscreteEMD(delta=delta), student, data.velocity, x, t, s) / delta
        errors.append(((disc - cont).norm() / cont.norm()).item())
    assert errors[-1] < 1e-3, errors
    assert errors[0] > 3 * errors[1] > 9 * errors[2], errors  # first order in delta


def test_emd_at_s_equal_t_is_flow_matching_and_at_s_zero_is_scd():
    torch.manual_seed(0)
    data = gaussian()
    student = MLPVelocity(SHAPE, 32).double()
    x, t, s = batch(32)
    fm = grads(FlowMatching(), student, data.velocity, x, t, s)
    emd_diag = grads(AYFEMD(tangent_norm="none"), student, data.velocity, x, t, t.clone())
    assert torch.allclose(fm, emd_diag, rtol=1e-10, atol=1e-12)
    scd = grads(SCD(), student, data.velocity, x, t, s)
    emd_zero = grads(AYFEMD(), student, data.velocity, x, t, torch.zeros_like(t))
    assert torch.allclose(scd, emd_zero, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(scd, grads(AYFEMD(), student, data.velocity, x, t, s))


def test_tangent_normalization_and_weighting():
    obj = AYFEMD(norm_const=0.1)
    g = torch.randn(4, *SHAPE) * 10
    gn, norm = obj.normalize(g)
    assert torch.allclose(norm, g.flatten(1).norm(dim=1))
    assert torch.allclose(gn.flatten(1).norm(dim=1), norm / (norm + 0.1))
    rms = AYFEMD(tangent_norm="rms")
    assert torch.allclose(rms.normalize(g)[1], g.flatten(1).norm(dim=1) / 6**0.5)
    # Weighting: (t - s)^power, and the adaptive form starts at u = 0 and learns.
    loss, t, s = torch.rand(4), torch.rand(4) * 0.5 + 0.5, torch.rand(4) * 0.5
    assert torch.allclose(Weighting(power=2)(loss, t, s), (t - s) ** 2 * loss)
    adaptive = Weighting(adaptive=True)
    assert torch.allclose(adaptive(loss, t, s), loss)
    adaptive(loss, t, s).sum().backward()
    assert adaptive.u[-1].bias.grad is not None


class DropoutVelocity(torch.nn.Module):
    """``F(x, t, s)``: an MLP of ``[x, t, t - s]`` with dropout (train mode), float64."""

    def __init__(self, d: int = 6, width: int = 32) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(d + 2, width), torch.nn.SiLU(), torch.nn.Dropout(0.3),
                                        torch.nn.Linear(width, d)).double()

    def forward(self, x, t, s):
        b = x.shape[0]
        return self.body(torch.cat([x.reshape(b, -1), t[:, None], (t - s)[:, None]], 1)).reshape(x.shape)


@pytest.mark.parametrize("objective", [AYFEMD, AYFLMD, SCD])
def test_one_pass_and_two_pass_give_the_same_loss_and_gradient(objective):
    """F and its tangent from one forward-mode pass equal the grad forward plus a separate JVP
    (docs/design.md section 4), dropout included: same loss, same gradient, in float64."""
    data = gaussian()
    x, t, s = batch(32)
    results = {}
    for mode in ("one_pass", "two_pass"):
        torch.manual_seed(0)
        student = DropoutVelocity()
        obj = objective(tangent_pass=mode)
        assert obj.uses_one_pass(x) == (mode == "one_pass")
        torch.manual_seed(1)  # the dropout masks of the step
        out = obj(student, data.velocity, x, t, obj.select_s(t, s), r=0.7)
        out.loss.mean().backward()
        results[mode] = out.loss.detach(), torch.cat([p.grad.flatten() for p in student.parameters()])
    (l1, g1), (l2, g2) = results["one_pass"], results["two_pass"]
    assert ((l1 - l2).abs().max() / l2.abs().max()) < 1e-12
    assert ((g1 - g2).norm() / g2.norm()) < 1e-10
    assert g2.norm() > 0


def test_tangent_pass_choice_and_its_errors():
    assert AYFEMD().tangent_pass == "auto" and AYFEMD().jvp_backend == "forward_ad"  # the defaults
    assert AYFEMD().uses_one_pass(torch.zeros(1))  # CPU, forward AD, no autocast: one pass
    assert not AYFEMD().uses_one_pass(torch.zeros(1, device="meta"))  # off the CPU: two passes (memory)
    from flowmap_lit.modules.distill import BoundStudent

    net = torch.nn.Identity()
    compiled, checkpointed = BoundStudent(torch.nn.Identity(), net, {}), BoundStudent(net, net, {}, checkpointed=True)
    assert not AYFEMD().uses_one_pass(torch.zeros(1), compiled)  # the compiled forward trains in two passes
    assert not AYFEMD().uses_one_pass(torch.zeros(1), checkpointed)  # recomputation has no tangents
    assert AYFEMD().uses_one_pass(torch.zeros(1), BoundStudent(net, net, {}))
    with pytest.raises(ValueError, match="activation checkpointing"):
        AYFEMD(tangent_pass="one_pass").uses_one_pass(torch.zeros(1), checkpointed)
    assert not AYFEMD(tangent_pass="auto", jvp_backend="finite_difference").uses_one_pass(torch.zeros(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # keeps the fp32 tangent of the two-pass form
        assert not AYFEMD(tangent_pass="auto").uses_one_pass(torch.zeros(1))
    with pytest.raises(ValueError, match="one_pass needs forward-mode AD"):
        AYFEMD(tangent_pass="one_pass", jvp_backend="finite_difference")
    with pytest.raises(ValueError, match="tangent_pass must be"):
        AYFEMD(tangent_pass="fused")


@pytest.mark.parametrize("tangent_pass", ["two_pass", "one_pass"])
def test_chunked_attention_jvp_gives_the_same_step(tangent_pass):
    """``attention_jvp: chunked`` (fused kernel plus the closed-form tangent) and ``math`` give the
    AYF-EMD step on a DiT student the same loss and gradient, in float64."""
    from flowmap_lit.networks import build_network

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.rand(4, generator=gen, dtype=torch.float64) * 0.8 + 0.2
    s = t * torch.rand(4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 5, 10])
    teacher = lambda x_, t_: -x_ * t_.reshape(-1, 1, 1, 1)  # noqa: E731
    results = {}
    for form in ("math", "chunked"):
        torch.manual_seed(0)
        net = build_network("dit", "tiny").double()
        with torch.no_grad():
            for p in net.parameters():
                if not p.any():
                    p.normal_(0, 0.1)
        obj = AYFEMD(tangent_pass=tangent_pass, attention_jvp=form)
        assert obj.attention_form(x) == form
        out = obj(lambda x_, t_, s_, net=net: net(x_, t_, s_, labels), teacher, x, t, s, r=0.9)
        out.loss.mean().backward()
        results[form] = out.loss.detach(), torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    (l1, g1), (l2, g2) = results["chunked"], results["math"]
    assert ((l1 - l2).abs().max() / l2.abs().max()) < 1e-10
    assert ((g1 - g2).norm() / g2.norm()) < 1e-10 and g2.norm() > 0
    assert AYFEMD().attention_form(torch.zeros(1)) == "math"  # auto: math on CPU, chunked on CUDA
    with pytest.raises(ValueError, match="attention_jvp must be"):
        AYFEMD(attention_jvp="flash")
