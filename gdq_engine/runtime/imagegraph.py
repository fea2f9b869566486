"""A static policy's whole image as one CUDA graph replay (``Engine(image_graphs=True)``).

The tiled path queues an image's work from the host piece by piece: the input's (min, max), the
window gather, the network's graph replay per batch, the Triton stitch, the finish (clamp, and
the uint8 rounding) and the finiteness flag, with Python, dispatch and table lookups between
them, and on a GPU the network's replay starts only after the host has done the first of them.
An image graph holds all of it, captured per (image size, tiling, bit-width, output dtype, batch
size) on the size's second use (:class:`~gdq_engine.runtime.graphs.GraphCache`). An image then costs the
host: one copy in, one replay, one copy out and one read of (finite, min, max).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .graphs import GraphCache
from .stitch import Stitcher, StitchPlan, finish_canvas
from .tables import TableCache
from .tiler import TileGrid
from .windows import WindowCutter, gather_windows


class ImageBatch(NamedTuple):
    """One batch of an image's windows: their tile numbers, gather indices and stitch plan."""

    tiles: tuple[int, ...]
    index: tuple[torch.Tensor, torch.Tensor]
    stitch: StitchPlan


class ImagePlan(NamedTuple):
    """An image size's batches (tiles in order, ``batch_size`` per batch, the last one shorter)
    and its output size (rows, columns)."""

    grid: TileGrid
    batch_size: int
    output: tuple[int, int]
    batches: tuple[ImageBatch, ...]


def make_image_plan(grid: TileGrid, batch_size: int, scale: int, device: torch.device, cutter: WindowCutter,
                    stitcher: Stitcher) -> ImagePlan:
    """The :class:`ImagePlan` of ``grid`` in batches of ``batch_size`` (>= 1), with the tables of
    ``cutter`` and ``stitcher`` on ``device``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = []
    for start in range(0, len(grid), batch_size):
        tiles = list(range(start, min(start + batch_size, len(grid))))
        batches.append(ImageBatch(tuple(tiles), cutter.index(grid, tiles, device),
                                  stitcher.plan(grid, tiles, scale, device)))
    return ImagePlan(grid, batch_size, (grid.height * scale, grid.width * scale), tuple(batches))


def image_fn(plan: ImagePlan, network: Callable[[torch.Tensor], torch.Tensor], uint8: bool
             ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The whole image's work as one function of the (1, 3, H, W) fp32 image on the device:
    returns (the finished (1, 3, sH, sW) image, fp32 or uint8 with ``uint8``; a (1, 3) fp32 flag:
    1 if every value stitched into it is finite else 0, the input's min, its max). ``network``
    maps (K, 3, h, w) channels-last fp32 windows to (K, 3, sh, sw) fp32 SR windows without host
    syncs. Call it in inference mode. The same values as the tiled path: the gather, the network, the Triton stitch
    (``kernels/stitch.py``) and :func:`~gdq_engine.runtime.stitch.finish_canvas`."""
    from ..kernels import ops

    def run(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img = images[0]
        lo, hi = torch.aminmax(img)
        canvas = img.new_empty((img.shape[0], *plan.output))
        bad = torch.zeros(1, dtype=torch.int32, device=img.device)
        for batch in plan.batches:
            sr = network(gather_windows(img, *batch.index).contiguous(memory_format=torch.channels_last))
            ops.stitch_windows(canvas, sr, batch.stitch.boxes, batch.stitch.extent, bad)
        result = finish_canvas(canvas, uint8)
        flag = torch.stack([(bad[0] == 0).to(lo.dtype), lo, hi])
        return result[None], flag[None]

    return run


class ImageGraphs:
    """An engine's image graphs (at most ``capacity``, least recently used dropped; they share one
    memory pool and replay one at a time) and its image plans."""

    def __init__(self, capacity: int = 4):
        self.graphs = GraphCache(capacity, what="the whole image", lend=True)
        self._plans = TableCache(4 * capacity)

    def plan(self, key: tuple, make: Callable[[], ImagePlan | None]) -> ImagePlan | None:
        """The plan of ``key`` (image size and tiling), made by ``make()`` on its first use; None
        when ``make`` found that images of that size do not run as an image graph."""
        plan = self._plans.get_or_make(key, lambda: make() or False)  # False: cached "no"
        return plan or None

    def run(self, img: torch.Tensor, plan: ImagePlan, network: Callable[[torch.Tensor], torch.Tensor],
            tag: object, uint8: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`image_fn` on the (3, H, W) fp32 image ``img`` (on the compute device) as a graph
        replay (eagerly on the size's first use, on CPU tensors, and after a failed capture).
        ``tag`` names the network (its bit-width): another ``network`` needs another tag.
        Returns (the (3, sH, sW) image, the (3,) flag): the graph's own buffers, valid until the
        next call."""
        with torch.inference_mode():  # the buffers the graph keeps are inference tensors, as the network's
            result, flag = self.graphs(("image", tag, uint8, plan.grid, plan.batch_size), img[None],
                                       image_fn(plan, network, uint8), pad=False, keep=plan)
        return result[0], flag[0]
