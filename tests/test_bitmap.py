"""Bit-width pictures (gdq_engine/bitmap.py, `upscale --bitmap`)."""

import pytest
import torch
from conftest import random_image

from gdq_engine.bitmap import BIT_COLOR_NAMES, BIT_COLORS, bit_map
from gdq_engine.io import load_image, save_image
from gdq_engine.models import EDSR
from gdq_engine.models.checkpoints import save_checkpoint
from gdq_engine.runtime.tiler import make_grid


def test_each_patch_region_gets_its_bits_colour():
    grid = make_grid(20, 30, patch=10, stride=10)
    bits = [2, 4, 8, 4, 2, 8]
    img = torch.zeros(3, 20, 30)  # black: the picture is exactly strength * colour
    out = bit_map(img, bits, grid, strength=1.0)
    for tile, b in zip(grid.tiles, bits):
        (y0, y1), (x0, x1) = tile.keep_y, tile.keep_x
        want = torch.tensor(BIT_COLORS[b]).view(3, 1, 1).expand(3, y1 - y0, x1 - x0)
        assert torch.allclose(out[:, y0:y1, x0:x1], want)
    with pytest.raises(ValueError, match="6 tiles"):
        bit_map(img, bits[:5], grid)
    with pytest.raises(ValueError, match="expected a"):
        bit_map(torch.zeros(3, 21, 30), bits, grid)


def test_cli_upscale_writes_bitmap(tmp_path, capsys):
    from gdq_engine.cli import main

    torch.manual_seed(0)
    save_checkpoint(EDSR(scale=2, n_feats=8, n_blocks=1), tmp_path / "tiny.pt")
    (tmp_path / "calib").mkdir()
    for i in range(3):
        save_image(random_image(48, 48, seed=i), tmp_path / "calib" / f"{i}.png")
    save_image(random_image(30, 40, seed=7), tmp_path / "in.png")
    common = [str(tmp_path / "in.png"), str(tmp_path / "out.png"), "--model", str(tmp_path / "tiny.pt"),
              "--patch-size", "16", "--stride", "14", "--bitmap", str(tmp_path / "bits.png")]
    assert main(["upscale", *common, "--policy", "fp"]) == 2 and not (tmp_path / "bits.png").exists()
    capsys.readouterr()
    assert main(["upscale", *common, "--policy", "entropy:3,5,8", "--calib", str(tmp_path / "calib")]) == 0
    assert "patches tinted by bits: cyan 3, yellow 5, red 8)" in capsys.readouterr().err  # the policy's widths
    assert load_image(tmp_path / "bits.png").shape == (3, 30, 40)
    assert load_image(tmp_path / "out.png").shape == (3, 60, 80)


def test_every_width_has_a_colour_and_a_name():
    assert sorted(BIT_COLORS) == sorted(BIT_COLOR_NAMES) == list(range(2, 9))
