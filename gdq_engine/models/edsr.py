"""EDSR (Lim et al., 2017): baseline (16 blocks, 64 ch) and large (32 blocks, 256 ch, res_scale 0.1)."""

from __future__ import annotations

import torch
from torch import nn

from .common import DIV2K_RGB_MEAN, SRModel, conv3x3, pixel_shuffle_upsampler


class ResBlock(nn.Module):
    """conv3x3 -> ReLU -> conv3x3, scaled by ``res_scale``, plus identity. (N,F,H,W) -> same."""

    def __init__(self, n_feats: int, res_scale: float = 1.0):
        super().__init__()
        self.conv1 = conv3x3(n_feats, n_feats)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(n_feats, n_feats)
        self.res_scale = float(res_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.conv2(self.relu(self.conv1(x)))
        if self.res_scale != 1.0:
            res = res * self.res_scale
        return x + res


class EDSR(SRModel):
    """EDSR on (N,3,H,W) float images in [0,1]; pixel range 255 with DIV2K mean shift.

    Args:
        scale: 2, 3 or 4.
        n_feats: body width (64 baseline, 256 large).
        n_blocks: residual blocks (16 baseline, 32 large).
        res_scale: residual scaling (1.0 baseline, 0.1 large).
    """

    arch = "edsr"

    def __init__(self, scale: int = 4, n_feats: int = 64, n_blocks: int = 16, res_scale: float = 1.0,
                 mean: tuple[float, float, float] = DIV2K_RGB_MEAN, pixel_range: float = 255.0):
        super().__init__(scale, mean, pixel_range)
        self.config = dict(scale=self.scale, n_feats=n_feats, n_blocks=n_blocks, res_scale=res_scale,
                           mean=tuple(mean), pixel_range=pixel_range)
        self.head = conv3x3(3, n_feats)
        self.body = nn.ModuleList(ResBlock(n_feats, res_scale) for _ in range(n_blocks))
        self.body_tail = conv3x3(n_feats, n_feats)
        self.upsampler = pixel_shuffle_upsampler(n_feats, self.scale)
        self.tail = conv3x3(n_feats, 3)


def edsr_baseline(scale: int = 4) -> EDSR:
    """EDSR-baseline: 16 blocks x 64 channels, res_scale 1."""
    return EDSR(scale, n_feats=64, n_blocks=16, res_scale=1.0)


def edsr_large(scale: int = 4) -> EDSR:
    """EDSR (large): 32 blocks x 256 channels, res_scale 0.1."""
    return EDSR(scale, n_feats=256, n_blocks=32, res_scale=0.1)
