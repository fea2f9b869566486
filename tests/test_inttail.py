"""The integer tail (runtime/inttail.py): which convs it takes, exact integer semantics on every CPU
backend, checkpoints, calibration tables, Engine options and BitOPs."""

import pytest
import torch
from conftest import random_image

from gdq_engine import Engine, load_quantized, quantize, save_quantized
from gdq_engine.models import EDSR, MSRResNet
from gdq_engine.ops import cpu_ops, reference
from gdq_engine.quant.quantizer import ActQuant, quantize_weight
from gdq_engine.runtime.inttail import IntegerConv, IntegerUpsampler, calibrate_tail, tail_conv_names

needs_cpp = pytest.mark.skipif(not cpu_ops.available(), reason="the C++ extension is not built")


@pytest.fixture(scope="module")
def edsr32():
    """EDSR x4 with 32 channels (the smallest width every integer backend takes), 2 blocks."""
    torch.manual_seed(0)
    return EDSR(scale=4, n_feats=32, n_blocks=2).eval()


def test_tail_convs_are_the_body_end_and_upsampler_convs_the_kernels_take():
    assert tail_conv_names(EDSR(scale=4, n_feats=64, n_blocks=1)) == ["body_tail", "upsampler.0", "upsampler.2"]
    assert tail_conv_names(EDSR(scale=2, n_feats=64, n_blocks=1)) == ["body_tail", "upsampler.0"]
    # MSRResNet: no body-end conv; upsampler stages are [conv, shuffle, act]; tail = conv_hr, act, conv_last.
    assert tail_conv_names(MSRResNet(scale=4, n_feats=64, n_blocks=1)) == ["upsampler.0", "upsampler.3", "tail.0"]
    # Output channels must be a multiple of 64 (the CUDA kernel's tile): 32 -> 32 and 32 -> 288 stay FP.
    assert tail_conv_names(EDSR(scale=3, n_feats=32, n_blocks=1)) == []
    assert tail_conv_names(EDSR(scale=4, n_feats=32, n_blocks=1)) == ["upsampler.0", "upsampler.2"]
    tiny = EDSR(scale=2, n_feats=8, n_blocks=1)
    with pytest.raises(ValueError, match="no conv the integer tail can run"):
        calibrate_tail(tiny, lambda: None, 8)


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_conv_is_the_reference_op_and_close_to_the_fp_conv(edsr32, bits):
    conv = edsr32.upsampler[0]
    x = torch.randn(2, 32, 7, 5, generator=torch.Generator().manual_seed(bits)).to(memory_format=torch.channels_last)
    q = ActQuant(bits, True, float(x.abs().max()) / ((1 << (bits - 1)) - 1))
    y = IntegerConv(conv, q, reference)(x)
    w_codes, s_w = quantize_weight(conv.weight.detach(), 8)
    expected = reference.packed_conv3x3(reference.quantize_pack(x.permute(0, 2, 3, 1).contiguous(), q), bits, True,
                                        w_codes, torch.tensor(q.scale) * s_w, conv.bias.detach())
    assert y.shape == (2, 128, 7, 5) and y.dtype == torch.float32
    assert torch.equal(y.permute(0, 2, 3, 1), expected)
    with torch.no_grad():
        fp = conv(x)
    assert (y - fp).abs().max() < (0.02 if bits == 8 else 0.3) * fp.abs().max()
    assert IntegerConv(conv, q, reference)(x.bfloat16()).dtype == torch.bfloat16


@needs_cpp
@pytest.mark.parametrize("bits", [8, 5, 2])
def test_cpp_tail_is_bit_exact_with_the_reference(edsr32, bits):
    calib = random_image(12, 12, n=4, seed=1)
    q = quantize(edsr32, "static", bits=4, calib=calib, tail_bits=bits)
    assert q.tail_bits == bits and q.tail_scales.shape == (2,)
    x = random_image(10, 9, n=2, seed=2)
    q.backend = "reference"
    ref = q(x)
    q.backend = "cpp"
    q._drop_caches()
    assert torch.equal(q(x), ref)
    up = q.runtime_model().upsampler
    if bits >= 5:  # fused: 8-bit codes move through the pixel shuffle
        assert isinstance(up, IntegerUpsampler) and up.factors == [2, 2]
    else:
        assert isinstance(up[2], IntegerConv)
    assert type(q.fp.upsampler[2]).__name__ == "Conv2d"  # the FP model is untouched


