"""Training data: HR images -> (LR, HR) pairs made with MATLAB bicubic, random aligned crops."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ..io import IMAGE_SUFFIXES, load_image
from ..metrics import imresize


def list_images(folders) -> list[Path]:
    """All image files (sorted) under the given folders (recursively). Raises if none are found."""
    files: list[Path] = []
    for folder in ([folders] if isinstance(folders, (str, Path)) else folders):
        folder = Path(folder)
        if not folder.exists():
            raise ValueError(f"image folder not found: {folder}")
        files += sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images found under {folders}")
    return files


def make_lr(hr: torch.Tensor, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mod-crop a (3,H,W) HR image to the scale and make its LR: both float in [0,1].

    The LR is MATLAB bicubic, rounded to 8 bit (as LR PNG files are), so training, calibration and
    evaluation see the same inputs.
    """
    h, w = hr.shape[-2:]
    hr = hr[..., : h - h % scale, : w - w % scale]
    lr = (imresize(hr, 1.0 / scale).clamp(0, 1) * 255).round() / 255
    return lr, hr


class PairedPatches:
    """In-memory (LR, HR) pairs with random aligned crops, flips and 90-degree rotations.

    ``sample(batch, generator)`` returns LR (B,3,p,p) and HR (B,3,p*s,p*s) float32 in [0,1].
    """

    def __init__(self, folders, scale: int, lr_patch: int = 48, progress: bool = True):
        self.scale, self.lr_patch = scale, lr_patch
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for path in tqdm(list_images(folders), desc=f"preparing x{scale} LR", disable=not progress):
            lr, hr = make_lr(load_image(path), scale)
            if min(lr.shape[-2:]) >= lr_patch:
                self.pairs.append(((lr * 255).round().to(torch.uint8), (hr * 255).round().to(torch.uint8)))
        if not self.pairs:
            raise ValueError(f"no training image is at least {lr_patch * scale} pixels on each side")

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        p, s = self.lr_patch, self.scale
        lrs, hrs = [], []
        picks = torch.randint(len(self.pairs), (batch,), generator=generator).tolist()
        for i in picks:
            lr, hr = self.pairs[i]
            y = int(torch.randint(lr.shape[1] - p + 1, (1,), generator=generator))
            x = int(torch.randint(lr.shape[2] - p + 1, (1,), generator=generator))
            lr_c = lr[:, y : y + p, x : x + p]
            hr_c = hr[:, y * s : (y + p) * s, x * s : (x + p) * s]
            flip_h, flip_v, rot = torch.randint(2, (3,), generator=generator).tolist()
            if flip_h:
                lr_c, hr_c = lr_c.flip(-1), hr_c.flip(-1)
            if flip_v:
                lr_c, hr_c = lr_c.flip(-2), hr_c.flip(-2)
            if rot:
                lr_c, hr_c = lr_c.transpose(-1, -2), hr_c.transpose(-1, -2)
            lrs.append(lr_c)
            hrs.append(hr_c)
        return torch.stack(lrs).float() / 255, torch.stack(hrs).float() / 255


def random_lr_patches(folders, scale: int, count: int = 32, size: int = 48, seed: int = 0,
                      progress: bool = False) -> torch.Tensor:
    """``count`` random (3, size, size) LR crops (MATLAB-bicubic LR of the images in ``folders``),
    stacked as (count, 3, size, size) float32 in [0,1]: calibration data for PTQ and policies."""
    data = PairedPatches(folders, scale, size, progress=progress)
    lr, _ = data.sample(count, torch.Generator().manual_seed(seed))
    return lr
