import warnings

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image

from gdq_engine import Engine, upscale_file
from gdq_engine.io import load_image, save_image


@pytest.fixture
def engine(tiny_edsr):
    return Engine(tiny_edsr, device="cpu", patch_size=16, stride=12)


def test_output_shape_range_and_dtype(engine):
    x = random_image(21, 30, n=2)
    y = engine.upscale(x)
    assert y.shape == (2, 3, 42, 60) and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 1


def test_batch_equals_per_image(engine):
    x = random_image(20, 18, n=3, seed=7)
    y = engine.upscale(x)
    for i in range(3):
        assert torch.allclose(engine.upscale(x[i]), y[i], atol=1e-6)


def test_whole_image_mode_is_the_model(tiny_edsr):
    x = random_image(13, 17, n=1)
    with torch.no_grad():
        ref = tiny_edsr(x).clamp(0, 1)
    assert torch.allclose(Engine(tiny_edsr, device="cpu", patch_size=None).upscale(x), ref, atol=1e-6)


def test_input_kinds_agree(engine, tmp_path):
    u8 = (random_image(20, 24, seed=2) * 255).round().to(torch.uint8)
    ref = engine.upscale(u8.float() / 255)
    out_u8 = engine.upscale(u8)
    assert out_u8.dtype == torch.uint8 and out_u8.shape == (3, 40, 48)
    assert (out_u8.float() - (ref * 255).round()).abs().max() <= 1
    hwc = u8.permute(1, 2, 0).numpy()
    out_np = engine.upscale(hwc)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.uint8 and out_np.shape == (40, 48, 3)
    out_np_f = engine.upscale(hwc.astype(np.float32) / 255)
    assert out_np_f.dtype == np.float32 and np.allclose(out_np_f, ref.permute(1, 2, 0).numpy(), atol=1e-6)
    out_pil = engine.upscale(Image.fromarray(hwc))
    assert isinstance(out_pil, Image.Image) and out_pil.size == (48, 40)
    assert np.array_equal(np.asarray(out_pil), out_np)
    save_image(u8.float() / 255, tmp_path / "in.png")
    out_path = engine.upscale(str(tmp_path / "in.png"))
    assert torch.allclose(out_path[0], ref, atol=1e-6)


def test_8_bit_results_are_rounded_where_computed_with_the_values_of_to_uint8(engine, tiny_edsr):
    """uint8 tensors and arrays and PIL images come back as the float result rounded by
    io.to_uint8, bit for bit, though the engine now rounds on its compute device and hands over
    bytes; float input still gets the clamped float result (stitched in place)."""
    from gdq_engine.engine import finish_image
    from gdq_engine.io import to_uint8

    u8 = (random_image(20, 24, n=2, seed=5) * 255).round().to(torch.uint8)
    ref = engine.upscale(u8.float() / 255)
    assert ref.dtype == torch.float32 and float(ref.min()) >= 0 and float(ref.max()) <= 1
    got = engine.upscale(u8)
    want = torch.stack([torch.from_numpy(to_uint8(r)).permute(2, 0, 1) for r in ref])
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    assert np.array_equal(engine.upscale(u8[0].permute(1, 2, 0).numpy()), want[0].permute(1, 2, 0).numpy())
    assert np.array_equal(np.asarray(engine.upscale(Image.fromarray(u8[0].permute(1, 2, 0).numpy()))),
                          want[0].permute(1, 2, 0).numpy())
    # the rounding itself, at its edges: out of range, halves (round half to even, as torch.round)
    canvas = torch.tensor([-0.2, 0.0, 0.5 / 255, 1.5 / 255, 2.5 / 255, 0.5, 1.0, 1.7, float("-0.0")]).view(1, 1, 9)
    target = torch.empty(1, 1, 9, dtype=torch.uint8)
    finish_image(canvas.clone(), target)
    assert torch.equal(target.view(-1), torch.from_numpy(to_uint8(canvas.expand(3, 1, 9)))[..., 0].view(-1))
    assert engine._canvas_for(ref[0]).data_ptr() == ref[0].data_ptr()  # fp32 on the compute device: in place
    # uint8 where the torch copies stitch: rounded in place too, no fp32 image beside it
    assert engine._canvas_for(got[0]).data_ptr() == got[0].data_ptr()
    engine.stitcher.kernel_on_cpu = True  # where the Triton stitch runs, it stitches into fp32
    assert engine._canvas_for(got[0]).dtype == torch.float32
    assert torch.equal(engine.upscale(u8), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host images on a CUDA engine")
def test_host_uint8_images_on_a_cuda_engine_equal_the_float_path(tiny_edsr, monkeypatch):
    """A host uint8 image on a CUDA engine is stitched and rounded on the GPU (one transfer of
    bytes back), or, when its fp32 output would take more than an eighth of the free memory,
    stitched on the host as before: both give the rounded float result."""
    from gdq_engine.io import to_uint8

    engine = Engine(tiny_edsr, device="cuda", patch_size=8, stride=8)
    u8 = (random_image(20, 24, seed=6) * 255).round().to(torch.uint8)
    want = torch.from_numpy(to_uint8(engine.upscale(u8.float() / 255))).permute(2, 0, 1)
    assert engine._canvas_for(torch.empty(3, 40, 48, dtype=torch.uint8)).is_cuda
    assert torch.equal(engine.upscale(u8), want)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024, 1 << 40))
    assert not engine._canvas_for(torch.empty(3, 40, 48, dtype=torch.uint8)).is_cuda
    assert torch.equal(engine.upscale(u8), want)


