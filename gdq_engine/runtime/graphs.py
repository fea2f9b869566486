"""CUDA-graph replay of a batched function, one graph per batch bucket.

The integer body uses it for one bit-width's block stack; the Engine uses it for a static policy's
whole network (head, integer body, tail), so a batch of patches is one replay with no launch gaps.
"""

from __future__ import annotations

import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable

import torch


def graph_batch(n: int) -> int:
    """The batch a CUDA graph is captured for when ``n`` patches run: ``n`` rounded up to the next
    of 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, ... (powers of two and 1.5x them), so at most a third of a
    replay is padding and batch sizes up to 2^k share 2k graphs per bit-width."""
    if n < 1:
        raise ValueError(f"need at least one patch, got {n}")
    power = 1 << (n - 1).bit_length()  # the next power of two >= n
    return power * 3 // 4 if power >= 4 and n <= power * 3 // 4 else power


def capturing(x: torch.Tensor) -> bool:
    """Whether work on ``x`` is being captured into a CUDA graph now (never for CPU tensors)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class GraphCache:
    """Runs ``fn(*inputs)`` for batches of N items as CUDA graph replays: ``cache(tag, x, fn)``,
    where ``x`` is one (N, ...) tensor or a tuple of them (the same N).

    One graph per (``tag``, and per input: N rounded up by :func:`graph_batch`, the other dims,
    dtype, device, memory format), least recently used dropped past ``capacity``. ``pad=False``
    keys on N itself: for ``fn`` with FP convolutions, whose library may pick another algorithm,
    and so round differently, for another batch size (cuDNN, oneDNN). The first call of
    a key runs ``fn`` eagerly (which also compiles and autotunes kernels and lets cuDNN pick
    algorithms); the second captures a graph on zero-filled inputs of the bucket's size; later
    calls copy the inputs in, replay, and return a copy of the first N outputs. ``fn`` must treat
    the N items independently, so padding never changes a real item's result, and must not
    synchronise with the host.

    ``fn`` is captured with whatever buffers it allocates; code it calls that keeps buffers across
    calls should take fresh ones while :func:`capturing` (a buffer dropped later would be reused by
    other tensors while the graph still writes it). Graphs share one memory pool: they replay
    one at a time on one stream, and a later capture may place its buffers, its output included,
    where an earlier graph keeps intermediates; so results are copied out before the next replay.
    ``pool_of(tag)`` (optional) names the pool of a tag's graphs instead: graphs of different pools
    never share memory, so they may replay at the same time on different streams (the integer
    body's widths, :class:`~gdq_engine.runtime.streams.GroupStreams`).

    ``lend=True`` returns the graph's own output buffer (the first N items) instead of a copy: for
    an owner that has read it (in stream order) before it calls the cache again, as the Engine's
    tile loop stitches each batch before the next; the next replay of that graph overwrites it. On
    a 1080p frame of EDSR-baseline x4 the copy is a 32 MB round trip. ``fn`` may return a tuple of
    (N, ...) tensors; the call then returns a tuple too.

    ``keep`` (optional, per call) is held with the graph a call captures, for as long as the graph
    lives: device tensors ``fn`` reads that are neither its inputs nor made inside it (index tables
    from a bounded cache, which could otherwise free them while the graph still reads them).

    Calls on CPU tensors, calls made while another graph is being captured (``fn`` then becomes
    part of that graph) and calls after a capture failed run ``fn`` eagerly. A failed capture
    warns once and turns the cache off; running out of memory while capturing is raised as it is.
    """

    MAX_COUNTED = 4096  # keys whose uses are counted before a capture

    def __init__(self, capacity: int = 32, what: str = "the integer body", lend: bool = False,
                 pool_of: Callable[[Hashable], Hashable] | None = None):
        self.capacity, self.what, self.lend, self.pool_of = capacity, what, bool(lend), pool_of
        self.enabled = True
        self.captures = 0  # graphs captured so far (a capture synchronises the device: torch.cuda.graph)
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self._calls: Counter[tuple] = Counter()
        self._pools: dict[Hashable, object] = {}  # pool name -> graph_pool_handle()

    def keys(self) -> list[tuple]:
        """The captured keys, oldest use first: (tag, (padded shape, dtype, device, channels_last)
        per input)."""
        return list(self._graphs)

    def _eligible(self, x: torch.Tensor) -> bool:
        return self.enabled and x.is_cuda and not capturing(x)

    def __call__(self, tag: Hashable, x: torch.Tensor | tuple[torch.Tensor, ...], fn: Callable[..., torch.Tensor],
                 pad: bool = True, items: bool = False, keep: object = None) -> torch.Tensor:
        """``fn(*x)`` as described above. ``items``: ``fn`` takes one more argument, a (1,) int32
        tensor on the device holding how many of its N items are real, or None when all are (the
        eager calls); a replay first writes the call's N into it, so ``fn``'s kernels can skip the
        padding items (``packed_conv3x3(items=)``). A tag is always called with the same ``items``."""
        inputs = x if isinstance(x, tuple) else (x,)
        call = (lambda *ins: fn(*ins, None)) if items else fn
        if not self._eligible(inputs[0]):
            return call(*inputs)
        n = inputs[0].shape[0]
        if any(t.shape[0] != n for t in inputs):
            raise ValueError(f"inputs of one graph need the same batch size, got {[t.shape[0] for t in inputs]}")
        batch = graph_batch(n) if pad else n
        key = (tag, tuple(((batch,) + tuple(t.shape[1:]), t.dtype, t.device, _channels_last(t)) for t in inputs))
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._calls) >= self.MAX_COUNTED and key not in self._calls:
                self._calls.clear()  # shapes seen once (whole-image mode): forget them, keep memory bounded
            self._calls[key] += 1
            if self._calls[key] < 2:
                return call(*inputs)
            entry = self._capture(key, fn, items, keep)
            if entry is None:
                return call(*inputs)
        self._graphs.move_to_end(key)
        replay, static_ins, static_out, count, _ = entry
        for static, t in zip(static_ins, inputs):
            static[:n].copy_(t)
        if count is not None:
            count.fill_(n)  # read by the graph's kernels when they run (stream order)
        replay()
        if isinstance(static_out, tuple):
            return tuple(out[:n] if self.lend else out[:n].clone() for out in static_out)
        return static_out[:n] if self.lend else static_out[:n].clone()

    def _capture(self, key: tuple, fn, items: bool = False, keep: object = None) -> tuple | None:
        static_ins = []
        for shape, dtype, device, channels_last in key[1]:
            static = torch.zeros(shape, dtype=dtype, device=device)  # padding items stay finite
            static_ins.append(static.contiguous(memory_format=torch.channels_last) if channels_last else static)
        # the count of real items, outside the graph's pool; the warm-up and capture see a full batch
        count = torch.full((1,), key[1][0][0][0], dtype=torch.int32, device=key[1][0][2]) if items else None
        bound = (lambda *ins: fn(*ins, count)) if items else fn
        try:
            replay, static_out = self._capture_graph(bound, static_ins,
                                                     pool=None if self.pool_of is None else self.pool_of(key[0]))
        except torch.cuda.OutOfMemoryError:
            raise  # the Engine halves the batch and retries; a smaller bucket may still be captured
        except RuntimeError as exc:  # e.g. an op that cannot be captured: run eagerly from now on
            warnings.warn(f"CUDA graph capture failed, running {self.what} eagerly: {exc}", stacklevel=4)
            self.enabled = False
            return None
        self.captures += 1
        self._graphs[key] = (replay, static_ins, static_out, count, keep)
        while len(self._graphs) > self.capacity:
            self._graphs.popitem(last=False)
        return self._graphs[key]

    def _capture_graph(self, fn, static_ins: list[torch.Tensor],
                       pool: Hashable = None) -> tuple[Callable[[], None], torch.Tensor | tuple]:
        """(replay, output) of ``fn`` captured on ``static_ins`` into the memory pool named ``pool``,
        after a warm-up run on a side stream (as ``torch.cuda.graph`` expects; it also compiles the
        padded shape's kernels)."""
        device = static_ins[0].device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn(*static_ins)
        torch.cuda.current_stream(device).wait_stream(side)
        if pool not in self._pools:
            self._pools[pool] = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pools[pool]):
            static_out = fn(*static_ins)
        return graph.replay, static_out
