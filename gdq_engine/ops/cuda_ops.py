"""The ``cuda`` backend: packed 3x3 conv and quantize+pack in CUDA C++ (csrc/cuda/conv3x3.cu).

int8 tensor-core MMA (``mma.sync`` m16n8k32, sm_80+), int4/int2 activations unpacked to int8 in
registers. Built into ``gdq_engine._C`` only where torch is a CUDA build and a CUDA toolkit is
present (setup.py). Same arguments and results as :mod:`gdq_engine.ops.reference`, except that
conv weights are prepared once by :func:`prepare_conv_weight`.
"""

from __future__ import annotations

import torch

from ..quant.quantizer import ActQuant, container_bits, requant_args
from . import HAS_CPP, compiled_quantize_pack
from .reference import check_weight_codes

IN_CHANNEL_STEP = 32  # csrc/cuda/launch.h kConvInChannels: the int8 MMA's k step
OUT_CHANNEL_TILE = 64  # csrc/cuda/launch.h kConvOutChannels: output channels per CTA


def available() -> bool:
    """Whether the compiled extension holds the CUDA kernels (a CUDA build of gdq_engine._C)."""
    return HAS_CPP and hasattr(torch.ops.gdq_engine, "packed_conv3x3_cuda")


def unavailable_reason(device: torch.device) -> str | None:
    """Why the CUDA backend cannot run on ``device`` (None when it can)."""
    if not available():
        return ("gdq_engine._C was built without the CUDA kernels (needs a CUDA build of torch and a CUDA "
                "toolkit at install time: pip install --no-build-isolation -e .)")
    if torch.device(device).type != "cuda":
        return f"the CUDA kernels run on CUDA tensors, not {device}"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return "the CUDA kernels need sm_80 or newer (int8 mma.sync m16n8k32)"
    return None


def prepare_conv_weight(w_codes: torch.Tensor, a_bits: int | None = None) -> torch.Tensor:
    """(Cout, C, 3, 3) int8 weight codes -> (9, Cout, C) int8 (tap-major; any activation width)."""
    check_weight_codes(w_codes)
    cout, cin = w_codes.shape[:2]
    return w_codes.permute(2, 3, 0, 1).reshape(9, cout, cin).contiguous()


def check_conv_channels(x_packed: torch.Tensor, a_bits: int, weight: torch.Tensor) -> None:
    """Raise ``ValueError`` unless the CUDA conv's tiles fit: input channels a multiple of
    ``IN_CHANNEL_STEP``, output channels of ``OUT_CHANNEL_TILE`` (``weight``: (9, Cout, C))."""
    if x_packed.dim() != 4 or weight.dim() != 3:
        return  # the op's own checks name the expected shapes
    cin, cout = x_packed.shape[-1] * 8 // container_bits(a_bits), weight.shape[1]
    if cin % IN_CHANNEL_STEP:
        raise ValueError(f"the CUDA conv needs input channels in multiples of {IN_CHANNEL_STEP}, got {cin}")
    if cout % OUT_CHANNEL_TILE:
        raise ValueError(f"the CUDA conv needs output channels in multiples of {OUT_CHANNEL_TILE}, got {cout}")


def packed_conv3x3(x_packed: torch.Tensor, a_bits: int, a_signed: bool, weight: torch.Tensor, mult: torch.Tensor,
                   bias: torch.Tensor, relu: bool = False, residual: torch.Tensor | None = None,
                   res_scale: float = 1.0, out_quant: ActQuant | None = None) -> torch.Tensor:
    """Fused unpack -> int conv -> epilogue -> (re-quantize + pack | fp32), NHWC, on CUDA tensors.

    ``weight``: from :func:`prepare_conv_weight` ((9, Cout, C) int8) or raw (Cout, C, 3, 3) codes.
    Input channels C must be a multiple of 32, output channels of 64. Returns packed uint8 NHWC
    when ``out_quant`` else fp32 NHWC.
    """
    if weight.dim() == 4:
        weight = prepare_conv_weight(weight)
    check_conv_channels(x_packed, a_bits, weight)
    o_bits, lo, hi, inv_s = requant_args(out_quant)
    return torch.ops.gdq_engine.packed_conv3x3_cuda(
        x_packed.contiguous(), container_bits(a_bits), bool(a_signed), weight, mult.float().contiguous(),
        bias.float().contiguous(), None if residual is None else residual.float().contiguous(), float(res_scale),
        bool(relu), o_bits, lo, hi, inv_s)


quantize_pack = compiled_quantize_pack  # fp32 NHWC (..., C) -> packed uint8 codes of an ActQuant
