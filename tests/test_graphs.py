"""GraphCache's bookkeeping (keys, buckets, padding, copies, eviction, failure) on the CPU, with
the CUDA capture replaced by a recording of ``fn``; and the Engine's whole-network path through it.
The real captures run in GPU sessions (tests/test_triton_kernels.py, tests/test_cuda_kernels.py)."""

import pytest
import torch
from conftest import random_image

from gdq_engine.runtime.graphs import GraphCache


class FakeGraphs(GraphCache):
    """Captures on CPU tensors: 'replay' re-runs fn on the static input into the static output."""

    def __init__(self, *args, fail: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail, self.captured = fail, []

    def _eligible(self, x):
        return self.enabled

    def _capture_graph(self, fn, static_ins, pool=None):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured.append(static_ins[0])
        static_out = fn(*static_ins)

        def replay():
            fresh = fn(*static_ins)
            for out, new in zip(static_out, fresh) if isinstance(static_out, tuple) else [(static_out, fresh)]:
                out.copy_(new)

        return replay, static_out


def per_item(calls):
    def fn(x):
        calls.append(x.shape[0])
        return x * 2 + x.flatten(1).sum(1).view(-1, *[1] * (x.dim() - 1))  # each item on its own
    return fn


def test_first_call_eager_second_captures_later_replay():
    cache, calls = FakeGraphs(), []
    fn = per_item(calls)
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    outs = [cache("a", x, fn) for _ in range(3)]
    assert all(torch.equal(o, fn(x)) for o in outs)
    # eager (5), the capture (6: the bucket), its first replay (6), the third call's replay (6)
    assert calls[:4] == [5, 6, 6, 6] and len(cache.captured) == 1 and cache.captures == 1
    assert cache.keys() == [("a", (((6, 3, 4, 4), torch.float32, torch.device("cpu"), False),))]


def test_buckets_pad_and_padding_never_reaches_the_results():
    cache, calls = FakeGraphs(), []
    fn = per_item(calls)
    g = torch.Generator().manual_seed(1)
    big, small = torch.randn(6, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g) * 100
    for x in (big, big, small, small, big):  # 5 and 6 share the bucket-6 graph
        assert torch.equal(cache("t", x, fn), fn(x))
    cache("t", torch.randn(3, 2, 3, generator=g), fn)  # bucket 3: eager first
    assert [k[1][0][0][0] for k in cache.keys()] == [6] and [t.shape for t in cache.captured] == [(6, 2, 3)]


def test_results_are_copies_not_the_graphs_buffer():
    cache = FakeGraphs()
    fn = per_item([])
    x, y = torch.ones(2, 3), torch.full((2, 3), 7.0)
    cache("t", x, fn), cache("t", x, fn)
    first = cache("t", x, fn)
    second = cache("t", y, fn)  # the next replay rewrites the graph's output buffer
    assert torch.equal(first, fn(x)) and torch.equal(second, fn(y))


def test_a_lending_cache_returns_the_graphs_buffer_until_its_next_replay():
    cache = FakeGraphs(lend=True)
    fn = per_item([])
    x, y = torch.ones(2, 3), torch.full((2, 3), 7.0)
    cache("t", x, fn), cache("t", x, fn)  # eager, then the capture
    first = cache("t", x, fn)
    assert torch.equal(first, fn(x))
    second = cache("t", y, fn)
    assert second.data_ptr() == first.data_ptr() and torch.equal(first, fn(y))  # the same buffer, rewritten


def test_tuple_outputs_come_back_as_tuples_and_keep_lives_as_long_as_the_graph():
    """A function of two outputs gets both back (sliced to the call's N, copied unless lent),
    eagerly and from replays; what a call passes as ``keep`` is held by the graph it captures
    and released when the graph is dropped."""
    import gc
    import weakref

    class Table:
        pass

    cache = FakeGraphs(capacity=1)
    fn = per_item([])

    def two(x):
        return fn(x), x.sum(1)

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    table = Table()
    held = weakref.ref(table)
    for _ in range(3):  # eager, capture, replay
        got = cache("t", x, two, keep=table)
        assert isinstance(got, tuple) and torch.equal(got[0], fn(x)) and torch.equal(got[1], x.sum(1))
    del table
    gc.collect()
    assert held() is not None  # the captured graph keeps it
    cache("u", x, two), cache("u", x, two)  # another graph: capacity 1 drops the first
    gc.collect()
    assert held() is None


def test_tags_and_layouts_are_separate_graphs_and_old_ones_are_dropped():
    cache = FakeGraphs(capacity=2)
    fn = per_item([])
    x = torch.randn(2, 4, 3, 3)
    cl = x.contiguous(memory_format=torch.channels_last)
    for tag, inp in ((8, x), (4, x), (8, cl)):
        cache(tag, inp, fn), cache(tag, inp, fn)
    assert [(k[0], k[1][0][3]) for k in cache.keys()] == [(4, False), (8, True)]  # (8, NCHW) dropped: capacity 2
    assert cache.captured[-1].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cache(8, cl, fn), fn(cl))


