"""Quantize / dequantize by the integer contract (docs/numerics.md), pure torch.

Activations: per-tensor scale ``s`` stored with its fp32 reciprocal ``inv_s``;
``code = clamp(floor(x * inv_s + 0.5), lo, hi)`` computed as separate fp32 operations (no fused
multiply-add), so every backend reproduces the same codes. Weights: symmetric, narrow range
(``-(2^(b-1)-1) .. 2^(b-1)-1``), per output channel by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BIT_CLASSES = (2, 4, 8)
CODE_WIDTHS = (2, 3, 4, 5, 6, 7, 8)


def container_bits(code_bits: int) -> int:
    """The packed container (2, 4 or 8) that stores codes of ``code_bits`` bits."""
    if code_bits not in CODE_WIDTHS:
        raise ValueError(f"unsupported bit-width {code_bits!r}; code widths are {CODE_WIDTHS}")
    return next(c for c in BIT_CLASSES if c >= code_bits)


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """Inclusive (lo, hi) code range of an activation quantizer."""
    container_bits(bits)
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


@dataclass(frozen=True)
class ActQuant:
    """A calibrated per-tensor activation quantizer: ``bits``, ``signed`` and ``scale`` (rounded to
    fp32 on construction).

    ``container``: the packed class (2, 4 or 8 bits per code) its codes are stored in; ``None``
    (default): the smallest that holds ``bits`` (:func:`container_bits`). A wider one stores the
    same codes with fewer per byte (e.g. 4-bit codes one per byte, so the 8-bit kernels run them):
    the code range, and so every value, stays that of ``bits``."""

    bits: int
    signed: bool
    scale: float
    container: int | None = None

    def __post_init__(self):
        code_range(self.bits, self.signed)
        if not self.scale > 0:
            raise ValueError(f"quantizer scale must be positive, got {self.scale}")
        smallest = container_bits(self.bits)
        if self.container is None:
            object.__setattr__(self, "container", smallest)
        elif self.container not in BIT_CLASSES or self.container < smallest:
            raise ValueError(f"{self.bits}-bit codes fit containers {[c for c in BIT_CLASSES if c >= smallest]}, "
                             f"not {self.container!r}")
        # The scale is an fp32 number (docs/numerics.md): round once here, so every path that
        # stores it (checkpoints, tables, buffers) and every backend sees the same value.
        object.__setattr__(self, "scale", float(torch.tensor(float(self.scale), dtype=torch.float32)))

    @property
    def inv_scale(self) -> float:
        """fp32(1 / scale), the multiplier every backend uses."""
        return float(torch.tensor(1.0 / self.scale, dtype=torch.float32))

    @property
    def range(self) -> tuple[int, int]:
        return code_range(self.bits, self.signed)


def requant_args(q: ActQuant | None) -> tuple[int, int, int, float]:
    """The fused epilogue's re-quantization arguments (container bits, lo, hi, fp32 inv_scale) of
    the kernels' calling convention; ``(0, 0, 0, 1.0)`` (fp32 out) when ``q`` is None."""
    if q is None:
        return 0, 0, 0, 1.0
    lo, hi = q.range
    return q.container, lo, hi, q.inv_scale


def quantize(x: torch.Tensor, q: ActQuant) -> torch.Tensor:
    """fp32 tensor -> int32 codes by the contract (floor(x * inv_s + 0.5), clamped)."""
    lo, hi = q.range
    t = x.to(torch.float32) * torch.tensor(q.inv_scale, dtype=torch.float32)
    t = t + torch.tensor(0.5, dtype=torch.float32)
    return torch.floor(t).clamp_(lo, hi).to(torch.int32)


def dequantize(codes: torch.Tensor, q: ActQuant) -> torch.Tensor:
    """int codes -> fp32 values ``code * scale``."""
    return codes.to(torch.float32) * torch.tensor(q.scale, dtype=torch.float32)


def fake_quantize(x: torch.Tensor, q: ActQuant) -> torch.Tensor:
    """quantize then dequantize (the float model of the integer path)."""
    return dequantize(quantize(x, q), q)


def quantize_weight(w: torch.Tensor, bits: int = 8, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric narrow-range weight quantization.

    Args:
        w: (Cout, Cin, kh, kw) float weights.
        bits: 8, 4 or 2.
        per_channel: one scale per output channel (else one for the tensor).
    Returns:
        (codes int8 of w's shape, fp32 scales of shape (Cout,)).
    """
    if bits not in BIT_CLASSES:
        raise ValueError(f"unsupported weight bit-width {bits!r}; weights use {BIT_CLASSES}")
    qmax = (1 << (bits - 1)) - 1
    w = w.detach().to(torch.float32)
    amax = w.abs().flatten(1).amax(1) if per_channel else w.abs().amax().expand(w.shape[0])
    # a tensor divisor: CUDA divides by a Python number as a multiply by its reciprocal, one ulp off
    # the CPU's (and the contract's) correctly rounded quotient for some channels
    scale = (amax / torch.full_like(amax, qmax)).clamp_min(1e-12)
    codes = torch.round(w / scale.view(-1, 1, 1, 1)).clamp_(-qmax, qmax).to(torch.int8)
    return codes, scale.to(torch.float32)
