"""RDN (Zhang et al., 2018) as in EDSR-PyTorch: residual dense blocks with 1x1 local/global fusion."""

from __future__ import annotations

import torch
from torch import nn

from .common import SRModel, check_scale, conv3x3

RDN_CONFIGS = {"A": (20, 6, 32), "B": (16, 8, 64)}  # (blocks D, convs per block C, growth G)


class DenseLayer(nn.Module):
    """conv3x3 + ReLU whose output is concatenated to its input: (N,C,H,W) -> (N,C+G,H,W)."""

    def __init__(self, in_channels: int, growth: int):
        super().__init__()
        self.conv = conv3x3(in_channels, growth)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.relu(self.conv(x))), 1)


class ResidualDenseBlock(nn.Module):
    """C dense layers, 1x1 local fusion back to G0 channels, plus identity. (N,G0,H,W) -> same."""

    def __init__(self, n_feats: int, growth: int, n_layers: int):
        super().__init__()
        self.convs = nn.Sequential(*(DenseLayer(n_feats + i * growth, growth) for i in range(n_layers)))
        self.fuse = nn.Conv2d(n_feats + n_layers * growth, n_feats, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.convs(x)) + x


class RDN(SRModel):
    """RDN on (N,3,H,W) float images in [0,1]; runs at pixel range 255 without mean shift.

    ``head`` = SFENet1, ``body_entry`` = SFENet2 (:meth:`blocks_input`), ``body`` = the RDBs,
    ``body_tail`` = global feature fusion (1x1 over all block outputs, then 3x3), global skip
    from ``head``.
    """

    arch = "rdn"

    def __init__(self, scale: int = 4, n_feats: int = 64, n_blocks: int = 16, n_layers: int = 8, growth: int = 64):
        super().__init__(check_scale(scale), (0.0, 0.0, 0.0), 255.0)
        self.config = dict(scale=self.scale, n_feats=n_feats, n_blocks=n_blocks, n_layers=n_layers, growth=growth)
        self.head = conv3x3(3, n_feats)
        self.body_entry = conv3x3(n_feats, n_feats)
        self.body = nn.ModuleList(ResidualDenseBlock(n_feats, growth, n_layers) for _ in range(n_blocks))
        self.body_tail = nn.Sequential(nn.Conv2d(n_blocks * n_feats, n_feats, 1), conv3x3(n_feats, n_feats))
        factors = [2, 2] if self.scale == 4 else [self.scale]
        stages: list[nn.Module] = []
        channels = n_feats
        for factor in factors:
            stages += [conv3x3(channels, growth * factor * factor), nn.PixelShuffle(factor)]
            channels = growth
        self.upsampler = nn.Sequential(*stages)
        self.tail = conv3x3(growth, 3)

    def blocks_input(self, feat: torch.Tensor) -> torch.Tensor:
        """SFENet2 on the head features: (N,G0,H,W) -> (N,G0,H,W), the first block's input."""
        return self.body_entry(feat)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The residual dense blocks in FP: (N,G0,H,W) -> (N, D*G0, H, W), every block's output
        concatenated along channels (the global feature fusion's input). Quantized runtimes
        replace this (:class:`~gdq_engine.runtime.densebody.DenseIntegerBody`)."""
        outs = []
        for block in self.body:
            x = block(x)
            outs.append(x)
        return torch.cat(outs, 1)