@pytest.mark.parametrize("bad,match", [
    (torch.rand(1, 4, 20, 20), "3 colour channels, got 4.*RGBA"),
    (torch.rand(1, 1, 20, 20), "3 colour channels, got 1"),
    (torch.full((1, 3, 20, 20), float("nan")), "NaN or Inf"),
    (torch.full((1, 3, 20, 20), float("inf")), "NaN or Inf"),
    (torch.rand(1, 3, 20, 20) * 255, r"in \[0, 1\]"),
    (torch.rand(0, 3, 20, 20), "empty"),
    (torch.rand(1, 3, 0, 20), "empty"),
    (torch.rand(1, 3, 3, 20), "too small"),
    (torch.randint(0, 255, (1, 3, 20, 20), dtype=torch.int32), "dtype"),
    (torch.rand(20, 20), r"\(N,3,H,W\)"),
    (np.zeros((20, 20)), "HWC"),
])
def test_bad_inputs(engine, bad, match):
    with pytest.raises(ValueError, match=match):
        engine.upscale(bad)


@pytest.mark.parametrize("deferred", [False, True])
def test_input_value_checks_wait_for_the_one_host_read_on_cuda(tiny_edsr, monkeypatch, deferred):
    """On CUDA with an FP or static policy, reading the input's min and max would be a host sync
    before any work: they are read with the output's finiteness flag at the end instead (the
    network has then run on the bad input), with the same errors. Here on CPU, the CUDA choice
    forced (``deferred``) or not."""
    engine = Engine(tiny_edsr, device="cpu", patch_size=8, stride=8)
    assert not engine._defers_value_check(torch.rand(1, 3, 8, 8))  # CPU input: checked at once
    monkeypatch.setattr(Engine, "_defers_value_check", lambda self, batch: deferred)
    calls = []
    real = engine._forward
    monkeypatch.setattr(engine, "_forward", lambda *a: calls.append(1) or real(*a))
    good = random_image(12, 10, n=2)
    assert torch.equal(engine.upscale(good), Engine(tiny_edsr, device="cpu", patch_size=8, stride=8).upscale(good))
    for bad, match in ((good.clone().index_fill_(3, torch.tensor([4]), float("nan")), "NaN or Inf"),
                       (good * 255, r"in \[0, 1\]")):
        calls.clear()
        with pytest.raises(ValueError, match=match):
            engine.upscale(bad)
        assert bool(calls) == deferred  # deferred: the first image's patches ran before the check
    with pytest.raises(ValueError, match="too small"):  # shapes are checked at once either way
        engine.upscale(torch.full((1, 3, 3, 20), float("nan")))
    dynamic = Engine(tiny_edsr, device="cpu", policy="entropy", bits=(2, 4, 8), calib=random_image(16, 16, n=2))
    monkeypatch.undo()
    assert not dynamic._defers_value_check(good)  # a dynamic policy reads its bits mid-frame anyway


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the deferred value checks are a CUDA path")
def test_bad_cuda_input_raises_the_input_error_not_a_half_precision_fallback(tiny_edsr):
    engine = Engine(tiny_edsr, device="cuda", patch_size=8, stride=8, dtype=torch.float16)
    nan = random_image(12, 10, n=1).cuda().index_fill_(3, torch.tensor([4], device="cuda"), float("nan"))
    assert engine._defers_value_check(nan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "re-running this image in float32"
        with pytest.raises(ValueError, match="NaN or Inf"):
            engine.upscale(nan)
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            engine.upscale(random_image(12, 10, n=1).cuda() * 255)


def test_bad_input_types_and_files(engine, tmp_path):
    with pytest.raises(TypeError):
        engine.upscale([1, 2, 3])
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        engine.upscale(str(tmp_path / "notes.png"))
    with pytest.raises(ValueError, match="no such image"):
        engine.upscale(str(tmp_path / "missing.png"))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(policy="cadyq", calib=torch.rand(2, 3, 8, 8)), NotImplementedError, "bit selectors"),
    (dict(policy="granular", calib=torch.rand(2, 3, 8, 8)), NotImplementedError, "trained"),
    (dict(policy="static"), ValueError, "needs calibration data"),
    (dict(policy="static", bits=(2, 4), calib=torch.rand(2, 3, 8, 8)), ValueError, "one integer bit-width"),
    (dict(policy="static", bits=9, calib=torch.rand(2, 3, 8, 8)), ValueError, "unsupported bit-width 9"),
    (dict(policy="static", bits=0, calib=torch.rand(2, 3, 8, 8)), ValueError, "unsupported bit-width 0"),
    (dict(policy="entropy", bits=(8, 4, 2), calib=torch.rand(2, 3, 8, 8)), ValueError, "ascending"),
    (dict(policy="static", calib=torch.rand(2, 8, 8)), ValueError, "calib must be"),
    (dict(bits=8), ValueError, "only apply to quantized"),
    (dict(backend="fpga"), ValueError, "unknown backend"),
    (dict(policy="static", bits=4, calib=torch.rand(2, 3, 8, 8), containers="nibbles"), ValueError,
     "unknown containers"),
    (dict(containers="bytes"), ValueError, "containers and residual_stream only apply to quantized"),
    (dict(residual_stream="dtype"), ValueError, "containers and residual_stream only apply to quantized"),
    (dict(policy="static", bits=8, calib=torch.rand(2, 3, 8, 8), residual_stream="half"), ValueError,
     "unknown residual_stream"),
    (dict(policy="turbo"), ValueError, "unknown policy"),
    (dict(patch_size=16, stride=17), ValueError, "stride"),
    (dict(margin=-1), ValueError, "margin"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(dtype=torch.float16), ValueError, "float16 is not supported on CPU"),
    (dict(dtype=torch.int8), ValueError, "dtype"),
    (dict(dtype="int8"), ValueError, "dtype must be torch.float32"),
    (dict(patch_size=16.5), ValueError, "patch_size must be an integer, got 16.5"),
    (dict(patch_size=0), ValueError, "patch_size must be >= 1"),
    (dict(stride="8"), ValueError, "stride must be an integer"),
    (dict(batch_size=True), ValueError, "batch_size must be an integer"),
    (dict(margin=None), ValueError, "margin >= 0"),
])
def test_bad_engine_arguments(tiny_edsr, kwargs, err, match):
    with pytest.raises(err, match=match):
        Engine(tiny_edsr, device="cpu", **kwargs)


