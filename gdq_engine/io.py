"""Image I/O and conversions between the formats users hand to the engine.

Internal format: (N,3,H,W) float32 tensor in [0,1]. Files are read with Pillow.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
NO_ALPHA_SUFFIXES = (".jpg", ".jpeg")  # formats Pillow writes without an alpha channel


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as a (3,H,W) float32 tensor in [0,1] (grey and palette become RGB).

    The file's EXIF orientation is applied (the image comes out as viewers show it), and 16-bit
    grey files keep their 16-bit values (k / 65535). Raises ``ValueError`` naming the file when
    it is missing or not an image. An alpha channel is dropped here; :func:`load_image_rgba`
    keeps it.
    """
    rgb, _ = load_image_rgba(path)
    return rgb


def load_image_rgba(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read an image as ((3,H,W) RGB, (1,H,W) alpha or None), float32 in [0,1], as
    :func:`load_image` does."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such image file: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return pil_to_tensors(im, source=str(path))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path} is not a readable image: {exc}") from exc


# Pillow's one-channel modes of more than 8 bits: 16-bit grey PNG / TIFF ("I;16*", or "I" from
# some files), 32-bit float TIFF ("F"). ``convert("RGB")`` clips them at 255, which turns a
# 16-bit image white; they are scaled here instead.
_DEEP_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
GREY_MODES = ("1", "L", "LA", *_DEEP_GREY_MODES)  # Pillow's grey modes: 1-bit, 8-bit (with alpha), and those


