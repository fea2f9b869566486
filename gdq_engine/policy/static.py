"""Static(b): every patch at ``b`` bits (PAMS / 2DQuant / QuantSR style uniform quantization)."""

from __future__ import annotations

import torch

from ..quant.quantizer import container_bits
from .base import BitPolicy


class Static(BitPolicy):
    """All patches at one activation bit-width ``bits`` (2..8; 3/5/6/7 run in their container)."""

    name = "static"

    def __init__(self, bits: int = 8):
        container_bits(int(bits))
        self.bits = (int(bits),)

    def assign(self, lr: torch.Tensor, head_feat: torch.Tensor) -> torch.Tensor:
        return torch.full((lr.shape[0],), self.bits[0], dtype=torch.int64)
