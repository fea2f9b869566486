"""An image's whole work as CUDA graph replays (``Engine(image_graphs=...)``).

The tiled path queues an image's work from the host piece by piece: the input's (min, max), the
window gather, the network's graph replay per batch, the Triton stitch, the finish (clamp, and
the uint8 rounding) and the finiteness flag, with Python, dispatch and table lookups between
them, and on a GPU the network's replay starts only after the host has done the first of them.
An image graph holds all of it, captured per (image size, tiling, bit-widths, output dtype, batch
size) on the key's second use (:class:`~gdq_engine.runtime.graphs.GraphCache`). A static policy's
image then costs the host: one copy in, one replay, one copy out and one read of (finite, min, max).

A patch-wise dynamic policy with a device stage (Granular-DQ, EntropyOnly) takes two replays: the
image's *stage graph* (every batch's windows, FP head and the policy's device stage:
:func:`stage_fn`), one host read of the stages, whose bit-widths the policy decides on the host,
then the image graph of those widths. An image whose patches all got one width replays that
width's static image graph; mixed widths key a graph on the widths of every patch, whose groups'
index tables are made before it (an upload of host data cannot be captured). Where an image
size's last two images got one pattern (:meth:`ImageGraphs.guess`), the engine queues that
pattern's image graph before the read, so the read's round trip overlaps the GPU's work; a wrong
guess costs one image's work and stops the guesses until a pattern repeats.
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


def image_fn(plan: ImagePlan, network: Callable[[torch.Tensor, int], torch.Tensor], uint8: bool
             ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The whole image's work as one function of the (1, 3, H, W) fp32 image on the device:
    returns (the finished (1, 3, sH, sW) image, fp32 or uint8 with ``uint8``; a (1, 3) fp32 flag:
    1 if every value stitched into it is finite else 0, the input's min, its max). ``network``
    maps (K, 3, h, w) channels-last fp32 windows and their batch's number in ``plan.batches`` to
    (K, 3, sh, sw) fp32 SR windows without host syncs (its result is stitched before its next
    call). Call it in inference mode. The same values as the tiled path: the gather, the network,
    the Triton stitch (``kernels/stitch.py``) and :func:`~gdq_engine.runtime.stitch.finish_canvas`."""
    from ..kernels import ops

    def run(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img = images[0]
        lo, hi = torch.aminmax(img)
        canvas = img.new_empty((img.shape[0], *plan.output))
        bad = torch.zeros(1, dtype=torch.int32, device=img.device)
        for k, batch in enumerate(plan.batches):
            sr = network(batch_windows(img, batch), k)
            ops.stitch_windows(canvas, sr, batch.stitch.boxes, batch.stitch.extent, bad)
        result = finish_canvas(canvas, uint8)
        flag = torch.stack([(bad[0] == 0).to(lo.dtype), lo, hi])
        return result[None], flag[None]

    return run


def batch_windows(img: torch.Tensor, batch: ImageBatch) -> torch.Tensor:
    """The (K, 3, h, w) channels-last windows of ``batch`` cut from the (3, H, W) image ``img``."""
    return gather_windows(img, *batch.index).contiguous(memory_format=torch.channels_last)


def stage_fn(plan: ImagePlan, stage: Callable[[torch.Tensor], torch.Tensor]
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A dynamic policy's device stage over the whole image, as one function of the (1, 3, H, W)
    fp32 image on the device: returns (1, P, ...) float32, the rows ``stage`` gives each batch's
    (K, 3, h, w) channels-last windows (:func:`batch_windows`), in tile order. ``stage`` (the FP
    head and the policy's device stage) must not synchronise with the host."""
    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([stage(batch_windows(images[0], batch)) for batch in plan.batches])[None]

    return run


class ImageGraphs:
    """An engine's image graphs (at most ``capacity``, least recently used dropped; they share one
    memory pool and replay one at a time), its dynamic policy's stage graphs (as many, in a cache
    of their own) and its image plans."""

    def __init__(self, capacity: int = 4):
        self.graphs = GraphCache(capacity, what="the whole image", lend=True)
        self.stages = GraphCache(capacity, what="the image's bit policy", lend=True)
        self._plans = TableCache(4 * capacity)
        self._groups = TableCache(16 * capacity)
        self._patterns = TableCache(4 * capacity)  # (plan, policy) -> (widths, times in a row)
        self.guesses = {"hits": 0, "misses": 0}

    def guess(self, plan: ImagePlan, policy: object) -> tuple[int, ...] | None:
        """The widths to run ahead of the host's read for the next image of ``plan`` under the
        policy tagged ``policy``: the pattern its last two images both got, else None."""
        widths, times = self._patterns.get(self._pattern_key(plan, policy), ((), 0))
        return widths if times >= 2 else None

    def note(self, plan: ImagePlan, policy: object, widths: tuple[int, ...], guessed: tuple[int, ...] | None) -> None:
        """Record the widths an image of ``plan`` got (and whether ``guessed``, the pattern run
        ahead, was right, in :attr:`guesses`)."""
        if guessed is not None:
            self.guesses["hits" if widths == guessed else "misses"] += 1
        key = self._pattern_key(plan, policy)
        last, times = self._patterns.get(key, ((), 0))
        self._patterns.put(key, (widths, times + 1 if widths == last else 1))

    @staticmethod
    def _pattern_key(plan: ImagePlan, policy: object) -> tuple:
        """What :meth:`guess` and :meth:`note` key a run of width patterns on: the tiling and batch
        of ``plan``, and the policy's tag."""
        return plan.grid, plan.batch_size, policy

    def plan(self, key: tuple, make: Callable[[], ImagePlan | None]) -> ImagePlan | None:
        """The plan of ``key`` (image size and tiling), made by ``make()`` on its first use; None
        when ``make`` found that images of that size do not run as an image graph."""
        plan = self._plans.get_or_make(key, lambda: make() or False)  # False: cached "no"
        return plan or None

    def run(self, img: torch.Tensor, plan: ImagePlan, network: Callable[[torch.Tensor, int], torch.Tensor],
            tag: object, uint8: bool, keep: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`image_fn` on the (3, H, W) fp32 image ``img`` (on the compute device) as a graph
        replay (eagerly on the key's first use, on CPU tensors, and after a failed capture).
        ``tag`` names the network (its bit-widths): another ``network`` needs another tag.
        ``keep``: device tensors ``network`` reads that the graph must hold (the groups' index
        tables). Returns (the (3, sH, sW) image, the (3,) flag): the graph's own buffers, valid
        until the next call."""
        with torch.inference_mode():  # the buffers the graph keeps are inference tensors, as the network's
            result, flag = self.graphs(("image", tag, uint8, plan.grid, plan.batch_size), img[None],
                                       image_fn(plan, network, uint8), pad=False, keep=(plan, keep))
        return result[0], flag[0]

    def stage(self, img: torch.Tensor, plan: ImagePlan, stage: Callable[[torch.Tensor], torch.Tensor],
              tag: object) -> torch.Tensor:
        """:func:`stage_fn` on the (3, H, W) fp32 image ``img`` (on the compute device) as a graph
        replay (eagerly where :meth:`run` would be): the (P, ...) float32 stage of every patch, the
        graph's own buffer, valid until the next call. ``tag`` names the policy."""
        with torch.inference_mode():
            return self.stages(("stage", tag, plan.grid, plan.batch_size), img[None], stage_fn(plan, stage),
                               pad=False, keep=plan)[0]

    def groups(self, plan: ImagePlan, bits: tuple[int, ...], device: torch.device) -> list[list]:
        """Per batch of ``plan``, the :func:`~gdq_engine.runtime.scheduler.bit_groups` of its
        patches' widths (``bits``: one per tile, in tile order) on ``device``, made on the first
        use of (plan, bits) and kept: a graph captured on them reads them at every replay."""
        def make() -> list[list]:
            from .scheduler import bit_groups

            return [list(bit_groups(torch.tensor([bits[t] for t in batch.tiles]), device)) for batch in plan.batches]

        return self._groups.get_or_make((plan.grid, plan.batch_size, bits, device), make)
