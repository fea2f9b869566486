"""The ``cpp`` backend: packed 3x3 conv and quantize+pack in C++ (csrc/cpu/conv.cpp).

AMX-INT8 tiles (``tdpbusd``) where the CPU and OS allow them, else AVX512-VNNI (``vpdpbusd``),
else AVX2 (``vpmaddwd`` on operands widened to int16), else a portable int32 loop; threads
through ATen's ``parallel_for`` (OpenMP). Same arguments and results as
:mod:`gdq_engine.ops.reference`, except that conv weights are prepared once by
:func:`prepare_conv_weight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.quantizer import ActQuant, container_bits, requant_args
from . import HAS_CPP, compiled_quantize_pack


def available() -> bool:
    """Whether the compiled extension with the CPU conv kernels is importable."""
    return HAS_CPP and hasattr(torch.ops.gdq_engine, "packed_conv3x3_cpu")


def has_vnni() -> bool:
    """Whether this CPU runs the AVX512-VNNI kernel (else the portable loop)."""
    return available() and bool(torch.ops.gdq_engine.cpu_has_vnni())


def has_avx2() -> bool:
    """Whether this CPU runs the AVX2 kernel (where it has no AVX512-VNNI)."""
    return available() and bool(torch.ops.gdq_engine.cpu_has_avx2())


def has_amx() -> bool:
    """Whether this CPU (and OS) runs the AMX-INT8 tile kernel (used for C = 4..64 or a multiple
    of 64 input channels and output channels in multiples of 32; else VNNI)."""
    return available() and bool(torch.ops.gdq_engine.cpu_has_amx())


def conv_path(cin: int, cout: int, allow_vnni: bool = True, allow_amx: bool = True, allow_avx2: bool = True) -> str:
    """The integer core :func:`packed_conv3x3` runs for ``cin`` -> ``cout`` channels on this CPU:
    ``"amx"``, ``"vnni"``, ``"avx2"`` (output channels in multiples of 8) or ``"portable"``."""
    return str(torch.ops.gdq_engine.cpu_conv_path(cin, cout, allow_vnni, allow_amx, allow_avx2))


@dataclass(frozen=True)
class PreparedCpuWeight:
    """``w``: (T, C/4, Cout, 4) int8, four input channels of one output channel per 32-bit lane,
    for T = 9 taps (3x3) or 1 (a 1x1 conv); ``wsum``: (Cout,) int32 sum of each output channel's codes."""

    w: torch.Tensor
    wsum: torch.Tensor


