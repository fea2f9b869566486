"""Image graphs (runtime/imagegraph.py, ``Engine(image_graphs=True)``): a static policy's whole image
as one replay. On the CPU with the fake capture of tests/test_graphs.py (a replay re-runs the
captured function on the graph's input buffer) and the Triton stitch in the interpreter (on a GPU,
compiled): images, reports and checks equal the tiled path's. The real capture runs in GPU
sessions (last test)."""

import pytest
import torch
from conftest import KERNEL_DEVICE, random_image
from test_graphs import FakeGraphs

from gdq_engine import Engine
from gdq_engine.runtime.imagegraph import ImageGraphs, ImagePlan

pytest.importorskip("gdq_engine.kernels.ops", reason="triton is a test dependency", exc_type=ImportError)

DEV = KERNEL_DEVICE  # the image function's Triton stitch: the interpreter on a CPU, compiled on a GPU


def engines(model, **kw):
    """(an engine whose images run through image graphs with the fake capture, the tiled engine)."""
    kw = dict(dict(policy="static", bits=4, calib=random_image(12, 12, n=4, seed=1), patch_size=8, stride=6,
                   device=DEV, backend="reference"), **kw)
    graphed, tiled = Engine(model, **kw), Engine(model, **kw)
    assert graphed.image_graphs is None  # the reference backend: Engine(image_graphs=True) would change nothing
    graphed.image_graphs = ImageGraphs()
    graphed.image_graphs.graphs = FakeGraphs(what="the whole image", lend=True)
    return graphed, tiled


def benchmarks_module(name: str):
    """A module of benchmarks/ (not a package), imported by name."""
    import importlib
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parent.parent / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def same_report(got, want):
    return (got.bits, got.groups, got.patches, got.batches, got.bitops, got.fallbacks) == (
        want.bits, want.groups, want.patches, want.batches, want.bitops, want.fallbacks)


@pytest.mark.parametrize("h, w, n, batch_size, as_uint8", [
    (13, 11, 1, None, False),  # 4 patches, one batch
    (13, 17, 2, 2, False),  # 6 patches in 3 batches, 2 images
    (9, 14, 1, 3, True),  # uint8 in and out
])
def test_image_graph_equals_the_tiled_path(tiny_edsr, h, w, n, batch_size, as_uint8):
    """Eager (first call), capture (second), replay (third): the tiled engine's image and report
    each time, one graph per image size; the tiled path's per-batch machinery is not used."""
    graphed, tiled = engines(tiny_edsr, batch_size=batch_size)
    lr = random_image(h, w, n=n, seed=h * w)
    if as_uint8:
        lr = (lr * 255).round().to(torch.uint8)
    graphed.cutter.cut = graphed.stitcher.stitch = None  # the image function reads their tables only
    for _ in range(3):
        got, rep = graphed.upscale(lr, return_report=True)
        want, rep_want = tiled.upscale(lr, return_report=True)
        assert got.dtype == want.dtype == (torch.uint8 if as_uint8 else torch.float32)
        assert torch.equal(got, want) and same_report(rep, rep_want)
    graphs = graphed.image_graphs.graphs
    assert len(graphs.captured) == 1 and [k[0][2] for k in graphs.keys()] == [as_uint8]
    assert graphs.keys()[0][1][0][0] == (1, 3, h, w)  # one image per replay


def test_image_graphs_per_size_and_whole_image_mode(tiny_edsr):
    """Two image sizes alternate: a graph each; whole-image mode (one window per image) too; a new
    stride on the engine: a new graph."""
    for patch_size in (8, None):
        graphed, tiled = engines(tiny_edsr, patch_size=patch_size)
        frames = [random_image(10, 12, n=1, seed=7), random_image(11, 9, n=1, seed=8)]
        for _ in range(3):
            for lr in frames:
                assert torch.equal(graphed.upscale(lr), tiled.upscale(lr))
        assert sorted(k[1][0][0] for k in graphed.image_graphs.graphs.keys()) == [(1, 3, 10, 12), (1, 3, 11, 9)]
        graphed.stride = tiled.stride = 3  # the engine's tiling changed: another graph (none without tiles)
        for _ in range(3):
            assert torch.equal(graphed.upscale(frames[0]), tiled.upscale(frames[0]))
        assert len(graphed.image_graphs.graphs.captured) == (3 if patch_size else 2)


