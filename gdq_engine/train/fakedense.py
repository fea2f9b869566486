"""The float training model of RDN's integer dense blocks: fake-quantized residual dense blocks.

The structure of :class:`~gdq_engine.runtime.densebody.DenseIntegerBody` (docs/numerics.md, "RDN's
residual dense blocks") in float: per block, the input (the fp32 residual stream) is quantized by a
signed quantizer, each dense layer's post-ReLU output by its own unsigned one, and every conv reads
the concatenation of those quantized segments; the 1x1 fusion's output is added to the unquantized
block input. Weights are fake-quantized per output channel over all their input channels, as the
engine quantizes them (:func:`~gdq_engine.train.fakebody.fake_quantize_weight`), so the exported
integer codes are the trained ones. Activation quantizers are LSQ steps, one per (block, segment,
bit-width), mixed per patch as in :class:`~gdq_engine.train.fakebody.FakeQuantBody` (Granular-DQ's
patch-wise, layer-invariant widths). Not here: per-layer widths (CADyQ), depth versions and
residual scales, which dense blocks do not run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.quantizer import ActQuant
from .fakebody import MixedBitQuant, fake_quantize_weight


class FakeQuantDenseBody(nn.Module):
    """Fake-quantized residual dense blocks of ``model`` (an :class:`~gdq_engine.models.RDN`).

    Args:
        model: the FP model; its block convs are used (and trained, if they require grad) in place.
        act_quants: {bits: per block (input, layer 1, .., layer C) :class:`ActQuant`}: the starting
            LSQ steps (:meth:`gdq_engine.quantized.QuantizedSR.act_quants`).
        w_bits: weight bit-width (8, 4 or 2).
    """

    def __init__(self, model, act_quants: dict[int, list[tuple[ActQuant, ...]]], w_bits: int):
        super().__init__()
        from ..runtime.densebody import has_dense_body

        if not has_dense_body(model):
            raise ValueError(f"{type(model).__name__} has no residual dense blocks")
        self.blocks = list(model.body)
        self.widths = tuple(sorted(act_quants))
        self.w_bits = int(w_bits)
        for b in self.widths:
            if len(act_quants[b]) != len(self.blocks) or any(
                    len(qs) != 1 + len(blk.convs) for qs, blk in zip(act_quants[b], self.blocks)):
                raise ValueError(f"{b}-bit quantizers do not match the blocks: one input and one per dense layer "
                                 "per block")
        self.quants = nn.ModuleList(
            nn.ModuleList(MixedBitQuant(self.widths, k == 0, [act_quants[b][i][k].scale for b in self.widths])
                          for k in range(1 + len(blk.convs)))
            for i, blk in enumerate(self.blocks))

    def forward(self, feat: torch.Tensor, mix: torch.Tensor | None = None, features: list | None = None,
                depth: int | None = None) -> torch.Tensor:
        """(N,G0,H,W) input of the first block -> (N, D*G0, H, W): every block's output,
        concatenated along channels (the global fusion's input), as the FP ``run_blocks``.

        ``mix``: None (one width) or a (N, len(widths)) matrix used by every layer (patch-wise,
        layer-invariant). ``features``: if a list, each block's output is appended. ``depth``: only
        None (or every block): dense blocks have no depth versions.
        """
        if callable(mix):
            raise NotImplementedError("per-layer bit-widths (CADyQ) run on residual-block bodies (EDSR, MSRResNet); "
                                      "dense blocks train patch-wise policies")
        if depth is not None and depth != len(self.blocks):
            raise NotImplementedError("dense blocks have no depth versions: RDN's global fusion reads every block")
        x, outs = feat, []
        for blk, quants in zip(self.blocks, self.quants):
            segments = [quants[0](x, mix)]
            for layer, quant in zip(blk.convs, quants[1:]):
                conv = layer.conv
                p = F.conv2d(torch.cat(segments, 1), fake_quantize_weight(conv.weight, self.w_bits), conv.bias,
                             padding=1)
                segments.append(quant(F.relu(p), mix))
            fuse = blk.fuse
            x = x + F.conv2d(torch.cat(segments, 1), fake_quantize_weight(fuse.weight, self.w_bits), fuse.bias)
            outs.append(x)
            if features is not None:
                features.append(x)
        return torch.cat(outs, 1)

    def act_quants(self) -> dict[int, list[tuple[ActQuant, ...]]]:
        """The trained steps as the engine's quantizers (per width, per block: input, then each layer)."""
        from ..quantized import act_quants_from_scales

        per_block = [list(zip(*(q.steps() for q in quants))) for quants in self.quants]  # [block][width] -> steps
        return act_quants_from_scales(self.widths, [[steps[k] for steps in per_block]
                                                    for k in range(len(self.widths))])