def prepare_conv_weight(w_codes: torch.Tensor, a_bits: int | None = None) -> PreparedCpuWeight:
    """(Cout, C, 3, 3) or (Cout, C, 1, 1) int8 weight codes -> :class:`PreparedCpuWeight` (any
    activation width). A 1x1 conv's weights give the sums of the 3x3 conv whose only nonzero tap is
    the centre one (:data:`CONV1X1`), at a ninth of the multiply-adds."""
    if w_codes.dim() != 4 or w_codes.shape[2:] not in ((3, 3), (1, 1)) or w_codes.dtype != torch.int8:
        raise ValueError(f"expected (Cout, C, 3, 3) or (Cout, C, 1, 1) int8 weight codes, got "
                         f"{tuple(w_codes.shape)} {w_codes.dtype}")
    cout, cin, kh, kw = w_codes.shape
    if cin % 4:
        raise ValueError(f"the C++ conv needs input channels in multiples of 4, got {cin}")
    taps = kh * kw
    w = w_codes.cpu().permute(2, 3, 1, 0).reshape(taps, cin // 4, 4, cout).permute(0, 1, 3, 2).contiguous()
    return PreparedCpuWeight(w, w_codes.cpu().sum((1, 2, 3), dtype=torch.int32).contiguous())


def packed_conv3x3(x_packed: torch.Tensor, a_bits: int, a_signed: bool, weight, mult: torch.Tensor,
                   bias: torch.Tensor, relu: bool = False, residual: torch.Tensor | None = None,
                   res_scale: float = 1.0, out_quant: ActQuant | None = None, allow_vnni: bool = True,
                   allow_amx: bool = True, shuffle: int = 1, out_dtype: torch.dtype = torch.float32,
                   out: torch.Tensor | None = None, next_quant: ActQuant | None = None,
                   next_out: torch.Tensor | None = None, allow_avx2: bool = True) -> torch.Tensor:
    """Fused unpack -> int conv -> epilogue -> (re-quantize + pack | fp32), NHWC, on CPU tensors.

    ``weight``: a :class:`PreparedCpuWeight` or raw (Cout, C, 3, 3) int8 codes, or (Cout, C, 1, 1)
    for a 1x1 conv (:data:`CONV1X1`). ``allow_amx=False``
    forces the VNNI kernel, ``allow_vnni=False`` too the AVX2 one, and all three False the portable
    loop (for tests and benchmarks); each falls back to the next where the CPU lacks it. Returns packed
    uint8 when ``out_quant`` else fp32 (or ``out_dtype=torch.bfloat16``: the fp32 values rounded to
    nearest even). ``shuffle=r`` stores pixel-shuffled: output channels are read sub-pixel major
    (block i*r + j of Cout / r^2 channels) and the result is (N, rH, rW, Cout / r^2) (no residual).
    ``out``: write into this contiguous tensor of the result's shape and dtype instead of a new
    one; it may be ``residual`` itself (each value is read before its result is written).
    ``next_quant`` with ``next_out`` (fp32 results only): also write the result's packed codes of
    ``next_quant`` into ``next_out`` (N,H,W,Cout*container/8), exactly ``quantize_pack(result,
    next_quant)`` without another pass over the fp32 values.
    """
    if not isinstance(weight, PreparedCpuWeight):
        weight = prepare_conv_weight(weight)
    o_bits, lo, hi, inv_s = requant_args(out_quant)
    return torch.ops.gdq_engine.packed_conv3x3_cpu(
        x_packed, container_bits(a_bits), bool(a_signed), weight.w, weight.wsum, mult.float(), bias.float(),
        residual, float(res_scale), bool(relu), o_bits, lo, hi, inv_s, allow_vnni, allow_amx, int(shuffle),
        out_dtype == torch.bfloat16, out, *requant_args(next_quant), next_out, allow_avx2)


# packed_conv3x3 also takes (Cout, C, 1, 1) weights: a 1x1 conv, the sums (and so the results) of the
# 3x3 conv whose weights are zero outside the centre tap, at a ninth of its multiply-adds.
# runtime.densebody runs RDN's fusion convs so; other backends get the zero-padded 3x3 weights.
CONV1X1 = True

# packed_conv3x3 stores pixel-shuffled (shuffle=r) in these dtypes (out_dtype=, or uint8 8-bit
# codes): runtime.inttail's upsampler uses it.
SHUFFLE_DTYPES = (torch.uint8, torch.float32, torch.bfloat16)
# packed_conv3x3 and quantize_pack take out= buffers (packed_conv3x3's may be its residual):
# runtime.intgraph / inttail reuse workspaces, since a fresh multi-megabyte tensor costs a page
# fault per 4 KiB on first touch.
OUT_BUFFERS = True


# quantize_pack reads bf16 input as it lies (its exact fp32 values: the codes equal those of
# x.float()), and packed_conv3x3 stores bf16 results (out_dtype=), so the integer tail of a bf16
# model skips an fp32 copy of its input and a cast of its output (runtime.inttail).
QUANTIZE_INPUT_DTYPES = (torch.float32, torch.bfloat16)
FP_OUT_DTYPES = (torch.float32, torch.bfloat16)


def quantize_pack(x: torch.Tensor, q: ActQuant, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 or bf16 NHWC (..., C) -> packed uint8 codes of ``q`` (the compiled kernel), into
    ``out`` if given. bf16 values are read exactly (no rounding: their fp32 conversion)."""
    if out is None and x.dtype != torch.bfloat16:
        return compiled_quantize_pack(x, q)
    src = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()
    return torch.ops.gdq_engine.quantize_pack_cpu_into(src, *requant_args(q), out)
