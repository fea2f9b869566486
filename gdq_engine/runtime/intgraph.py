"""The quantized body as an integer graph, one bit class per call (reference or Triton backend).

For residual-block bodies (EDSR, MSRResNet): per block, per activation bit-width ``b``::

    codes_in  = quantize(x, in_q[b])                      signed, b bits, packed
    codes_mid = requant(relu(conv1(codes_in) * m1 + b1))  unsigned, b bits, packed
    x         = x + res_scale * (conv2(codes_mid) * m2 + b2)   residual stream (fp32, or fp16 / bf16
                                                               rounded per block: ``stream_dtypes``)

Weights are w_bits per output channel, prepared once. Head, body-end conv, upsampler and tail stay
FP (Granular-DQ's placement).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from ..models import SRModel
from ..ops import reference
from ..quant.calibrate import dobi_scale
from ..quant.quantizer import ActQuant, quantize_weight
from .densebody import dense_quantized_convs, has_dense_body, is_dense_block
from .graphs import GraphCache, capturing
from .scheduler import bit_groups


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


def has_residual_body(model: SRModel) -> bool:
    """Whether the model's blocks are residual blocks of conv1 and conv2 (EDSR, MSRResNet): what
    :class:`IntegerBody` runs."""
    blocks = list(model.body)
    return bool(blocks) and all(hasattr(b, "conv1") and hasattr(b, "conv2") for b in blocks)


def has_integer_body(model: SRModel) -> bool:
    """Whether an integer body runs this model's blocks: residual blocks (:class:`IntegerBody`) or
    RDN's residual dense blocks (:class:`~gdq_engine.runtime.densebody.DenseIntegerBody`)."""
    return has_residual_body(model) or has_dense_body(model)


def _blocks_of(model: SRModel) -> list:
    if not has_residual_body(model):
        raise NotImplementedError(f"{model.arch}: this takes residual-block bodies (EDSR, MSRResNet); dense blocks "
                                  "(RDN) run on runtime.densebody")
    return list(model.body)


def _quantized_convs(block) -> list:
    """The convs of a block whose post-ReLU outputs are quantized (unsigned codes), in order."""
    return dense_quantized_convs(block) if is_dense_block(block) else [block.conv1]


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
def collect_block_activations(model: SRModel, lr_patches: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """FP activations seen by the quantizers: per block (block input, then each quantized conv's
    post-ReLU output: conv1's for a residual block, every dense layer's for a dense block)."""
    if not has_integer_body(model):
        raise NotImplementedError(f"{model.arch}: only residual-block (EDSR, MSRResNet) and residual dense "
                                  "(RDN) bodies are quantized")
    blocks = list(model.body)
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]
    hooks = []
    for i, blk in enumerate(blocks):
        hooks.append(blk.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0].detach().float())))
        for conv in _quantized_convs(blk):
            hooks.append(conv.register_forward_hook(
                lambda m, args, out, i=i: seen[i].append(torch.relu(out).detach().float())))
    try:
        model(lr_patches)
    finally:
        for h in hooks:
            h.remove()
    return [tuple(s) for s in seen]


# bits -> per block (signed input quantizer, then the unsigned ones: (input, mid) for a residual block)
QuantizerPairs = dict[int, list[tuple[ActQuant, ...]]]


def calibrate(model: SRModel, lr_patches: torch.Tensor, bits: tuple[int, ...]) -> QuantizerPairs:
    """DOBI scales for every block's quantizers (:func:`collect_block_activations`: the signed
    input, then the unsigned post-ReLU ones) at every bit-width in ``bits``."""
    acts = collect_block_activations(model, lr_patches)
    return {b: [tuple(ActQuant(b, k == 0, dobi_scale(t, b, k == 0)) for k, t in enumerate(per_block))
                for per_block in acts] for b in bits}


BODY_BACKENDS = ("reference", "cpp", "triton", "cuda")
CONTAINERS = ("packed", "bytes", "padded")


