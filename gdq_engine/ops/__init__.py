"""Op surface with per-backend implementations.

``torch.ops.gdq_engine.*`` ops come from the compiled extension ``gdq_engine._C`` when it is
built; every op has a pure-torch reference in :mod:`gdq_engine.quant` that backends must match.
``pack_codes``, ``unpack_codes`` and ``quantize_pack`` are each one torch.library op with a kernel
per device (CPU: csrc/cpu, CUDA: csrc/cuda when built with CUDA); the functions below pick the
compiled kernel for the tensor's device, or the reference where there is none.
"""

from __future__ import annotations

import torch

from ..quant import packing
from ..quant.quantizer import ActQuant, requant_args
from . import reference

try:
    from .. import _C  # noqa: F401  (registers torch.ops.gdq_engine.*)

    HAS_CPP = True
except ImportError:  # extension not built (e.g. a source checkout without install)
    HAS_CPP = False

BACKENDS = ("auto", "reference", "cpp")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether the compiled op ``torch.ops.gdq_engine.<op>`` has a kernel for ``device``'s type."""
    key = _DISPATCH_KEYS.get(torch.device(device).type)
    if not HAS_CPP or key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"gdq_engine::{op}", key)
    except RuntimeError:  # no such op in this build
        return False


def _use_compiled(t: torch.Tensor, op: str, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend == "cpp" and not HAS_CPP:
        raise RuntimeError("the C++ extension gdq_engine._C is not built; reinstall with "
                           "`pip install --no-build-isolation -e .`")
    if backend == "cpp" and not has_kernel(op, t.device):
        raise RuntimeError(f"gdq_engine._C has no {t.device.type} kernel of {op} (CUDA kernels need a CUDA "
                           "build of torch and a CUDA toolkit at install time)")
    return backend == "cpp" or (backend == "auto" and has_kernel(op, t.device))


def pack_codes(codes: torch.Tensor, bits: int, backend: str = "auto") -> torch.Tensor:
    """Pack integer codes (..., C) to uint8 (..., C*bits/8); see :mod:`gdq_engine.quant.packing`."""
    if _use_compiled(codes, "pack_codes", backend):
        return torch.ops.gdq_engine.pack_codes(codes, bits)
    return packing.pack_codes(codes, bits)


def unpack_codes(packed: torch.Tensor, bits: int, signed: bool, backend: str = "auto") -> torch.Tensor:
    """Unpack uint8 (..., C*bits/8) to codes (..., C): int8 if ``signed`` else uint8."""
    if _use_compiled(packed, "unpack_codes", backend):
        return torch.ops.gdq_engine.unpack_codes(packed, bits, signed)
    return packing.unpack_codes(packed, bits, signed)


def compiled_quantize_pack(x: torch.Tensor, q: ActQuant) -> torch.Tensor:
    """The compiled ``quantize_pack`` kernel of ``x``'s device, no checks (the ``cpp`` and ``cuda``
    backends' quantize+pack): fp32 (..., C) -> packed uint8 codes of ``q``."""
    return torch.ops.gdq_engine.quantize_pack(x.float(), *requant_args(q))


def quantize_pack(x: torch.Tensor, q: ActQuant, backend: str = "auto") -> torch.Tensor:
    """fp32 (..., C) -> packed uint8 (..., C * container / 8) codes of ``q``, in
    ``q.container`` (docs/numerics.md: clamp(floor(x / s + 0.5), lo, hi))."""
    if _use_compiled(x, "quantize_pack", backend):
        return compiled_quantize_pack(x, q)
    return reference.quantize_pack(x, q)
