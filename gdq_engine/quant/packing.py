"""Bit packing of integer codes along the channel (last) dimension: the pure-torch reference.

Layout (shared by every backend): for ``bits`` in {2, 4, 8} one byte holds ``k = 8 // bits``
codes. With C channels split into k equal groups of ``G = C // k`` channels, byte ``j`` holds
channel ``j + i*G`` in bits ``[i*bits, (i+1)*bits)`` for ``i = 0..k-1``. So for int4 the low nibble
of byte j is channel j and the high nibble channel j + C/2: a kernel can take the high group
with one mask (``b & 0xF0`` is 16 x code as an int8) and the low group with one shift.
Codes are stored as their low ``bits`` bits (two's complement for signed codes).
"""

from __future__ import annotations

import torch

PACK_BITS = (2, 4, 8)


def _check(bits: int, channels: int) -> int:
    if bits not in PACK_BITS:
        raise ValueError(f"unsupported bit-width {bits!r}; packed containers are {PACK_BITS}")
    per_byte = 8 // bits
    if channels % per_byte:
        raise ValueError(f"{channels} channels cannot be packed at {bits} bits: need a multiple of {per_byte}")
    return per_byte


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (..., C) into uint8 (..., C * bits // 8).

    ``codes``: any integer dtype; each value must fit ``bits`` bits signed or unsigned (only the
    low ``bits`` bits are kept).
    """
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"pack_codes expects integer codes, got {codes.dtype}")
    per_byte = _check(bits, codes.shape[-1])
    mask = (1 << bits) - 1
    groups = (codes.to(torch.int32) & mask).unflatten(-1, (per_byte, codes.shape[-1] // per_byte))
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32).mul_(bits).view(per_byte, 1)
    return (groups << shifts).sum(-2).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Unpack uint8 (..., C * bits // 8) into codes (..., C): int8 when signed, uint8 otherwise."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_codes expects uint8 packed data, got {packed.dtype}")
    per_byte = _check(bits, 8 // bits)
    mask = (1 << bits) - 1
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32).mul_(bits).view(per_byte, 1)
    fields = (packed.to(torch.int32).unsqueeze(-2) >> shifts) & mask
    if signed:
        fields = fields - ((fields >> (bits - 1)) << bits)
    return fields.flatten(-2).to(torch.int8 if signed else torch.uint8)
