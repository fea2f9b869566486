"""Named models: the FP weights shipped in the package and the official EDSR-PyTorch files.

``load_model("edsr-baseline-x4")`` reads the package's own weights (trained by
``python -m gdq_engine train``, see README). ``load_model("edsr-baseline-x4-official")`` finds the
official EDSR-PyTorch checkpoint in torch.hub's cache, downloading it there when a network exists;
offline it fails with a message that says where to put the file.
"""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import torch

from .checkpoints import CheckpointError, model_from_checkpoint, read_checkpoint
from .common import SRModel

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"

SHIPPED = {
    "edsr-baseline-x2": "edsr_baseline_x2.pt",
    "edsr-baseline-x4": "edsr_baseline_x4.pt",
}

_EDSR_URL = "https://cv.snu.ac.kr/research/EDSR/models/"
OFFICIAL = {  # name -> (url, sha256 prefix encoded in the file name)
    "edsr-baseline-x2-official": (_EDSR_URL + "edsr_baseline_x2-1bc95232.pt", "1bc95232"),
    "edsr-baseline-x3-official": (_EDSR_URL + "edsr_baseline_x3-abf2a44e.pt", "abf2a44e"),
    "edsr-baseline-x4-official": (_EDSR_URL + "edsr_baseline_x4-6b446fab.pt", "6b446fab"),
}


def known_models() -> list[str]:
    """Names accepted by :func:`load_model` besides file paths."""
    return sorted(SHIPPED) + sorted(OFFICIAL)


def official_cache_path(name: str) -> Path:
    """Where torch.hub keeps (or will keep) the official checkpoint ``name``."""
    url, _ = OFFICIAL[name]
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


def fetch_official(name: str, download: bool = True) -> Path:
    """Path of an official checkpoint in torch.hub's cache, downloading it (sha256 prefix checked)
    when missing and ``download`` is true. Raises ``CheckpointError`` offline, saying what to do."""
    if name not in OFFICIAL:
        raise CheckpointError(f"unknown official model {name!r}; known: {sorted(OFFICIAL)}")
    url, prefix = OFFICIAL[name]
    path = official_cache_path(name)
    if path.is_file():
        return path
    hint = f"download {url} by hand and put it at {path}, or pass the file's path to load_model"
    if not download:
        raise CheckpointError(f"{name} is not in the torch.hub cache; {hint}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix, progress=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot download {name} ({type(exc).__name__}: {exc}); {hint}") from exc
    return path


def from_pretrained(name: str, download: bool = True, device=None) -> SRModel:
    """Load a named model: shipped (``edsr-baseline-x2/x4``) or official
    (``edsr-baseline-x{2,3,4}-official``, from torch.hub's cache or downloaded there)."""
    if name not in SHIPPED and name not in OFFICIAL:
        raise CheckpointError(f"unknown pretrained model {name!r}; known: {known_models()}")
    return load_model(name, device=device, download=download)


def load_model(name_or_path: str | os.PathLike | SRModel, scale: int | None = None, device=None,
               key: str | None = None, download: bool = True) -> SRModel:
    """Load an FP SR model in eval mode.

    Args:
        name_or_path: a shipped name (``edsr-baseline-x2``, ``edsr-baseline-x4``), an official name
            (``edsr-baseline-x{2,3,4}-official``), a checkpoint path in any supported format (see
            :mod:`gdq_engine.models.checkpoints`), or an :class:`SRModel` (returned as is).
        scale: if given, must match the checkpoint's scale (a mismatch is an error, never a
            silently wrong output).
        device: where to put the model (default CPU).
        key: pick this entry of a wrapped checkpoint (e.g. ``"params"`` instead of ``params_ema``).
        download: allow downloading official checkpoints.
    """
    if isinstance(name_or_path, SRModel):
        model = name_or_path
    else:
        name = str(name_or_path)
        if name in SHIPPED:
            path = WEIGHTS_DIR / SHIPPED[name]
            if not path.is_file():
                raise CheckpointError(f"shipped weights {path} are missing from this installation")
        elif name in OFFICIAL:
            path = fetch_official(name, download=download)
        elif Path(name).exists():
            path = Path(name)
        else:
            raise CheckpointError(f"{name!r} is neither a checkpoint file nor a known model; known: {known_models()}")
        payload = read_checkpoint(path)
        if payload.get("format") == "gdq_engine-quantized":
            raise CheckpointError(f"{path} is a quantized checkpoint: load it with gdq_engine.load_quantized(path) "
                                  "or pass the path to gdq_engine.Engine")
        model, _ = model_from_checkpoint(payload, key=key, source=str(path))
    if scale is not None and int(scale) != model.scale:
        raise CheckpointError(f"requested scale x{scale} but the model is x{model.scale}")
    return model.to(device) if device is not None else model
