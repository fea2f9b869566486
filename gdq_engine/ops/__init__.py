"""Op surface with per-backend implementations.

``torch.ops.gdq_engine.*`` ops come from the compiled extension ``gdq_engine._C`` when it is
built; every op has a pure-torch reference in :mod:`gdq_engine.quant` that backends must match.
"""

from __future__ import annotations

import torch

from ..quant import packing

try:
    from .. import _C  # noqa: F401  (registers torch.ops.gdq_engine.*)

    HAS_CPP = True
except ImportError:  # extension not built (e.g. a source checkout without install)
    HAS_CPP = False

BACKENDS = ("auto", "reference", "cpp")


def _use_cpp(t: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend == "cpp" and not HAS_CPP:
        raise RuntimeError("the C++ extension gdq_engine._C is not built; reinstall with "
                           "`pip install --no-build-isolation -e .`")
    return backend == "cpp" or (backend == "auto" and HAS_CPP and t.device.type == "cpu")


def pack_codes(codes: torch.Tensor, bits: int, backend: str = "auto") -> torch.Tensor:
    """Pack integer codes (..., C) to uint8 (..., C*bits/8); see :mod:`gdq_engine.quant.packing`."""
    if _use_cpp(codes, backend):
        return torch.ops.gdq_engine.pack_codes(codes, bits)
    return packing.pack_codes(codes, bits)


def unpack_codes(packed: torch.Tensor, bits: int, signed: bool, backend: str = "auto") -> torch.Tensor:
    """Unpack uint8 (..., C*bits/8) to codes (..., C): int8 if ``signed`` else uint8."""
    if _use_cpp(packed, backend):
        return torch.ops.gdq_engine.unpack_codes(packed, bits, signed)
    return packing.unpack_codes(packed, bits, signed)
