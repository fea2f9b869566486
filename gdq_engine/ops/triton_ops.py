"""The ``triton`` backend: availability checks and access to :mod:`gdq_engine.kernels.ops`.

Triton kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` is set before
Triton is imported (slow; used by the CPU test suite).
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device`` (None when it can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tests), got {device}"


def runs_by_default(device: torch.device) -> bool:
    """Whether code with a Triton kernel and a torch path takes the kernel on ``device`` unless told
    otherwise: a CUDA device where Triton can run (the CPU interpreter is for tests, which ask)."""
    return device.type == "cuda" and unavailable_reason(device) is None


def kernel_ops():
    """The kernel launchers module (imports Triton)."""
    from ..kernels import ops

    return ops
