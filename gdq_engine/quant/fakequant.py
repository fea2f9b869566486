"""Fake-quantization modules for quantization-aware training (float in, float out, learnable).

* :class:`LSQQuantizer` (Esser et al.; Granular-DQ's and QuantSR's step quantizer): learnable
  step ``s``; ``y = s * clamp(round(x / s), qn, qp)`` with a straight-through rounding gradient
  and LSQ's step-gradient scale ``1 / sqrt(numel * qp)``.
* :class:`RLQQuantizer` (QuantSR): a learnable per-channel shift ``tau`` before an LSQ step,
  ``y = s * clamp(round((x + tau) / s), qn, qp) - tau``, with QuantSR's tanh-shaped "soft"
  rounding gradient ``k (1 - tanh^2(k (frac(u) - 1/2))) / (2 tanh(k / 2))`` (k = 1).
* :class:`PAMSQuantizer` (PAMS / CADyQ): symmetric with a learnable clip ``alpha``,
  ``y = s * round(clamp(x, -alpha, alpha) / s)``, ``s = alpha / (2^(b-1) - 1)``.

Rounding here is round-half-to-even (torch.round), as in the papers' code; the integer engine's
own rounding (floor(x * inv_s + 0.5), docs/numerics.md) differs only on exact ties. The
quantizers' learned scales become the engine's activation scales when a trained model is
exported; RLQ's shift needs a zero point, which the integer contract does not have yet.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .quantizer import code_range


def _grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the gradient is multiplied by ``scale``."""
    return (x - x * scale).detach() + x * scale


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity gradient."""
    return (torch.round(x) - x).detach() + x


class _SoftRound(torch.autograd.Function):
    """round() forward; QuantSR's soft gradient backward."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, k: float):
        ctx.save_for_backward(u)
        ctx.k = k
        return torch.round(u)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return grad * soft_round_grad(u, ctx.k), None


def soft_round_grad(u: torch.Tensor, k: float = 1.0) -> torch.Tensor:
    """QuantSR's rounding gradient ``k (1 - tanh^2(k (frac(u) - 1/2))) / (2 tanh(k / 2))``."""
    frac = u - torch.floor(u)
    return k * (1 - torch.tanh(k * (frac - 0.5)) ** 2) / (2 * math.tanh(k / 2))


class LSQQuantizer(nn.Module):
    """Learned-step fake quantizer. ``bits`` 2..8; ``signed`` picks [-2^(b-1), 2^(b-1)-1] or
    [0, 2^b-1]. The step initialises from the first batch (``2 mean|x| / sqrt(qp)``) unless given."""

    def __init__(self, bits: int, signed: bool, step: float | None = None):
        super().__init__()
        self.bits, self.signed = int(bits), bool(signed)
        self.qn, self.qp = code_range(self.bits, self.signed)
        self.step = nn.Parameter(torch.tensor(float(step) if step is not None else 1.0))
        self.register_buffer("initialized", torch.tensor(step is not None))

    def _init_step(self, x: torch.Tensor) -> None:
        if not bool(self.initialized):
            with torch.no_grad():
                self.step.fill_(max(2 * x.detach().abs().mean().item() / math.sqrt(self.qp), 1e-8))
                self.initialized.fill_(True)

    def _round(self, u: torch.Tensor) -> torch.Tensor:
        return _round_ste(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._init_step(x)
        s = _grad_scale(self.step, 1.0 / math.sqrt(x.numel() * self.qp)).abs().clamp_min(1e-8)
        return self._round(torch.clamp(x / s, self.qn, self.qp)) * s


class RLQQuantizer(LSQQuantizer):
    """QuantSR's RLQ: per-channel learnable shift ``tau`` (dim 1 of NCHW inputs) + soft rounding."""

    def __init__(self, bits: int, signed: bool, channels: int, step: float | None = None, k: float = 1.0):
        super().__init__(bits, signed, step)
        self.tau = nn.Parameter(torch.zeros(channels))
        self.k = float(k)

    def _round(self, u: torch.Tensor) -> torch.Tensor:
        return _SoftRound.apply(u, self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tau = self.tau.view(1, -1, *([1] * (x.dim() - 2)))
        return super().forward(x + tau) - tau


class PAMSQuantizer(nn.Module):
    """PAMS: symmetric fake quantizer with a learnable clip ``alpha`` (init 10, as in PAMS)."""

    def __init__(self, bits: int, alpha: float = 10.0):
        super().__init__()
        self.bits = int(bits)
        self.qmax = (1 << (self.bits - 1)) - 1
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.abs().clamp_min(1e-8)
        clipped = torch.minimum(torch.maximum(x, -alpha), alpha)  # gradient reaches alpha where clipped
        s = alpha / self.qmax
        return _round_ste(clipped / s) * s
