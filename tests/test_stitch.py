"""The Triton stitch (kernels/stitch.py, runtime/stitch.py) against the torch copies of
runtime/tiler.stitch_windows, bit for bit, on poisoned canvases; its finiteness flag; the Engine's
use of it (interpreter on CPU, compiled on GPU)."""

import pytest
import torch
from conftest import KERNEL_DEVICE, random_image

tk = pytest.importorskip("gdq_engine.kernels.ops", reason="triton is a test dependency", exc_type=ImportError)

from gdq_engine.runtime.stitch import Stitcher, make_plan  # noqa: E402
from gdq_engine.runtime.tiler import make_grid, owned_boxes, stitch_windows, whole_image_grid  # noqa: E402

DEV = torch.device(KERNEL_DEVICE)


def windows(grid, scale, n, seed, channels_last=False):
    wh, ww = grid.window
    sr = torch.randn(n, 3, wh * scale, ww * scale, generator=torch.Generator().manual_seed(seed))
    return sr.contiguous(memory_format=torch.channels_last) if channels_last else sr


@pytest.mark.parametrize("h,w,patch,stride,margin,scale,batch", [
    (13, 11, 8, 6, 0, 4, 3),     # batches that end mid-row of the grid
    (9, 21, 6, 5, 2, 2, 4),      # margins: windows larger than their tiles, shifted at borders
    (10, 10, 10, 10, 0, 3, 1),   # one tile
    (17, 5, 7, 4, 1, 4, 100),    # a side shorter than... the patch on one axis, one batch
])
def test_triton_stitch_equals_torch_copies_and_fills_every_pixel(h, w, patch, stride, margin, scale, batch):
    grid = make_grid(h, w, patch, stride, margin)
    sr = windows(grid, scale, len(grid), seed=h * w, channels_last=h % 2 == 1)
    want = torch.full((3, h * scale, w * scale), float("nan"))
    stitch_windows(want, sr, grid, range(len(grid)), scale)
    got = torch.full((3, h * scale, w * scale), float("nan"), device=DEV)  # poisoned
    bad = torch.zeros(1, dtype=torch.int32, device=DEV)
    src = sr.to(DEV)
    for start in range(0, len(grid), batch):
        idx = list(range(start, min(start + batch, len(grid))))
        plan = make_plan(grid, idx, scale, DEV)
        tk.stitch_windows(got, src[idx[0]:idx[-1] + 1], plan.boxes, plan.extent, bad)
    assert not torch.isnan(want).any() and torch.equal(got.cpu(), want) and int(bad) == 0


def test_triton_stitch_writes_into_a_strided_canvas():
    """An image of an output batch (out[n] of (N,3,H,W)) or a channel-last view: strides honoured."""
    grid, scale = make_grid(12, 14, 8, 6), 2
    sr = windows(grid, scale, len(grid), seed=3).to(DEV)
    want = torch.zeros(3, 24, 28)
    stitch_windows(want, sr.cpu(), grid, range(len(grid)), scale)
    plan = make_plan(grid, range(len(grid)), scale, DEV)
    bad = torch.zeros(1, dtype=torch.int32, device=DEV)
    batch = torch.zeros(2, 3, 24, 28, device=DEV)
    tk.stitch_windows(batch[1], sr, plan.boxes, plan.extent, bad)
    hwc = torch.zeros(24, 28, 3, device=DEV)
    tk.stitch_windows(hwc.permute(2, 0, 1), sr, plan.boxes, plan.extent, bad)
    assert torch.equal(batch[1].cpu(), want) and not batch[0].any()
    assert torch.equal(hwc.permute(2, 0, 1).cpu(), want)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_triton_stitch_flags_non_finite_values_it_copies_and_only_those(value):
    grid, scale = make_grid(14, 14, 8, 6), 2
    sr = windows(grid, scale, len(grid), seed=4)
    y0, y1, x0, x1, oy, ox = owned_boxes(grid, [0], scale)[0]
    wh, ww = sr.shape[-2:]
    assert x1 - x0 + ox < ww  # window 0 computes columns its right neighbour owns
    outside = sr.clone()
    outside[0, 1, 0, ww - 1] = value  # computed, then cropped away: never reaches the image
    inside = sr.clone()
    inside[0, 2, oy + y1 - y0 - 1, ox + x1 - x0 - 1] = value  # the box's last pixel
    plan = make_plan(grid, range(len(grid)), scale, DEV)
    for data, flagged in ((sr, 0), (outside, 0), (inside, 1)):
        bad = torch.zeros(1, dtype=torch.int32, device=DEV)
        canvas = torch.zeros(3, 28, 28, device=DEV)
        tk.stitch_windows(canvas, data.to(DEV), plan.boxes, plan.extent, bad)
        assert int(bad) == flagged


