"""Analytic cost of a patch: MACs of quantized and FP convolutions, BitOPs (Granular-DQ's metric),
and the largest activation (what bounds the batch size); and a model's storage in bytes."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models import SRModel

_CACHE: dict[tuple, dict[str, int]] = {}


def _probe(model: SRModel, height: int, width: int) -> dict[str, int]:
    """One forward of a zero patch, cached by architecture, config and size (not by model object,
    so no model is kept alive): quantized-body MACs, other MACs, largest module output (elements)."""
    integer_tail = tuple(n for n, m in model.named_modules()
                         if getattr(m, "is_integer_conv", False) or hasattr(m, "integer_macs"))
    key = (model.arch, repr(sorted(model.config.items())), integer_tail, int(height), int(width))
    if key not in _CACHE:
        if len(_CACHE) >= 256:
            _CACHE.clear()
        _CACHE[key] = _count(getattr(model, "_orig_mod", model), height, width)  # torch.compile'd: probe eagerly
    return _CACHE[key]


def conv_macs(model: SRModel, height: int, width: int) -> tuple[int, int]:
    """(MACs in the quantized body convs, MACs in all other convs, integer-tail convs included) for
    one height x width LR patch."""
    probe = _probe(model, height, width)
    return probe["q_macs"], probe["fp_macs"] + probe["tail_macs"]


def integer_tail_macs(model: SRModel, height: int, width: int) -> int:
    """MACs of one height x width LR patch in the model's integer-tail convs
    (:class:`~gdq_engine.runtime.inttail.IntegerConv`; 0 when the tail runs FP)."""
    return _probe(model, height, width)["tail_macs"]


def largest_activation(model: SRModel, height: int, width: int) -> int:
    """Elements of the largest tensor a module of ``model`` outputs for one height x width LR patch
    (for EDSR x4: the second upsampler conv's 256 channels at 2x the patch side)."""
    return _probe(model, height, width)["peak"]


def _count(model: SRModel, height: int, width: int) -> dict[str, int]:
    body_convs = {id(m) for m in model.body.modules() if isinstance(m, nn.Conv2d)}
    totals = {"q_macs": 0, "fp_macs": 0, "tail_macs": 0, "peak": 0}
    hooks = []

    def conv_hook(mod, args, out):
        macs = out.shape[-2] * out.shape[-1] * out.shape[1] * (mod.in_channels // mod.groups) * mod.kernel_size[0] * \
            mod.kernel_size[1]
        if id(mod) in body_convs:
            totals["q_macs"] += macs
        else:
            totals["tail_macs" if getattr(mod, "is_integer_conv", False) else "fp_macs"] += macs

    def fused_hook(mod, args, out):  # e.g. IntegerUpsampler: its convs run inside one forward
        totals["tail_macs"] += mod.integer_macs(args[0].shape)

    def size_hook(mod, args, out):
        if torch.is_tensor(out):
            totals["peak"] = max(totals["peak"], out.numel())

    for m in model.modules():
        if isinstance(m, nn.Conv2d) or getattr(m, "is_integer_conv", False):
            hooks.append(m.register_forward_hook(conv_hook))
        elif hasattr(m, "integer_macs"):
            hooks.append(m.register_forward_hook(fused_hook))
        hooks.append(m.register_forward_hook(size_hook))
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, 3, height, width, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    return totals


def bitops(q_macs: int, fp_macs: int, a_bits: int | None, w_bits: int = 8, tail_macs: int = 0,
           tail_bits: int | None = None) -> int:
    """Sum of MAC x b_w x b_a; FP convs count 32 x 32 (and the body too when ``a_bits`` is None).
    ``tail_macs`` of ``fp_macs`` run on the integer tail at ``tail_bits`` x 8 (weights) instead."""
    if a_bits is None:
        return (q_macs + fp_macs) * 32 * 32
    tail = tail_macs * 8 * tail_bits if tail_bits is not None else tail_macs * 32 * 32
    return q_macs * w_bits * a_bits + (fp_macs - tail_macs) * 32 * 32 + tail


def model_bytes(model: nn.Module, packed: dict[nn.Conv2d, int] | None = None, extra_fp32: int = 0,
                leave_out: tuple[nn.Module, ...] = ()) -> dict[str, int]:
    """A model's storage, counted exactly in bytes (not the fp32 size divided by a bit-width).

    ``packed``: the convs stored as integer codes, each with its weight bit-width. Each one holds its
    codes packed to that width (``ceil(numel * bits / 8)``), plus one fp32 scale and one fp32 bias per
    output channel. Every other parameter of ``model`` is fp32, 4 bytes, as are ``extra_fp32`` more
    values (activation scales, a policy's controller). The parameters of the ``leave_out`` modules
    (blocks a depth version does not run) are not counted.

    Returns:
        ``packed_weights`` (the codes), ``scales_and_biases`` (the packed convs' fp32 scales and biases),
        ``fp32`` (everything else) and ``total``.
    """
    packed = packed or {}
    skip = {id(p) for conv in packed for p in (conv.weight, conv.bias) if p is not None}
    skip |= {id(p) for module in leave_out for p in module.parameters()}
    codes = sum(math.ceil(conv.weight.numel() * bits / 8) for conv, bits in packed.items())
    per_channel = sum(4 * conv.out_channels * 2 for conv in packed)
    fp32 = 4 * (sum(p.numel() for p in model.parameters() if id(p) not in skip) + extra_fp32)
    return {"packed_weights": codes, "scales_and_biases": per_channel, "fp32": fp32,
            "total": codes + per_channel + fp32}