def in_containers(act_quants: QuantizerPairs, containers: str) -> QuantizerPairs:
    """``act_quants`` with their codes stored ``"packed"`` (each width in its smallest container:
    2 -> 2, 3/4 -> 4, 5..8 -> 8 bits per code) or as ``"bytes"`` (every width one code per byte,
    so 2- and 4-bit codes run the 8-bit kernels); ``"padded"`` is ``"bytes"`` in the padded
    layout (:class:`IntegerBody`). The codes, and every value computed from them, are the same
    either way: only bytes moved and the unpacking work differ."""
    if containers not in CONTAINERS:
        raise ValueError(f"unknown containers {containers!r}; choose from {CONTAINERS}")
    if containers == "packed":
        return act_quants
    return {b: [tuple(replace(q, container=8) for q in qs) for qs in per_block]
            for b, per_block in act_quants.items()}


class Workspace:
    """Reused scratch tensors by key (name, shape, dtype, device), least recently used dropped past
    ``capacity``: a fresh multi-megabyte CPU tensor costs a page fault per 4 KiB on first touch,
    and a bounded count keeps memory bounded when image shapes vary (whole-image mode)."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._tensors: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, name, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        key = (name, tuple(shape), dtype, torch.device(device))
        if key in self._tensors:
            self._tensors.move_to_end(key)
        else:
            self._tensors[key] = torch.empty(shape, dtype=dtype, device=device)
            while len(self._tensors) > self.capacity:
                self._tensors.popitem(last=False)
        return self._tensors[key]


def _backend_module(backend: str):
    if backend == "reference":
        return reference
    if backend == "cpp":
        from ..ops import cpu_ops

        if not cpu_ops.available():
            raise RuntimeError("backend='cpp' needs the compiled extension gdq_engine._C; reinstall with "
                               "`pip install --no-build-isolation -e .`")
        return cpu_ops
    if backend == "triton":
        from ..ops import triton_ops

        return triton_ops.kernel_ops()
    if backend == "cuda":
        from ..ops import cuda_ops

        if not cuda_ops.available():
            raise RuntimeError(cuda_ops.unavailable_reason(torch.device("cuda")))
        return cuda_ops
    raise ValueError(f"unknown integer-body backend {backend!r}; choose from {BODY_BACKENDS}")


class IntegerBody:
    """Runs the quantized blocks: ``body(feat, bits)``, on the ``reference``, ``cpp`` or ``triton`` backend.

    All backends compute the same codes and fp32 values bit for bit (docs/numerics.md).

    Not for concurrent calls from several threads: workspaces and CUDA graphs are reused.

    Args:
        blocks: from :func:`prepare_blocks`.
        act_quants: bit-width -> per block (input quantizer, mid quantizer), from :func:`calibrate`.
        backend: ``"reference"`` (pure torch, any device), ``"cpp"`` (C++ CPU kernels, AVX512-VNNI
            where available) or ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        containers: ``"packed"`` or ``"bytes"``, how codes narrower than 8 bits are stored between
            the convs (:func:`in_containers`), or ``"padded"``: bytes, and every tensor between the
            convs in the padded layout, (N, H + 2, W + 2, C) with a zero ring, so the Triton conv
            reads each tap as one shifted box by TMA (``packed_conv3x3(padded=True)``; backends with
            ``PADDED_LAYOUT``, 32k channels). Results are identical.
        stream_dtypes: dtypes the residual stream between blocks may be kept in. Features of one of
            them keep the stream in their dtype: each block's result is rounded to it (nearest
            even) and the next block's codes quantize the rounded values (docs/numerics.md,
            "Residual stream"); other features run an fp32 stream. fp16 / bf16 need a backend
            with ``STREAM_DTYPES`` (reference, triton). Default fp32 only: the contract's fp32 stream.
    """

    MAX_GRAPHS = 32  # captured (bits, batch bucket, shape) variants kept; least recently used dropped first

    def __init__(self, blocks: list[QuantBlock], act_quants: dict[int, list[tuple[ActQuant, ActQuant]]],
                 backend: str = "reference", cuda_graphs: bool = False, containers: str = "packed",
                 stream_dtypes: tuple[torch.dtype, ...] = (torch.float32,)):
        for b, qs in act_quants.items():
            if len(qs) != len(blocks):
                raise ValueError(f"{len(qs)} quantizer pairs for {b} bits but {len(blocks)} blocks")
        self.blocks, self.act_quants = blocks, in_containers(act_quants, containers)
        self.containers = containers
        self.backend = backend
        self._ops = _backend_module(backend)
        self.padded = containers == "padded"
        self.stream_dtypes = _check_stream_dtypes(stream_dtypes, self._ops, backend)
        if self.padded and not getattr(self._ops, "PADDED_LAYOUT", False):
            raise ValueError(f"containers='padded' needs a backend with the padded layout (triton), got {backend!r}")
        if self.padded and any(blk.w1.shape[1] % 32 or blk.w2.shape[1] % 32 for blk in blocks):
            raise ValueError("containers='padded' needs body channels that are a multiple of 32")
        # Epilogue multipliers m = fp32(s_in) * fp32(s_w[o]), once per (bits, block).
        self._mults = {b: [(torch.tensor(q_in.scale, dtype=torch.float32) * blk.s_w1.float(),
                            torch.tensor(q_mid.scale, dtype=torch.float32) * blk.s_w2.float())
                           for blk, (q_in, q_mid) in zip(blocks, qs)] for b, qs in act_quants.items()}
        self._weights: dict[tuple[int, int], list[tuple]] = {}
        # One memory pool per width: graphs of different widths may replay at the same time on
        # their own streams (runtime/streams.py); graphs of one width replay one at a time.
        self.graphs = GraphCache(self.MAX_GRAPHS, pool_of=lambda bits: bits) if cuda_graphs else None
        # convs that take items= (how many leading patches are real): padded graph replays skip the rest
        self._skips_padding = bool(getattr(self._ops, "SKIPS_PADDING", False)) and not self.padded
        # packed input and mid codes (backends with OUT_BUFFERS), 2 batch shapes, per width (as the pools)
        self._scratch: dict[int, Workspace] = {}

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(sorted(self.act_quants))

    def _weights_for(self, in_bits: int, mid_bits: int) -> list[tuple]:
        """Per block (conv1, conv2) weights in the backend's form, prepared once per pair of input
        containers."""
        key = (in_bits, mid_bits)
        if key not in self._weights:
            prep = getattr(self._ops, "prepare_conv_weight", None)
            self._weights[key] = [(blk.w1, blk.w2) if prep is None else (prep(blk.w1, in_bits), prep(blk.w2, mid_bits))
                                  for blk in self.blocks]
        return self._weights[key]

    def __call__(self, feat: torch.Tensor, bits: int) -> torch.Tensor:
        """(N,F,H,W) block-stack input -> (N,F,H,W) block-stack output at ``bits``, in channels_last
        memory (the kernels' NHWC result), in the stream dtype: ``feat.dtype`` if it is one of
        ``stream_dtypes``, else fp32.

        With ``cuda_graphs`` on a CUDA tensor the body runs as one CUDA graph per (bits, batch
        bucket, patch shape) (:class:`~gdq_engine.runtime.graphs.GraphCache`): N is padded up to
        ``graph_batch(N)``, so the varying group sizes of a dynamic policy share a few graphs; on
        backends whose convs take ``items`` (``ops.SKIPS_PADDING``: Triton) a replay's convs skip
        the row tiles of the padding patches, so they cost no MMAs. The
        second call of a key captures the graph (the first ran eagerly, which also autotunes the
        kernels); later calls replay it. Patches are independent (static scales, per-pixel convs),
        so padding never changes a result: outputs are identical to eager runs. A body called while
        a bigger graph is being captured (the Engine's whole network) runs eagerly into it.
        """
        if bits not in self.act_quants:
            raise ValueError(f"no calibrated quantizers for {bits} bits; calibrated: {self.bits}")
        if self.graphs is not None:
            if self._skips_padding:  # the graph's convs skip the row tiles of the bucket's padding patches
                return self.graphs(bits, feat, lambda f, items: self.run_eager(f, bits, items=items), items=True)
            return self.graphs(bits, feat, lambda f: self.run_eager(f, bits))
        return self.run_eager(feat, bits)

    def run_layerwise(self, feat: torch.Tensor, policy, grads: torch.Tensor):
        """CADyQ-style run: ``policy.select(layer, x, grads)`` picks each patch's bits before every
        quantized conv, and the patches are regrouped per conv.

        Returns (output (N,F,H,W) in the stream dtype, bits (2 * blocks, N) int64, groups
        [(layer, bits, count)]). The same codes and values as :meth:`__call__` whenever every
        layer picks the same bits.
        """
        ops = self._ops
        x = feat.to(self.stream_dtype(feat.dtype)).permute(0, 2, 3, 1).contiguous()
        layer_bits, groups = [], []
        for i, blk in enumerate(self.blocks):
            b1 = policy.select(2 * i, x, grads)
            mid = x.new_empty((*x.shape[:3], blk.b1.numel()), dtype=torch.float32)
            for b, idx in bit_groups(b1, x.device):
                q_in, _ = self.act_quants[b][i]
                packed = ops.quantize_pack(x[idx].contiguous(), q_in)
                mid[idx] = ops.packed_conv3x3(packed, q_in.container, True,
                                              self._weights_for(q_in.container, q_in.container)[i][0],
                                              self._mults[b][i][0], blk.b1, relu=True)
                groups.append((2 * i, b, idx.numel()))
            b2 = policy.select(2 * i + 1, mid, grads)
            new_x = torch.empty_like(x)  # the stream dtype: results are rounded to it as they are stored
            for b, idx in bit_groups(b2, x.device):
                _, q_mid = self.act_quants[b][i]
                packed = ops.quantize_pack(mid[idx].contiguous(), q_mid)
                new_x[idx] = ops.packed_conv3x3(packed, q_mid.container, reads_signed(ops, q_mid),
                                                self._weights_for(q_mid.container, q_mid.container)[i][1],
                                                self._mults[b][i][1], blk.b2, residual=x[idx].contiguous(),
                                                res_scale=blk.res_scale).to(x.dtype)
                groups.append((2 * i + 1, b, idx.numel()))
            x = new_x
            layer_bits += [b1, b2]
        return x.permute(0, 3, 1, 2).contiguous(), torch.stack(layer_bits), groups

    def run_eager(self, feat: torch.Tensor, bits: int, scratch: Workspace | None = None,
                  items: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`__call__` without CUDA graphs: every conv launched now (what a graph captures).

        ``items``: a (1,) int32 tensor on the device, on backends with ``SKIPS_PADDING``: only
        the first ``items[0]`` patches need results (the rest may be left unwritten), as a graph
        captured for a padded batch replays it. ``scratch``: the workspaces to reuse (default:
        the body's own, or fresh ones while a graph is being captured)."""
        ops, quants = self._ops, self.act_quants[bits]
        skip = {} if items is None else {"items": items}  # results needed for the first items[0] patches only
        if scratch is None:  # a graph being captured gets workspaces of its own, in its memory pool
            scratch = Workspace() if capturing(feat) else self._scratch.setdefault(bits, Workspace())
        weights = self._weights_for(quants[0][0].container, quants[0][1].container) if quants else []
        stream = self.stream_dtype(feat.dtype)
        x = feat.to(stream).permute(0, 2, 3, 1).contiguous()
        buffers = getattr(ops, "OUT_BUFFERS", False)  # reused workspaces; the residual stream updated in place
        if self.padded:  # the zero ring quantizes to code 0; every conv writes its result's ring as 0
            x = torch.nn.functional.pad(x, (0, 0, 1, 1, 1, 1))
        # The stream is updated in place, never in the caller's tensor: when x is feat itself (an NHWC
        # feat of the stream's dtype), the first conv2 writes a fresh tensor instead (no copy pass).
        fresh = buffers and not self.padded and x.data_ptr() == feat.data_ptr()
        if fresh and not self.blocks:
            x = x.clone()
        packed = None
        for i, (blk, (q_in, q_mid), (w1, w2), (m1, m2)) in enumerate(zip(self.blocks, quants, weights,
                                                                        self._mults[bits])):
            # With buffers, conv2 also writes the next block's packed input: one quantize_pack per call.
            if packed is None or not buffers:
                packed = ops.quantize_pack(x, q_in, **({"out": _codes_buffer(scratch, "in", x, q_in)}
                                                       if buffers else {}))
            mid_signed = reads_signed(ops, q_mid)
            # padded: 8-bit unsigned mid codes travel as code ^ 0x80 (signed bytes the MMA takes as they are)
            layout1 = dict(padded=True, offset_out=not mid_signed) if self.padded else {}
            layout2 = dict(padded=True, offset_in=not mid_signed) if self.padded else {}
            mid = ops.packed_conv3x3(packed, q_in.container, True, w1, m1, blk.b1, relu=True, out_quant=q_mid,
                                     **({"out": _codes_buffer(scratch, "mid", x, q_mid)} if buffers else {}), **layout1,
                                     **skip)
            into = {}
            if buffers:
                nxt = quants[i + 1][0] if i + 1 < len(quants) else None
                into = dict(out=torch.empty_like(x) if fresh and i == 0 else x, next_quant=nxt,
                            next_out=None if nxt is None else packed)
                if stream != torch.float32:
                    into["out_dtype"] = stream
            x = ops.packed_conv3x3(mid, q_mid.container, mid_signed, w2, m2, blk.b2, residual=x,
                                   res_scale=blk.res_scale, **into, **layout2, **skip)
            if x.dtype != stream:  # a backend without out= buffers returns fp32: round to the stream
                x = x.to(stream)
        if self.padded:
            x = x[:, 1:-1, 1:-1].contiguous()
        return x.permute(0, 3, 1, 2)  # NCHW view of the NHWC result: channels_last, no copy

    def stream_dtype(self, feat_dtype: torch.dtype) -> torch.dtype:
        """The dtype the residual stream (and the result) runs in for block-stack input of ``feat_dtype``."""
        return feat_dtype if feat_dtype in self.stream_dtypes else torch.float32


FLOAT_STREAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # every dtype a residual stream may have


def _check_stream_dtypes(dtypes, ops, backend: str) -> tuple[torch.dtype, ...]:
    """``dtypes`` as a tuple, checked: fp dtypes, fp16 / bf16 only on backends with ``STREAM_DTYPES``."""
    dtypes = tuple(dtypes)
    allowed = getattr(ops, "STREAM_DTYPES", (torch.float32,))
    for d in dtypes:
        if d not in FLOAT_STREAM_DTYPES:
            raise ValueError(f"stream_dtypes must be float32, float16 or bfloat16, got {d}")
        if d not in allowed:
            raise ValueError(f"the {backend!r} backend keeps the residual stream in float32 only, got {d}")
    return dtypes


def reads_signed(ops, q: ActQuant) -> bool:
    """The ``a_signed`` a conv of backend ``ops`` reads ``q``'s codes with. Unsigned codes of at most
    7 bits stored one per byte are the same bytes as signed 8-bit codes, so backends whose kernels
    take signed bytes more cheaply (``ops.SIGNED_BYTES_FASTER``: Triton, where unsigned 8-bit codes
    need a shift, a correction and a trip through registers) read them as signed; values and
    results are unchanged."""
    if q.signed:
        return True
    return bool(getattr(ops, "SIGNED_BYTES_FASTER", False)) and q.container == 8 and q.range[1] <= 127


def _codes_buffer(scratch: Workspace, name: str, x: torch.Tensor, q: ActQuant) -> torch.Tensor:
    """A reused uint8 buffer of ``scratch`` for ``x``'s (N,H,W,C) codes of ``q`` (in its
    container): the packed block input or mid activations, which never leave ``IntegerBody.run_eager``."""
    return scratch.get(name, (*x.shape[:-1], x.shape[-1] * q.container // 8), torch.uint8, x.device)
