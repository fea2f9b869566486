"""C++ CPU kernels (csrc/cpu/conv.cpp) vs the reference backend, bit for bit.

Both code paths run on every machine: the AVX512-VNNI kernel where the CPU has it, and the
portable loop (forced with ``allow_vnni=False``). Fresh random codes per case, odd H/W, batch 1
and > 1, signed and unsigned codes, every container and weight width, every epilogue.
"""

import itertools

import pytest
import torch
from conftest import rand_codes, rand_weights, random_image

from gdq_engine.ops import cpu_ops
from gdq_engine.ops import reference as ref
from gdq_engine.quant.packing import pack_codes
from gdq_engine.quant.quantizer import ActQuant, container_bits

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="gdq_engine._C is not built")  # CI builds it
_seed = itertools.count(5000)
PATHS = [True, False]  # allow_vnni


def gen():
    return torch.Generator().manual_seed(next(_seed))


def test_extension_is_built():
    assert cpu_ops.available()  # CI installs the package, so the kernels must be there


def check(x_codes, a_bits, signed, w, mult, bias, allow_vnni, **kw):
    xp = pack_codes(x_codes, container_bits(a_bits))
    want = ref.packed_conv3x3(xp, a_bits, signed, w, mult, bias, **kw)
    got = cpu_ops.packed_conv3x3(xp, a_bits, signed, cpu_ops.prepare_conv_weight(w), mult, bias,
                                 allow_vnni=allow_vnni, **kw)
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("allow_vnni", PATHS)
@pytest.mark.parametrize("a_bits", [8, 4, 2, 3, 6])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("w_bits", [8, 4, 2])
def test_int32_sums_equal_reference(allow_vnni, a_bits, signed, w_bits):
    g = gen()
    shape = (1, 5, 7, 64) if a_bits % 2 else (3, 9, 13, 64)
    x = rand_codes(shape, a_bits, signed, g)
    check(x, a_bits, signed, rand_weights(64, 64, w_bits, g), torch.ones(64), torch.zeros(64), allow_vnni)


@pytest.mark.parametrize("allow_vnni", PATHS)
@pytest.mark.parametrize("a_bits", [8, 4, 2])
@pytest.mark.parametrize("o_bits,o_signed", [(8, False), (4, False), (2, False), (4, True), (5, False)])
def test_relu_requantize_pack_epilogue(allow_vnni, a_bits, o_bits, o_signed):
    g = gen()
    x = rand_codes((2, 7, 11, 64), a_bits, True, g)
    q = ActQuant(o_bits, o_signed, float(torch.rand(1, generator=g)) * 0.05 + 0.01)
    check(x, a_bits, True, rand_weights(64, 64, 8, g), torch.rand(64, generator=g) * 2e-3,
          torch.randn(64, generator=g) * 0.1, allow_vnni, relu=not o_signed, out_quant=q)


@pytest.mark.parametrize("allow_vnni", PATHS)
@pytest.mark.parametrize("a_bits", [8, 4, 2])
@pytest.mark.parametrize("res_scale", [1.0, 0.1])
def test_residual_fp32_epilogue(allow_vnni, a_bits, res_scale):
    g = gen()
    x = rand_codes((2, 6, 9, 64), a_bits, False, g)
    check(x, a_bits, False, rand_weights(64, 64, 8, g), torch.rand(64, generator=g) * 1e-3,
          torch.randn(64, generator=g), allow_vnni, residual=torch.randn(2, 6, 9, 64, generator=g),
          res_scale=res_scale)


@pytest.mark.parametrize("allow_vnni", PATHS)
@pytest.mark.parametrize("cin,cout,a_bits", [(64, 256, 8), (32, 48, 4), (16, 16, 2), (8, 8, 8), (48, 64, 4)])
def test_other_channel_counts(allow_vnni, cin, cout, a_bits):
    """Upsampler-wide outputs, Cout not a multiple of 64 (VNNI tail tiles) or of 16 (portable)."""
    g = gen()
    x = rand_codes((1, 5, 14, cin), a_bits, True, g)
    w = rand_weights(cout, cin, 8, g)
    check(x, a_bits, True, w, torch.rand(cout, generator=g) * 1e-3, torch.randn(cout, generator=g), allow_vnni,
          relu=True)
    check(x, a_bits, True, w, torch.rand(cout, generator=g) * 1e-3, torch.randn(cout, generator=g), allow_vnni,
          relu=True, out_quant=ActQuant(a_bits, False, 0.02))


@pytest.mark.parametrize("bits", [8, 4, 2, 3])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("channels", [64, 8])
def test_quantize_pack(bits, signed, channels):
    g = gen()
    x = torch.randn(2, 5, 7, channels, generator=g) * 3
    x[0, 0, 0, :4] = torch.tensor([0.035, -0.035, 0.105, 1e9])  # exact half-way points and saturation
    q = ActQuant(bits, signed, 0.07)
    assert torch.equal(cpu_ops.quantize_pack(x, q), ref.quantize_pack(x, q))


def test_bad_inputs_raise_clear_errors():
    g = gen()
    with pytest.raises(ValueError, match="multiples of 4"):
        cpu_ops.prepare_conv_weight(rand_weights(16, 6, 8, g))
    w = cpu_ops.prepare_conv_weight(rand_weights(16, 16, 8, g))
    xp = torch.zeros(1, 4, 4, 8, dtype=torch.uint8)  # 16 channels at 4 bits
    with pytest.raises(RuntimeError, match="weights expect 16"):
        cpu_ops.packed_conv3x3(xp, 8, True, w, torch.ones(16), torch.zeros(16))
    with pytest.raises(RuntimeError, match="residual must be fp32"):
        cpu_ops.packed_conv3x3(xp, 4, True, w, torch.ones(16), torch.zeros(16), residual=torch.zeros(1, 4, 4, 16,
                                                                                                     dtype=torch.half))


@pytest.mark.parametrize("policy,bits", [("static", 8), ("static", 2), ("entropy", (2, 4, 8))])
def test_engine_cpp_backend_equals_reference(policy, bits):
    from gdq_engine import Engine
    from gdq_engine.models import EDSR

    torch.manual_seed(0)
    model = EDSR(scale=2, n_feats=16, n_blocks=2).eval()
    kw = dict(policy=policy, bits=bits, calib=random_image(12, 12, n=8, seed=1), patch_size=8, stride=6, device="cpu")
    fast = Engine(model, backend="cpp", **kw)
    auto = Engine(model, **kw).int_body.backend
    assert fast.int_body.backend == "cpp" and auto == ("cpp" if cpu_ops.has_vnni() else "reference")
    slow = Engine(model, backend="reference", **kw)
    lr = random_image(13, 11, n=2, seed=2)
    out_fast, rep_fast = fast.upscale(lr, return_report=True)
    out_slow, rep_slow = slow.upscale(lr, return_report=True)
    assert rep_fast.bits == rep_slow.bits and torch.equal(out_fast, out_slow)
