"""Dataset evaluation: PSNR/SSIM on Y of an upscaler against a folder of HR images.

Protocol (EDSR, BasicSR and the quantization papers): HR mod-cropped to the scale, LR made by
MATLAB bicubic and rounded to 8 bit, SR rounded to 8 bit, metrics on Y with ``scale`` border crop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .io import load_image
from .metrics import psnr_y, ssim_y
from .train.data import list_images, make_lr


@dataclass
class EvalResult:
    """Per-image and mean metrics of one upscaler on one folder."""

    name: str
    scale: int
    psnr: dict[str, float] = field(default_factory=dict)
    ssim: dict[str, float] = field(default_factory=dict)

    @property
    def mean_psnr(self) -> float:
        return sum(self.psnr.values()) / len(self.psnr)

    @property
    def mean_ssim(self) -> float:
        return sum(self.ssim.values()) / len(self.ssim)


def hr_folder(folder: str | Path) -> Path:
    """The folder of HR images: ``folder/HR`` when it exists (Set5's layout), else ``folder``."""
    folder = Path(folder)
    return folder / "HR" if (folder / "HR").is_dir() else folder


def evaluate_folder(upscale: Callable[[torch.Tensor], torch.Tensor], folder: str | Path, scale: int,
                    name: str = "model", progress: bool = True, limit: int | None = None) -> EvalResult:
    """Evaluate ``upscale`` ((1,3,h,w) LR in [0,1] -> (1,3,h*s,w*s)) on the HR images in ``folder``.

    Folders that hold ``HR/`` (like Set5) use that sub-folder. Returns PSNR (dB) and SSIM per file.
    """
    folder = hr_folder(folder)
    files = list_images(folder)[:limit]
    result = EvalResult(name=name, scale=scale)
    for path in tqdm(files, desc=f"eval {name} x{scale} on {folder.name}", disable=not progress, leave=False):
        lr, hr = make_lr(load_image(path), scale)
        with torch.no_grad():
            sr = upscale(lr.unsqueeze(0)).float().cpu()
        if sr.shape[-2:] != hr.shape[-2:]:
            raise ValueError(f"{name} returned {tuple(sr.shape[-2:])} for {path.name}, expected {tuple(hr.shape[-2:])}")
        sr = (sr.clamp(0, 1) * 255).round() / 255
        result.psnr[path.name] = float(psnr_y(sr, hr.unsqueeze(0), scale)[0])
        result.ssim[path.name] = float(ssim_y(sr, hr.unsqueeze(0), scale)[0])
    return result


def bicubic_upscaler(scale: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MATLAB-bicubic baseline as an upscaler callable."""
    from .metrics import imresize

    return lambda lr: imresize(lr, scale)
