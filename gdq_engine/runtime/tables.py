"""Small index tables the engine makes on the host once per grid and batch and keeps on the device
(the Triton stitch's owned boxes, runtime/stitch.py; the windows' gather indices,
runtime/windows.py): the upload that does not wait for the GPU, and a bounded cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch


def upload(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` (a host tensor) on ``device``; to a CUDA device through pinned memory, without
    waiting: a copy from pageable memory would wait for the work already queued on the stream."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class TableCache(OrderedDict):
    """At most ``capacity`` tables, least recently used dropped (whole-image mode sees a new grid
    per image size)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def get_or_make(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The table of ``key``, made by ``make()`` on its first use."""
        table = self.get(key)
        if table is None:
            return self.put(key, make())
        self.move_to_end(key)
        return table

    def put(self, key: Hashable, table: Any) -> Any:
        """Keep ``table`` as ``key``'s (the most recently used), dropping the least recently used
        past ``capacity``; returns it."""
        self[key] = table
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)
        return table
