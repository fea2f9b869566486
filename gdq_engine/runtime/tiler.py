"""Tiling of LR images into fixed-size patches and stitching of the SR patches.

Protocol of the dynamic-quantization papers: P x P LR patches with stride S (default 96 / 90),
the last patch of a row/column shifted inside the image, and in overlaps each patch keeps the half
nearer its own centre (cut at the overlap midpoint).

Seams: a patch computed alone sees zero padding at its edges, so pixels near a cut differ from the
whole-image result. ``margin`` M adds LR context around every patch (the window grows to
P + 2M, shifted inside the image at borders) that is computed and then cropped away. Once M is at
least the network's receptive radius, tiled output equals whole-image output up to float rounding.
All windows of one image have the same size, so they run as one batch. An image side shorter
than the patch is covered by one patch of that side's length (the papers' test code does the same
for small images such as Set5 at x4).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

MIN_SIDE = 4  # smallest LR side the engine accepts (the policies pool features 4x4)
PAPER_OVERLAP = 6  # LR pixels two neighbouring patches share in the papers' protocol (96 / 90)


def default_stride(patch: int) -> int:
    """The stride of ``patch``-pixel patches when none is given: ``patch - 6`` (the papers' 96 -> 90;
    64 -> 58), or ``patch - patch // 8`` where an eighth of the patch is less than 6 pixels
    (32 -> 28, 16 -> 14), at least 1."""
    return max(1, patch - min(PAPER_OVERLAP, patch // 8))


def patch_starts(length: int, patch: int, stride: int) -> list[int]:
    """Start offsets of patches of size ``patch`` along ``length`` (last one shifted inside)."""
    if patch > length:
        raise ValueError(f"patch {patch} is larger than the image side {length}")
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] + patch < length:
        starts.append(length - patch)
    return starts


def kept_spans(starts: list[int], patch: int, length: int) -> list[tuple[int, int]]:
    """For each patch, the [lo, hi) range it writes: overlaps are split at their midpoints."""
    spans = []
    for i, s in enumerate(starts):
        lo = 0 if i == 0 else (s + starts[i - 1] + patch) // 2
        hi = length if i == len(starts) - 1 else (starts[i + 1] + s + patch) // 2
        spans.append((lo, hi))
    return spans


@dataclass(frozen=True)
class Tile:
    """One patch: its computed window (LR coords) and the region of the output it owns."""

    win_y: int
    win_x: int
    keep_y: tuple[int, int]
    keep_x: tuple[int, int]


@dataclass(frozen=True)
class TileGrid:
    """All tiles of an H x W LR image. ``window`` = (height, width) of every computed window."""

    height: int
    width: int
    window: tuple[int, int]
    tiles: tuple[Tile, ...]

    def __len__(self) -> int:
        return len(self.tiles)

    def __hash__(self) -> int:
        # Computed once: the engine's tables are keyed on the grid every batch, and the generated
        # hash would walk every tile each time.
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.height, self.width, self.window, self.tiles))
            object.__setattr__(self, "_hash", cached)
        return cached


def _axis(length: int, patch: int, stride: int, margin: int):
    starts = patch_starts(length, patch, stride)
    win = min(patch + 2 * margin, length)
    wins = [min(max(s - margin, 0), length - win) for s in starts]
    return win, wins, kept_spans(starts, patch, length)


def check_image_size(height: int, width: int) -> None:
    """Raise ``ValueError`` for empty images or images with a side below ``MIN_SIDE`` pixels."""
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ValueError(f"image {height}x{width} is too small: each side needs at least {MIN_SIDE} pixels")


@lru_cache(maxsize=64)
def make_grid(height: int, width: int, patch: int = 96, stride: int = 90, margin: int = 0) -> TileGrid:
    """Tile an LR image of ``height`` x ``width`` pixels (see module doc). Raises ``ValueError``
    for a stride outside [1, patch], a negative margin, or an image side below ``MIN_SIDE``.
    Grids are immutable and cached per arguments: the engine asks for one per image, and building
    one is Python work on the host before the frame's first launch."""
    if patch < 1 or not 1 <= stride <= patch:
        raise ValueError(f"need patch >= 1 and 1 <= stride <= patch, got patch={patch}, stride={stride}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    check_image_size(height, width)
    win_h, ys, spans_y = _axis(height, min(patch, height), stride, margin)
    win_w, xs, spans_x = _axis(width, min(patch, width), stride, margin)
    tiles = tuple(Tile(wy, wx, sy, sx) for wy, sy in zip(ys, spans_y) for wx, sx in zip(xs, spans_x))
    return TileGrid(height, width, (win_h, win_w), tiles)


def whole_image_grid(height: int, width: int) -> TileGrid:
    """A single window covering the whole image (whole-image mode)."""
    return TileGrid(height, width, (height, width), (Tile(0, 0, (0, height), (0, width)),))


def extract_windows(img: torch.Tensor, grid: TileGrid, tiles: range | list[int]) -> torch.Tensor:
    """(3,H,W) image -> (len(tiles), 3, wh, ww) windows of the given tile indices (a copy)."""
    wh, ww = grid.window
    return torch.stack([img[:, t.win_y:t.win_y + wh, t.win_x:t.win_x + ww]
                        for t in (grid.tiles[i] for i in tiles)])


def owned_boxes(grid: TileGrid, tiles: range | list[int], scale: int) -> list[tuple[int, int, int, int, int, int]]:
    """Per tile of ``tiles``, the output region its SR window owns, in output (x ``scale``) pixels:
    (y0, y1, x0, x1, oy, ox): canvas rows [y0, y1) and columns [x0, x1), taken from the window's
    pixels from (oy, ox) on. The boxes of all tiles of a grid tile the output exactly."""
    boxes = []
    for i in tiles:
        t = grid.tiles[i]
        (y0, y1), (x0, x1) = t.keep_y, t.keep_x
        boxes.append((y0 * scale, y1 * scale, x0 * scale, x1 * scale, (y0 - t.win_y) * scale, (x0 - t.win_x) * scale))
    return boxes


def stitch_windows(canvas: torch.Tensor, sr: torch.Tensor, grid: TileGrid, tiles: range | list[int],
                   scale: int) -> None:
    """Write each SR window's owned region (:func:`owned_boxes`) into ``canvas`` (3, H*scale,
    W*scale), in place: one copy per window (the pure-torch reference of the Triton stitch,
    kernels/stitch.py). A uint8 ``canvas`` gets the finished values: clamped to [0, 1] and
    rounded to ``round(255 x)``, elementwise as :func:`~gdq_engine.runtime.stitch.finish_canvas`
    does, so bit for bit the image a float canvas gives once finished."""
    for out, (y0, y1, x0, x1, oy, ox) in zip(sr, owned_boxes(grid, tiles, scale)):
        box = out[:, oy:oy + y1 - y0, ox:ox + x1 - x0]
        if canvas.dtype == torch.uint8:
            box = box.float().clamp(0, 1).mul(255).round()
        canvas[:, y0:y1, x0:x1] = box.to(canvas.dtype)
