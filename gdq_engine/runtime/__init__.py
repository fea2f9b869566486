"""Runtime: tiling and stitching (scheduler and CUDA-graph cache come with the quantized engine)."""

from .tiler import Tile, TileGrid, extract_windows, make_grid, stitch_windows, whole_image_grid

__all__ = ["Tile", "TileGrid", "extract_windows", "make_grid", "stitch_windows", "whole_image_grid"]