@pytest.mark.parametrize("patch, stride", [(96, 90), (64, 58), (48, 42), (32, 28), (16, 14), (8, 7), (2, 2), (1, 1)])
def test_the_default_stride_follows_the_patch_size(tiny_edsr, patch, stride):
    """The papers' 6-pixel overlap at 96; smaller patches overlap by an eighth of their side."""
    from gdq_engine.runtime.tiler import default_stride

    assert default_stride(patch) == stride
    engine = Engine(tiny_edsr, device="cpu", patch_size=np.int64(patch))  # numpy integers are integers
    assert (engine.patch_size, engine.stride) == (patch, stride) and type(engine.patch_size) is int
    assert Engine(tiny_edsr, device="cpu", patch_size=patch, stride=1).stride == 1


def test_dtype_names(tiny_edsr):
    for name in ("bf16", "BFloat16", "float32", "fp32"):
        assert Engine(tiny_edsr, device="cpu", dtype=name).dtype == (torch.float32 if "32" in name else torch.bfloat16)
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        Engine(tiny_edsr, device="cpu", dtype="half")


def test_unusable_devices_are_named(tiny_edsr, monkeypatch):
    """A CPU-only torch asked for CUDA (a common install mistake) says so, not an AssertionError."""
    from gdq_engine.compute import resolve_device

    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        Engine(tiny_edsr, device="gpu0")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ValueError, match="CPU-only build; install a CUDA build"):
        Engine(tiny_edsr, device="cuda")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        resolve_device("cuda:0")
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"only 2 CUDA GPU\(s\) are visible"):
        resolve_device("cuda:2")


