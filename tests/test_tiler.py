import pytest
import torch
from conftest import random_image

from gdq_engine.models import EDSR
from gdq_engine.runtime.tiler import kept_spans, make_grid, patch_starts


def test_exact_coordinates_papers_protocol():
    assert patch_starts(200, 96, 90) == [0, 90, 104]
    assert kept_spans([0, 90, 104], 96, 200) == [(0, 93), (93, 145), (145, 200)]
    assert patch_starts(96, 96, 90) == [0]
    assert patch_starts(187, 96, 90) == [0, 90, 91]
    grid = make_grid(187, 200, 96, 90)
    assert len(grid) == 9 and grid.window == (96, 96)
    assert grid.tiles[-1].win_y == 91 and grid.tiles[-1].win_x == 104


@pytest.mark.parametrize("h,w,patch,stride,margin", [
    (97, 131, 96, 90, 0), (37, 53, 16, 11, 3), (50, 23, 24, 24, 5), (17, 19, 8, 1, 2), (40, 40, 96, 90, 4)])
def test_every_pixel_owned_exactly_once(h, w, patch, stride, margin):
    grid = make_grid(h, w, patch, stride, margin)
    owner = torch.zeros(h, w, dtype=torch.int32)
    wh, ww = grid.window
    for t in grid.tiles:
        (y0, y1), (x0, x1) = t.keep_y, t.keep_x
        owner[y0:y1, x0:x1] += 1
        assert 0 <= t.win_y <= h - wh and 0 <= t.win_x <= w - ww
        assert t.win_y <= y0 and y1 <= t.win_y + wh and t.win_x <= x0 and x1 <= t.win_x + ww
        # Kept pixels are at least `margin` away from a window edge unless that edge is the image's.
        if t.win_y > 0:
            assert y0 - t.win_y >= margin
        if t.win_y + wh < h:
            assert t.win_y + wh - y1 >= margin
        if t.win_x > 0:
            assert x0 - t.win_x >= margin
        if t.win_x + ww < w:
            assert t.win_x + ww - x1 >= margin
    assert (owner == 1).all()


def test_grid_errors():
    with pytest.raises(ValueError, match="too small"):
        make_grid(3, 50)
    with pytest.raises(ValueError, match="stride"):
        make_grid(100, 100, 96, 97)
    with pytest.raises(ValueError, match="margin"):
        make_grid(100, 100, 96, 90, -1)


def _engine(model, **kw):
    from gdq_engine import Engine

    return Engine(model, device="cpu", **kw)


def test_tiled_equals_whole_inside_centres_for_small_receptive_field(tiny_edsr):
    # 1-block net: receptive radius 6 < half the overlap (16 - 8 = 8): centres see full context.
    assert tiny_edsr.receptive_radius <= 8
    x = random_image(53, 71, n=1, seed=3)
    tiled = _engine(tiny_edsr, patch_size=24, stride=8).upscale(x)
    whole = _engine(tiny_edsr, patch_size=None).upscale(x)
    assert (tiled - whole).abs().max() < 1e-5


def test_margin_removes_seams_and_costs_compute():
    torch.manual_seed(0)
    model = EDSR(2, n_feats=8, n_blocks=4).eval()
    r = model.receptive_radius
    x = random_image(61, 47, n=2, seed=4)
    whole = _engine(model, patch_size=None).upscale(x)
    seamy = _engine(model, patch_size=20, stride=18).upscale(x)
    assert (seamy - whole).abs().max() > 1e-3  # the seam exists without context
    exact, report = _engine(model, patch_size=20, stride=18, margin=r).upscale(x, return_report=True)
    assert (exact - whole).abs().max() < 1e-5
    assert report.patches == 2 * len(make_grid(61, 47, 20, 18, r))


def test_batching_does_not_change_output(tiny_edsr):
    x = random_image(45, 50, n=1, seed=5)
    a = _engine(tiny_edsr, patch_size=16, stride=12, batch_size=1).upscale(x)
    b = _engine(tiny_edsr, patch_size=16, stride=12, batch_size=64).upscale(x)
    assert torch.allclose(a, b, atol=1e-6)
