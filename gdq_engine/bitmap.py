"""Bit-width pictures: the LR input with every patch tinted by the activation bits it ran at."""

from __future__ import annotations

import torch

from .runtime.tiler import TileGrid

# RGB in [0, 1] per code width: cool = few bits, warm = many.
BIT_COLORS = {2: (0.15, 0.35, 1.0), 3: (0.1, 0.7, 0.9), 4: (0.15, 0.8, 0.2), 5: (0.85, 0.85, 0.1),
              6: (1.0, 0.6, 0.1), 7: (1.0, 0.4, 0.1), 8: (1.0, 0.15, 0.15)}
BIT_COLOR_NAMES = {2: "blue", 3: "cyan", 4: "green", 5: "yellow", 6: "orange", 7: "dark orange", 8: "red"}


def legend(bits) -> str:
    """The colours of the code widths ``bits`` (e.g. a policy's (2, 4, 8)) in words:
    ``"blue 2, green 4, red 8"``."""
    return ", ".join(f"{BIT_COLOR_NAMES[b]} {b}" for b in sorted({int(b) for b in bits}))


def bit_map(lr: torch.Tensor, bits, grid: TileGrid, strength: float = 0.5) -> torch.Tensor:
    """(3,H,W) LR image in [0,1] + per-tile bits (tile order, as in ``UpscaleReport.bits``) ->
    (3,H,W) float32: the grayscale image blended with each tile's colour over the region it owns
    (mean bits of layer-wise policies are rounded to the nearest width)."""
    if lr.dim() != 3 or lr.shape[0] != 3 or tuple(lr.shape[1:]) != (grid.height, grid.width):
        raise ValueError(f"expected a (3,{grid.height},{grid.width}) image, got {tuple(lr.shape)}")
    if len(bits) != len(grid):
        raise ValueError(f"{len(bits)} bit-widths for {len(grid)} tiles")
    gray = (lr.float().cpu() * torch.tensor([0.2989, 0.5870, 0.1140]).view(3, 1, 1)).sum(0, keepdim=True)
    out = gray.expand(3, -1, -1).clone()
    for tile, b in zip(grid.tiles, bits):
        width = min(max(int(round(float(b))), 2), 8)
        color = torch.tensor(BIT_COLORS[width]).view(3, 1, 1)
        (y0, y1), (x0, x1) = tile.keep_y, tile.keep_x
        out[:, y0:y1, x0:x1] = (1 - strength) * out[:, y0:y1, x0:x1] + strength * color
    return out.clamp(0, 1)
