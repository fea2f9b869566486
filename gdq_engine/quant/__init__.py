"""Numeric contract: packing (quantizers and fake-quant modules arrive with the quantization core)."""

from .packing import PACK_BITS, pack_codes, unpack_codes

__all__ = ["PACK_BITS", "pack_codes", "unpack_codes"]
