"""Cutting a batch's LR windows out of an image: one gather per batch (index tensors cached per
grid and batch) instead of :func:`~gdq_engine.runtime.tiler.extract_windows`' slice per window
and a stack (on a GPU, host calls before the network's graph can start: a few instead of two per
window and one more). The windows come out channels-last, the layout the network takes.
"""

from __future__ import annotations

import torch

from .tables import TableCache, upload
from .tiler import TileGrid


def window_index(grid: TileGrid, tiles: range | list[int], device: torch.device | str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (K, wh, 1), columns (K, 1, ww)) int64 on ``device``: the LR pixel coordinates of each
    window of ``tiles`` (K of them, each ``grid.window`` = (wh, ww) pixels)."""
    wh, ww = grid.window
    chosen = [grid.tiles[i] for i in tiles]
    rows = torch.tensor([t.win_y for t in chosen]).view(-1, 1, 1) + torch.arange(wh).view(1, wh, 1)
    cols = torch.tensor([t.win_x for t in chosen]).view(-1, 1, 1) + torch.arange(ww).view(1, 1, ww)
    return upload(rows, device), upload(cols, device)


def gather_windows(img: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(C, H, W) image -> (K, C, wh, ww) windows at :func:`window_index`'s coordinates, a copy in
    channels-last memory (the values of :func:`~gdq_engine.runtime.tiler.extract_windows`)."""
    return img.permute(1, 2, 0)[rows, cols].permute(0, 3, 1, 2)


class WindowCutter:
    """Cuts an engine's batches of windows, caching each grid and batch's index tensors (at most
    ``capacity``, least recently used dropped: whole-image mode sees a new grid per image size)."""

    def __init__(self, capacity: int = 64):
        self._index = TableCache(capacity)

    def cut(self, img: torch.Tensor, grid: TileGrid, tiles: list[int]) -> torch.Tensor:
        """The windows of ``tiles`` of ``grid`` from the (C, H, W) image ``img``: (K, C, wh, ww),
        ``img``'s dtype and device, channels-last."""
        if tuple(img.shape[1:]) != (grid.height, grid.width):
            raise ValueError(f"image of {tuple(img.shape[1:])} pixels for a grid of {(grid.height, grid.width)}")
        return gather_windows(img, *self.index(grid, tiles, img.device))

    def index(self, grid: TileGrid, tiles: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached :func:`window_index` of ``tiles`` of ``grid`` on ``device``."""
        return self._index.get_or_make((grid, tuple(tiles), device), lambda: window_index(grid, tiles, device))
