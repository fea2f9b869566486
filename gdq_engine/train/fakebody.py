"""The float training model of the integer body: fake-quantized residual blocks (QAT and DQC).

Each block runs ``x -> Q_in(x) -> conv1 -> ReLU -> Q_mid -> conv2 -> x + res_scale * res`` with the
residual stream in fp32, exactly the integer graph's structure (docs/numerics.md). Weights are
fake-quantized per output channel by :func:`~gdq_engine.quant.quantizer.quantize_weight`'s formula
with a straight-through rounding gradient, so the exported model's integer weight codes are the
ones trained. Activation quantizers are LSQ steps, one per (block, position, bit-width); a
per-patch mixing matrix selects (or, for straight-through estimators, softly weights) the width each
patch runs at, which is how one batch trains every width of a patch-wise policy at once; a mixing
function of the layer and its input does the same per layer (CADyQ). ``depth`` runs only the first
blocks (QuantSR's DQA depth versions) and ``res_scales`` (trainable with ``learn_res_scale``:
DQA's per-block weight beta) scale each block's residual branch, as the engine's ``res_scale``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.fakequant import LSQQuantizer
from ..quant.quantizer import ActQuant, quantize_weight


def fake_quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """(Cout,Cin,kh,kw) float -> the same shape, values ``code * scale`` of the engine's symmetric
    per-channel ``bits``-bit weights (:func:`quantize_weight`); the gradient passes straight
    through (the per-channel scale maps max |w| to the top code, so nothing is clipped)."""
    codes, scale = quantize_weight(w, bits)
    return w + (codes.to(w.dtype) * scale.to(w.dtype).view(-1, 1, 1, 1) - w).detach()


class MixedBitQuant(nn.Module):
    """LSQ quantizers of one activation at several widths.

    ``forward(x, mix)``: ``x`` (N,C,H,W); ``mix`` (N, len(widths)) rows summing to 1 (one-hot values,
    possibly carrying straight-through gradients) or None when there is a single width.
    """

    def __init__(self, widths: tuple[int, ...], signed: bool, steps: list[float]):
        super().__init__()
        self.widths = tuple(int(b) for b in widths)
        self.quants = nn.ModuleList(LSQQuantizer(b, signed, s) for b, s in zip(self.widths, steps))

    def forward(self, x: torch.Tensor, mix: torch.Tensor | None) -> torch.Tensor:
        if mix is None:
            if len(self.quants) != 1:
                raise ValueError(f"{len(self.quants)} widths need a (N, {len(self.quants)}) mixing matrix")
            return self.quants[0](x)
        out = 0
        for k, q in enumerate(self.quants):
            w = mix[:, k].view(-1, 1, 1, 1)
            if w.requires_grad or bool((w != 0).any()):  # unused widths cost nothing without gradients
                out = out + w * q(x)
        return out

    def steps(self) -> list[float]:
        return [float(q.step.detach().abs()) for q in self.quants]


class FakeQuantBody(nn.Module):
    """Fake-quantized residual blocks of ``model`` (an EDSR / SRResNet-style :class:`SRModel`).

    Args:
        model: the FP model; its block convs are used (and trained, if they require grad) in place.
        act_quants: {bits: per block (input, mid) :class:`ActQuant`}: the starting LSQ steps.
        w_bits: weight bit-width (8, 4 or 2).
        learn_res_scale: make the blocks' residual scales a trained parameter (else a buffer).
    """

    def __init__(self, model, act_quants: dict[int, list[tuple[ActQuant, ActQuant]]], w_bits: int,
                 learn_res_scale: bool = False):
        super().__init__()
        from ..runtime.intgraph import has_residual_body

        if not has_residual_body(model):
            raise NotImplementedError(f"{model.arch}: FakeQuantBody runs residual-block bodies (EDSR, MSRResNet); "
                                      "dense blocks train as FakeQuantDenseBody (fake_quant_body picks)")
        self.blocks = list(model.body)
        res_scales = torch.tensor([float(getattr(b, "res_scale", 1.0)) for b in self.blocks])
        if learn_res_scale:
            self.res_scales = nn.Parameter(res_scales)
        else:
            self.register_buffer("res_scales", res_scales)
        self.widths = tuple(sorted(act_quants))
        self.w_bits = int(w_bits)
        self.q_in = nn.ModuleList(MixedBitQuant(self.widths, True, [act_quants[b][i][0].scale for b in self.widths])
                                  for i in range(len(self.blocks)))
        self.q_mid = nn.ModuleList(MixedBitQuant(self.widths, False, [act_quants[b][i][1].scale for b in self.widths])
                                   for i in range(len(self.blocks)))

    def forward(self, feat: torch.Tensor, mix=None, features: list | None = None,
                depth: int | None = None) -> torch.Tensor:
        """(N,F,H,W) block-stack input -> (N,F,H,W) output.

        ``mix``: None (one width), a (N, len(widths)) matrix as in :class:`MixedBitQuant` used by
        every layer (patch-wise, layer-invariant: Granular-DQ), or a callable ``mix(layer, x)`` ->
        that matrix for quantized conv ``layer`` (block i: 2i and 2i+1) from its FP input ``x``
        (N,F,H,W) (per layer: CADyQ). ``features``: if a list, each block's output is appended.
        ``depth``: run only the first ``depth`` blocks (default: all).
        """
        x = feat
        stack = list(zip(self.blocks, self.q_in, self.q_mid))[:depth]
        for i, (blk, q_in, q_mid) in enumerate(stack):
            c1, c2 = blk.conv1, blk.conv2
            m_in = mix(2 * i, x) if callable(mix) else mix
            mid = F.relu(F.conv2d(q_in(x, m_in), fake_quantize_weight(c1.weight, self.w_bits), c1.bias, padding=1))
            m_mid = mix(2 * i + 1, mid) if callable(mix) else mix
            res = F.conv2d(q_mid(mid, m_mid), fake_quantize_weight(c2.weight, self.w_bits), c2.bias, padding=1)
            x = x + res * self.res_scales[i]
            if features is not None:
                features.append(x)
        return x

    def act_quants(self) -> dict[int, list[tuple[ActQuant, ActQuant]]]:
        """The trained steps as the engine's quantizers."""
        from ..quantized import act_quants_from_scales

        per_block = [list(zip(q_in.steps(), q_mid.steps())) for q_in, q_mid in zip(self.q_in, self.q_mid)]
        return act_quants_from_scales(self.widths, [[pair[k] for pair in per_block] for k in range(len(self.widths))])


def fake_quant_body(model, act_quants: dict[int, list[tuple[ActQuant, ...]]], w_bits: int,
                    learn_res_scale: bool = False) -> nn.Module:
    """The fake-quantized body of ``model``'s integer body: :class:`FakeQuantBody` for residual
    blocks (EDSR, MSRResNet), :class:`~gdq_engine.train.fakedense.FakeQuantDenseBody` for RDN's
    dense blocks (which have no residual scales: ``learn_res_scale`` raises there). Either maps
    the blocks' input to what the FP ``run_blocks`` returns."""
    from ..runtime.densebody import has_dense_body

    if has_dense_body(model):
        from .fakedense import FakeQuantDenseBody

        if learn_res_scale:
            raise NotImplementedError("dense blocks have no residual scales (nor depth versions) to train")
        return FakeQuantDenseBody(model, act_quants, w_bits)
    return FakeQuantBody(model, act_quants, w_bits, learn_res_scale)
