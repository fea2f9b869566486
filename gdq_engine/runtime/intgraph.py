"""The quantized body as an integer graph (reference backend), one bit class per call.

For residual-block bodies (EDSR, MSRResNet): per block, per activation bit-width ``b``::

    codes_in  = quantize(x, in_q[b])                      signed, b bits, packed
    codes_mid = requant(relu(conv1(codes_in) * m1 + b1))  unsigned, b bits, packed
    x         = x + res_scale * (conv2(codes_mid) * m2 + b2)   fp32 residual stream

Weights are w_bits per output channel, prepared once. Head, body-end conv, upsampler and tail stay
FP (Granular-DQ's placement).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import SRModel
from ..ops import reference
from ..quant.calibrate import dobi_scale
from ..quant.quantizer import ActQuant, quantize_weight


@dataclass
class QuantBlock:
    """One residual block's integer parameters (weights shared by every activation bit-width)."""

    w1: torch.Tensor
    s_w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    s_w2: torch.Tensor
    b2: torch.Tensor
    res_scale: float


def _blocks_of(model: SRModel) -> list:
    blocks = list(model.body)
    if not blocks or not all(hasattr(b, "conv1") and hasattr(b, "conv2") for b in blocks):
        raise NotImplementedError(f"{model.arch}: only residual-block bodies (EDSR, MSRResNet) are quantized so far")
    return blocks


def prepare_blocks(model: SRModel, w_bits: int = 8) -> list[QuantBlock]:
    """Quantize every block's conv weights (per output channel) once."""
    out = []
    for blk in _blocks_of(model):
        w1, s1 = quantize_weight(blk.conv1.weight, w_bits)
        w2, s2 = quantize_weight(blk.conv2.weight, w_bits)
        out.append(QuantBlock(w1.contiguous(), s1, blk.conv1.bias.detach().float(), w2.contiguous(), s2,
                              blk.conv2.bias.detach().float(),
                              float(getattr(blk, "res_scale", 1.0))))
    return out


@torch.no_grad()
def collect_block_activations(model: SRModel, lr_patches: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """FP activations seen by the quantizers: per block (block input, post-ReLU conv1 output)."""
    blocks = _blocks_of(model)
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]
    hooks = []
    for i, blk in enumerate(blocks):
        hooks.append(blk.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0].detach().float())))
        hooks.append(blk.conv1.register_forward_hook(
            lambda m, args, out, i=i: seen[i].append(torch.relu(out).detach().float())))
    try:
        model(lr_patches)
    finally:
        for h in hooks:
            h.remove()
    return [(s[0], s[1]) for s in seen]


QuantizerPairs = dict[int, list[tuple[ActQuant, ActQuant]]]  # bits -> per block (input, mid)


def calibrate(model: SRModel, lr_patches: torch.Tensor, bits: tuple[int, ...]) -> QuantizerPairs:
    """DOBI scales for every block's two quantizers at every bit-width in ``bits``."""
    acts = collect_block_activations(model, lr_patches)
    return {b: [(ActQuant(b, True, dobi_scale(x_in, b, True)), ActQuant(b, False, dobi_scale(mid, b, False)))
                for x_in, mid in acts] for b in bits}


class IntegerBody:
    """Runs the quantized blocks on the reference backend: ``body(feat, bits)``.

    Args:
        blocks: from :func:`prepare_blocks`.
        act_quants: bit-width -> per block (input quantizer, mid quantizer), from :func:`calibrate`.
    """

    def __init__(self, blocks: list[QuantBlock], act_quants: dict[int, list[tuple[ActQuant, ActQuant]]]):
        for b, qs in act_quants.items():
            if len(qs) != len(blocks):
                raise ValueError(f"{len(qs)} quantizer pairs for {b} bits but {len(blocks)} blocks")
        self.blocks, self.act_quants = blocks, act_quants

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(sorted(self.act_quants))

    def __call__(self, feat: torch.Tensor, bits: int) -> torch.Tensor:
        """(N,F,H,W) fp32 block-stack input -> (N,F,H,W) fp32 block-stack output at ``bits``."""
        if bits not in self.act_quants:
            raise ValueError(f"no calibrated quantizers for {bits} bits; calibrated: {self.bits}")
        x = feat.to(torch.float32).permute(0, 2, 3, 1).contiguous()
        for blk, (q_in, q_mid) in zip(self.blocks, self.act_quants[bits]):
            packed = reference.quantize_pack(x, q_in)
            m1 = torch.tensor(q_in.scale, dtype=torch.float32) * blk.s_w1
            mid = reference.packed_conv3x3(packed, q_in.bits, True, blk.w1, m1, blk.b1, relu=True, out_quant=q_mid)
            m2 = torch.tensor(q_mid.scale, dtype=torch.float32) * blk.s_w2
            x = reference.packed_conv3x3(mid, q_mid.bits, False, blk.w2, m2, blk.b2, residual=x,
                                         res_scale=blk.res_scale)
        return x.permute(0, 3, 1, 2).contiguous()
