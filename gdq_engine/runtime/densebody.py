"""RDN's residual dense blocks on the integer path, one bit class per call.

A dense layer convolves the concatenation of the block input (signed codes: the residual stream)
and every earlier layer's post-ReLU output (unsigned codes), each segment with its own DOBI scale.
One int32 sum needs one scale per input, so each segment is convolved on its own and the
segments' fp32 results are summed in a fixed order (docs/numerics.md, "Dense blocks"). Per block,
per activation width ``b``, with ``q[0]`` the block input's signed quantizer and ``q[j]`` layer
``j``'s unsigned one::

    seg[0] = quantize(x, q[0])
    layer i = 1..C:  p = acc(seg[0]) * m[i][0] + bias[i]
                     p = p + acc(seg[j]) * m[i][j]                  j = 1 .. i-1, in order
                     seg[i] = quantize(p, q[i])    (unsigned: a negative p clamps to code 0 = ReLU)
    fusion (1x1):    x = x + (acc(seg[0]) * f[0] + bias)
                     x = x + acc(seg[j]) * f[j]                     j = 1 .. C, in order

``acc`` is a segment's exact int32 conv, ``m[i][j] = fp32(s_j) * s_w[o]`` with the layer's
per-output-channel weight scales (one set over all segments, as in the FP conv). Every line is one
``packed_conv3x3`` of the backend (fp32 out; a later segment adds the partial sum as its
residual), so every backend computes the same values bit for bit. The 1x1 fusion conv runs as a
3x3 conv whose weights are zero outside the centre tap (exact; 9x that layer's MACs), or, on a
backend whose ``packed_conv3x3`` takes 1x1 weights (``CONV1X1``: the C++ one), as a 1x1 conv:
the same int32 sums, so the same values.
The residual stream and the body's output (every block's output, concatenated: the global
fusion's input) are fp32.

On a backend with a dense conv (``dense_conv``: the Triton one) and codes one per byte, each
layer and each fusion conv runs as one launch over all its segments instead (``fused``): the
same operations in the same order with the partial sum in registers, so the same bits, without
the chain's fp32 partial sums in memory (layer ``i`` of the chain reads and writes ``i`` of them).
A block's codes then live in one buffer, (N, H, W, G0 + C * G) bytes, each layer writing its
segment in place, and each fusion conv (a real 1x1 conv there) writes its block's slice of the
body's output and the next block's input codes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..quant.quantizer import ActQuant, quantize_weight
from .graphs import GraphCache

# Whether dense bodies run their convs as one launch over all segments where the backend can
# (``DenseIntegerBody(fused=None)``); GDQ_DENSE_FUSED=0 keeps the segment chain (A/B runs).
FUSED = os.environ.get("GDQ_DENSE_FUSED", "1") != "0"


def is_dense_block(block: nn.Module) -> bool:
    """Whether ``block`` is a residual dense block (``convs`` of dense layers, a ``fuse`` 1x1 conv)."""
    fuse = getattr(block, "fuse", None)
    return (hasattr(block, "convs") and all(hasattr(layer, "conv") for layer in block.convs)
            and isinstance(fuse, nn.Conv2d) and fuse.kernel_size == (1, 1) and fuse.groups == 1)


def has_dense_body(model: nn.Module) -> bool:
    """Whether ``model.body`` is a non-empty list of residual dense blocks (RDN)."""
    blocks = list(getattr(model, "body", []))
    return bool(blocks) and all(is_dense_block(b) for b in blocks)


def dense_quantized_convs(block: nn.Module) -> list[nn.Conv2d]:
    """The block's dense-layer convs, in order: each one's post-ReLU output is a quantized segment."""
    return [layer.conv for layer in block.convs]


@dataclass
class DenseConv:
    """One quantized conv over concatenated segments: int8 (Cout, C_j, k, k) codes per segment (k = 3,
    or 1 for the fusion conv),
    fp32 (Cout,) weight scales (shared by the segments), bias (the first segment's) and zeros (the
    later segments' bias)."""

    segments: list[torch.Tensor]
    s_w: torch.Tensor
    bias: torch.Tensor
    zeros: torch.Tensor


@dataclass
class DenseQuantBlock:
    """One residual dense block's integer parameters: its C dense layers and the fusion conv."""

    layers: list[DenseConv]
    fuse: DenseConv


def _split(conv: nn.Conv2d, widths: list[int], w_bits: int) -> DenseConv:
    codes, s_w = quantize_weight(conv.weight, w_bits)  # per output channel, over every segment
    bounds = [0]
    for w in widths:
        bounds.append(bounds[-1] + w)
    if bounds[-1] != codes.shape[1]:
        raise ValueError(f"segments of {widths} channels for a conv of {codes.shape[1]} inputs")
    segments = [codes[:, a:b].contiguous() for a, b in zip(bounds, bounds[1:])]
    bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros(codes.shape[0])
    return DenseConv(segments, s_w, bias.to(s_w.device), torch.zeros_like(s_w))


def prepare_dense_blocks(model: nn.Module, w_bits: int = 8) -> list[DenseQuantBlock]:
    """Quantize every dense block's weights (per output channel) once and split them by segment."""
    if not has_dense_body(model):
        raise ValueError(f"{type(model).__name__} has no residual dense blocks")
    out = []
    for block in model.body:
        convs = dense_quantized_convs(block)
        n_in = convs[0].in_channels
        widths = [n_in]
        layers = []
        for conv in convs:
            layers.append(_split(conv, widths, w_bits))
            widths = widths + [conv.out_channels]
        out.append(DenseQuantBlock(layers, _split(block.fuse, widths, w_bits)))
    return out


class DenseIntegerBody:
    """Runs RDN's quantized dense blocks: ``body(x, bits)``, on the ``reference``, ``cpp``,
    ``triton`` or ``cuda`` backend; every backend gives the same values bit for bit.

    The interface of :class:`~gdq_engine.runtime.intgraph.IntegerBody` (what the scheduler and the
    Engine call), for dense blocks. Not for concurrent calls from several threads.

    Args:
        blocks: from :func:`prepare_dense_blocks`.
        act_quants: bit-width -> per block (input quantizer, then one per dense layer), from
            :func:`~gdq_engine.runtime.intgraph.calibrate`.
        backend: as :class:`~gdq_engine.runtime.intgraph.IntegerBody`'s.
        cuda_graphs: on CUDA, one graph per (bits, batch bucket, shape), as IntegerBody's.
        containers: ``"packed"`` or ``"bytes"`` (:func:`~gdq_engine.runtime.intgraph.in_containers`);
            the padded layout is not supported here.
        fused: run each conv as one launch over all its segments where the backend has a dense
            conv and the codes are bytes (module docstring); None: :data:`FUSED`. Same results.
    """

    MAX_GRAPHS = 32

    def __init__(self, blocks: list[DenseQuantBlock], act_quants: dict[int, list[tuple[ActQuant, ...]]],
                 backend: str = "reference", cuda_graphs: bool = False, containers: str = "packed",
                 fused: bool | None = None):
        from .intgraph import _backend_module, in_containers

        if containers == "padded":
            raise ValueError("containers='padded' is for residual-block bodies; dense blocks run 'packed' or 'bytes'")
        for b, qs in act_quants.items():
            if len(qs) != len(blocks):
                raise ValueError(f"{len(qs)} quantizer sets for {b} bits but {len(blocks)} blocks")
            for blk, q in zip(blocks, qs):
                if len(q) != 1 + len(blk.layers) or not q[0].signed or any(m.signed for m in q[1:]):
                    raise ValueError(f"a dense block of {len(blk.layers)} layers needs a signed input quantizer "
                                     f"and {len(blk.layers)} unsigned ones, got {q}")
        self.blocks, self.act_quants = blocks, in_containers(act_quants, containers)
        self.containers, self.backend = containers, backend
        self._ops = _backend_module(backend)
        # Epilogue multipliers m = fp32(s_segment) * fp32(s_w[o]), once per (bits, block, conv, segment).
        self._mults = {b: [[[torch.tensor(q.scale, dtype=torch.float32) * conv.s_w.float()
                             for q in qs[: len(conv.segments)]] for conv in (*blk.layers, blk.fuse)]
                           for blk, qs in zip(blocks, act_quants[b])] for b in act_quants}
        self._mult_rows = {b: [[torch.stack(ms) for ms in blk] for blk in per_block]  # (segments, Cout) each
                           for b, per_block in self._mults.items()}
        self._weights: dict[tuple[int, int], list] = {}
        self.fused = FUSED if fused is None else bool(fused)
        self._dense_weights: list | None = None
        self.graphs = GraphCache(self.MAX_GRAPHS, pool_of=lambda bits: bits) if cuda_graphs else None

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(sorted(self.act_quants))

    def stream_dtype(self, feat_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the residual stream and of the result: fp32 for any input dtype."""
        return torch.float32

    def _weights_for(self, in_bits: int, mid_bits: int) -> list:
        """Per block, per conv, per segment: weights in the backend's form for the segment's container
        (a 1x1 conv's as the centre tap of 3x3 ones where the backend takes no 1x1 weights)."""
        key = (in_bits, mid_bits)
        if key not in self._weights:
            prep = getattr(self._ops, "prepare_conv_weight", None) or (lambda w, bits: w)
            conv1x1 = getattr(self._ops, "CONV1X1", False)

            def form(w: torch.Tensor, bits: int):
                if w.shape[2:] == (1, 1) and not conv1x1:
                    w = nn.functional.pad(w, (1, 1, 1, 1))  # the same sums
                return prep(w, bits)

            self._weights[key] = [[[form(w, in_bits if j == 0 else mid_bits) for j, w in enumerate(conv.segments)]
                                   for conv in (*blk.layers, blk.fuse)] for blk in self.blocks]
        return self._weights[key]

    def __call__(self, feat: torch.Tensor, bits: int) -> torch.Tensor:
        """(N,G0,H,W) input of the first dense block -> (N, D * G0, H, W) fp32: every block's output,
        concatenated along channels (in channels_last memory), at activation width ``bits``."""
        if bits not in self.act_quants:
            raise ValueError(f"no calibrated quantizers for {bits} bits; calibrated: {self.bits}")
        if self.graphs is not None:
            return self.graphs(bits, feat, lambda f: self.run_eager(f, bits))
        return self.run_eager(feat, bits)

    def run_layerwise(self, feat: torch.Tensor, policy, grads: torch.Tensor):
        """Per-layer policies (CADyQ) are not run on dense blocks: raises ``NotImplementedError``."""
        raise NotImplementedError("per-layer bit-widths (CADyQ) run on residual-block bodies (EDSR, MSRResNet); "
                                  "dense blocks run patch-wise policies")

    def runs_fused(self, device: torch.device) -> bool:
        """Whether :meth:`run_eager` runs each conv as one launch over its segments on ``device``:
        ``fused`` is on, the backend has a dense conv that takes these widths, and codes are bytes."""
        applies = getattr(self._ops, "dense_conv_applies", None)
        if not self.fused or applies is None or self.containers != "bytes" or not self.blocks:
            return False
        blk = self.blocks[0]
        g0, growth = blk.fuse.s_w.shape[0], blk.layers[0].s_w.shape[0] if blk.layers else 0
        return bool(blk.layers) and applies(g0, growth, growth, device) and applies(g0, growth, g0, device)

    def run_eager(self, feat: torch.Tensor, bits: int) -> torch.Tensor:
        """:meth:`__call__` without CUDA graphs."""
        from .intgraph import reads_signed

        ops, quants = self._ops, self.act_quants[bits]
        if not quants:
            raise ValueError("a dense body needs at least one block")
        if self.runs_fused(feat.device):
            return self._run_fused(feat.float().permute(0, 2, 3, 1).contiguous(), bits)
        weights = self._weights_for(quants[0][0].container, quants[0][1].container)
        x = feat.float().permute(0, 2, 3, 1).contiguous()
        outs = []
        for blk, qs, ws, ms in zip(self.blocks, quants, weights, self._mults[bits]):
            segs = [ops.quantize_pack(x, qs[0])]
            signed = [True]
            for i, (conv, w, m) in enumerate(zip(blk.layers, ws, ms)):
                p = self._segment_sum(ops, conv, segs, signed, qs, w, m, None)
                segs.append(ops.quantize_pack(p, qs[i + 1]))
                signed.append(reads_signed(ops, qs[i + 1]))
            x = self._segment_sum(ops, blk.fuse, segs, signed, qs, ws[-1], ms[-1], x)
            outs.append(x)
        return torch.cat(outs, dim=-1).permute(0, 3, 1, 2)  # NCHW view of the NHWC result: channels_last

    def _fused_weights(self) -> list:
        """Per block, per conv (layers, then the fusion): the backend's dense weights (made once)."""
        if self._dense_weights is None:
            prep = self._ops.prepare_dense_weight
            self._dense_weights = [[prep(conv.segments) for conv in (*blk.layers, blk.fuse)] for blk in self.blocks]
        return self._dense_weights

    def _run_fused(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        """:meth:`run_eager` with one dense-conv launch per conv: ``x`` (N,H,W,G0) fp32 contiguous."""
        from .intgraph import reads_signed

        ops, quants = self._ops, self.act_quants[bits]
        n, h, w, g0 = x.shape
        growth, depth = self.blocks[0].layers[0].s_w.shape[0], len(self.blocks)
        width = g0 + len(self.blocks[0].layers) * growth  # a block's codes: its input, then each layer's
        body = torch.empty((n, h, w, depth * g0), dtype=torch.float32, device=x.device)
        buffers = [torch.empty((n, h, w, width), dtype=torch.uint8, device=x.device) for _ in range(min(2, depth))]
        buffers[0][..., :g0].copy_(ops.quantize_pack(x, quants[0][0]))
        residual = x
        for d, (blk, qs, ws, ms) in enumerate(zip(self.blocks, quants, self._fused_weights(), self._mult_rows[bits])):
            codes = buffers[d % 2]
            shift = not reads_signed(ops, qs[1])  # 8-bit unsigned codes (the later segments all share a width)
            for i, (conv, weight, m) in enumerate(zip(blk.layers, ws, ms)):
                start = g0 + i * growth
                ops.dense_conv(codes, weight, m, conv.bias, out=codes[..., start:start + growth],
                               out_quant=qs[i + 1], shift_later=shift)
            nxt = quants[d + 1][0] if d + 1 < depth else None
            out = body[..., d * g0:(d + 1) * g0]
            ops.dense_conv(codes, ws[-1], ms[-1], blk.fuse.bias, out=out, residual=residual,
                           shift_later=shift, next_quant=nxt,
                           next_codes=None if nxt is None else buffers[(d + 1) % 2][..., :g0])
            residual = out
        return body.permute(0, 3, 1, 2)  # NCHW view of the NHWC result: channels_last

    @staticmethod
    def _segment_sum(ops, conv: DenseConv, segs, signed, qs, weights, mults, residual):
        """fp32 (N,H,W,Cout): the segments' convs summed in order, the bias with the first segment
        (and ``residual``, if given, before it)."""
        in_place = getattr(ops, "OUT_BUFFERS", False)  # the partial sum updated in place (never the stream)
        p = residual
        for j, (codes, w, m) in enumerate(zip(segs, weights, mults)):
            into = {"out": p} if in_place and j > 0 else {}
            p = ops.packed_conv3x3(codes, qs[j].container, signed[j], w, m, conv.bias if j == 0 else conv.zeros,
                                   residual=p, **into)
        return p