def test_a_failed_capture_warns_once_and_runs_eagerly_from_then_on():
    cache, calls = FakeGraphs(fail=True, what="the network"), []
    fn = per_item(calls)
    x = torch.randn(3, 2)
    cache("t", x, fn)
    with pytest.warns(UserWarning, match="running the network eagerly"):
        assert torch.equal(cache("t", x, fn), fn(x))
    assert not cache.enabled and cache.keys() == []
    calls.clear()
    assert torch.equal(cache("t", x, fn), fn(x)) and calls == [3, 3]


def test_several_inputs_pad_together():
    cache, calls = FakeGraphs(), []

    def fn(a, b):
        calls.append((a.shape[0], b.shape[0]))
        return a * 2 + b.sum(1, keepdim=True)

    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, 4, generator=g)
    want = fn(a, b)
    calls.clear()
    assert all(torch.equal(cache("t", (a, b), fn), want) for _ in range(3))
    assert calls == [(5, 5), (6, 6), (6, 6), (6, 6)]  # eager, capture, its first replay, a replay
    assert [spec[0] for spec in cache.keys()[0][1]] == [(6, 3), (6, 4)]
    with pytest.raises(ValueError, match="same batch size"):
        cache("t", (a, b[:4]), fn)


def test_unpadded_keys_take_the_exact_batch():
    cache = FakeGraphs()
    fn = per_item([])
    for n in (5, 5, 6, 6):
        assert torch.equal(cache("t", torch.ones(n, 2), fn, pad=False), fn(torch.ones(n, 2)))
    assert sorted(k[1][0][0][0] for k in cache.keys()) == [5, 6]


def test_items_tell_the_captured_function_how_many_items_are_real():
    """``items=True``: eager calls pass None (every item real); the capture and the warm-up see the
    full bucket; every replay first writes its call's N into the tensor the graph reads."""
    cache, seen = FakeGraphs(), []

    def fn(x, items):
        seen.append(None if items is None else int(items))
        return x * 2

    for n in (5, 5, 6, 5):  # all in bucket 6
        x = torch.arange(n * 2, dtype=torch.float32).view(n, 2)
        assert torch.equal(cache("t", x, fn, items=True), x * 2)
    # eager (None), the capture (fake: runs once on the full bucket, 6), then a replay per call
    # (fake: fn again), each seeing that call's N
    assert seen == [None, 6, 5, 6, 5]


def test_the_real_cache_runs_cpu_tensors_eagerly():
    cache, calls = GraphCache(), []
    for _ in range(3):
        cache("t", torch.ones(2, 2), per_item(calls))
    assert calls == [2, 2, 2] and cache.keys() == []


def test_engine_static_policy_replays_the_whole_network(tiny_edsr):
    """What a CUDA engine does for a static policy, with the fake capture: every patch batch of the
    second and later images is one replay of head + integer body + tail, and the output, bits and
    groups equal the eager engine's."""
    from gdq_engine import Engine

    kw = dict(policy="static", bits=4, calib=random_image(12, 12, n=4, seed=1), patch_size=8, stride=6,
              device="cpu", backend="reference")
    eager, graphed = Engine(tiny_edsr, **kw), Engine(tiny_edsr, **kw)
    assert eager.network_graphs is None  # CPU: no graphs
    graphed.network_graphs = FakeGraphs(what="the network")
    body_calls = []
    real_body = graphed.int_body.run_eager
    graphed.int_body.run_eager = (lambda feat, bits, scratch=None:
                                  body_calls.append(feat.shape[0]) or real_body(feat, bits))
    lr = random_image(13, 11, n=1, seed=2)  # 4 patches: bucket 4
    for _ in range(3):
        got, rep = graphed.upscale(lr, return_report=True)
        want, rep_want = eager.upscale(lr, return_report=True)
        assert torch.equal(got, want) and rep.bits == rep_want.bits == [4] * 4 and rep.groups == [(4, 4)]
    assert [k[0] for k in graphed.network_graphs.keys()] == [4] and len(graphed.network_graphs.captured) == 1
    # eager, the capture, and the fake's two replays (which re-run the captured function)
    assert body_calls == [4, 4, 4, 4]


