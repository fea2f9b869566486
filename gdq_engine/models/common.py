"""Building blocks shared by the SR architectures.

Every architecture in :mod:`gdq_engine.models` is an :class:`SRModel`: it maps an (N, 3, H, W)
float tensor in [0, 1] to an (N, 3, sH, sW) float tensor in [0, 1] (not clamped), and exposes the
same five parts so that the quantization runtime can treat them alike:

``head``        first conv (FP), LR features
``body``        ``nn.ModuleList`` of residual blocks (the part that gets quantized)
``body_tail``   conv(s) closing the body (FP)
``upsampler``   conv + pixel-shuffle stages (FP)
``tail``        last conv(s) back to RGB (FP)

Input normalisation is ``(x - mean) * pixel_range`` and output is ``y / pixel_range + mean``,
which reproduces both the EDSR-PyTorch convention (0..255 input, mean shift convs) and BasicSR's
(0..1 input, ``img_range``) with one set of weights.
"""

from __future__ import annotations

import torch
from torch import nn

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
SUPPORTED_SCALES = (2, 3, 4)


def conv3x3(in_channels: int, out_channels: int, bias: bool = True) -> nn.Conv2d:
    """3x3 convolution, stride 1, zero padding 1 (keeps H, W)."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)


def check_scale(scale: int) -> int:
    """Return ``scale`` as an int or raise ``ValueError`` when it is not 2, 3 or 4."""
    if int(scale) != scale or int(scale) not in SUPPORTED_SCALES:
        raise ValueError(f"unsupported scale {scale!r}: gdq_engine models support {SUPPORTED_SCALES}")
    return int(scale)


def pixel_shuffle_upsampler(n_feats: int, scale: int, activation: nn.Module | None = None) -> nn.Sequential:
    """Conv + PixelShuffle stages for ``scale`` in {2, 3, 4}: x4 is two x2 stages.

    Layout (``activation`` None): x2/x3 ``[conv, shuffle]``; x4 ``[conv, shuffle, conv, shuffle]``,
    so the convs sit at indices 0 and 2 as in EDSR-PyTorch and BasicSR. With an activation each
    stage is ``[conv, shuffle, act]``.
    """
    scale = check_scale(scale)
    factors = [2, 2] if scale == 4 else [scale]
    layers: list[nn.Module] = []
    for factor in factors:
        layers += [conv3x3(n_feats, n_feats * factor * factor), nn.PixelShuffle(factor)]
        if activation is not None:
            layers.append(activation)
    return nn.Sequential(*layers)


class SRModel(nn.Module):
    """Base class: normalisation, the common five-part shape and the forward pass.

    Subclasses build ``head``, ``body``, ``body_tail``, ``upsampler``, ``tail`` and may override
    :meth:`forward_body` and :meth:`forward_output`. ``config`` holds the constructor arguments so a
    checkpoint can rebuild the model.
    """

    arch: str = ""

    def __init__(self, scale: int, mean: tuple[float, float, float], pixel_range: float):
        super().__init__()
        self.scale = check_scale(scale)
        self.pixel_range = float(pixel_range)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.config: dict = {}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) in [0,1] -> network input space."""
        return (x - self.mean.to(x.dtype)) * self.pixel_range

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        """Network output space -> (N,3,sH,sW) image space (about [0,1], not clamped)."""
        return y / self.pixel_range + self.mean.to(y.dtype)

    def denormalize_(self, y: torch.Tensor) -> torch.Tensor:
        """:meth:`denormalize` in place on ``y`` (the same operations, same values): no fresh
        image-sized tensors, whose first touch costs a page fault per 4 KiB on CPU."""
        return y.div_(self.pixel_range).add_(self.mean.to(y.dtype))

    def run_blocks(self, feat: torch.Tensor) -> torch.Tensor:
        """The residual blocks in FP: (N,F,H,W) -> (N,F,H,W). Quantized runtimes replace this."""
        for block in self.body:
            feat = block(feat)
        return feat

    def blocks_input(self, feat: torch.Tensor) -> torch.Tensor:
        """Head features (N,F,H,W) -> the input of the blocks (here the features themselves)."""
        return feat

    def close_body(self, blocks_out: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """The blocks' output and the head features (N,F,H,W) -> features entering the upsampler:
        the body-end conv(s) and the global skip."""
        return self.body_tail(blocks_out) + feat

    def forward_body(self, feat: torch.Tensor, run_blocks=None) -> torch.Tensor:
        """Head features (N,F,H,W) -> features entering the upsampler (N,F,H,W):
        ``close_body(run_blocks(blocks_input(feat)), feat)``.

        ``run_blocks``: optional replacement for :meth:`run_blocks` (e.g. a quantized body).
        """
        return self.close_body((run_blocks or self.run_blocks)(self.blocks_input(feat)), feat)

    def forward_output(self, feat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Body output (N,F,H,W) and normalised input -> normalised HR output (N,3,sH,sW)."""
        return self.tail(self.upsampler(feat))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) float in [0,1] -> (N,3,sH,sW) float, same dtype/device."""
        xn = self.normalize(x)
        feat = self.head(xn)
        return self.denormalize(self.forward_output(self.forward_body(feat), xn))

    @property
    def receptive_radius(self) -> int:
        """Upper bound, in LR pixels, of the context one output pixel depends on, per side.

        Every 3x3 conv adds one pixel (convs after a pixel shuffle add less; counting them as one
        LR pixel keeps the bound safe). A tiling margin >= this makes tiled output exact.
        """
        return sum(1 for m in self.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
