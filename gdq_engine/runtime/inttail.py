"""The network's tail on the integer path: body-end conv, upsampler convs (and tail convs wide enough).

Granular-DQ quantizes only the residual blocks; the rest stays FP. For EDSR-baseline x4 that FP
rest is 40% of the MACs (body-end conv and upsampler 39%, head and last conv 1.5%), so however fast the body
gets, the whole network cannot run more than 1 / 0.40 = 2.5x faster than its FP version, and with
int8 at twice the fp16 tensor-core rate at most 1 / (0.40 + 0.60 / 2) = 1.4x. ``tail_bits`` runs
those convs as packed integer convs too: per-tensor signed activation codes (one DOBI scale per
conv, the same for every patch, whatever bit-width the policy gave the patch's body) and 8-bit
per-output-channel weights, fp32 out, on the body's backend and numeric contract
(docs/numerics.md). Pixel shuffles, activations, the global skip add and the last conv (3 output
channels) stay in torch.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..quant.calibrate import dobi_scale
from ..quant.quantizer import ActQuant, quantize_weight
from .graphs import capturing
from .intgraph import Workspace

TAIL_W_BITS = 8
TAIL_PARTS = ("body_tail", "upsampler", "tail")


def is_same_size_conv3x3(conv: nn.Module) -> bool:
    """Whether ``conv`` is the 3x3 conv the kernels compute: an ``nn.Conv2d`` with stride 1, zero
    pad 1, no groups or dilation (the output keeps the input's size)."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def _qualifies(conv: nn.Module) -> bool:
    """A conv every integer backend runs: :func:`is_same_size_conv3x3`, input channels a multiple
    of 32, output channels a multiple of 64."""
    return is_same_size_conv3x3(conv) and conv.in_channels % 32 == 0 and conv.out_channels % 64 == 0


def tail_conv_names(model: nn.Module) -> list[str]:
    """Qualified names (``upsampler.0``, ...) of the convs ``tail_bits`` quantizes, in forward order:
    every qualifying conv of ``body_tail``, ``upsampler`` and ``tail`` (EDSR-baseline x4: the
    body-end conv and both upsampler convs; its last conv has 3 outputs and stays FP)."""
    names = []
    for part in TAIL_PARTS:
        module = getattr(model, part, None)
        if module is None:
            continue
        if _qualifies(module):
            names.append(part)
        names += [f"{part}.{name}" for name, m in module.named_modules() if name and _qualifies(m)]
    return names


@torch.no_grad()
def collect_tail_inputs(model: nn.Module, run) -> list[torch.Tensor]:
    """The inputs of the :func:`tail_conv_names` convs (flattened, fp32), seen while ``run()`` runs
    ``model`` on calibration patches."""
    names = tail_conv_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no conv the integer tail can run "
                         "(3x3, input channels a multiple of 32, output channels a multiple of 64)")
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda m, args, n=n: seen[n].append(args[0].detach().float()))
             for n in names]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat([x.flatten() for x in seen[n]]) for n in names]


def calibrate_tail(model: nn.Module, run, bits: int) -> list[ActQuant]:
    """Signed ``bits`` quantizers of the tail convs' inputs (:func:`collect_tail_inputs`), DOBI scales."""
    return [ActQuant(bits, True, dobi_scale(x, bits, True)) for x in collect_tail_inputs(model, run)]