def pil_to_tensors(im, source: str = "image") -> tuple[torch.Tensor, torch.Tensor | None]:
    """A PIL image as ((3,H,W) RGB, (1,H,W) alpha or None), float32 in [0,1]: grey and palette
    images become RGB; 16-bit grey (``I;16``, or ``I`` with values up to 65535) is k / 65535 and
    float grey (``F``) is taken as it is, both repeated on the three channels. ``ValueError``
    (naming ``source``) for ``I`` values outside 0..65535 and ``F`` values outside [0, 1]."""
    if im.mode in _DEEP_GREY_MODES:
        grey = np.asarray(im).astype(np.float64)
        if im.mode == "F":
            if not (np.isfinite(grey).all() and grey.min() >= 0 and grey.max() <= 1):
                raise ValueError(f"{source}: a float image must hold values in [0, 1], got "
                                 f"[{grey.min():.3g}, {grey.max():.3g}]")
        else:
            if grey.min() < 0 or grey.max() > 65535:
                raise ValueError(f"{source}: integer grey values must be 16-bit (0..65535), got "
                                 f"[{grey.min():.0f}, {grey.max():.0f}]")
            grey = grey / 65535.0
        return torch.from_numpy(grey).float().expand(3, *grey.shape).contiguous(), None
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    rgba = im.convert("RGBA") if has_alpha else im.convert("RGB")
    img = torch.from_numpy(np.asarray(rgba, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
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


def save_image(img: torch.Tensor, path: str | os.PathLike, alpha: torch.Tensor | None = None,
               grey: bool = False) -> None:
    """Write a (3,H,W) or (1,3,H,W) float image in [0,1] (rounded to 8 bit), or uint8 image,
    atomically.

    The file is written to a temporary name and renamed, so a failure never leaves a partial file.
    ``alpha``: optional (1,H,W) channel written as RGBA (JPEG has none: it is dropped with a
    warning). ``grey``: write one luma channel (Pillow's ITU-R 601-2 ``L``), for grey sources.
    """
    from PIL import Image

    path = check_output_path(path)
    suffix = path.suffix.lower()
    if alpha is not None and suffix in NO_ALPHA_SUFFIXES:
        warnings.warn(f"{path.name}: {suffix[1:].upper()} has no alpha channel; writing the colours only "
                      "(use .png, .webp or .tif to keep it)", stacklevel=2)
        alpha = None
    arr = to_uint8(img)
    pil = Image.fromarray(arr, "RGB")
    if grey:
        pil = pil.convert("L")
    if alpha is not None:
        a = (alpha.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).reshape(arr.shape[:2]).cpu().numpy()
        pil.putalpha(Image.fromarray(a, "L"))
    tmp = path.with_name(f".{path.name}.partial")
    try:
        pil.save(tmp, format=Image.registered_extensions()[suffix])
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def is_grey_file(path: str | os.PathLike) -> bool:
    """Whether the image file ``path`` is stored grey (one channel, with or without alpha); reads
    its header only."""
    from PIL import Image

    with Image.open(path) as im:
        return im.mode in GREY_MODES


def check_output_path(path: str | os.PathLike, make_folder: bool = False) -> Path:
    """``path`` as a ``Path`` once it is checked as an image file to write: a suffix of
    ``IMAGE_SUFFIXES`` and an existing folder (``make_folder``: made when missing, after the
    suffix is checked); ``ValueError`` naming the problem otherwise. Callers check their outputs
    before the work that fills them."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"{path}: unsupported output format {suffix!r}; use one of {IMAGE_SUFFIXES}")
    if make_folder:
        path.parent.mkdir(parents=True, exist_ok=True)
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the folder {path.parent} does not exist")
    return path


def as_batch(x) -> tuple[torch.Tensor, str]:
    """Convert user input to a (N,3,H,W) float tensor in [0,1]; also return its kind.

    Accepts: float tensors (N,3,H,W) / (3,H,W) in [0,1]; uint8 (0..255) and uint16 (0..65535)
    tensors of those shapes; numpy HWC arrays (uint8, uint16 or float 0..1); PIL images; file
    paths. The kind ("tensor4", "tensor3", "numpy", "pil") lets :func:`restore_kind` hand the
    result back in the same form (with :func:`to_input_dtype`, in the same dtype).
    """
    if isinstance(x, (str, os.PathLike)):
        return load_image(x).unsqueeze(0), "tensor4"
    try:
        from PIL import Image

        if isinstance(x, Image.Image):
            return pil_to_tensors(x, source="PIL image")[0].unsqueeze(0), "pil"
    except ImportError:  # pragma: no cover - Pillow is a dependency
        pass
    if isinstance(x, np.ndarray):
        if x.ndim != 3 or x.shape[2] != 3:
            raise ValueError(f"numpy images must be HWC with 3 channels, got shape {x.shape}")
        if _numpy_dtype(x) is None:
            raise ValueError(f"numpy images must be float in [0,1], uint8 or uint16, got dtype {x.dtype}")
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
    if t.dtype in INTEGER_FULL_SCALE:
        return t.float() / INTEGER_FULL_SCALE[t.dtype]
    if t.is_floating_point():
        return t
    raise ValueError(f"image tensors must be float in [0,1], uint8 or uint16, got dtype {t.dtype}")


INTEGER_FULL_SCALE = {torch.uint8: 255.0, torch.uint16: 65535.0}  # the integer image dtypes and their 1.0


def _numpy_dtype(x: np.ndarray) -> torch.dtype | None:
    """The torch dtype of image array ``x``: its own for float16/32/64 and uint8 / uint16 arrays,
    else None."""
    if x.dtype in (np.float16, np.float32, np.float64, np.uint8, np.uint16):
        return torch.from_numpy(np.empty(0, dtype=x.dtype)).dtype
    return None


def input_dtype_of(x) -> torch.dtype | None:
    """torch dtype of a tensor or numpy input (None for PIL images and paths)."""
    if torch.is_tensor(x):
        return x.dtype
    if isinstance(x, np.ndarray):
        return _numpy_dtype(x)
    return None


def to_input_dtype(y: torch.Tensor, input_dtype: torch.dtype | None) -> torch.Tensor:
    """The engine's (N,3,H,W) result ``y`` (float32 in [0,1], or uint8 where :func:`returns_uint8`)
    in the dtype of the input it came from: float16 / bfloat16 / float64 cast, uint16 as
    ``round(65535 x)``; others (and None: PIL images, paths) as it is."""
    if input_dtype == torch.uint16:
        return (y.float().clamp(0, 1) * 65535).round().to(torch.uint16)
    if input_dtype is not None and input_dtype.is_floating_point and y.is_floating_point():
        return y.to(input_dtype)
    return y


def returns_uint8(kind: str, input_dtype: torch.dtype | None) -> bool:
    """Whether the form :func:`as_batch` reported (``kind``, with :func:`input_dtype_of`'s dtype) is
    8-bit: PIL images, uint8 tensors and arrays; their results are rounded to uint8."""
    return kind == "pil" or input_dtype == torch.uint8


def restore_kind(y: torch.Tensor, kind: str):
    """Hand a (N,3,H,W) result back in the form :func:`as_batch` reported: ``y`` is uint8, already
    rounded (``round(255 x)``, as :func:`to_uint8` does), where :func:`returns_uint8`, else in [0, 1]
    in the input's dtype (:func:`to_input_dtype`)."""
    if kind == "pil":
        from PIL import Image

        return Image.fromarray(to_uint8(y), "RGB")
    if kind == "numpy":
        return y[0].permute(1, 2, 0).cpu().numpy()
    return y[0] if kind == "tensor3" else y