def test_containers_auto_is_bytes_only_for_triton_on_cuda():
    from gdq_engine.quantized import resolve_containers

    assert resolve_containers("auto", "triton", torch.device("cuda")) == "bytes"
    for backend, device in (("triton", "cpu"), ("cuda", "cuda"), ("cpp", "cpu"), ("reference", "cuda")):
        assert resolve_containers("auto", backend, torch.device(device)) == "packed"
    assert resolve_containers("bytes", "cpp", torch.device("cpu")) == "bytes"
    assert resolve_containers("packed", "triton", torch.device("cuda")) == "packed"
    with pytest.raises(ValueError, match="unknown containers"):
        resolve_containers("nibbles", "triton", torch.device("cuda"))


def test_residual_stream_auto_is_fp16_only_for_triton_on_cuda():
    from gdq_engine.quantized import resolve_stream_dtypes

    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    assert resolve_stream_dtypes("auto", "triton", torch.device("cuda")) == (f32, f16)
    for backend, device in (("triton", "cpu"), ("cuda", "cuda"), ("cpp", "cpu"), ("reference", "cuda")):
        assert resolve_stream_dtypes("auto", backend, torch.device(device)) == (f32,)
    assert resolve_stream_dtypes("float32", "triton", torch.device("cuda")) == (f32,)
    assert resolve_stream_dtypes("dtype", "reference", torch.device("cpu")) == (f32, f16, bf16)
    with pytest.raises(ValueError, match="unknown residual_stream"):
        resolve_stream_dtypes("fp8", "triton", torch.device("cuda"))