def test_image_graph_checks_its_input_and_output(tiny_edsr):
    """The graph's one read checks the input's values (NaN, outside [0, 1]) and the output's
    finiteness, as the tiled path does."""
    graphed, _ = engines(tiny_edsr)
    lr = random_image(13, 11, n=1, seed=3)
    for _ in range(2):
        graphed.upscale(lr)  # eager, then the capture
    assert_input_refused(graphed, lr)
    graphed.model.tail.forward = lambda t: t[:, :3] * float("inf")  # read by the next capture
    graphed.image_graphs = ImageGraphs()
    graphed.image_graphs.graphs = FakeGraphs(what="the whole image", lend=True)
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        graphed.upscale(lr)


def assert_input_refused(engine, lr: torch.Tensor) -> None:
    """``engine`` refuses a copy of the (1, 3, H, W) image ``lr`` with a NaN, and ``lr`` * 2."""
    bad = lr.clone()
    bad[0, 1, 2, 9] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        engine.upscale(bad)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        engine.upscale(lr * 2)


def test_out_of_memory_turns_image_graphs_off_and_the_tiled_path_finishes(tiny_edsr):
    graphed, tiled = engines(tiny_edsr)
    lr = random_image(13, 17, n=2, seed=4)
    graphed.upscale(lr)  # the first image size's plan and eager run

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    graphed.image_graphs.run = out_of_memory
    got, rep = graphed.upscale(lr, return_report=True)
    assert torch.equal(got, tiled.upscale(lr)) and graphed.image_graphs is None
    assert rep.fallbacks == ["out of memory: image graphs off"] and rep.patches == 12
    bad = lr.clone()
    bad[1, 0, 0, 0] = 2.0  # the second image, which the tiled path now checks
    graphed.image_graphs = ImageGraphs()
    graphed.image_graphs.run = out_of_memory
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        graphed.upscale(bad)


def test_image_graphs_only_on_cuda_graphs(tiny_edsr):
    kw = dict(calib=random_image(12, 12, n=4, seed=1), patch_size=8, stride=6, device="cpu", image_graphs=True)
    assert Engine(tiny_edsr, policy="static", bits=8, backend="reference", **kw).image_graphs is None  # CPU
    assert Engine(tiny_edsr, policy="entropy", backend="reference", **kw).image_graphs is None


def dynamic_engines(model, policy, **kw):
    """:func:`engines` for a dynamic policy (a policy name or a quantized checkpoint's path as
    ``model``): the graphed engine's stage graphs fake-captured too."""
    kw = dict(dict(patch_size=8, stride=6, device=DEV, backend="reference"), **kw)
    if policy is not None:
        kw.update(policy=policy, calib=random_image(12, 12, n=6, seed=1))
    graphed, tiled = Engine(model, **kw), Engine(model, **kw)
    graphed.image_graphs = ImageGraphs()
    graphed.image_graphs.graphs = FakeGraphs(what="the whole image", lend=True)
    graphed.image_graphs.stages = FakeGraphs(what="the image's bit policy", lend=True)
    return graphed, tiled


def spread_thresholds(graphed, tiled, img: torch.Tensor) -> None:
    """Both engines' entropy thresholds at the 1/3 and 2/3 quantiles of the entropies of the
    (3, H, W) image's patches, so that they get all three widths."""
    from gdq_engine.policy.entropy import patch_entropy

    grid = graphed.grid(*img.shape[-2:])
    h = patch_entropy(graphed.cutter.cut(img.to(DEV), grid, list(range(len(grid)))))
    for engine in (graphed, tiled):
        engine.policy.thresholds = tuple(float(torch.quantile(h.cpu(), q)) for q in (1 / 3, 2 / 3))


