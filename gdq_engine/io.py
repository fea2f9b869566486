"""Image I/O and conversions between the formats users hand to the engine.

Internal format: (N,3,H,W) float32 tensor in [0,1]. Files are read with Pillow.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as a (3,H,W) float32 tensor in [0,1] (grey and palette become RGB).

    Raises ``ValueError`` naming the file when it is missing or not an image. An alpha channel
    is dropped here; :func:`load_image_rgba` keeps it.
    """
    rgb, _ = load_image_rgba(path)
    return rgb


def load_image_rgba(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read an image as ((3,H,W) RGB, (1,H,W) alpha or None), float32 in [0,1]."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such image file: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            has_alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
            rgba = im.convert("RGBA") if has_alpha else im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path} is not a readable image: {exc}") from exc
    arr = torch.from_numpy(np.asarray(rgba, dtype=np.uint8).copy()).permute(2, 0, 1)
    img = arr.float() / 255.0
    if has_alpha:
        return img[:3].contiguous(), img[3:].contiguous()
    return img, None


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3,H,W) or (1,3,H,W) float tensor in [0,1] -> (H,W,3) uint8 array (rounded, clamped); a
    uint8 tensor is taken as it is."""
    if img.dim() == 4:
        if img.shape[0] != 1:
            raise ValueError("to_uint8 takes a single image")
        img = img[0]
    if img.dtype != torch.uint8:
        img = (img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return img.permute(1, 2, 0).cpu().numpy()


def save_image(img: torch.Tensor, path: str | os.PathLike, alpha: torch.Tensor | None = None) -> None:
    """Write a (3,H,W) or (1,3,H,W) float image in [0,1] (rounded to 8 bit), or uint8 image,
    atomically.

    The file is written to a temporary name and renamed, so a failure never leaves a partial file.
    ``alpha``: optional (1,H,W) channel written as RGBA.
    """
    from PIL import Image

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"unsupported output format {suffix!r}; use one of {IMAGE_SUFFIXES}")
    arr = to_uint8(img)
    if alpha is not None:
        a = (alpha.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).reshape(arr.shape[:2]).cpu().numpy()
        pil = Image.fromarray(np.dstack([arr, a]), "RGBA")
    else:
        pil = Image.fromarray(arr, "RGB")
    tmp = path.with_name(f".{path.name}.partial")
    try:
        pil.save(tmp, format=Image.registered_extensions()[suffix])
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def as_batch(x) -> tuple[torch.Tensor, str]:
    """Convert user input to a (N,3,H,W) float tensor in [0,1]; also return its kind.

    Accepts: float tensors (N,3,H,W) / (3,H,W) in [0,1]; uint8 tensors of those shapes (0..255);
    numpy HWC arrays (uint8 0..255 or float 0..1); PIL images; file paths. The kind ("tensor4",
    "tensor3", "numpy", "pil") lets :func:`restore_kind` hand the result back in the same form.
    """
    if isinstance(x, (str, os.PathLike)):
        return load_image(x).unsqueeze(0), "tensor4"
    try:
        from PIL import Image

        if isinstance(x, Image.Image):
            arr = np.asarray(x.convert("RGB"), dtype=np.uint8).copy()
            return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).float() / 255.0, "pil"
    except ImportError:  # pragma: no cover - Pillow is a dependency
        pass
    if isinstance(x, np.ndarray):
        if x.ndim != 3 or x.shape[2] != 3:
            raise ValueError(f"numpy images must be HWC with 3 channels, got shape {x.shape}")
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).unsqueeze(0)
        return _tensor_to_float(t), "numpy"
    if torch.is_tensor(x):
        if x.dim() == 3:
            return _tensor_to_float(x.unsqueeze(0)), "tensor3"
        if x.dim() == 4:
            return _tensor_to_float(x), "tensor4"
        raise ValueError(f"image tensors must be (N,3,H,W) or (3,H,W), got shape {tuple(x.shape)}")
    raise TypeError(f"cannot upscale an object of type {type(x).__name__}")


def _tensor_to_float(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if t.is_floating_point():
        return t
    raise ValueError(f"image tensors must be float in [0,1] or uint8, got dtype {t.dtype}")


def input_dtype_of(x) -> torch.dtype | None:
    """torch dtype of a tensor or numpy input (None for PIL images and paths)."""
    if torch.is_tensor(x):
        return x.dtype
    if isinstance(x, np.ndarray):
        return torch.uint8 if x.dtype == np.uint8 else torch.float32
    return None


def returns_uint8(kind: str, input_dtype: torch.dtype | None) -> bool:
    """Whether the form :func:`as_batch` reported (``kind``, with :func:`input_dtype_of`'s dtype) is
    8-bit: PIL images, uint8 tensors and arrays; their results are rounded to uint8."""
    return kind == "pil" or input_dtype == torch.uint8


def restore_kind(y: torch.Tensor, kind: str):
    """Hand a (N,3,H,W) result back in the form :func:`as_batch` reported: ``y`` is uint8, already
    rounded (``round(255 x)``, as :func:`to_uint8` does), where :func:`returns_uint8`, else float
    in [0, 1]."""
    if kind == "pil":
        from PIL import Image

        return Image.fromarray(to_uint8(y), "RGB")
    if kind == "numpy":
        return y[0].permute(1, 2, 0).cpu().numpy()
    return y[0] if kind == "tensor3" else y