def test_engine_runs_the_residual_stream_in_its_fp_dtype_when_asked(monkeypatch):
    """residual_stream="dtype" on a bf16 engine: the body's blocks get and return bf16 (the
    stream; with 3 blocks its rounding shows in the result), the result stays close to the fp32
    stream's; backends without half streams refuse."""
    from gdq_engine.models import EDSR
    from gdq_engine.runtime.intgraph import IntegerBody

    torch.manual_seed(0)
    tiny_edsr = EDSR(scale=2, n_feats=16, n_blocks=3).eval()

    calib, x = random_image(16, 16, n=4, seed=1), random_image(20, 24, n=1, seed=2)
    kw = dict(device="cpu", patch_size=None, policy="static", bits=8, calib=calib, dtype=torch.bfloat16,
              backend="reference")
    seen, real = [], IntegerBody.run_eager

    def spy(self, feat, bits, **kwargs):
        out = real(self, feat, bits, **kwargs)
        seen.append((feat.dtype, out.dtype))
        return out

    monkeypatch.setattr(IntegerBody, "run_eager", spy)
    half = Engine(tiny_edsr, residual_stream="dtype", **kw)
    a = half.upscale(x)
    b = Engine(tiny_edsr, **kw).upscale(x)  # auto: fp32 off the Triton backend
    assert seen == [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
    assert half.int_body.stream_dtype(torch.bfloat16) == torch.bfloat16
    assert not torch.equal(a, b) and (a - b).abs().max() < 0.02
    from gdq_engine.ops import cpu_ops

    if cpu_ops.available():
        with pytest.raises(ValueError, match="float32 only"):
            Engine(tiny_edsr, residual_stream="dtype", **{**kw, "backend": "cpp"})


def test_bfloat16_runs_close_to_fp32(tiny_edsr):
    x = random_image(20, 20, n=1)
    a = Engine(tiny_edsr, device="cpu", patch_size=None).upscale(x)
    b = Engine(tiny_edsr, device="cpu", patch_size=None, dtype=torch.bfloat16).upscale(x)
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.05


def test_report(engine):
    _, report = engine.upscale(random_image(30, 30, n=2), return_report=True)
    assert report.patches == 2 * 9 and report.batches == 2 and report.seconds > 0 and report.device == "cpu"



def _poison_in_half(model):
    """Make ``model``'s tail output Inf whenever it runs in a half-precision dtype."""
    forward = model.tail.forward
    model.tail.forward = lambda x: forward(x) * (float("inf") if x.dtype != torch.float32 else 1.0)


def test_non_finite_half_precision_output_is_recomputed_with_the_fp32_weights(tiny_edsr):
    x = random_image(30, 26, n=1, seed=4)
    fp32 = Engine(tiny_edsr, device="cpu", patch_size=16, stride=12).upscale(x)
    half = Engine(tiny_edsr, device="cpu", patch_size=16, stride=12, batch_size=2, dtype=torch.bfloat16)
    _poison_in_half(half.model)
    with pytest.warns(UserWarning, match="re-running this image in float32"):
        out, report = half.upscale(x, return_report=True)
    assert torch.equal(out, fp32)  # the fp32 weights, not the bf16 ones cast back
    assert report.fallbacks == ["non-finite half-precision output: image re-run in float32"]
    assert report.patches == 6 and report.batches == 3  # the re-run is not counted twice
    u8 = (x * 255).round().to(torch.uint8)  # rounded into the output as stitched: the re-run overwrites it
    want = Engine(tiny_edsr, device="cpu", patch_size=16, stride=12).upscale(u8)
    with pytest.warns(UserWarning, match="re-running this image in float32"):
        assert torch.equal(half.upscale(u8), want)
    assert half.dtype == torch.bfloat16 and next(half.model.parameters()).dtype == torch.bfloat16


def test_non_finite_output_of_fp32_and_quantized_runs_raises(tiny_edsr):
    x = random_image(20, 20, n=1)
    fp32 = Engine(tiny_edsr, device="cpu", patch_size=16, stride=12)
    fp32.model.tail.forward = lambda t: t[:, :3] * float("nan")
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        fp32.upscale(x)
    quant = Engine(tiny_edsr, device="cpu", policy="static", bits=8, calib=random_image(16, 16, n=2))
    quant.model.tail.forward = lambda t: t[:, :3] * float("inf")
    with pytest.raises(FloatingPointError, match="NaN/Inf values in torch.float32; use float32$"):
        quant.upscale(x)
    half = Engine(tiny_edsr, device="cpu", policy="static", bits=8, calib=random_image(16, 16, n=2),
                  dtype=torch.bfloat16, backend="reference", residual_stream="dtype")
    half.model.tail.forward = lambda t: t[:, :3] * float("inf")
    with pytest.raises(FloatingPointError, match="or residual_stream='float32'"):
        half.upscale(x)


def test_default_batch_size_is_16_on_cpu_and_fits_free_memory_on_cuda(tiny_edsr):
    from gdq_engine import load_model
    from gdq_engine.engine import auto_batch_size

    engine = Engine(tiny_edsr, device="cpu", patch_size=4, stride=4)
    _, report = engine.upscale(random_image(20, 16, n=1), return_report=True)
    assert engine.batch_size is None and report.patches == 20 and report.batches == 2  # 16 + 4
    edsr = load_model("edsr-baseline-x4")
    per_patch = 16 * 192 * 192 * 256  # fp32 x 4 tensors of the second upsampler conv's output
    assert auto_batch_size(edsr, (96, 96), 18, 80 << 30) == 18  # a 1080p frame in one pass
    assert auto_batch_size(edsr, (96, 96), 500, 80 << 30) == 256
    assert auto_batch_size(edsr, (96, 96), 18, 6 * per_patch) == 3
    assert auto_batch_size(edsr, (96, 96), 18, per_patch) == 1


def test_cuda_batch_size_looks_up_the_largest_activation_once_per_window(tiny_edsr, monkeypatch):
    # On CUDA the batch size is chosen before every frame's first kernel, so its host time is
    # latency: the activation probe (whose cache key walks the model's modules) runs once per
    # window size, the free memory is read every time.
    import gdq_engine.runtime.cost as cost
    from gdq_engine.engine import auto_batch_size

    engine = Engine(tiny_edsr, device="cpu", patch_size=8, stride=8)
    engine.device = torch.device("cuda")  # batch_size_for's CUDA branch, with the device calls faked
    free = iter([1 << 30, 1 << 16, 1 << 30])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (next(free), 1 << 40))
    probes, real = [], cost.largest_activation
    monkeypatch.setattr(cost, "largest_activation", lambda *a: probes.append(a[1:]) or real(*a))
    grid = engine.grid(40, 24)
    sizes = [engine.batch_size_for(grid) for _ in range(3)]
    assert probes == [(8, 8)]
    assert sizes == [auto_batch_size(engine.model, (8, 8), len(grid), f) for f in (1 << 30, 1 << 16, 1 << 30)]
    assert sizes[1] < sizes[0] == len(grid)  # less free memory, a smaller batch


