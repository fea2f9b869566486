"""Fake-quant training modules: LSQ, QuantSR's RLQ, PAMS: forward values and the papers' gradients."""

import math

import pytest
import torch

from gdq_engine.quant.fakequant import LSQQuantizer, PAMSQuantizer, RLQQuantizer, soft_round_grad


def data(seed=0, shape=(2, 4, 5, 6), scale=2.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("bits,signed", [(8, True), (4, False), (2, True), (3, False)])
def test_lsq_forward_and_step_gradient(bits, signed):
    x = data(bits).requires_grad_(True)
    q = LSQQuantizer(bits, signed, step=0.3)
    y = q(x)
    qn, qp = q.qn, q.qp
    v = x.detach() / 0.3
    assert torch.allclose(y, torch.clamp(torch.round(v), qn, qp) * 0.3)
    y.sum().backward()
    inside = (v >= qn) & (v <= qp)
    assert torch.equal(x.grad, inside.float())  # straight-through inside the range, zero outside
    per_elem = torch.where(v < qn, torch.full_like(v, qn), torch.where(v > qp, torch.full_like(v, qp),
                                                                        torch.round(v) - v))
    want = per_elem.sum() / math.sqrt(x.numel() * qp)  # LSQ step gradient with its scale
    assert q.step.grad.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)


def test_lsq_initialises_step_from_data_once():
    q = LSQQuantizer(4, True)
    x = data(1)
    q(x)
    assert q.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-6)
    q(x * 100)
    assert q.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-6)
    state = q.state_dict()
    fresh = LSQQuantizer(4, True)
    fresh.load_state_dict(state)
    assert bool(fresh.initialized) and torch.equal(fresh(x), q(x))


def test_rlq_shift_and_soft_rounding_gradient():
    x = data(2, scale=1.0).requires_grad_(True)
    q = RLQQuantizer(4, True, channels=4, step=0.25)
    with torch.no_grad():
        q.tau.copy_(torch.tensor([0.0, 0.1, -0.2, 0.05]))
    tau = q.tau.detach().view(1, -1, 1, 1)
    y = q(x)
    u = (x.detach() + tau) / 0.25
    assert torch.allclose(y, torch.clamp(torch.round(u), -8, 7) * 0.25 - tau)
    y.sum().backward()
    inside = (u >= -8) & (u <= 7)
    want = torch.where(inside, soft_round_grad(u), torch.zeros_like(u))
    assert torch.allclose(x.grad, want, atol=1e-6)
    assert q.tau.grad is not None and q.tau.grad.shape == (4,)


def test_soft_round_gradient_formula():
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 3.5])
    k = 1.0
    want = k * (1 - torch.tanh(k * (u - torch.floor(u) - 0.5)) ** 2) / (2 * math.tanh(k / 2))
    assert torch.allclose(soft_round_grad(u), want)
    # Its mean over one period is 1: on average the soft gradient is the identity's.
    grid = torch.linspace(0, 1, 100001)[:-1]
    assert soft_round_grad(grid).mean().item() == pytest.approx(1.0, abs=1e-4)


def test_pams_clip_and_alpha_gradient():
    x = torch.tensor([-5.0, -0.3, 0.0, 0.7, 2.9, 6.0], requires_grad=True)
    q = PAMSQuantizer(4, alpha=3.0)
    y = q(x)
    s = 3.0 / 7
    want = torch.round(torch.clamp(x.detach(), -3, 3) / s) * s
    assert torch.allclose(y, want)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 0]))
    # d y / d alpha: +-1 where clipped, (round(v) - v) / qmax inside
    v = x.detach()[1:5] / s
    inside = ((torch.round(v) - v) / 7).sum()
    assert q.alpha.grad.item() == pytest.approx((-1 + 1 + inside).item(), abs=1e-5)
