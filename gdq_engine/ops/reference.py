"""Reference backend: packed 3x3 convolution with the fused epilogue, exact integer math.

The oracle every fast kernel is tested against, bit for bit. Tensors are NHWC:

* ``x_packed``: (N, H, W, C * bits / 8) uint8, codes packed by :mod:`gdq_engine.quant.packing`.
* ``w_codes``: (Cout, C, 3, 3) int8 weight codes.
* accumulation: int32 (computed exactly through an fp32 or float64 convolution of integer codes).
* epilogue (docs/numerics.md): ``y = fp32(acc) * mult[c]``; ``y = y + bias[c]``; optional ReLU;
  optional residual ``y = residual + y * res_scale``; then either fp32 out or re-quantized codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.packing import pack_codes, unpack_codes
from ..quant.quantizer import ActQuant, container_bits, quantize

# Residual-stream dtypes this backend's integer body may keep (runtime.intgraph's stream_dtypes):
# packed_conv3x3 takes such a residual and quantize_pack such activations, both converted exactly to fp32.
STREAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_weight_codes(w_codes: torch.Tensor) -> None:
    """Raise unless ``w_codes`` is a (Cout, C, 3, 3) int8 tensor (what the fast backends prepare)."""
    if w_codes.dim() != 4 or w_codes.shape[2:] != (3, 3) or w_codes.dtype != torch.int8:
        raise ValueError(f"expected (Cout, C, 3, 3) int8 weight codes, got {tuple(w_codes.shape)} {w_codes.dtype}")


def conv3x3_int(codes: torch.Tensor, w_codes: torch.Tensor) -> torch.Tensor:
    """(N,H,W,C) integer codes * (Cout,C,3,3) int8 -> (N,H,W,Cout) int32, stride 1, zero pad 1.

    Exact integer result through a float convolution: fp32 when every partial sum stays below
    2^24 in magnitude (8-bit unsigned codes are first shifted by -128, and the shift is added back
    with the in-image weight sums, so zero padding keeps meaning code 0), float64 otherwise.
    """
    if codes.dim() != 4 or w_codes.dim() != 4 or w_codes.shape[2:] != (3, 3):
        raise ValueError(f"conv3x3_int expects NHWC codes and (Cout,C,3,3) weights, got {tuple(codes.shape)}, "
                         f"{tuple(w_codes.shape)}")
    if codes.shape[-1] != w_codes.shape[1]:
        raise ValueError(f"channel mismatch: activations have {codes.shape[-1]}, weights expect {w_codes.shape[1]}")
    lo, hi = int(codes.min()), int(codes.max())
    offset = 128 if lo >= 0 and hi > 127 else 0
    bound = max(abs(lo - offset), abs(hi - offset)) * int(w_codes.abs().max()) * 9 * codes.shape[-1]
    dtype = torch.float32 if bound < 2**24 else torch.float64
    # Contiguous NCHW: torch's float convs are much slower on NHWC strides for these dtypes.
    x = (codes.permute(0, 3, 1, 2).to(torch.int32) - offset).to(dtype).contiguous()
    w = w_codes.to(dtype).contiguous()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # TF32 would break exactness on GPUs
        acc = F.conv2d(x, w, padding=1).round().to(torch.int32)
        if offset:
            ones = torch.ones(1, *x.shape[1:], dtype=dtype, device=x.device)
            acc += offset * F.conv2d(ones, w, padding=1).round().to(torch.int32)
    return acc.permute(0, 2, 3, 1).contiguous()


def epilogue(acc: torch.Tensor, mult: torch.Tensor, bias: torch.Tensor, relu: bool = False,
             residual: torch.Tensor | None = None, res_scale: float = 1.0,
             out_quant: ActQuant | None = None) -> torch.Tensor:
    """int32 accumulators (N,H,W,Cout) -> fp32 (N,H,W,Cout) or int32 codes when ``out_quant``.

    Each step is one fp32 operation, in this order, so every backend can reproduce it exactly.
    """
    y = acc.to(torch.float32) * mult.to(torch.float32)
    y = y + bias.to(torch.float32)
    if relu:
        y = torch.clamp_min(y, 0.0)
    if residual is not None:
        if res_scale != 1.0:
            y = y * torch.tensor(res_scale, dtype=torch.float32)
        y = residual.to(torch.float32) + y
    return quantize(y, out_quant) if out_quant is not None else y


def packed_conv3x3(x_packed: torch.Tensor, a_bits: int, a_signed: bool, w_codes: torch.Tensor, mult: torch.Tensor,
                   bias: torch.Tensor, relu: bool = False, residual: torch.Tensor | None = None,
                   res_scale: float = 1.0, out_quant: ActQuant | None = None) -> torch.Tensor:
    """The fused op: unpack -> int conv -> epilogue -> (re-quantize + pack | fp32).

    ``a_bits`` is the input's code width or container: only the container (:func:`container_bits`)
    matters here. Returns packed uint8 NHWC when ``out_quant`` is given (in ``out_quant.container``),
    else fp32 NHWC.
    """
    codes = unpack_codes(x_packed, container_bits(a_bits), a_signed)
    acc = conv3x3_int(codes, w_codes)
    out = epilogue(acc, mult, bias, relu, residual, res_scale, out_quant)
    if out_quant is None:
        return out
    return pack_codes(out, out_quant.container)


def quantize_pack(x: torch.Tensor, q: ActQuant) -> torch.Tensor:
    """fp32 (or fp16 / bf16) NHWC -> packed uint8 NHWC codes of ``q`` (in ``q.container``)."""
    return pack_codes(quantize(x, q), q.container)