def test_upscale_file_keeps_alpha_and_writes_atomically(engine, tmp_path):
    rgba = np.dstack([(random_image(20, 22).permute(1, 2, 0).numpy() * 255).astype(np.uint8),
                      np.full((20, 22), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "in.png")
    h, w = upscale_file(engine, tmp_path / "in.png", tmp_path / "out.png", compare=str(tmp_path / "cmp.png"))
    out = Image.open(tmp_path / "out.png")
    assert (h, w) == (40, 44) and out.mode == "RGBA" and out.size == (44, 40)
    assert np.asarray(out)[..., 3].min() == 128 and np.asarray(out)[..., 3].max() == 128
    assert Image.open(tmp_path / "cmp.png").size == (44 * 2 + 8, 40)
    assert load_image(tmp_path / "out.png").shape == (3, 40, 44)
    # the file holds the float result rounded to 8 bits (the engine rounds, save_image writes bytes)
    from gdq_engine.io import load_image_rgba, to_uint8

    want = to_uint8(engine.upscale(load_image_rgba(tmp_path / "in.png")[0]))
    assert np.array_equal(np.asarray(out)[..., :3], want)
    with pytest.raises(ValueError):
        upscale_file(engine, tmp_path / "in.png", tmp_path / "out.xyz")
    assert not (tmp_path / "out.xyz").exists()
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_all_finite_finds_any_nan_or_inf(layout):
    from gdq_engine.engine import all_finite

    g = torch.Generator().manual_seed(11)

    def view(parent):  # the tensor checked, a view of ``parent`` in the layout under test
        if layout == "channels_last":
            return parent.contiguous(memory_format=torch.channels_last)
        return parent[..., ::2] if layout == "strided" else parent

    parent = torch.rand(2, 3, 9, 14, generator=g)
    assert bool(all_finite(view(parent)))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for _ in range(3):
            p = parent.clone()
            idx = (*(int(torch.randint(0, s, (1,), generator=g)) for s in p.shape[:3]),
                   2 * int(torch.randint(0, 7, (1,), generator=g)))  # a column the strided view keeps
            p[idx] = bad
            assert not bool(all_finite(view(p))), (bad, idx)
    odd = parent.clone()
    odd[0, 0, 0, 1] = float("nan")  # outside the strided view only
    assert bool(all_finite(view(odd))) == (layout == "strided")


def test_float_images_are_finished_in_place_without_an_image_sized_copy(engine):
    """A float image on the compute device is stitched into the result itself and clamped there:
    no copy of an image-sized tensor (an earlier loop built two views of out[n] and copied the
    canvas onto itself, 25 MB a 1080p frame)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.copy_.default:
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    x = random_image(20, 24, n=2, seed=9)
    want = engine.upscale(x)
    with Copies() as copies:
        got = engine.upscale(x)
    assert torch.equal(got, want)
    hr = (3, 20 * engine.scale, 24 * engine.scale)
    assert hr not in copies.shapes, copies.shapes
