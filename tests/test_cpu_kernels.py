"""C++ CPU kernels (csrc/cpu/conv.cpp) vs the reference backend, bit for bit.

Every code path runs on every machine: the AMX-INT8 tile kernel, the AVX512-VNNI kernel and the
AVX2 kernel where the CPU has them (each falls back to the next path down elsewhere, so the same
cases still run), and the portable loop (forced with ``allow_vnni=False, allow_avx2=False``).
Fresh random codes per case, odd H/W (rows not multiples of the AMX kernel's 32-pixel blocks),
batch 1 and > 1, signed and unsigned codes, every container and weight width, every epilogue.
"""

import itertools
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import rand_codes, rand_weights, random_image

from gdq_engine.ops import cpu_ops
from gdq_engine.ops import reference as ref
from gdq_engine.quant.packing import pack_codes
from gdq_engine.quant.quantizer import ActQuant, container_bits

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="gdq_engine._C is not built")  # CI builds it
_seed = itertools.count(5000)
PATHS = ["amx", "vnni", "avx2", "portable"]
PATH_FLAGS = {"amx": {}, "vnni": dict(allow_amx=False, allow_avx2=False),
              "avx2": dict(allow_amx=False, allow_vnni=False),
              "portable": dict(allow_amx=False, allow_vnni=False, allow_avx2=False)}


def gen():
    return torch.Generator().manual_seed(next(_seed))


