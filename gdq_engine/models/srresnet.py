"""MSRResNet (BasicSR's modified SRResNet): no BN, LeakyReLU 0.1, bilinear global skip."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import SRModel, conv3x3, pixel_shuffle_upsampler


class ResBlockNoBN(nn.Module):
    """conv3x3 -> ReLU -> conv3x3 plus identity. (N,F,H,W) -> same."""

    def __init__(self, n_feats: int):
        super().__init__()
        self.conv1 = conv3x3(n_feats, n_feats)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(n_feats, n_feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


class MSRResNet(SRModel):
    """MSRResNet on (N,3,H,W) float images in [0,1] (no mean shift, pixel range 1).

    ``head`` is conv+LeakyReLU, ``body_tail`` is the identity (the architecture has no
    body-end conv and no head-to-body skip), ``tail`` is conv_hr+LeakyReLU+conv_last, and the
    output adds the bilinearly upsampled input.
    """

    arch = "msrresnet"

    def __init__(self, scale: int = 4, n_feats: int = 64, n_blocks: int = 16):
        super().__init__(scale, (0.0, 0.0, 0.0), 1.0)
        self.config = dict(scale=self.scale, n_feats=n_feats, n_blocks=n_blocks)
        self.head = nn.Sequential(conv3x3(3, n_feats), nn.LeakyReLU(0.1, inplace=True))
        self.body = nn.ModuleList(ResBlockNoBN(n_feats) for _ in range(n_blocks))
        self.body_tail = nn.Identity()
        self.upsampler = pixel_shuffle_upsampler(n_feats, self.scale, nn.LeakyReLU(0.1, inplace=True))
        self.tail = nn.Sequential(conv3x3(n_feats, n_feats), nn.LeakyReLU(0.1, inplace=True), conv3x3(n_feats, 3))

    def close_body(self, blocks_out: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """No body-end conv and no head-to-body skip: the blocks' output as it is."""
        return blocks_out

    def forward_output(self, feat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        base = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return self.tail(self.upsampler(feat)) + base
