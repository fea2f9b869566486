"""gdq_engine.quantize: the drop-in quantized module, its state and checkpoints, and the Engine on it."""

import pytest
import torch
from conftest import random_image, shared

import gdq_engine
from gdq_engine import CheckpointError, Engine, QuantizedSR, load_quantized, quantize, save_quantized
from gdq_engine.models import EDSR
from gdq_engine.quantized import calibration_patches


@pytest.fixture
def small_edsr():
    torch.manual_seed(0)
    return EDSR(scale=2, n_feats=16, n_blocks=2).eval()


def calib_patches():
    return random_image(16, 16, n=12, seed=7)


def test_quantize_is_a_drop_in_module(small_edsr):
    before = {k: v.clone() for k, v in small_edsr.state_dict().items()}
    q = quantize(small_edsr, "static", bits=8, calib=calib_patches())
    assert isinstance(q, torch.nn.Module) and q.scale == 2 and not q.training
    x = random_image(11, 13, n=3, seed=1)
    y, bits = q(x, return_bits=True)
    assert y.shape == (3, 3, 22, 26) and y.dtype == torch.float32 and bits.tolist() == [8, 8, 8]
    with torch.no_grad():
        fp = small_edsr(x)
    mse = float(((y - fp) ** 2).mean())
    assert 0 < mse < 1e-4, mse  # 8-bit activations: close to FP, but really quantized
    assert all(torch.equal(v, small_edsr.state_dict()[k]) for k, v in before.items())  # caller's model untouched


def test_scales_live_on_the_fp_models_device(small_edsr):
    """The engine resolves the integer backend from ``act_scales.device``: calibrating on a GPU
    must give GPU scales (they were made on the CPU, so a CUDA engine picked the CPU kernels)."""
    q = quantize(small_edsr, "static", bits=8, calib=calib_patches())
    moved = QuantizedSR(q.fp.to("meta"), q.policy, q.act_quants(), w_bits=q.w_bits)
    assert moved.act_scales.device.type == "meta" and moved.act_bits.device.type == "meta"


def test_state_dict_round_trip_is_exact(small_edsr):
    q = quantize(small_edsr, "entropy", bits=(2, 4, 8), calib=calib_patches())
    other = quantize(EDSR(scale=2, n_feats=16, n_blocks=2), "entropy", bits=(2, 4, 8),
                     calib=random_image(16, 16, n=12, seed=99))
    other.load_state_dict(q.state_dict())
    assert other.policy.thresholds == q.policy.thresholds and other.w_bits == q.w_bits
    x = random_image(12, 12, n=4, seed=2)
    assert torch.equal(other(x), q(x))


def test_save_and_load_quantized_checkpoint(small_edsr, tmp_path):
    q = quantize(small_edsr, "entropy", bits=(2, 4, 8), calib=calib_patches(), w_bits=4)
    path = tmp_path / "q.pt"
    save_quantized(q, path, meta={"note": "test"})
    loaded = load_quantized(path)
    assert isinstance(loaded, QuantizedSR) and loaded.w_bits == 4
    assert loaded.policy.thresholds == q.policy.thresholds and loaded.policy.bits == (2, 4, 8)
    x = random_image(10, 9, n=5, seed=3)
    y_q, b_q = q(x, return_bits=True)
    y_l, b_l = loaded(x, return_bits=True)
    assert torch.equal(y_q, y_l) and torch.equal(b_q, b_l)
    # The Engine takes the checkpoint path and needs no calibration.
    engine = Engine(str(path), device="cpu", patch_size=None)
    hr, report = engine.upscale(x, return_report=True)
    assert report.bits == b_q.tolist() and torch.allclose(hr, y_q.clamp(0, 1), atol=1e-4)
    with pytest.raises(CheckpointError, match="quantized checkpoint"):
        gdq_engine.load_model(path)


def test_engine_on_quantized_model_rules(small_edsr):
    q = quantize(small_edsr, "static", bits=4, calib=calib_patches())
    with pytest.raises(ValueError, match="already quantized"):
        Engine(q, policy="static", bits=8, device="cpu")
    with pytest.raises(ValueError, match="already quantized"):
        Engine(q, calib=calib_patches(), device="cpu")
    x = random_image(12, 12, n=1, seed=4)
    fp_engine = Engine(q, policy="fp", device="cpu", patch_size=None)  # its FP weights
    assert fp_engine.policy is None
    with torch.no_grad():
        assert torch.allclose(fp_engine.upscale(x), small_edsr(x).clamp(0, 1), atol=1e-5)
    assert q.policy.bits == (4,)  # the caller's quantized model is not changed by the engine


def test_a_quantized_model_that_has_run_can_be_copied_and_given_to_an_engine(small_edsr):
    """The model caches its prepared integer body on first use; copies (Engine deep-copies its
    model) drop that cache and rebuild it, with the same outputs."""
    import copy

    q = quantize(small_edsr, "static", bits=4, calib=calib_patches())
    x = random_image(12, 12, n=1, seed=4)
    y = q(x)
    assert q._bodies  # cached
    twin = copy.deepcopy(q)
    assert not twin._bodies and torch.equal(twin(x), y)
    hr = Engine(q, device="cpu", patch_size=None).upscale(x)
    assert torch.allclose(hr, y[0].clamp(0, 1), atol=1e-6)