@needs_cpp
def test_cpp_tail_takes_bf16_input_as_it_is_and_rounds_its_output_like_to(edsr32):
    """With bf16 FP layers the C++ tail reads bf16 without an fp32 copy and stores bf16 from its
    epilogue: the same bits as widening to fp32 first and rounding with .to(bfloat16) after."""
    g = torch.Generator().manual_seed(21)
    x = (torch.randn(2, 32, 7, 6, generator=g) * 3).bfloat16().contiguous(memory_format=torch.channels_last)
    q = ActQuant(8, True, float(x.float().abs().max()) / 127)
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    assert torch.equal(cpu_ops.quantize_pack(nhwc, q), cpu_ops.quantize_pack(nhwc.float(), q))
    out = torch.empty(2, 7, 6, 32, dtype=torch.uint8)
    assert torch.equal(cpu_ops.quantize_pack(nhwc, q, out=out), reference.quantize_pack(nhwc.float(), q))
    narrow = (torch.randn(3, 5, 8, generator=g) * 3).bfloat16()  # 8 channels: the widening's scalar loop
    assert torch.equal(cpu_ops.quantize_pack(narrow, q), reference.quantize_pack(narrow.float(), q))
    conv = edsr32.upsampler[0]
    y = IntegerConv(conv, q, cpu_ops)(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, IntegerConv(conv, q, reference)(x))
    calib = random_image(12, 12, n=4, seed=1)
    model = quantize(edsr32, "static", bits=8, calib=calib, tail_bits=8)
    from gdq_engine.runtime.inttail import with_integer_tail

    quants = model.tail_quants()
    assert torch.equal(with_integer_tail(edsr32, quants, cpu_ops).upsampler(x),
                       with_integer_tail(edsr32, quants, reference).upsampler(x))


def test_fused_upsampler_equals_conv_by_conv_with_fp32_in_between(edsr32):
    """Re-quantizing in the epilogue and shuffling codes gives what quantizing the shuffled fp32
    output gives: a permutation commutes with per-tensor quantization."""
    calib = random_image(12, 12, n=4, seed=1)
    q = quantize(edsr32, "static", bits=8, calib=calib, tail_bits=8)
    from gdq_engine.runtime.intgraph import _backend_module

    fused = q.runtime_model().upsampler
    ops = _backend_module("cpp" if cpu_ops.available() else "reference")
    quants = q.tail_quants()
    stepwise = torch.nn.Sequential(IntegerConv(edsr32.upsampler[0], quants[0], ops), torch.nn.PixelShuffle(2),
                                   IntegerConv(edsr32.upsampler[2], quants[1], ops), torch.nn.PixelShuffle(2))
    x = torch.randn(2, 32, 7, 6, generator=torch.Generator().manual_seed(5))
    out = fused(x)
    assert out.shape == (2, 32, 28, 24) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, stepwise(x))
    assert fused.integer_macs((2, 32, 7, 6)) == 2 * 9 * 32 * 128 * (7 * 6 + 14 * 12)
    assert fused(x.bfloat16()).dtype == torch.bfloat16
    fused.reuse_output = True  # as the Engine sets it: the next call overwrites the result
    first = fused(x).clone()
    again = fused(x)
    assert torch.equal(first, out) and torch.equal(again, out)
    assert not list(fused.buffers()) and not fused.state_dict()  # scratch and integer weights stay outside


def test_tail_checkpoint_round_trip_and_older_checkpoints(edsr32, tmp_path):
    calib = random_image(12, 12, n=4, seed=1)
    q = quantize(edsr32, "static", bits=8, calib=calib, tail_bits=8)
    save_quantized(q, tmp_path / "q.pt")
    back = load_quantized(tmp_path / "q.pt")
    assert back.tail_bits == 8 and torch.equal(back.tail_scales, q.tail_scales)
    x = random_image(9, 11, n=1, seed=3)
    assert torch.equal(back(x), q(x))
    plain = quantize(edsr32, "static", bits=8, calib=calib)
    save_quantized(plain, tmp_path / "plain.pt")
    again = load_quantized(tmp_path / "plain.pt")
    assert again.tail_bits is None and again.tail_scales is None and "tail_scales" not in again.state_dict()
    assert not torch.equal(again(x), q(x))  # the tail really changed the computation


