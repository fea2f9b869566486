"""Evaluation metrics with the SR community's exact protocol.

* :func:`imresize`: MATLAB ``imresize`` (bicubic, antialiased when downscaling), the way every SR
  paper makes its LR images (PIL's bicubic differs).
* :func:`psnr_y`, :func:`ssim_y`: PSNR / SSIM on the Y channel of BT.601 YCbCr (range 16..235 on a
  0..255 scale), with ``scale`` pixels cropped from each border, as EDSR, BasicSR and the
  quantization papers report them.

Images are float tensors in [0, 1], shaped (N,3,H,W) or (3,H,W). Metrics take the values as given;
quantize to 8 bit first (``(x * 255).round() / 255``) to match numbers computed on saved PNGs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_Y_WEIGHTS = (65.481, 128.553, 24.966)  # BT.601, RGB in [0,1] -> Y in [16,235]


def _matlab_cubic(x: torch.Tensor) -> torch.Tensor:
    """MATLAB's bicubic kernel (a = -0.5) evaluated at ``x``."""
    ax = x.abs()
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return near + far


def resize_matrix(in_len: int, out_len: int, scale: float, antialias: bool = True) -> torch.Tensor:
    """(out_len, in_len) float64 matrix M so that ``M @ signal`` is MATLAB's bicubic resize.

    Reproduces MATLAB's ``contributions``: the kernel is widened by 1/scale when downscaling
    (antialiasing), weights are normalised per output sample, and out-of-range taps are mirrored
    (symmetric padding).
    """
    kernel_width = 4.0
    if scale < 1 and antialias:
        def kernel(t):
            return scale * _matlab_cubic(scale * t)
        kernel_width /= scale
    else:
        kernel = _matlab_cubic
    x = torch.arange(1, out_len + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]
    weights = kernel(u[:, None] - idx)
    weights = weights / weights.sum(1, keepdim=True)
    mirror = torch.cat([torch.arange(in_len), torch.arange(in_len - 1, -1, -1)])
    cols = mirror[(idx.long() - 1) % (2 * in_len)]
    matrix = torch.zeros(out_len, in_len, dtype=torch.float64)
    matrix.scatter_add_(1, cols, weights)
    return matrix


def imresize(img: torch.Tensor, scale: float) -> torch.Tensor:
    """MATLAB-compatible bicubic resize by ``scale`` (e.g. 1/4 to make x4 LR, 2 to upscale).

    Args:
        img: (N,C,H,W) or (C,H,W) float tensor (any range; [0,1] for images).
        scale: positive factor; output size is ``ceil(H*scale) x ceil(W*scale)``.
    Returns:
        Float tensor of the input's dtype, same layout, neither rounded nor clamped.
    """
    if not torch.is_tensor(img) or img.dim() not in (3, 4) or not img.is_floating_point():
        raise ValueError("imresize expects a float tensor shaped (N,C,H,W) or (C,H,W)")
    if not scale > 0:
        raise ValueError(f"imresize scale must be positive, got {scale!r}")
    squeeze = img.dim() == 3
    x = img.unsqueeze(0) if squeeze else img
    h, w = x.shape[-2:]
    out_h, out_w = math.ceil(h * scale - 1e-9), math.ceil(w * scale - 1e-9)
    mh = resize_matrix(h, out_h, scale).to(x.device)
    mw = resize_matrix(w, out_w, scale).to(x.device)
    out = torch.matmul(torch.matmul(mh, x.to(torch.float64)), mw.T).to(img.dtype)
    return out.squeeze(0) if squeeze else out


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) or (3,H,W) RGB in [0,1] -> (N,1,H,W) float64 Y in [16,235] (BT.601)."""
    x = img.unsqueeze(0) if img.dim() == 3 else img
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected RGB images shaped (N,3,H,W) or (3,H,W), got {tuple(img.shape)}")
    w = torch.tensor(_Y_WEIGHTS, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    return 16.0 + (x.to(torch.float64) * w).sum(1, keepdim=True)


def _prepare_pair(sr: torch.Tensor, hr: torch.Tensor, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr shapes differ: {tuple(sr.shape)} vs {tuple(hr.shape)}")
    ys, yh = rgb_to_y(sr), rgb_to_y(hr)
    c = int(scale)
    if c > 0:
        if ys.shape[-1] <= 2 * c or ys.shape[-2] <= 2 * c:
            raise ValueError(f"image {tuple(sr.shape[-2:])} is too small for a border crop of {c}")
        ys, yh = ys[..., c:-c, c:-c], yh[..., c:-c, c:-c]
    return ys, yh


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, scale: int) -> torch.Tensor:
    """PSNR (dB) on Y with a ``scale``-pixel border crop, per image: returns shape (N,) or ().

    ``inf`` where the images are identical. Inputs: same-shape RGB float tensors in [0,1].
    """
    ys, yh = _prepare_pair(sr, hr, scale)
    mse = ((ys - yh) ** 2).mean(dim=(1, 2, 3))
    psnr = 10 * torch.log10(255.0**2 / mse)
    return psnr.squeeze(0) if sr.dim() == 3 else psnr


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


def ssim_y(sr: torch.Tensor, hr: torch.Tensor, scale: int) -> torch.Tensor:
    """SSIM on Y (0..255 scale) with a ``scale``-pixel border crop, per image: (N,) or ().

    MATLAB/BasicSR definition: 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, statistics
    over the valid region only.
    """
    ys, yh = _prepare_pair(sr, hr, scale)
    if min(ys.shape[-2:]) < 11:
        raise ValueError("ssim_y needs at least 11x11 pixels after the border crop")
    win = _gaussian_window().to(ys.device)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = F.conv2d(ys, win), F.conv2d(yh, win)
    sxx = F.conv2d(ys * ys, win) - mu_x**2
    syy = F.conv2d(yh * yh, win) - mu_y**2
    sxy = F.conv2d(ys * yh, win) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    ssim = ssim_map.mean(dim=(1, 2, 3))
    return ssim.squeeze(0) if sr.dim() == 3 else ssim