def test_triton_stitch_rejects_what_it_cannot_run():
    grid, scale = make_grid(8, 8, 8, 8), 2
    plan = make_plan(grid, [0], scale, "cpu")
    sr, canvas, bad = torch.zeros(1, 3, 16, 16), torch.zeros(3, 16, 16), torch.zeros(1, dtype=torch.int32)
    cases = [
        (lambda: tk.stitch_windows(canvas[0], sr, plan.boxes, plan.extent, bad), "canvas and"),
        (lambda: tk.stitch_windows(canvas, sr.half(), plan.boxes, plan.extent, bad), "fp32"),
        (lambda: tk.stitch_windows(canvas, sr, plan.boxes.long(), plan.extent, bad), "int32"),
        (lambda: tk.stitch_windows(canvas, torch.zeros(2, 3, 16, 16), plan.boxes, plan.extent, bad), r"\(2, 6\)"),
        (lambda: tk.stitch_windows(canvas, sr, plan.boxes, plan.extent, torch.zeros(1)), "int32"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_plans_are_cached_per_grid_and_batch_and_bounded():
    stitcher = Stitcher(capacity=2)
    stitcher.kernel_on_cpu = DEV.type == "cpu"
    bad = torch.zeros(1, dtype=torch.int32, device=DEV)
    for h in (8, 9, 8, 10, 11):
        grid = whole_image_grid(h, 8)
        canvas = torch.zeros(3, 2 * h, 16, device=DEV)
        assert stitcher.stitch(canvas, torch.ones(1, 3, 2 * h, 16, device=DEV), grid, [0], 2, bad)
        assert bool((canvas == 1).all())
    assert [k[0].height for k in stitcher._plans] == [10, 11]
    # not fp32, or on different devices: the torch copies, and the caller checks the values itself
    canvas = torch.zeros(3, 16, 16, dtype=torch.float64, device=DEV)
    assert not stitcher.stitch(canvas, torch.ones(1, 3, 16, 16, device=DEV), whole_image_grid(8, 8), [0], 2, bad)
    assert bool((canvas == 1).all())


@pytest.mark.parametrize("policy", ["fp", "static"])
def test_engine_stitches_with_triton_and_keeps_the_image_and_the_checks(tiny_edsr, policy):
    """The engine's output with the Triton stitch (on a CPU: the interpreter) equals the torch
    copies' bit for bit, over batches that split the grid; a non-finite output still raises."""
    from gdq_engine import Engine

    kw = dict(policy=policy, device=DEV, patch_size=8, stride=6, batch_size=3)
    if policy == "static":
        kw.update(bits=8, calib=random_image(12, 12, n=2), backend="reference")
    fused, plain = Engine(tiny_edsr, **kw), Engine(tiny_edsr, **kw)
    fused.stitcher.kernel_on_cpu = True
    plain.stitcher.fused = lambda canvas, sr: False
    lr = random_image(13, 17, n=2, seed=5).to(DEV)
    assert torch.equal(fused.upscale(lr), plain.upscale(lr))
    assert fused.stitcher._plans  # the kernel ran
    fused.model.tail.forward = lambda t: t[:, :3] * float("inf")
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        fused.upscale(lr)
