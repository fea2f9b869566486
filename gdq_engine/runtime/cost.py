"""Analytic cost of a patch: MACs of quantized and FP convolutions, BitOPs (Granular-DQ's metric),
and the largest activation (what bounds the batch size)."""

from __future__ import annotations

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
