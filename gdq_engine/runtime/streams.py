"""A batch's bit groups at the same time, one CUDA stream per bit-width.

A dynamic policy splits a batch of patches into groups, one per bit-width, and each group's
integer blocks run as one launch sequence (a CUDA graph replay, runtime/intgraph.py). One after
another on one stream, a small group (1-2 patches of a 1080p frame: 72-144 row tiles against an
H100's 132 SMs) leaves most of the GPU idle while it runs. Here every group's blocks run on a
stream of their own width, after the gathers that feed them, and the batch's stream waits for
all of them before the results are scattered back, so the groups' kernels may share the GPU.

What makes that safe: the body's graphs of different widths have separate memory pools and
workspaces (``IntegerBody``), so no two concurrent replays write the same memory; and each tensor
made on one stream and used on another is recorded on the other (``Tensor.record_stream``), so
the caching allocator does not hand its memory out again while that stream may still read it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch


class GroupStreams:
    """Runs ``fn(x_i, b_i)`` for a batch's groups ``(b_i, x_i)`` each on the stream of width
    ``b_i`` (created on first use, kept) and returns their results once the current stream
    has waited for them. ``device``: the CUDA device."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._streams: dict[int, object] = {}

    def stream(self, bits: int):
        """The stream of ``bits``-wide groups."""
        if bits not in self._streams:
            self._streams[bits] = self._new_stream()
        return self._streams[bits]

    def run(self, groups: list[tuple[int, torch.Tensor]], fn: Callable[[torch.Tensor, int], torch.Tensor]
            ) -> list[torch.Tensor]:
        """``[fn(x, b) for b, x in groups]``, each on its width's stream (one group: on the current
        stream, as it is). The inputs must be ready in the current stream's order; the results are
        ready in it when this returns."""
        if len(groups) < 2:
            return [fn(x, b) for b, x in groups]
        if len({b for b, _ in groups}) != len(groups):
            raise ValueError(f"one group per bit-width, got widths {[b for b, _ in groups]}")
        main = self._current()
        outs = []
        for b, x in groups:
            side = self.stream(b)
            self._wait(side, main)  # the group's gathered input is ready
            with self._use(side):
                y = fn(x, b)
            self._keep(x, side)  # made on the batch's stream, read on the group's
            outs.append(y)
        for (b, _), y in zip(groups, outs):
            self._wait(main, self.stream(b))
            self._keep(y, main)  # made on the group's stream, read (and freed) on the batch's
        return outs

    # The CUDA calls, one method each (tests replace them to follow the protocol on a CPU).
    def _new_stream(self):
        return torch.cuda.Stream(self.device)

    def _current(self):
        return torch.cuda.current_stream(self.device)

    @staticmethod
    def _wait(waiter, producer) -> None:
        waiter.wait_stream(producer)

    @staticmethod
    @contextmanager
    def _use(stream):
        with torch.cuda.stream(stream):
            yield

    @staticmethod
    def _keep(t: torch.Tensor, stream) -> None:
        t.record_stream(stream)