def mixed_image(h: int, w: int, seed: int) -> torch.Tensor:
    """A (1, 3, h, w) image whose left half is flat and right half random: low and high entropy."""
    img = random_image(h, w, n=1, seed=seed)
    img[..., : w // 2] = 0.5
    return img


def granular_checkpoint(tmp_path, top: bool = True, channels: int = 16):
    """A quantized EDSR x2 (``channels`` features) with Granular-DQ {2,4,8}, GBC sent to its top
    code (E2B's entropies decide: mixed widths) or, ``top=False``, to its middle one (every patch
    at 4 bits)."""
    from gdq_engine.models import EDSR
    from gdq_engine.policy import GranularDQ
    from gdq_engine.quantized import quantize, save_quantized

    torch.manual_seed(0)
    policy = GranularDQ(gbc_bits=(2, 4, 8), e2b_bits=(2, 4, 8), channels=channels)
    with torch.no_grad():
        policy.gbc.fc.weight.zero_()
        policy.gbc.fc.bias.copy_(torch.tensor([0.0, 0.0, 10.0]) if top else torch.tensor([0.0, 10.0, 0.0]))
    path = tmp_path / f"granular-{top}-{channels}.pt"
    save_quantized(quantize(EDSR(scale=2, n_feats=channels, n_blocks=2).eval(), policy,
                            calib=random_image(16, 16, n=12, seed=4)), path)
    return path


@pytest.mark.parametrize("which", ["entropy", "granular"])
def test_dynamic_image_graphs_equal_the_tiled_path(tiny_edsr, tmp_path, which):
    """A dynamic policy's image: the stage graph (every batch's head and device stage), one read,
    then the image graph of the widths it chose, over mixed widths in several batches and two
    images: the tiled engine's image and report (bits, groups, BitOPs) each time; eager, capture,
    replay; one stage graph and one image graph per width pattern."""
    if which == "entropy":
        graphed, tiled = dynamic_engines(tiny_edsr, "entropy", batch_size=3)
    else:
        graphed, tiled = dynamic_engines(granular_checkpoint(tmp_path), None, batch_size=3)
    lr = torch.cat([mixed_image(13, 17, seed=5), mixed_image(13, 17, seed=6)])  # 6 patches each, 2 batches
    spread_thresholds(graphed, tiled, lr[0])
    graphed.cutter.cut = graphed.stitcher.stitch = None  # the image functions read their tables only
    for _ in range(3):
        got, rep = graphed.upscale(lr, return_report=True)
        want, rep_want = tiled.upscale(lr, return_report=True)
        assert torch.equal(got, want) and same_report(rep, rep_want)
    assert len(set(rep.bits)) >= 2 and len(rep.groups) > rep.batches  # mixed batches
    stages, images = graphed.image_graphs.stages, graphed.image_graphs.graphs
    assert len(stages.captured) == 1 and [k[0][0] for k in stages.keys()] == ["stage"]
    patterns = {tuple(rep.bits[:6]), tuple(rep.bits[6:])}
    assert sorted(k[0][1] for k in images.keys()) == sorted(("bits", p) for p in patterns)
    assert len(images.captured) == len(patterns)
    # what latency.sync_sites reports as the call's captures counts both caches
    assert benchmarks_module("latency").graph_captures(graphed) == 1 + len(patterns)


def test_a_dynamic_image_at_one_width_replays_that_widths_static_image_graph(tmp_path):
    """Every patch at one width (GBC's middle code): the image graph tagged by the width alone, the
    one a static policy at that width has; the tiled engine's image and report."""
    graphed, tiled = dynamic_engines(granular_checkpoint(tmp_path, top=False), None)
    lr = random_image(13, 11, n=1, seed=7)
    for _ in range(3):
        got, rep = graphed.upscale(lr, return_report=True)
        want, rep_want = tiled.upscale(lr, return_report=True)
        assert torch.equal(got, want) and same_report(rep, rep_want) and set(rep.bits) == {4}
    assert [k[0][1] for k in graphed.image_graphs.graphs.keys()] == [4]


def test_a_repeated_width_pattern_runs_ahead_of_the_read(tiny_edsr):
    """Once an image size's last two images got one pattern of widths, the next image's graph of
    that pattern is queued before the host reads the stage: a hit runs one image graph, a miss
    (another image, other widths) drops it and runs the right one after it, then guesses stop
    until a pattern repeats again. Every image and report equals the tiled engine's."""
    graphed, tiled = dynamic_engines(tiny_edsr, "entropy", batch_size=4)
    a, b = mixed_image(13, 17, seed=5), mixed_image(13, 17, seed=6)
    b[..., 9:] = 0.5  # flatter: other widths than a's
    spread_thresholds(graphed, tiled, a[0])
    runs, run = [], graphed.image_graphs.run

    def counted(img, plan, network, tag, uint8, keep=None):
        runs.append(tag)
        return run(img, plan, network, tag, uint8, keep)

    graphed.image_graphs.run = counted
    patterns, per_call = [], []
    for img in (a, a, a, a, b, b, b):
        runs.clear()
        got, rep = graphed.upscale(img, return_report=True)
        want, rep_want = tiled.upscale(img, return_report=True)
        assert torch.equal(got, want) and same_report(rep, rep_want)
        patterns.append(tuple(rep.bits))
        per_call.append(len(runs))
    assert patterns[0] != patterns[4] and len(set(patterns[0])) > 1  # mixed widths, two patterns
    # a, a: no guess yet; a, a: hits; b: a miss (a's graph, then b's); b: no guess; b: a hit
    assert per_call == [1, 1, 1, 1, 2, 1, 1], per_call
    assert graphed.image_graphs.guesses == {"hits": 3, "misses": 1}


def test_width_guesses_follow_each_size_and_policy_on_its_own():
    """ImageGraphs.guess: a pattern once two images in a row of one plan and policy got it; other
    plans and policies keep their own streaks; a new pattern restarts the streak."""
    from gdq_engine.runtime.tiler import make_grid

    graphs = ImageGraphs()
    plans = [ImagePlan(make_grid(h, 20, 8, 6, 0), 4, (2 * h, 40), ()) for h in (12, 16)]
    a, b = (2, 4, 8), (4, 4, 4)
    graphs.note(plans[0], "p", a, guessed=None)
    assert graphs.guess(plans[0], "p") is None
    graphs.note(plans[0], "p", a, guessed=None)
    assert graphs.guess(plans[0], "p") == a and graphs.guess(plans[1], "p") is None
    assert graphs.guess(plans[0], "q") is None  # another policy (a swapped one) guesses nothing
    graphs.note(plans[0], "p", b, guessed=a)
    assert graphs.guess(plans[0], "p") is None and graphs.guesses == {"hits": 0, "misses": 1}
    graphs.note(plans[0], "p", b, guessed=None)
    graphs.note(plans[0], "p", b, guessed=b)
    assert graphs.guess(plans[0], "p") == b and graphs.guesses == {"hits": 1, "misses": 1}


def test_dynamic_image_graphs_check_their_input(tiny_edsr):
    """A NaN or out-of-range input goes through the stage (its widths are still valid ones) and is
    refused at the image graph's read, as on the tiled path."""
    graphed, _ = dynamic_engines(tiny_edsr, "entropy")
    assert_input_refused(graphed, mixed_image(13, 11, seed=3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (GPU sessions run this)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_image_graphs_equal_the_tiled_engine(dtype):
    """The latency rows' setup (static a8, x4 integer tail) on CUDA: image graphs (the default for
    a static policy there) against the tiled path (the network's graphs, the Triton stitch), bit
    for bit over three calls each (eager, capture, replay) of device fp32 images, device uint8
    images, host uint8 images and a batch of two images in several batches; a capture failure
    would turn them off: checked."""
    from gdq_engine.models import EDSR

    torch.manual_seed(0)
    model = EDSR(scale=4, n_feats=64, n_blocks=2).eval()
    kw = dict(policy="static", bits=8, tail_bits=8, calib=random_image(24, 24, n=8, seed=3), patch_size=16,
              stride=14, device="cuda", dtype=dtype, backend="triton")
    graphed, tiled = Engine(model, **kw), Engine(model, image_graphs=False, **kw)
    assert graphed.image_graphs is not None and tiled.image_graphs is None
    assert Engine(model, progress=True, **kw).image_graphs is None  # a progress bar: the tiled path's batches
    lr = random_image(37, 29, n=2, seed=4)
    inputs = {"fp32 cuda": lr.cuda(), "uint8 cuda": (lr * 255).round().to(torch.uint8).cuda(),
              "uint8 host": (lr * 255).round().to(torch.uint8)}
    for name, x in inputs.items():
        for _ in range(3):
            got, rep = graphed.upscale(x, return_report=True)
            want, rep_want = tiled.upscale(x, return_report=True)
            assert got.device == x.device and torch.equal(got, want), name
            assert same_report(rep, rep_want), name
    graphed.batch_size = tiled.batch_size = 2
    for _ in range(3):
        assert torch.equal(graphed.upscale(inputs["fp32 cuda"]), tiled.upscale(inputs["fp32 cuda"]))
    graphs = graphed.image_graphs.graphs
    assert graphs.enabled and len(graphs.keys()) == 3 and graphs.captures == 3  # fp32, uint8; the batch size of 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (GPU sessions run this)")
@pytest.mark.parametrize("top", [True, False])
def test_cuda_dynamic_image_graphs_equal_the_tiled_engine(tmp_path, top):
    """Granular-DQ {2,4,8} with a x2 integer tail and fp16 FP layers on CUDA (Triton), as the
    latency row runs it: image graphs (the stage graph, one read, the widths' image graph)
    against the tiled path, bit for bit with equal reports over three calls (eager, capture,
    replay) of mixed widths (GBC's top code: E2B's entropies decide) and of one width (whose
    pattern then runs ahead of the stage's read); the host reads per frame, and no capture
    failure."""
    latency = benchmarks_module("latency")
    kw = dict(patch_size=16, stride=14, device="cuda", backend="triton", tail_bits=8, dtype=torch.float16,
              calib=random_image(24, 24, n=8, seed=3))
    path = granular_checkpoint(tmp_path, top=top, channels=64)  # the integer tail takes 32+ channels
    graphed, tiled = Engine(path, **kw), Engine(path, image_graphs=False, **kw)
    assert graphed.image_graphs is not None and tiled.image_graphs is None  # dynamic: on by default
    lr = torch.cat([mixed_image(37, 45, seed=5), mixed_image(37, 45, seed=6)]).cuda()
    if top:
        spread_thresholds(graphed, tiled, lr[0])
    for _ in range(3):
        got, rep = graphed.upscale(lr, return_report=True)
        want, rep_want = tiled.upscale(lr, return_report=True)
        assert torch.equal(got, want) and same_report(rep, rep_want)
    assert (len(set(rep.bits)) > 1) == top, rep.bits
    images, stages = graphed.image_graphs.graphs, graphed.image_graphs.stages
    assert images.enabled and stages.enabled and stages.captures == 1 and images.captures >= 1
    # Where both images got one pattern (always at one width, not top), it runs ahead of the
    # stage's read from the third image on: that read waits on an event (which torch's sync check
    # may not count) and the image's read stays. Where their patterns differ they alternate:
    # no guesses, and two reads (the stage's, the image's).
    half = len(rep.bits) // 2
    repeats = rep.bits[:half] == rep.bits[half:]
    assert repeats or top
    assert graphed.image_graphs.guesses == {"hits": 4 if repeats else 0, "misses": 0}
    syncs = latency.sync_sites(graphed, lr[:1])
    reads = sum(n for site, n in syncs["sites"].items() if site.startswith("hostreads.py"))
    assert reads == (1 if repeats else 2) and syncs["count"] <= 2 and syncs["captures"] == 0, syncs
