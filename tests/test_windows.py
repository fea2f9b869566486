"""runtime/windows.py: a batch's windows as one gather, equal to tiler.extract_windows' slices bit
for bit (any grid, margins, batches ending mid-row, one tile, uint8 and float images), in
channels-last memory; the index cache; and on CUDA (with a GPU) the same values."""

import pytest
import torch

from gdq_engine.runtime.tiler import extract_windows, make_grid, whole_image_grid
from gdq_engine.runtime.windows import WindowCutter, gather_windows, window_index


@pytest.mark.parametrize("h,w,patch,stride,margin,batch", [
    (13, 11, 8, 6, 0, 3),     # batches that end mid-row of the grid
    (9, 21, 6, 5, 2, 4),      # margins: windows larger than their tiles, shifted at borders
    (10, 10, 10, 10, 0, 1),   # one tile
    (17, 5, 7, 4, 1, 100),    # a side shorter than the patch, one batch
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_gather_equals_the_slices_in_channels_last(h, w, patch, stride, margin, batch, dtype):
    g = torch.Generator().manual_seed(h * w + margin)
    img = torch.rand(3, h, w, generator=g)
    img = (img * 255).round().to(torch.uint8) if dtype == torch.uint8 else img
    grid = make_grid(h, w, patch, stride, margin)
    cutter = WindowCutter()
    for start in range(0, len(grid), batch):
        idx = list(range(start, min(start + batch, len(grid))))
        got, want = cutter.cut(img, grid, idx), extract_windows(img, grid, idx)
        assert got.dtype == dtype and got.shape == want.shape and torch.equal(got, want)
        assert got.is_contiguous(memory_format=torch.channels_last)
        before = got.clone()
        img.add_(1)  # the windows are a copy: they do not follow the image (uint8 wraps, and back)
        assert torch.equal(got, before)
        img.sub_(1)


def test_whole_image_grid_and_a_strided_image():
    img = torch.rand(3, 20, 30)[:, ::2, 1::3]  # a view with strides of its own
    grid = whole_image_grid(*img.shape[1:])
    assert torch.equal(WindowCutter().cut(img, grid, [0]), extract_windows(img, grid, [0]))


def test_index_tensors_are_cached_per_grid_and_batch_and_bounded():
    img = torch.rand(3, 30, 30)
    cutter = WindowCutter(capacity=2)
    grid = make_grid(30, 30, 8, 6)
    cutter.cut(img, grid, [0, 1])
    first = cutter._index[(grid, (0, 1), img.device)]
    cutter.cut(img, grid, [0, 1])
    assert cutter._index[(grid, (0, 1), img.device)] is first and len(cutter._index) == 1
    cutter.cut(img, grid, [2])
    cutter.cut(img, make_grid(30, 30, 10, 10), [0])
    assert len(cutter._index) == 2 and (grid, (0, 1), img.device) not in cutter._index  # least recently used out
    with pytest.raises(ValueError, match="grid"):
        cutter.cut(torch.rand(3, 31, 30), grid, [0])


def test_window_index_is_each_windows_pixel_coordinates():
    grid = make_grid(13, 11, 8, 6, 1)
    rows, cols = window_index(grid, [1, 2], "cpu")
    (wh, ww), t = grid.window, grid.tiles[2]
    assert rows.shape == (2, wh, 1) and cols.shape == (2, 1, ww) and rows.dtype == torch.int64
    assert rows[1, :, 0].tolist() == list(range(t.win_y, t.win_y + wh))
    assert cols[1, 0].tolist() == list(range(t.win_x, t.win_x + ww))
    img = torch.arange(3 * 13 * 11.0).view(3, 13, 11)
    assert torch.equal(gather_windows(img, rows, cols), extract_windows(img, grid, [1, 2]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gather_equals_the_slices():
    img = torch.rand(3, 270, 480, device="cuda")
    grid = make_grid(270, 480)
    idx = list(range(len(grid)))
    assert torch.equal(WindowCutter().cut(img, grid, idx), extract_windows(img, grid, idx))