class IntegerConv(nn.Module):
    """A 3x3 conv on the integer path: (N,C,H,W) float (any dtype, NCHW or channels_last) ->
    quantize + pack (``quant``) -> packed conv with 8-bit per-channel weights -> fp32 epilogue
    ``acc * m[o] + bias[o]`` -> (N,Cout,H,W) in the input's dtype, channels_last memory.

    The prepared weights and fp32 multipliers are plain attributes, so ``.to(dtype)`` on the model
    never rounds them; build it on the device it runs on.
    """

    is_integer_conv = True

    def __init__(self, conv: nn.Conv2d, quant: ActQuant, ops):
        super().__init__()
        if not _qualifies(conv):
            raise ValueError(f"the integer tail cannot run {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.groups = conv.kernel_size, conv.groups
        self.quant, self._ops = quant, ops
        w_codes, s_w = quantize_weight(conv.weight.detach().float(), TAIL_W_BITS)
        self.mult = torch.tensor(quant.scale, dtype=torch.float32) * s_w.float()
        self.bias_fp32 = (conv.bias.detach().float() if conv.bias is not None
                          else torch.zeros(conv.out_channels, device=conv.weight.device))
        prep = getattr(ops, "prepare_conv_weight", None)
        self.weight_codes = w_codes.contiguous() if prep is None else prep(w_codes.contiguous(), quant.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._ops.quantize_pack(_nhwc_input(x, self._ops), self.quant)
        args = (packed, self.quant.bits, True, self.weight_codes, self.mult, self.bias_fp32)
        if x.dtype != torch.float32 and _stores(x.dtype, self._ops):
            # the kernel rounds its fp32 results to x's dtype itself (nearest even, as .to does):
            # no fp32 result and no cast pass over it
            return self._ops.packed_conv3x3(*args, out_dtype=x.dtype).permute(0, 3, 1, 2)
        return self._ops.packed_conv3x3(*args).permute(0, 3, 1, 2).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, a{self.quant.bits} w{TAIL_W_BITS}"


class IntegerUpsampler(nn.Module):
    """An upsampler of [conv, PixelShuffle(r)] stages (EDSR's) on the integer path, fused: each
    stage's conv re-quantizes its output in its epilogue straight to the next stage's 8-bit input
    codes, and the pixel shuffle moves those bytes (a permutation commutes with per-tensor
    quantization); only the last stage writes fp32, shuffled into the input's dtype. No fp32
    intermediate, no separate quantize pass. (N,C,H,W) -> (N,C',rH,rW) channels_last. Backends
    whose kernel stores pixel-shuffled in the output's dtype (``SHUFFLE_DTYPES``: the C++ kernel in
    bf16/fp32, the Triton one also in fp16) do the shuffle and cast in the epilogue; the others copy
    once after the conv.

    Needs every stage but the first to take 8-bit-container codes (``tail_bits`` 5..8): packed
    4/2-bit bytes hold channels the shuffle separates. Each conv's output channels are reordered
    once (sub-pixel major: (i, j, c) instead of PixelShuffle's (c, i, j)), so the shuffle copies
    runs of C contiguous values instead of scattering single ones; the values are unchanged
    (per-output-channel weight codes and scales move with their channel).
    """

    def __init__(self, stages: list[tuple[nn.Conv2d, ActQuant, int]], ops):
        super().__init__()
        self.convs = nn.ModuleList(IntegerConv(_subpixel_major(conv, r), q, ops) for conv, q, r in stages)
        self.factors = [int(r) for _, _, r in stages]
        # True: the result is a buffer reused by the next call (for an owner that consumes it at
        # once, as the Engine's private model does: a fresh tensor of tens of megabytes costs a
        # page fault per 4 KiB on first touch). Intermediate codes always reuse their buffer.
        self.reuse_output = False
        self._scratch = Workspace(capacity=2 * len(stages))  # each stage's output, 2 batch shapes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = self.convs[0]._ops
        # A CUDA graph being captured gets buffers of its own (GraphCache): ours may be dropped later.
        scratch = Workspace(capacity=len(self.convs)) if capturing(x) else self._scratch
        codes = ops.quantize_pack(_nhwc_input(x, ops), self.convs[0].quant)
        for i, (conv, r) in enumerate(zip(self.convs, self.factors)):
            last = i + 1 == len(self.convs)
            nxt = None if last else self.convs[i + 1].quant
            dtype = x.dtype if last else torch.uint8
            args = (codes, conv.quant.bits, True, conv.weight_codes, conv.mult, conv.bias_fp32)
            if dtype in getattr(ops, "SHUFFLE_DTYPES", ()):
                n, h, w, _ = codes.shape
                out = None
                if getattr(ops, "OUT_BUFFERS", False) and (not last or self.reuse_output):
                    out = scratch.get(i, (n, h * r, w * r, conv.out_channels // (r * r)), dtype, codes.device)
                codes = ops.packed_conv3x3(*args, out_quant=nxt, shuffle=r,
                                           out_dtype=torch.float32 if dtype == torch.uint8 else dtype, out=out)
            else:  # the kernel writes (N,H,W,r*r*C) in its own dtype; the shuffle moves (and casts) it
                codes = _shuffle_nhwc(ops.packed_conv3x3(*args, out_quant=nxt), r, dtype)
        return codes.permute(0, 3, 1, 2)

    def integer_macs(self, shape) -> int:
        """Conv MACs of one forward on an input of ``shape`` (N,C,H,W) (for runtime.cost)."""
        n, _, h, w = shape
        total = 0
        for conv, r in zip(self.convs, self.factors):
            total += n * h * w * conv.out_channels * conv.in_channels * 9
            h, w = h * r, w * r
        return total


def _subpixel_major(conv: nn.Conv2d, r: int) -> nn.Conv2d:
    """A copy of ``conv`` whose output channel (i*r + j)*C + c is the original c*r*r + i*r + j."""
    c = conv.out_channels // (r * r)
    order = torch.arange(conv.out_channels).view(c, r * r).t().reshape(-1)
    out = copy.deepcopy(conv)
    with torch.no_grad():
        out.weight.copy_(conv.weight[order])
        if conv.bias is not None:
            out.bias.copy_(conv.bias[order])
    return out


def _reads(dtype: torch.dtype, ops) -> bool:
    """Whether the backend's ``quantize_pack`` reads activations of ``dtype`` as they are
    (``QUANTIZE_INPUT_DTYPES``: their exact fp32 values, so the codes equal those of an fp32 copy)."""
    return dtype in getattr(ops, "QUANTIZE_INPUT_DTYPES", (torch.float32,))


def _stores(dtype: torch.dtype, ops) -> bool:
    """Whether the backend's ``packed_conv3x3`` stores its fp32 results in ``dtype`` itself
    (``FP_OUT_DTYPES``, its ``out_dtype=``: rounded to nearest even, as ``.to`` rounds)."""
    return dtype in getattr(ops, "FP_OUT_DTYPES", (torch.float32,))


def _nhwc_input(x: torch.Tensor, ops) -> torch.Tensor:
    """(N,C,H,W) -> contiguous (N,H,W,C) for ``ops.quantize_pack``: as it is where :func:`_reads`
    (a half-precision tail input then gets no fp32 copy: about 85 MB less traffic per 1080p frame
    for each of EDSR-baseline x4's two tail inputs), else fp32."""
    return (x if _reads(x.dtype, ops) else x.to(torch.float32)).permute(0, 2, 3, 1).contiguous()


def _shuffle_nhwc(y: torch.Tensor, r: int, dtype: torch.dtype) -> torch.Tensor:
    """PixelShuffle(r) of a sub-pixel-major NHWC conv output (N,H,W,r*r*C) -> (N,rH,rW,C) in
    ``dtype``: one copy of C-long contiguous runs."""
    n, h, w, crr = y.shape
    c = crr // (r * r)
    out = torch.empty((n, h * r, w * r, c), dtype=dtype, device=y.device)
    out.view(n, h, r, w, r, c).copy_(y.view(n, h, w, r, r, c).permute(0, 1, 3, 2, 4, 5))
    return out


def _fusable(upsampler: nn.Module, bits: int) -> bool:
    layers = list(upsampler.children()) if isinstance(upsampler, nn.Sequential) else []
    return (bits >= 5 and len(layers) >= 2 and len(layers) % 2 == 0 and all(_qualifies(c) for c in layers[0::2])
            and all(isinstance(s, nn.PixelShuffle) for s in layers[1::2]))


def with_integer_tail(model: nn.Module, quants: list[ActQuant], ops) -> nn.Module:
    """A copy of ``model`` whose :func:`tail_conv_names` convs run on the integer path (one
    quantizer each, in that order) on the backend module ``ops``: an EDSR-style upsampler as one
    :class:`IntegerUpsampler`, every other tail conv as an :class:`IntegerConv`."""
    names = tail_conv_names(model)
    if len(quants) != len(names):
        raise ValueError(f"{len(quants)} tail quantizers for {len(names)} tail convs {names}")
    out = copy.deepcopy(model)
    by_name = dict(zip(names, quants))
    up = getattr(out, "upsampler", None)
    if up is not None and _fusable(up, quants[0].bits):
        layers = list(up.children())
        stages = zip(layers[0::2], layers[1::2])
        out.upsampler = IntegerUpsampler([(conv, by_name[f"upsampler.{2 * k}"], shuf.upscale_factor)
                                          for k, (conv, shuf) in enumerate(stages)], ops)
        by_name = {n: q for n, q in by_name.items() if not n.startswith("upsampler.")}
    for name, q in by_name.items():
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, IntegerConv(getattr(parent, child), q, ops))
    return out