def test_bad_quantized_inputs(small_edsr, tmp_path):
    with pytest.raises(ValueError, match="calibration data"):
        quantize(small_edsr, "static")
    with pytest.raises(ValueError, match="w_bits"):
        quantize(small_edsr, "static", calib=calib_patches(), w_bits=3)
    with pytest.raises(ValueError, match="unknown quantized policy"):
        quantize(small_edsr, "granularity", calib=calib_patches())
    fp_path = tmp_path / "fp.pt"
    gdq_engine.save_checkpoint(small_edsr, fp_path)
    with pytest.raises(CheckpointError, match="not a gdq_engine quantized checkpoint"):
        load_quantized(fp_path)
    q = quantize(small_edsr, "static", calib=calib_patches())
    with pytest.raises(ValueError, match=r"\(N,3,H,W\)"):
        q(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="expected float images in \\[0,1\\], got dtype torch.uint8"):
        q(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_to_rebuilds_the_integer_body(small_edsr):
    q = quantize(small_edsr, "static", bits=8, calib=calib_patches())
    x = random_image(8, 8, n=2, seed=5)
    y = q(x)
    assert q._bodies
    q.to("cpu")
    assert not q._bodies and torch.equal(q(x), y)


def test_folder_calibration_uses_the_inference_patch_size():
    patches = calibration_patches(shared("train"), 4, size=96)
    assert patches.shape == (32, 3, 96, 96) and 0 <= float(patches.min()) and float(patches.max()) <= 1


@pytest.mark.parametrize("arch", ["msrresnet", "edsr-res-scale"])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_other_residual_models_quantize_identically_on_every_backend(arch, backend):
    """SRResNet and EDSR-large-style blocks (res_scale 0.1) through the integer path."""
    from conftest import KERNEL_DEVICE

    from gdq_engine.models import MSRResNet
    from gdq_engine.ops import cpu_ops

    if backend == "cpp" and not cpu_ops.available():
        pytest.skip("gdq_engine._C not built")
    torch.manual_seed(0)
    model = (MSRResNet(scale=2, n_feats=16, n_blocks=2) if arch == "msrresnet"
             else EDSR(scale=2, n_feats=32, n_blocks=2, res_scale=0.1)).eval()
    device = "cpu" if backend == "cpp" else KERNEL_DEVICE
    q_ref = quantize(model, "static", bits=8, calib=calib_patches(), backend="reference")
    q_fast = quantize(model, "static", bits=8, calib=calib_patches(), backend=backend).to(device)
    x = random_image(9, 10, n=2, seed=8)
    y = q_ref(x)
    assert torch.equal(q_fast(x.to(device)).cpu(), y)
    with torch.no_grad():
        assert float(((y - model(x)) ** 2).mean()) < 1e-4


def test_a_body_of_other_blocks_is_refused_with_the_reason(small_edsr):
    """RDN's dense blocks quantize (tests/test_densebody.py); blocks of another kind are refused."""
    small_edsr.body = torch.nn.ModuleList(torch.nn.Identity() for _ in small_edsr.body)
    with pytest.raises(NotImplementedError, match="residual-block .* and residual dense"):
        quantize(small_edsr, "static", bits=8, calib=calib_patches())


def test_dqc_trains_the_activation_scales(small_edsr):
    from gdq_engine.train.dqc import dqc_calibrate

    calib = random_image(12, 12, n=16, seed=11)
    q = quantize(small_edsr, "static", bits=2, calib=calib)
    trained, history = dqc_calibrate(q, calib, iters=40, batch=16, progress=False)
    losses = history[2]
    assert len(losses) == 40 and sum(losses[-5:]) < sum(losses[:5])  # the L1 + feature loss goes down
    before = [a.scale for a, _ in q.act_quants()[2]]
    after = [a.scale for a, _ in trained.act_quants()[2]]
    assert before != after and all(s > 0 for s in after)
    assert q.act_quants()[2][0][0].scale == before[0]  # the input model is not changed
    x = random_image(12, 12, n=4, seed=12)
    with torch.no_grad():
        ref = small_edsr(x)
    err = lambda m: float((m(x) - ref).abs().mean())
    assert err(trained) < err(q)  # closer to the FP model on fresh images


def test_shipped_models_carry_calibration_tables():
    """Quantized policies on the shipped models need no calibration data; the table equals a fresh
    calibration on the same crops of ../shared/data/train."""
    from gdq_engine.quantized import calibration_patches, load_calibration_table, shipped_calibration
    from gdq_engine.runtime.intgraph import calibrate

    for name in ("edsr-baseline-x2", "edsr-baseline-x4"):
        path = shipped_calibration(name)
        assert path is not None and path.is_file(), name
        assert load_calibration_table(path)["meta"]["command"].startswith("python -m gdq_engine calibrate")
    engine = Engine("edsr-baseline-x4", policy="entropy", bits=(2, 4, 8), device="cpu")
    table = load_calibration_table(shipped_calibration("edsr-baseline-x4"))
    assert engine.policy.thresholds == tuple(table["entropy"]["thresholds"])
    scales = [[q_in.scale, q_mid.scale] for q_in, q_mid in engine.int_body.act_quants[4]]
    assert scales == table["act_scales"][4]
    fresh = calibrate(gdq_engine.load_model("edsr-baseline-x4"), calibration_patches(shared("train"), 4, 96), (4,))
    # Same crops, same search: equal here; another CPU's float rounding may move a DOBI candidate
    # (they are about 1% apart), so allow 5%.
    got = torch.tensor([[a.scale, b.scale] for a, b in fresh[4]])
    assert torch.allclose(got, torch.tensor(table["act_scales"][4]), rtol=0.05)


def test_calibration_table_round_trip_and_mismatch(small_edsr, tmp_path):
    from gdq_engine.quantized import save_calibration_table

    path = tmp_path / "t.calib.pt"
    save_calibration_table(small_edsr, calib_patches(), path)
    from_table = quantize(small_edsr, "static", bits=4, calib=str(path))
    direct = quantize(small_edsr, "static", bits=4, calib=calib_patches())
    x = random_image(10, 10, n=2, seed=13)
    assert torch.equal(from_table(x), direct(x))
    other = EDSR(scale=2, n_feats=32, n_blocks=2)
    with pytest.raises(ValueError, match="calibration table is for"):
        quantize(other, "static", bits=4, calib=str(path))


def test_storage_bytes_count_packed_codes_scales_and_fp32_parameters_exactly():
    """Model size as real bytes (not the fp32 size divided by a bit-width): the body's codes packed
    at w_bits, fp32 scales and biases per output channel, every other parameter, the activation
    scales and the policy's floats in fp32; a depth version leaves its unused blocks out, an
    integer tail adds its convs at 8 bits. Engine.storage_bytes and eval's JSON report the same."""
    import math

    from gdq_engine.runtime.cost import model_bytes

    torch.manual_seed(0)
    fp = EDSR(scale=2, n_feats=16, n_blocks=3).eval()
    calib = torch.rand(2, 3, 12, 12)
    params = sum(p.numel() for p in fp.parameters())
    assert model_bytes(fp) == {"packed_weights": 0, "scales_and_biases": 0, "fp32": 4 * params, "total": 4 * params}
    for w_bits in (8, 4, 2):
        q = quantize(fp, "entropy", (2, 4, 8), calib, w_bits=w_bits, calib_patch=12)
        body = [m for m in fp.body.modules() if isinstance(m, torch.nn.Conv2d)]
        codes = sum(math.ceil(c.weight.numel() * w_bits / 8) for c in body)
        per_channel = sum(8 * c.out_channels for c in body)
        quantized = sum(c.weight.numel() + c.bias.numel() for c in body)
        floats = 3 * 3 * 2 + 2 + 2  # act scales (widths, blocks, input and mid); entropy thresholds and quantiles
        want = {"packed_weights": codes, "scales_and_biases": per_channel, "fp32": 4 * (params - quantized + floats)}
        assert q.storage_bytes() == {**want, "total": sum(want.values())}, w_bits
        assert Engine(q, device="cpu").storage_bytes == q.storage_bytes()
    # a depth version: the blocks it does not run are left out
    deep = QuantizedSR(q.fp, q.policy, q.act_quants(), w_bits=2, depths=(1, 3)).set_depth(1)
    block = [m for m in fp.body[1:].modules() if isinstance(m, torch.nn.Conv2d)]
    full = QuantizedSR(q.fp, q.policy, q.act_quants(), w_bits=2, depths=(1, 3)).storage_bytes()
    assert full["total"] - deep.storage_bytes()["total"] == sum(
        math.ceil(c.weight.numel() * 2 / 8) + 8 * c.out_channels for c in block) + 4 * (
        sum(p.numel() for p in fp.body[1:].parameters()) - sum(c.weight.numel() + c.bias.numel() for c in block))
    # an integer tail: its convs as 8-bit codes, their activation scales in fp32
    fp = EDSR(scale=2, n_feats=32, n_blocks=1).eval()
    tail = quantize(fp, "static", 8, calib, w_bits=4, calib_patch=12, tail_bits=8)
    names = gdq_engine.runtime.inttail.tail_conv_names(fp)
    assert names
    convs = [dict(fp.named_modules())[n] for n in names]
    plain = quantize(fp, "static", 8, calib, w_bits=4, calib_patch=12).storage_bytes()
    got = tail.storage_bytes()
    assert got["packed_weights"] - plain["packed_weights"] == sum(c.weight.numel() for c in convs)
    assert got["fp32"] - plain["fp32"] == 4 * (len(names) - sum(c.weight.numel() + c.bias.numel() for c in convs))