def test_extension_is_built():
    assert cpu_ops.available()  # CI installs the package, so the kernels must be there


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="reads the ELF dynamic section with binutils' readelf (Linux)")
def test_extension_links_the_shared_cxx_runtime():
    """_C.so must load libstdc++.so.6, not carry a static copy: two C++ runtimes in one process do
    not share locale facets, and TORCH_CHECK messages holding an integer then crashed (the lent GPU
    machine's compiler wrapper linked libstdc++.a; setup.py now links the one torch runs on)."""
    import gdq_engine._C as ext

    dynamic = subprocess.run(["readelf", "-d", ext.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[-1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any(name.startswith("libstdc++.so") for name in needed), needed


def test_each_path_is_taken_where_the_cpu_has_it():
    avx2 = "avx2" if cpu_ops.has_avx2() else "portable"
    best = "amx" if cpu_ops.has_amx() else "vnni" if cpu_ops.has_vnni() else avx2
    assert cpu_ops.conv_path(64, 64) == best and cpu_ops.conv_path(64, 256) == best
    assert cpu_ops.conv_path(64, 64, allow_amx=False) == ("vnni" if cpu_ops.has_vnni() else avx2)
    assert cpu_ops.conv_path(64, 64, allow_vnni=False, allow_amx=False) == avx2
    assert cpu_ops.conv_path(64, 64, allow_vnni=False, allow_amx=False, allow_avx2=False) == "portable"
    assert cpu_ops.conv_path(64, 12, allow_vnni=False, allow_amx=False) == "portable"  # AVX2: Cout % 8
    if cpu_ops.has_amx():  # 96 channels would need two chunk sizes, 48 outputs an odd tile pair: VNNI
        assert cpu_ops.conv_path(96, 64) == cpu_ops.conv_path(64, 48) == "vnni"


def check(x_codes, a_bits, signed, w, mult, bias, path, **kw):
    xp = pack_codes(x_codes, container_bits(a_bits))
    want = ref.packed_conv3x3(xp, a_bits, signed, w, mult, bias, **kw)
    got = cpu_ops.packed_conv3x3(xp, a_bits, signed, cpu_ops.prepare_conv_weight(w), mult, bias,
                                 **PATH_FLAGS[path], **kw)
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("a_bits", [8, 4, 2, 3, 6])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("w_bits", [8, 4, 2])
def test_int32_sums_equal_reference(path, a_bits, signed, w_bits):
    g = gen()
    shape = (1, 5, 7, 64) if a_bits % 2 else (3, 9, 37, 64)
    x = rand_codes(shape, a_bits, signed, g)
    check(x, a_bits, signed, rand_weights(64, 64, w_bits, g), torch.ones(64), torch.zeros(64), path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("a_bits", [8, 4, 2])
@pytest.mark.parametrize("o_bits,o_signed", [(8, False), (4, False), (2, False), (4, True), (5, False)])
def test_relu_requantize_pack_epilogue(path, a_bits, o_bits, o_signed):
    g = gen()
    x = rand_codes((2, 7, 11, 64), a_bits, True, g)
    q = ActQuant(o_bits, o_signed, float(torch.rand(1, generator=g)) * 0.05 + 0.01)
    check(x, a_bits, True, rand_weights(64, 64, 8, g), torch.rand(64, generator=g) * 2e-3,
          torch.randn(64, generator=g) * 0.1, path, relu=not o_signed, out_quant=q)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("a_bits", [8, 4, 2])
@pytest.mark.parametrize("res_scale", [1.0, 0.1])
def test_residual_fp32_epilogue(path, a_bits, res_scale):
    g = gen()
    x = rand_codes((2, 6, 9, 64), a_bits, False, g)
    check(x, a_bits, False, rand_weights(64, 64, 8, g), torch.rand(64, generator=g) * 1e-3,
          torch.randn(64, generator=g), path, residual=torch.randn(2, 6, 9, 64, generator=g),
          res_scale=res_scale)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cin,cout,a_bits", [(64, 256, 8), (32, 48, 4), (16, 16, 2), (8, 8, 8), (48, 64, 4),
                                             (128, 64, 8), (192, 32, 2), (96, 64, 8), (64, 128, 8), (64, 32, 4),
                                             (16, 12, 8)])
def test_other_channel_counts(path, cin, cout, a_bits):
    """Upsampler-wide outputs, Cout not a multiple of 64 (VNNI tail tiles), of 16 (AVX2 blocks of 8)
    or of 8 (portable), C over
    64 in 64-byte AMX chunks (128, 192) and C the AMX kernel leaves to VNNI (96: chunks would differ);
    the register-held epilogue's widths (32, 64, 128 channels; packed rows that are not whole
    16-byte vectors, e.g. 32 channels at 2 bits, take the per-pixel one); packed rows of 8, 16 and
    48 bytes per pixel (unpacked bytewise and 16 bytes at a time)."""
    g = gen()
    x = rand_codes((1, 5, 14, cin), a_bits, True, g)
    w = rand_weights(cout, cin, 8, g)
    check(x, a_bits, True, w, torch.rand(cout, generator=g) * 1e-3, torch.randn(cout, generator=g), path,
          relu=True)
    check(x, a_bits, True, w, torch.rand(cout, generator=g) * 1e-3, torch.randn(cout, generator=g), path,
          relu=True, out_quant=ActQuant(a_bits, False, 0.02))


def _shuffled(y: torch.Tensor, r: int) -> torch.Tensor:
    """(N,H,W,r*r*C) sub-pixel-major -> (N,rH,rW,C)."""
    n, h, w, crr = y.shape
    return y.view(n, h, w, r, r, crr // (r * r)).permute(0, 1, 3, 2, 4, 5).reshape(n, h * r, w * r, -1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cout,r", [(256, 2), (64, 2), (576, 3), (32, 2)])
@pytest.mark.parametrize("out", ["fp32", "bf16", 8, 4])
def test_pixel_shuffle_store_and_bf16_output(path, cout, r, out):
    """The upsampler's stores: sub-pixel blocks to their pixels, fp32 rounded to bf16 (nearest even)
    or re-quantized and packed per stored pixel."""
    g = gen()
    x = rand_codes((2, 5, 11, 64), 8, True, g)
    w = rand_weights(cout, 64, 8, g)
    mult, bias = torch.rand(cout, generator=g) * 1e-3, torch.randn(cout, generator=g)
    xp = pack_codes(x, 8)
    y = ref.packed_conv3x3(xp, 8, True, w, mult, bias)
    prep = cpu_ops.prepare_conv_weight(w)
    if out in ("fp32", "bf16"):
        dtype = torch.float32 if out == "fp32" else torch.bfloat16
        got = cpu_ops.packed_conv3x3(xp, 8, True, prep, mult, bias, shuffle=r, out_dtype=dtype, **PATH_FLAGS[path])
        assert got.dtype == dtype and torch.equal(got, _shuffled(y, r).to(dtype))
    else:
        q = ActQuant(out, True, 0.05)
        got = cpu_ops.packed_conv3x3(xp, 8, True, prep, mult, bias, out_quant=q, shuffle=r, **PATH_FLAGS[path])
        codes = ref.packed_conv3x3(xp, 8, True, w, mult, bias, out_quant=q)
        expect = pack_codes(_shuffled(ref.unpack_codes(codes, out, True), r), out)
        assert torch.equal(got, expect)


@pytest.mark.parametrize("path", PATHS)
def test_output_written_into_the_residual_buffer(path):
    g = gen()
    x = rand_codes((2, 6, 37, 64), 8, False, g)
    w, mult, bias = rand_weights(64, 64, 8, g), torch.rand(64, generator=g) * 1e-3, torch.randn(64, generator=g)
    residual = torch.randn(2, 6, 37, 64, generator=g)
    xp = pack_codes(x, 8)
    want = ref.packed_conv3x3(xp, 8, False, w, mult, bias, residual=residual, res_scale=0.5)
    got = cpu_ops.packed_conv3x3(xp, 8, False, cpu_ops.prepare_conv_weight(w), mult, bias, residual=residual,
                                 res_scale=0.5, out=residual, **PATH_FLAGS[path])
    assert got.data_ptr() == residual.data_ptr() and torch.equal(got, want)
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        cpu_ops.packed_conv3x3(xp, 8, False, cpu_ops.prepare_conv_weight(w), mult, bias, out=torch.empty(2, 6, 37, 63))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("a_bits,signed", [(8, True), (8, False), (4, False), (2, True), (2, False)])
@pytest.mark.parametrize("cin,cout,shape", [(64, 64, (1, 5, 37, 64)), (576, 64, (2, 3, 9, 576)),
                                            (96, 48, (3, 4, 7, 96)), (16, 8, (1, 1, 1, 16))])
def test_1x1_weights_equal_the_centre_tap_3x3_conv(path, a_bits, signed, cin, cout, shape):
    """(Cout, C, 1, 1) weights (RDN's fusion conv): the reference 3x3 conv of the weights zero-padded
    to the centre tap, bit for bit, through the dense body's epilogue (fp32, the partial sum as the
    residual, written in place) and a packed one; C = 576 is RDN-B's fusion width (AMX chunks of 64),
    96 -> 48 the VNNI tail tiles, one pixel a row of only padding around it."""
    g = gen()
    x = rand_codes(shape[:3] + (cin,), a_bits, signed, g)
    w1 = rand_weights(cout, cin, 8, g)[:, :, 1:2, 1:2].contiguous()
    w3 = torch.nn.functional.pad(w1, (1, 1, 1, 1))
    mult, bias = torch.rand(cout, generator=g) * 1e-3, torch.randn(cout, generator=g)
    xp = pack_codes(x, container_bits(a_bits))
    prep = cpu_ops.prepare_conv_weight(w1)
    assert prep.w.shape == (1, cin // 4, cout, 4)
    residual = torch.randn(shape[:3] + (cout,), generator=g)
    want = ref.packed_conv3x3(xp, a_bits, signed, w3, mult, bias, residual=residual)
    got = cpu_ops.packed_conv3x3(xp, a_bits, signed, prep, mult, bias, residual=residual, out=residual,
                                 **PATH_FLAGS[path])
    assert got.data_ptr() == residual.data_ptr() and torch.equal(got, want)
    q = ActQuant(4, False, 0.03)
    want = ref.packed_conv3x3(xp, a_bits, signed, w3, mult, bias, relu=True, out_quant=q)
    got = cpu_ops.packed_conv3x3(xp, a_bits, signed, w1, mult, bias, relu=True, out_quant=q, **PATH_FLAGS[path])
    assert torch.equal(got, want)


def test_pixel_shuffle_store_rejects_what_it_cannot_do():
    g = gen()
    w = cpu_ops.prepare_conv_weight(rand_weights(64, 64, 8, g))
    xp = pack_codes(rand_codes((1, 3, 3, 64), 8, True, g), 8)
    one, zero = torch.ones(64), torch.zeros(64)
    with pytest.raises(RuntimeError, match="sub-pixel"):
        cpu_ops.packed_conv3x3(xp, 8, True, w, one, zero, shuffle=3)
    with pytest.raises(RuntimeError, match="no residual"):
        cpu_ops.packed_conv3x3(xp, 8, True, w, one, zero, shuffle=2, residual=torch.zeros(1, 3, 3, 64))
    with pytest.raises(RuntimeError, match="bf16 output"):
        cpu_ops.packed_conv3x3(xp, 8, True, w, one, zero, out_quant=ActQuant(8, True, 0.1), out_dtype=torch.bfloat16)


@pytest.mark.parametrize("bits", [8, 4, 2, 3])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("channels", [64, 8])
def test_quantize_pack(bits, signed, channels):
    g = gen()
    x = torch.randn(2, 5, 7, channels, generator=g) * 3
    x[0, 0, 0, :4] = torch.tensor([0.035, -0.035, 0.105, 1e9])  # exact half-way points and saturation
    q = ActQuant(bits, signed, 0.07)
    assert torch.equal(cpu_ops.quantize_pack(x, q), ref.quantize_pack(x, q))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("next_bits", [8, 4, 2, 5])
def test_residual_output_also_packed_for_the_next_block(path, next_bits):
    g = gen()
    x = rand_codes((2, 5, 35, 64), 4, False, g)
    w, mult, bias = rand_weights(64, 64, 8, g), torch.rand(64, generator=g) * 1e-3, torch.randn(64, generator=g)
    residual = torch.randn(2, 5, 35, 64, generator=g)
    xp = pack_codes(x, 4)
    y = ref.packed_conv3x3(xp, 4, False, w, mult, bias, residual=residual)
    q = ActQuant(next_bits, True, 0.05)
    nxt = torch.full((2, 5, 35, 64 * container_bits(next_bits) // 8), 0xA5, dtype=torch.uint8)
    got = cpu_ops.packed_conv3x3(xp, 4, False, cpu_ops.prepare_conv_weight(w), mult, bias, residual=residual,
                                 next_quant=q, next_out=nxt, **PATH_FLAGS[path])
    assert torch.equal(got, y) and torch.equal(nxt, ref.quantize_pack(y, q))
    with pytest.raises(RuntimeError, match="q2"):
        cpu_ops.packed_conv3x3(xp, 4, False, cpu_ops.prepare_conv_weight(w), mult, bias, next_quant=q)


def test_quantize_pack_into_a_given_buffer():
    g = gen()
    x = torch.randn(2, 5, 7, 64, generator=g) * 3
    q = ActQuant(4, True, 0.07)
    out = torch.full((2, 5, 7, 32), 0xA5, dtype=torch.uint8)
    assert cpu_ops.quantize_pack(x, q, out=out) is out and torch.equal(out, ref.quantize_pack(x, q))
    with pytest.raises(RuntimeError, match="out must be a contiguous CPU uint8"):
        cpu_ops.quantize_pack(x, q, out=torch.empty(2, 5, 7, 64, dtype=torch.uint8))


def test_bad_inputs_raise_clear_errors():
    g = gen()
    with pytest.raises(ValueError, match="multiples of 4"):
        cpu_ops.prepare_conv_weight(rand_weights(16, 6, 8, g))
    for bad in (rand_weights(16, 16, 8, g)[:, :, :1], rand_weights(16, 16, 8, g)[:, :, :1, :1].float()):
        with pytest.raises(ValueError, match=r"\(Cout, C, 3, 3\) or \(Cout, C, 1, 1\) int8"):
            cpu_ops.prepare_conv_weight(bad)
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
    assert fast.int_body.backend == "cpp" and auto == ("cpp" if cpu_ops.has_vnni() or cpu_ops.has_avx2()
                                                       else "reference")
    slow = Engine(model, backend="reference", **kw)
    lr = random_image(13, 11, n=2, seed=2)
    out_fast, rep_fast = fast.upscale(lr, return_report=True)
    out_slow, rep_slow = slow.upscale(lr, return_report=True)
    assert rep_fast.bits == rep_slow.bits and torch.equal(out_fast, out_slow)
