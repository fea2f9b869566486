"""The network's last conv (HR features -> RGB) on the backend's FP conv kernel.

After the integer tail, EDSR-baseline x4's last conv (64 -> 3 on the x4 map) is the largest FP
op left: 0.38 ms of a 3.18 ms 1080p frame in cuDNN fp16 on an H200 (docs/kernels.md). Backends
with an FP 3x3 conv for few output channels (``fp_conv3x3``: the Triton one,
kernels/fp_conv.py) run it there: fp16 channels_last in, fp32 out, products exact and summed in
fp32, where cuDNN rounds its result to fp16. It is an FP layer, so the numeric contract of the
integer path does not apply: results agree with torch's conv to fp32 rounding, not bit for bit.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .graphs import capturing
from .inttail import is_same_size_conv3x3


def _qualifies(conv: nn.Module, ops) -> bool:
    """A conv ``ops.fp_conv3x3`` runs: a plain ``nn.Conv2d`` (not already swapped) that
    :func:`~gdq_engine.runtime.inttail.is_same_size_conv3x3`, input channels a multiple of 16, at
    most ``ops.FP_CONV_MAX_COUT`` outputs."""
    return (type(conv) is nn.Conv2d and is_same_size_conv3x3(conv) and conv.in_channels % 16 == 0
            and conv.out_channels <= ops.FP_CONV_MAX_COUT)


class KernelConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that runs ``ops.fp_conv3x3`` on fp16 channels_last CUDA inputs: (N,C,H,W)
    fp16 -> (N,Cout,H,W) fp32 NCHW. Other inputs (CPU, other dtypes or layouts, torch.compile
    tracing) take ``nn.Conv2d``'s own forward. Same parameters and state dict as the conv it
    copies, so ``.to()``, hooks and MAC counting see an ordinary conv.

    ``use_kernel = False`` turns the kernel off (benchmarks' A/B rows), ``fuse_output = False`` only
    :meth:`image`'s fused output glue; ``kernel_on_cpu = True`` also runs it on CPU tensors (Triton's
    interpreter, for tests).
    """

    def __init__(self, conv: nn.Conv2d, ops):
        super().__init__(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        self._ops = ops
        self.use_kernel = True
        self.kernel_on_cpu = False
        self.fuse_output = True  # image(): the output glue in the kernel's epilogue (False: benchmarks' A/B rows)
        self._prepared: tuple | None = None  # (key, weight, bias) for the parameters' current storage
        self._glue: tuple | None = None  # (key, 1 / pixel_range, mean) for image()

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` runs the kernel on ``x``."""
        return (self.use_kernel and not torch.compiler.is_compiling() and x.dim() == 4
                and x.dtype in self._ops.FP_CONV_DTYPES and self.weight.dtype == x.dtype
                and x.shape[1] == self.in_channels and x.is_contiguous(memory_format=torch.channels_last)
                and (x.is_cuda or (self.kernel_on_cpu and x.device.type == "cpu"))
                and x.device == self.weight.device)

    def _operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bias = self.bias
        key = (self.weight.data_ptr(), self.weight._version, None if bias is None else (bias.data_ptr(), bias._version))
        if self._prepared is not None and self._prepared[0] == key:
            return self._prepared[1:]
        w, b = self._ops.prepare_fp_weight(self.weight.detach(), None if bias is None else bias.detach())
        if not capturing(x):  # a CUDA graph's buffers may be reused once it is dropped: never keep them
            self._prepared = (key, w, b)
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernel(x):
            return super().forward(x)
        w, b = self._operands(x)
        return self._ops.fp_conv3x3(x.permute(0, 2, 3, 1), w, b, self.out_channels)

    def image(self, x: torch.Tensor, model) -> torch.Tensor:
        """The network's output from the upsampled features ``x`` (N,C,H,W): this conv, then
        ``model.denormalize_`` in fp32 (``/ pixel_range + mean``); (N,Cout,H,W) fp32.

        Where :meth:`uses_kernel`, the glue runs in the kernel's epilogue instead of two passes
        over the HR image (about 40 us of a 1080p frame on an H100): ``y * r + mean`` with ``r``
        the fp32 reciprocal of ``pixel_range``, which is how torch divides a CUDA tensor by a
        scalar (ATen's ``div_true_kernel_cuda``), so the values are those of the unfused path on
        a GPU (on a CPU, where torch divides, they may differ in the last bit)."""
        if not (self.fuse_output and self.uses_kernel(x)) or model.mean.numel() != self.out_channels:
            return model.denormalize_(self(x).float())
        w, b = self._operands(x)
        inv, shift = self._output_glue(model, x)
        return self._ops.fp_conv3x3(x.permute(0, 2, 3, 1), w, b, self.out_channels, out_scale=inv, out_shift=shift)

    def _output_glue(self, model, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        mean = model.mean
        key = (model.pixel_range, mean.data_ptr(), mean._version, mean.dtype)
        if self._glue is not None and self._glue[0] == key:
            return self._glue[1:]
        inv = float(torch.tensor(1.0) / torch.tensor(model.pixel_range, dtype=torch.float32))
        shift = mean.reshape(-1).to(torch.float32)  # what denormalize_ adds: mean.to(y.dtype)
        if not capturing(x):  # as _operands: never keep a CUDA graph's buffer
            self._glue = (key, inv, shift)
        return inv, shift


def last_conv_parent(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(module, attribute name) holding ``model``'s last conv: ``model.tail`` itself when it is a
    conv (EDSR, RDN), or the last child of a ``Sequential`` tail (MSRResNet); None otherwise."""
    tail = getattr(model, "tail", None)
    if isinstance(tail, nn.Conv2d):
        return model, "tail"
    if isinstance(tail, nn.Sequential) and len(tail) and isinstance(tail[-1], nn.Conv2d):
        return tail, str(len(tail) - 1)
    return None


def with_kernel_last_conv(model: nn.Module, ops, in_place: bool = False) -> nn.Module:
    """``model`` with its last conv as a :class:`KernelConv2d` on ``ops``: a copy, or ``model``
    itself changed when ``in_place`` (a model holding backend modules, e.g. an integer tail's, cannot
    be deep-copied). ``model`` unchanged when ``ops`` has no ``fp_conv3x3`` or the conv does not
    qualify (3x3, stride 1, pad 1, input channels a multiple of 16, at most 16 outputs)."""
    where = last_conv_parent(model)
    if getattr(ops, "fp_conv3x3", None) is None or where is None or not _qualifies(getattr(*where), ops):
        return model
    out = model if in_place else copy.deepcopy(model)
    parent, name = last_conv_parent(out)
    setattr(parent, name, KernelConv2d(getattr(parent, name), ops))
    return out


def image_conv(model: nn.Module) -> KernelConv2d | None:
    """``model``'s last conv when it is a :class:`KernelConv2d` whose output is the network's
    normalised output (``forward_output`` is :class:`~gdq_engine.models.SRModel`'s own: EDSR,
    RDN), so :meth:`KernelConv2d.image` can finish the image; else None (MSRResNet adds its
    bilinear base after the last conv)."""
    from ..models.common import SRModel

    tail = getattr(model, "tail", None)
    if isinstance(tail, KernelConv2d) and getattr(type(model), "forward_output", None) is SRModel.forward_output:
        return tail
    return None


def use_kernel_last_conv(model: nn.Module, enabled: bool) -> int:
    """Turn the :class:`KernelConv2d` s of ``model`` on (the default) or off (``nn.Conv2d``'s own
    forward, e.g. cuDNN: benchmarks' A/B rows, tests comparing with the reference backend's FP
    layers bit for bit). Returns how many there are."""
    convs = [m for m in model.modules() if isinstance(m, KernelConv2d)]
    for m in convs:
        m.use_kernel = bool(enabled)
    return len(convs)
