"""Where and in what precision the engine computes: device and dtype arguments checked, with
errors that say what to do (a CPU-only torch asked for CUDA is a common install mistake)."""

from __future__ import annotations

import torch

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
               "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device=None) -> torch.device:
    """``device`` (a ``torch.device``, a string such as ``"cuda:1"``, or None: CUDA when
    available, else CPU) as a ``torch.device``. ``ValueError`` when it cannot be used: an unknown
    name, CUDA with a torch built without it or with no GPU visible, a GPU index out of range."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(f"device {str(dev)!r} asked for, but this torch ({torch.__version__}) is a CPU-only "
                             "build; install a CUDA build of torch, or use device='cpu'")
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(dev)!r} asked for, but no CUDA GPU is visible (driver, "
                             "CUDA_VISIBLE_DEVICES); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(dev)!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) "
                             "are visible")
    return dev


def resolve_dtype(dtype) -> torch.dtype:
    """``dtype`` (``torch.float32`` / ``float16`` / ``bfloat16``, or a name of one of
    :data:`DTYPE_NAMES`: ``"fp16"``, ``"bf16"`` ...) as a torch dtype; ``ValueError`` otherwise."""
    if isinstance(dtype, str) and dtype.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower()]
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16 (or one of "
                     f"{sorted(DTYPE_NAMES)}), got {dtype!r}")
