"""Stitching SR windows into the output image: one Triton launch per batch where it can run (the
output on a CUDA device), else one torch copy per window (:func:`~gdq_engine.runtime.tiler.stitch_windows`).

The Triton stitch (kernels/stitch.py) also checks that the values it copies are finite, so the
engine needs no separate reduction over each batch's windows; it checks what reaches the image,
where the torch path checks every value the batch computed (the owned boxes and the overlaps
each window's neighbours own).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .tables import TableCache, upload
from .tiler import TileGrid, owned_boxes


class StitchPlan(NamedTuple):
    """A batch's owned boxes for the Triton stitch: (K, 6) int32 on the device, and the largest
    box's (rows, columns)."""

    boxes: torch.Tensor
    extent: tuple[int, int]


def make_plan(grid: TileGrid, tiles: range | list[int], scale: int, device: torch.device) -> StitchPlan:
    """The :class:`StitchPlan` of ``tiles`` of ``grid`` (output pixels: LR x ``scale``)."""
    rows = owned_boxes(grid, tiles, scale)
    boxes = torch.tensor(rows, dtype=torch.int32).view(len(rows), 6)
    extent = (max(r[1] - r[0] for r in rows), max(r[3] - r[2] for r in rows))
    return StitchPlan(upload(boxes, device), extent)


class Stitcher:
    """Stitches an engine's batches; the Triton path where :meth:`fused` (plans cached per grid and
    batch, at most ``capacity``, least recently used dropped: whole-image mode sees a new grid per
    image size). ``kernel_on_cpu = True`` runs the Triton stitch on CPU tensors too (Triton's
    interpreter, for tests)."""

    def __init__(self, capacity: int = 64):
        self.kernel_on_cpu = False
        self._plans = TableCache(capacity)

    def fused(self, canvas: torch.Tensor, sr: torch.Tensor) -> bool:
        """Whether :meth:`stitch` runs the Triton kernel for this canvas and these windows: both
        fp32 on one CUDA device (or a CPU with ``kernel_on_cpu``), Triton able to run there."""
        if canvas.dtype != torch.float32 or sr.dtype != torch.float32 or canvas.device != sr.device:
            return False
        return self.runs_on(canvas.device)

    def runs_on(self, device: torch.device) -> bool:
        """Whether the Triton stitch runs for fp32 canvases on ``device``: a CUDA device (or a CPU
        with ``kernel_on_cpu``) where Triton can run."""
        if not (device.type == "cuda" or (self.kernel_on_cpu and device.type == "cpu")):
            return False
        from ..ops.triton_ops import unavailable_reason

        return unavailable_reason(device) is None

    def stitch(self, canvas: torch.Tensor, sr: torch.Tensor, grid: TileGrid, tiles: list[int], scale: int,
               bad: torch.Tensor | None) -> bool:
        """Write the windows ``sr`` (K,3,sh,sw) of ``tiles`` into ``canvas`` (3,sH,sW). On the
        Triton path also set ``bad`` ((1,) int32 on the canvas' device) to 1 if a copied value is
        not finite, and return True; else copy with torch, leave ``bad`` alone (it may then be
        None) and return False (the caller then checks the windows itself)."""
        if not self.fused(canvas, sr):
            from .tiler import stitch_windows

            stitch_windows(canvas, sr.to(canvas.device), grid, tiles, scale)
            return False
        from ..kernels import ops

        plan = self.plan(grid, tiles, scale, canvas.device)
        ops.stitch_windows(canvas, sr, plan.boxes, plan.extent, bad)
        return True

    def plan(self, grid: TileGrid, tiles: list[int], scale: int, device: torch.device) -> StitchPlan:
        """The cached :class:`StitchPlan` of ``tiles`` of ``grid`` on ``device``."""
        return self._plans.get_or_make((grid, tuple(tiles), scale, device),
                                       lambda: make_plan(grid, tiles, scale, device))


def finish_canvas(canvas: torch.Tensor, uint8: bool) -> torch.Tensor:
    """The finished output image of a stitched fp32 (3, sH, sW) ``canvas``: clamped to [0, 1] in
    place, and with ``uint8`` rounded to ``round(255 x)`` (the values
    :func:`~gdq_engine.io.to_uint8` gives) as a new uint8 tensor (the canvas then holds 255 x)."""
    canvas.clamp_(0, 1)
    return canvas.mul_(255).round_().to(torch.uint8) if uint8 else canvas
