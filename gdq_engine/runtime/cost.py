"""Analytic cost of a patch: MACs of quantized and FP convolutions, BitOPs (Granular-DQ's metric)."""

from __future__ import annotations

import torch
from torch import nn

from ..models import SRModel

_CACHE: dict[tuple, tuple[int, int]] = {}


def conv_macs(model: SRModel, height: int, width: int) -> tuple[int, int]:
    """(MACs in the quantized body convs, MACs in all other convs) for one height x width LR patch.

    Cached by architecture, config and size (not by model object, so no model is kept alive)."""
    key = (model.arch, repr(sorted(model.config.items())), int(height), int(width))
    if key not in _CACHE:
        if len(_CACHE) >= 256:
            _CACHE.clear()
        _CACHE[key] = _count_macs(model, height, width)
    return _CACHE[key]


def _count_macs(model: SRModel, height: int, width: int) -> tuple[int, int]:
    body_convs = {id(m) for m in model.body.modules() if isinstance(m, nn.Conv2d)}
    totals = {"q": 0, "fp": 0}
    hooks = []

    def hook(mod, args, out):
        macs = out.shape[-2] * out.shape[-1] * out.shape[1] * (mod.in_channels // mod.groups) * mod.kernel_size[0] * \
            mod.kernel_size[1]
        totals["q" if id(mod) in body_convs else "fp"] += macs

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(hook))
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, 3, height, width, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    return totals["q"], totals["fp"]


def bitops(q_macs: int, fp_macs: int, a_bits: int | None, w_bits: int = 8) -> int:
    """Sum of MAC x b_w x b_a; FP convs count 32 x 32 (and the body too when ``a_bits`` is None)."""
    if a_bits is None:
        return (q_macs + fp_macs) * 32 * 32
    return q_macs * w_bits * a_bits + fp_macs * 32 * 32
