"""benchmarks/oracle_allocation.py: per-patch errors add up to the evaluation's PSNR exactly, and the
greedy oracle stays within its FAB budget and spends it where it buys the most."""

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_image

from gdq_engine import Engine, quantize
from gdq_engine.metrics import psnr_y
from gdq_engine.models import EDSR

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from oracle_allocation import fab, greedy_oracle, patch_errors, set_psnr  # noqa: E402


def test_patch_errors_add_up_to_the_image_psnr():
    torch.manual_seed(0)
    q = quantize(EDSR(scale=2, n_feats=8, n_blocks=2), "static", bits=4, calib=random_image(16, 16, n=4))
    engine = Engine(q, device="cpu", patch_size=16, stride=12)
    lr, hr = random_image(30, 37, seed=1), random_image(60, 74, seed=2)
    errors = patch_errors(engine, lr, hr)
    assert len(errors) == len(engine.grid(30, 37)) == 9
    sr = (engine.upscale(lr).clamp(0, 1) * 255).round() / 255
    expected = float(psnr_y(sr[None], hr[None], 2)[0])
    pixels = (60 - 4) * (74 - 4)
    assert 10 * math.log10(255 ** 2 * pixels / sum(errors)) == pytest.approx(expected, abs=1e-4)


def test_greedy_oracle_spends_the_budget_where_it_buys_most():
    # Two images: one of two patches, one of one; patch (0, 1) gains a lot from 8 bits, the others little.
    images = [{"pixels": 100, "own": [4, 4], "sse": {"4": [50.0, 500.0], "8": [45.0, 100.0]}},
              {"pixels": 100, "own": [4], "sse": {"4": [300.0], "8": [290.0]}}]
    assert set_psnr(images, [[4, 4], [4]]) == pytest.approx(
        (10 * math.log10(255 ** 2 * 100 / 550) + 10 * math.log10(255 ** 2 * 100 / 300)) / 2)
    alloc = greedy_oracle(images, [4, 8], budget=4 + 4 / 3)  # one upgrade fits
    assert alloc == [[4, 8], [4]] and fab(alloc) == pytest.approx(4 + 4 / 3)
    assert greedy_oracle(images, [4, 8], budget=4.0) == [[4, 4], [4]]
    assert greedy_oracle(images, [4, 8], budget=8.0) == [[8, 8], [8]]