def test_tail_scales_from_a_table_equal_those_from_its_patches(edsr32, tmp_path):
    from gdq_engine.quantized import save_calibration_table

    calib = random_image(12, 12, n=4, seed=1)
    save_calibration_table(edsr32, calib, tmp_path / "t.calib.pt")
    from_table = quantize(edsr32, "static", bits=8, calib=str(tmp_path / "t.calib.pt"), tail_bits=8)
    from_patches = quantize(edsr32, "static", bits=8, calib=calib, tail_bits=8)
    assert torch.equal(from_table.tail_scales, from_patches.tail_scales)
    table = torch.load(tmp_path / "t.calib.pt", weights_only=True)
    del table["tail_scales"]
    torch.save(table, tmp_path / "old.calib.pt")
    with pytest.raises(ValueError, match="no integer-tail scales"):
        quantize(edsr32, "static", bits=8, calib=str(tmp_path / "old.calib.pt"), tail_bits=8)


def test_engine_tail_options(edsr32, monkeypatch):
    calib = random_image(12, 12, n=4, seed=1)
    with pytest.raises(ValueError, match="tail_bits only apply to quantized policies"):
        Engine(edsr32, device="cpu", tail_bits=8)
    q = quantize(edsr32, "static", bits=8, calib=calib)
    with pytest.raises(ValueError, match="pass calib"):
        Engine(q, device="cpu", tail_bits=8)
    engine = Engine(q, device="cpu", tail_bits=8, calib=calib, patch_size=8, stride=8)
    assert engine.tail_bits == 8 and q.tail_bits is None  # the caller's model is not changed
    direct = Engine(edsr32, device="cpu", policy="static", bits=8, calib=calib, tail_bits=8, patch_size=8, stride=8)
    x = random_image(16, 8, n=1, seed=4)
    out, report = engine.upscale(x, return_report=True)
    assert torch.equal(out, direct.upscale(x))
    # The engine's private model reuses the upsampler's output buffer; the drop-in module does not.
    qt = quantize(edsr32, "static", bits=8, calib=calib, tail_bits=8)
    whole = Engine(qt, device="cpu", patch_size=None)
    assert torch.equal(whole.upscale(x), qt(x).clamp(0, 1)) and torch.equal(whole.upscale(x), qt(x).clamp(0, 1))
    # BitOPs: the tail convs count 8 x 8 instead of 32 x 32.
    _, fp_report = Engine(q, device="cpu", patch_size=8, stride=8).upscale(x, return_report=True)
    from gdq_engine.runtime.cost import integer_tail_macs

    tail_macs = integer_tail_macs(engine.model, 8, 8)
    assert tail_macs == (8 * 8 + 16 * 16) * 128 * 32 * 9  # the two upsampler convs (32 -> 128)
    assert fp_report.bitops - report.bitops == 2 * tail_macs * (32 * 32 - 8 * 8)
    # The MAC counts are looked up once per patch size (the lookup walks the model's modules):
    # a second image gives the same BitOPs from the engine's own table.
    import gdq_engine.runtime.cost as cost

    calls, real = [], cost.conv_macs
    monkeypatch.setattr(cost, "conv_macs", lambda *a: calls.append(a[1:]) or real(*a))
    _, again = engine.upscale(x, return_report=True)
    assert calls == [] and again.bitops == report.bitops and engine._patch_costs


def test_shipped_quantized_model_takes_tail_scales_from_the_shipped_table():
    from gdq_engine.quantized import load_calibration_table, shipped_calibration

    q = quantize("edsr-baseline-x4", "granular", tail_bits=8)
    table = load_calibration_table(shipped_calibration("edsr-baseline-x4"))
    assert q.tail_bits == 8 and q.tail_scales.tolist() == pytest.approx(table["tail_scales"][8], rel=1e-7)