def test_engine_stitches_each_lent_batch_before_the_next_replay(tiny_edsr):
    """The Engine's network cache lends its graphs' output buffers: with two batches per image the
    second replay rewrites the buffer the first batch came back in, and the image is still the
    eager engine's."""
    from gdq_engine import Engine

    kw = dict(policy="static", bits=8, calib=random_image(12, 12, n=4, seed=1), patch_size=8, stride=6,
              device="cpu", backend="reference", batch_size=2)
    eager, graphed = Engine(tiny_edsr, **kw), Engine(tiny_edsr, **kw)
    graphed.network_graphs = FakeGraphs(what="the network", lend=True)
    lr = random_image(13, 11, n=1, seed=3)  # 4 patches: two batches of 2, one graph
    for _ in range(3):
        assert torch.equal(graphed.upscale(lr), eager.upscale(lr))
    assert len(graphed.network_graphs.captured) == 1


def test_engine_dynamic_policy_replays_group_bodies_and_the_tail(tiny_edsr):
    """EntropyOnly with the fake capture: the groups' integer blocks (padded buckets) and the
    batch's body-end conv, upsampler and tail (exact size) are replays; output, bits and groups
    equal the eager engine's. The body-end conv runs on the whole batch, never per group."""
    from gdq_engine import Engine
    from gdq_engine.runtime.graphs import graph_batch

    flat, ramp = torch.full((3, 8, 8), 0.5), torch.linspace(0, 1, 8).expand(3, 8, 8)
    calib = torch.stack([flat, ramp * 0.3 + 0.2, *random_image(8, 8, n=4, seed=1)])
    kw = dict(policy="entropy", bits=(2, 4, 8), calib=calib, patch_size=8, stride=8, device="cpu",
              backend="reference")
    eager, graphed = Engine(tiny_edsr, **kw), Engine(tiny_edsr, **kw)
    graphed.network_graphs, graphed.int_body.graphs = FakeGraphs(what="the network"), FakeGraphs()
    graphed.policy_graphs = FakeGraphs(what="the bit policy")  # the head and the entropies
    lr = torch.cat([torch.cat([flat, ramp], 2), random_image(8, 16, seed=3)], 1)  # 4 patches, mixed
    body_end = []
    for engine in (eager, graphed):
        engine.model.body_tail.register_forward_hook(lambda mod, args, out: body_end.append(args[0].shape[0]))
    for _ in range(3):
        got, rep = graphed.upscale(lr, return_report=True)
        want, rep_want = eager.upscale(lr, return_report=True)
        assert torch.equal(got, want) and rep.bits == rep_want.bits and rep.groups == rep_want.groups
    assert len(rep.groups) >= 2 and body_end and set(body_end) == {4}
    assert [(k[0], k[1][0][0][0]) for k in graphed.network_graphs.keys()] == [("tail", 4)]
    assert [k[1][0][0][0] for k in graphed.policy_graphs.keys()] == [4] and len(graphed.policy_graphs.captured) == 1
    body_keys = sorted((k[0], k[1][0][0][0]) for k in graphed.int_body.graphs.keys())
    assert body_keys == sorted((b, graph_batch(n)) for b, n in rep.groups)


