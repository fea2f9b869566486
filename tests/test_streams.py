"""GroupStreams (runtime/streams.py): the stream protocol on a CPU, with the CUDA calls replaced
by a recording; the Engine's grouped path through it; per-width pools and workspaces of the
integer body. The real streams run in GPU sessions (tests/test_triton_kernels.py)."""

from contextlib import contextmanager

import pytest
import torch
from conftest import random_image

from gdq_engine.runtime.scheduler import run_grouped
from gdq_engine.runtime.streams import GroupStreams


class FakeStreams(GroupStreams):
    """Streams are names; waits, uses and records are logged in order."""

    def __init__(self):
        super().__init__("cpu")
        self.log, self.inside = [], "main"

    def _new_stream(self):
        return f"s{len(self._streams)}"

    def _current(self):
        return "main"

    def _wait(self, waiter, producer):
        self.log.append(("wait", waiter, producer))

    @contextmanager
    def _use(self, stream):
        before, self.inside = self.inside, stream
        self.log.append(("use", stream))
        try:
            yield
        finally:
            self.inside = before

    def _keep(self, t, stream):
        self.log.append(("keep", int(t.flatten()[0]), stream))


def test_each_group_runs_on_its_widths_stream_between_the_waits():
    streams = FakeStreams()
    ran = []

    def fn(x, b):
        ran.append((b, streams.inside))
        return x * 10

    groups = [(2, torch.tensor([1.0])), (4, torch.tensor([2.0])), (8, torch.tensor([3.0]))]
    outs = streams.run(groups, fn)
    assert [float(y) for y in outs] == [10.0, 20.0, 30.0]
    assert ran == [(2, "s0"), (4, "s1"), (8, "s2")]
    assert streams.log == [
        ("wait", "s0", "main"), ("use", "s0"), ("keep", 1, "s0"),  # input ready, then the group, input kept
        ("wait", "s1", "main"), ("use", "s1"), ("keep", 2, "s1"),
        ("wait", "s2", "main"), ("use", "s2"), ("keep", 3, "s2"),
        ("wait", "main", "s0"), ("keep", 10, "main"),  # the batch's stream waits for every group's result
        ("wait", "main", "s1"), ("keep", 20, "main"),
        ("wait", "main", "s2"), ("keep", 30, "main")]
    streams.log.clear()
    assert streams.run([(4, torch.tensor([5.0]))], fn)[0] == 50 and streams.log == []  # one group: as it is
    assert streams.stream(4) == "s1"  # kept per width
    with pytest.raises(ValueError, match="one group per bit-width"):
        streams.run([(4, torch.ones(1)), (4, torch.ones(1))], fn)


def test_grouped_run_with_streams_scatters_like_the_sequential_one():
    g = torch.Generator().manual_seed(0)
    bits = torch.tensor([8, 2, 4, 2, 8, 4, 4])
    feats = torch.randn(7, 3, 2, 2, generator=g)

    def run(x, b):
        return x * b + x.flatten(1).sum(1).view(-1, 1, 1, 1)

    want, want_groups = run_grouped(bits, feats, run)
    streams = FakeStreams()
    got, groups = run_grouped(bits, feats, run, streams)
    assert torch.equal(got, want) and groups == want_groups == [(2, 2), (4, 3), (8, 2)]
    assert [e[1] for e in streams.log if e[0] == "use"] == ["s0", "s1", "s2"]


def test_engine_groups_take_their_streams_and_give_the_same_image(tiny_edsr):
    from gdq_engine import Engine

    kw = dict(policy="entropy", bits=(2, 4, 8), calib=random_image(12, 12, n=8, seed=1), patch_size=8, stride=6,
              device="cpu", backend="reference")
    plain, streamed = Engine(tiny_edsr, **kw), Engine(tiny_edsr, **kw)
    assert Engine(tiny_edsr, group_streams=True, **kw).group_streams is None  # CPU: nothing to run side by side
    streamed.group_streams = FakeStreams()
    for engine in (plain, streamed):
        engine.policy.thresholds = (0.5, 2.9)  # the flat half and the noise land in different groups
    lr = random_image(20, 23, n=1, seed=2)
    lr[..., :10] = 0.5
    want, report = plain.upscale(lr, return_report=True)
    got, got_report = streamed.upscale(lr, return_report=True)
    assert torch.equal(got, want) and got_report.groups == report.groups
    widths = sorted({b for b, _ in report.groups})
    assert len(widths) > 1 and [e[1] for e in streamed.group_streams.log if e[0] == "use"] == [
        f"s{i}" for i in range(len(widths))]


def test_integer_body_widths_have_their_own_graph_pools_and_workspaces(tiny_edsr):
    from gdq_engine.runtime.intgraph import IntegerBody, calibrate, prepare_blocks

    body = IntegerBody(prepare_blocks(tiny_edsr), calibrate(tiny_edsr, random_image(8, 8, n=2), (2, 4)),
                       cuda_graphs=True)
    assert body.graphs.pool_of(2) == 2 and body.graphs.pool_of(4) == 4
    feat = torch.randn(2, 8, 5, 5)
    body.run_eager(feat, 2)
    body.run_eager(feat, 4)
    assert sorted(body._scratch) == [2, 4] and body._scratch[2] is not body._scratch[4]
