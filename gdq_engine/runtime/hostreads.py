"""The host's reads of device results, timed (``UpscaleReport.wait_seconds``).

On a GPU, ``Engine.upscale`` queues its work and reads results back only where it must: a
dynamic policy's bit-widths of each batch, and the image's finiteness flag at the end. In those
reads the host waits for the GPU to catch up; the rest of the call is host work (Python, torch
dispatch, launches). A call whose waits are short spent its time queueing work: it is host-bound,
the GPU idled between launches, and a faster kernel does not shorten it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_waits: ContextVar[list[float] | None] = ContextVar("gdq_engine_host_waits", default=None)


@contextmanager
def counting_waits() -> Iterator[list[float]]:
    """Sum the seconds spent in :func:`to_host` reads of device tensors inside the block. Yields a
    one-item list holding the running sum in seconds (nested blocks count their own reads only)."""
    total = [0.0]
    token = _waits.set(total)
    try:
        yield total
    finally:
        _waits.reset(token)


@contextmanager
def waiting() -> Iterator[None]:
    """Add the block's seconds to the innermost :func:`counting_waits` block: wrap a host read of
    device memory (``t.cpu()``, a copy into host memory) that waits for the work computing it."""
    total = _waits.get()
    start = time.perf_counter()
    try:
        yield
    finally:
        if total is not None:
            total[0] += time.perf_counter() - start


def copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)``, timed by :func:`waiting` when it copies device memory into host
    memory (it then waits for the work computing ``source``)."""
    if target.device.type == "cpu" and source.device.type != "cpu":
        with waiting():
            target.copy_(source)
    else:
        target.copy_(source)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t.cpu()`` (any shape and dtype), timed by :func:`waiting` when ``t`` is on a device."""
    if t.device.type == "cpu":
        return t
    with waiting():
        return t.cpu()


class PendingRead:
    """A read of a device tensor queued now and waited on later: ``wait()`` returns the values it
    had when the read was made, on the host. On CUDA the copy goes, without blocking, into
    pinned host memory and an event marks its end, so work queued after it runs while the host
    waits (timed by :func:`waiting`); a CPU tensor is copied at once."""

    def __init__(self, t: torch.Tensor):
        if t.device.type != "cuda":
            self._host, self._done = t.clone(), None
            return
        self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self._host.copy_(t, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record()

    def wait(self) -> torch.Tensor:
        """The tensor's values on the host, once the copy has finished."""
        if self._done is not None:
            with waiting():
                self._done.synchronize()
        return self._host