def test_engine_dynamic_policy_with_one_width_replays_the_whole_network(tiny_edsr):
    """A patch-wise policy that puts every patch of a batch at one width runs as the static
    policy does: one exact-size replay of the whole network (no group body padded to its bucket,
    no separate tail graph), with the eager engine's output, bits and groups."""
    from gdq_engine import Engine

    kw = dict(policy="entropy", bits=(2, 4, 8), calib=random_image(8, 8, n=6, seed=4), patch_size=8, stride=6,
              device="cpu", backend="reference")
    eager, graphed = Engine(tiny_edsr, **kw), Engine(tiny_edsr, **kw)
    for engine in (eager, graphed):  # every patch's entropy lies between the thresholds: all at 4 bits
        engine.policy.thresholds = (-1.0, 1e9)
    graphed.network_graphs, graphed.int_body.graphs = FakeGraphs(what="the network"), FakeGraphs()
    lr = random_image(13, 17, n=1, seed=5)  # 6 patches
    for _ in range(3):
        got, rep = graphed.upscale(lr, return_report=True)
        want, rep_want = eager.upscale(lr, return_report=True)
        assert torch.equal(got, want) and rep.bits == rep_want.bits == [4] * 6 and rep.groups == [(4, 6)]
        assert rep_want.groups == [(4, 6)]
    # the network's graph under the width's tag, not the grouped path's ("tail", 6)
    assert [(k[0], k[1][0][0][0]) for k in graphed.network_graphs.keys()] == [(4, 6)]
    assert len(graphed.network_graphs.captured) == 1


def test_engine_granular_policy_runs_head_and_gbc_as_one_replay(tmp_path):
    """GranularDQ (GBC forced to its top code, so E2B's entropy thresholds decide) with the fake
    capture: the FP head and GBC are one exact-size replay tagged ("policy", id(policy)) whose
    codes, with the top code's entropies computed after them, give the eager engine's bits, groups
    and output, over mixed widths (the grouped path then runs the head eagerly)."""
    from gdq_engine import Engine
    from gdq_engine.models import EDSR
    from gdq_engine.policy import GranularDQ
    from gdq_engine.quantized import quantize, save_quantized

    torch.manual_seed(0)
    policy = GranularDQ(gbc_bits=(2, 4, 8), e2b_bits=(2, 4, 8), channels=16)
    with torch.no_grad():
        policy.gbc.fc.weight.zero_()
        policy.gbc.fc.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))  # every patch to the top code
    save_quantized(quantize(EDSR(scale=2, n_feats=16, n_blocks=2).eval(), policy,
                            calib=random_image(16, 16, n=12, seed=4)), tmp_path / "g.pt")
    kw = dict(device="cpu", patch_size=8, stride=8, backend="reference")
    eager, graphed = Engine(tmp_path / "g.pt", **kw), Engine(tmp_path / "g.pt", **kw)
    assert eager.policy_graphs is None  # CPU: no graphs
    graphed.network_graphs, graphed.int_body.graphs = FakeGraphs(what="the network"), FakeGraphs()
    graphed.policy_graphs = FakeGraphs(what="the bit policy")
    flat, ramp = torch.full((3, 8, 8), 0.5), torch.linspace(0, 1, 8).expand(3, 8, 8)
    lr = torch.cat([torch.cat([flat, ramp], 2), random_image(8, 16, seed=3)], 1)  # 4 patches, mixed
    for _ in range(3):
        got, rep = graphed.upscale(lr, return_report=True)
        want, rep_want = eager.upscale(lr, return_report=True)
        assert torch.equal(got, want) and rep.bits == rep_want.bits and rep.groups == rep_want.groups
    assert len(set(rep.bits)) >= 2
    assert [(k[0], k[1][0][0][0]) for k in graphed.policy_graphs.keys()] == [(("policy", id(graphed.policy)), 4)]
    assert len(graphed.policy_graphs.captured) == 1
    assert [(k[0], k[1][0][0][0]) for k in graphed.network_graphs.keys()] == [("tail", 4)]


def test_out_of_memory_while_capturing_is_raised_and_the_cache_stays_on():
    class OutOfMemory(FakeGraphs):
        def _capture_graph(self, fn, static_in, pool=None):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    cache = OutOfMemory()
    x = torch.ones(4, 2)
    cache("t", x, per_item([]))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        cache("t", x, per_item([]))
    assert cache.enabled


def test_use_counts_stay_bounded_when_every_call_has_a_new_shape(monkeypatch):
    monkeypatch.setattr(GraphCache, "MAX_COUNTED", 8)
    cache = FakeGraphs()
    for w in range(1, 30):
        cache("t", torch.ones(1, w), per_item([]))
    assert len(cache._calls) <= 8 and cache.keys() == []
