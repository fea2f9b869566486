import math

import numpy as np
import pytest
import torch
from conftest import random_image, shared

from gdq_engine.io import load_image
from gdq_engine.metrics import imresize, psnr_y, rgb_to_y, ssim_y
from gdq_engine.train.data import make_lr


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_imresize_matches_official_set5_lr(scale):
    diffs = []
    for hr_path in sorted(shared("val", "Set5", "HR").glob("*.png")):
        lr, _ = make_lr(load_image(hr_path), scale)
        ref = load_image(shared("val", "Set5", "LR_bicubic", f"X{scale}", f"{hr_path.stem}x{scale}.png"))
        assert lr.shape == ref.shape
        diffs.append(((lr - ref).abs() * 255).mean().item())
    assert max(diffs) < 0.5, diffs


def test_imresize_identity_and_constant():
    x = random_image(9, 7)
    assert torch.allclose(imresize(x, 1), x, atol=1e-12)
    c = torch.full((1, 3, 12, 10), 0.3, dtype=torch.float64)
    for s in (0.5, 1 / 3, 2, 3):
        y = imresize(c, s)
        assert y.shape[-2:] == (math.ceil(12 * s - 1e-9), math.ceil(10 * s - 1e-9))
        assert torch.allclose(y, torch.full_like(y, 0.3), atol=1e-12)


def test_imresize_hand_computed_weights():
    # Upscaling x2 of a 1-D impulse: MATLAB taps at u = x/2 + 0.25 give cubic(0.25), cubic(0.75) ...
    from gdq_engine.metrics import resize_matrix

    m = resize_matrix(8, 16, 2.0)
    row = m[4]  # output sample 5 (1-based) -> u = 2.75
    cubic = lambda t: (1.5 * abs(t) ** 3 - 2.5 * t * t + 1) if abs(t) <= 1 else (
        -0.5 * abs(t) ** 3 + 2.5 * t * t - 4 * abs(t) + 2)
    expect = torch.zeros(8, dtype=torch.float64)
    for j in range(1, 5):  # 1-based input samples 1..4 around u=2.75
        expect[j - 1] = cubic(2.75 - j)
    assert torch.allclose(row, expect / expect.sum(), atol=1e-12)


def test_psnr_known_value():
    hr = random_image(20, 20).double().clamp(0.1, 0.9)
    sr = hr + 1 / 255
    y_step = sum((65.481, 128.553, 24.966)) / 255
    expected = 10 * math.log10(255**2 / y_step**2)
    assert psnr_y(sr, hr, 2).item() == pytest.approx(expected, abs=1e-9)
    assert math.isinf(psnr_y(hr, hr, 2).item())
    assert psnr_y(sr.unsqueeze(0), hr.unsqueeze(0), 2).shape == (1,)


def test_psnr_crops_border():
    hr = random_image(20, 20)
    sr = hr.clone()
    sr[:, :4, :] = 0  # damage only the border band
    assert math.isinf(psnr_y(sr, hr, 4).item())
    assert not math.isinf(psnr_y(sr, hr, 3).item())


def test_y_channel_range():
    assert rgb_to_y(torch.zeros(3, 2, 2)).unique().item() == pytest.approx(16.0)
    assert rgb_to_y(torch.ones(3, 2, 2)).unique().item() == pytest.approx(235.0)


def test_ssim_matches_skimage():
    skm = pytest.importorskip("skimage.metrics")
    hr = random_image(40, 36, seed=1)
    sr = (hr + 0.05 * random_image(40, 36, seed=2)).clamp(0, 1)
    ours = ssim_y(sr, hr, 2).item()
    ys, yh = rgb_to_y(sr)[0, 0, 2:-2, 2:-2].numpy(), rgb_to_y(hr)[0, 0, 2:-2, 2:-2].numpy()
    ref = skm.structural_similarity(ys, yh, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=255)
    assert ours == pytest.approx(ref, abs=1e-6)
    assert ssim_y(hr, hr, 2).item() == pytest.approx(1.0, abs=1e-12)
    assert 0 < ours < 1


def test_metric_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr_y(torch.rand(3, 10, 10), torch.rand(3, 10, 12), 2)
    with pytest.raises(ValueError, match="RGB"):
        psnr_y(torch.rand(1, 10, 10), torch.rand(1, 10, 10), 2)
    with pytest.raises(ValueError):
        imresize(np.zeros((3, 4, 4)), 2)
