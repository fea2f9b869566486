"""CUDA C++ kernels (csrc/cuda/conv3x3.cu) vs the reference backend and the Triton backend, bit for bit.

Runs where a CUDA device and a CUDA build of gdq_engine._C exist (GPU sessions); elsewhere every
test here is skipped and tests/test_cuda_compile.py still compiles the kernels with nvcc. Outputs
are poisoned: before every launch a block of the caching allocator is filled with 0xFF and freed,
so the op's output (allocated from it) starts as garbage and an unwritten element fails.
"""

import itertools

import pytest
import torch
from conftest import rand_codes, rand_weights

from gdq_engine.ops import cuda_ops
from gdq_engine.ops import reference as ref
from gdq_engine.quant.packing import pack_codes, unpack_codes
from gdq_engine.quant.quantizer import ActQuant, container_bits

pytestmark = pytest.mark.skipif(cuda_ops.unavailable_reason(torch.device("cuda")) is not None,
                                reason="needs a CUDA device and gdq_engine._C built with CUDA")
_seed = itertools.count(9000)


def gen():
    return torch.Generator().manual_seed(next(_seed))


def poison(nbytes: int) -> None:
    """Leave 0xFF bytes in the caching allocator's next blocks of about ``nbytes``."""
    blocks = [torch.full((max(nbytes, 512),), 255, dtype=torch.uint8, device="cuda") for _ in range(4)]
    del blocks


def check(x_codes, a_bits, signed, w, mult, bias, triton_too=False, **kw):
    xp = pack_codes(x_codes, container_bits(a_bits))
    want = ref.packed_conv3x3(xp, a_bits, signed, w, mult, bias, **kw)
    cuda_kw = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()}
    poison(want.numel() * want.element_size())
    got = cuda_ops.packed_conv3x3(xp.cuda(), a_bits, signed, cuda_ops.prepare_conv_weight(w.cuda()), mult.cuda(),
                                  bias.cuda(), **cuda_kw).cpu()
    assert got.dtype == want.dtype and torch.equal(got, want)
    if triton_too:
        from gdq_engine.kernels import ops as triton_kernels

        tri = triton_kernels.packed_conv3x3(xp.cuda(), a_bits, signed, w.cuda(), mult.cuda(), bias.cuda(), **cuda_kw)
        assert torch.equal(tri.cpu(), got)


@pytest.mark.parametrize("a_bits", [8, 4, 2, 3, 6])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("w_bits", [8, 4, 2])
def test_int32_sums_equal_reference(a_bits, signed, w_bits):
    g = gen()
    shape = (1, 5, 7, 64) if a_bits % 2 else (3, 9, 13, 64)
    check(rand_codes(shape, a_bits, signed, g), a_bits, signed, rand_weights(64, 64, w_bits, g), torch.ones(64),
          torch.zeros(64))


@pytest.mark.parametrize("a_bits", [8, 4, 2])
@pytest.mark.parametrize("o_bits,o_signed", [(8, False), (4, False), (2, False), (8, True), (4, True), (2, True),
                                             (5, False)])
def test_relu_requantize_pack_epilogue(a_bits, o_bits, o_signed):
    g = gen()
    x = rand_codes((2, 7, 11, 64), a_bits, True, g)
    q = ActQuant(o_bits, o_signed, float(torch.rand(1, generator=g)) * 0.05 + 0.01)
    check(x, a_bits, True, rand_weights(64, 64, 8, g), torch.rand(64, generator=g) * 2e-3,
          torch.randn(64, generator=g) * 0.1, triton_too=True, relu=not o_signed, out_quant=q)


@pytest.mark.parametrize("a_bits", [8, 4, 2])
@pytest.mark.parametrize("res_scale", [1.0, 0.1])
def test_residual_fp32_epilogue(a_bits, res_scale):
    g = gen()
    x = rand_codes((2, 6, 9, 64), a_bits, False, g)
    check(x, a_bits, False, rand_weights(64, 64, 8, g), torch.rand(64, generator=g) * 1e-3,
          torch.randn(64, generator=g), triton_too=True, residual=torch.randn(2, 6, 9, 64, generator=g),
          res_scale=res_scale)


@pytest.mark.parametrize("cin,cout,a_bits,o_bits", [(64, 256, 8, 0), (256, 256, 4, 8), (32, 64, 2, 2),
                                                    (128, 128, 4, 4), (96, 192, 8, 2)])
def test_other_channel_counts(cin, cout, a_bits, o_bits):
    """Upsampler-wide outputs (several CTAs per pixel along channels) and packed outputs whose bytes
    gather channels from every 64-channel slice."""
    g = gen()
    x = rand_codes((1, 5, 14, cin), a_bits, True, g)
    q = ActQuant(o_bits, False, 0.02) if o_bits else None
    check(x, a_bits, True, rand_weights(cout, cin, 8, g), torch.rand(cout, generator=g) * 1e-3,
          torch.randn(cout, generator=g), relu=True, out_quant=q)


@pytest.mark.parametrize("a_bits", [8, 4, 2])
@pytest.mark.parametrize("shape", [(1, 96, 96, 64), (4, 33, 47, 64), (16, 8, 8, 64), (4, 32, 32, 64)])
def test_full_size_and_odd_shapes(shape, a_bits):
    """Many CTAs along pixels at every input width (the engine's batches: 4 x 32 x 32 and more)."""
    g = gen()
    x = rand_codes(shape, a_bits, True, g)
    check(x, a_bits, True, rand_weights(64, 64, 8, g), torch.rand(64, generator=g) * 1e-3,
          torch.randn(64, generator=g), relu=True, out_quant=ActQuant(4, False, 0.05))
    check(rand_codes(shape, a_bits, False, g), a_bits, False, rand_weights(64, 64, 8, g),
          torch.rand(64, generator=g) * 1e-3, torch.randn(64, generator=g), triton_too=True,
          residual=torch.randn(shape, generator=g), res_scale=0.1)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_pack_and_unpack(bits, signed):
    g = gen()
    x = torch.randn(3, 7, 9, 64, generator=g) * 4
    q = ActQuant(bits, signed, 0.07)
    want = ref.quantize_pack(x, q)
    poison(want.numel())
    assert torch.equal(cuda_ops.quantize_pack(x.cuda(), q).cpu(), want)
    codes = rand_codes((5, 11, 64), bits, signed, g).to(torch.int32)  # the op takes int8/uint8/int32 codes
    packed = pack_codes(codes, bits)
    assert torch.equal(torch.ops.gdq_engine.pack_codes(codes.cuda(), bits).cpu(), packed)
    assert torch.equal(torch.ops.gdq_engine.unpack_codes(packed.cuda(), bits, signed).cpu(),
                       unpack_codes(packed, bits, signed))


def test_bad_shapes_raise_clear_errors():
    g = gen()
    x = pack_codes(rand_codes((1, 4, 4, 48), 8, True, g), 8).cuda()
    w48 = rand_weights(64, 48, 8, g).cuda()
    with pytest.raises(ValueError, match="multiples of 32"):
        cuda_ops.packed_conv3x3(x, 8, True, w48, torch.ones(64).cuda(), torch.zeros(64).cuda())
    # The op's own check (a message with an integer in it, built in the C++ glue: on both 2026-11-26
    # GPU runs this crashed the process, because _C.so carried a static libstdc++; setup.py).
    with pytest.raises(RuntimeError, match="multiples of 32, got 48"):
        torch.ops.gdq_engine.packed_conv3x3_cuda(x, 8, True, cuda_ops.prepare_conv_weight(w48), torch.ones(64).cuda(),
                                                 torch.zeros(64).cuda(), None, 1.0, False, 0, 0, 0, 1.0)
    x = pack_codes(rand_codes((1, 4, 4, 64), 8, True, g), 8).cuda()
    with pytest.raises(ValueError, match="multiples of 64"):
        cuda_ops.packed_conv3x3(x, 8, True, rand_weights(48, 64, 8, g).cuda(), torch.ones(48).cuda(),
                                torch.zeros(48).cuda())


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("graphs", [False, True])
def test_integer_body_matches_reference(bits, graphs):
    """The whole block stack on the cuda backend (eager, and as CUDA graphs with padded batches)
    equals the reference backend bit for bit; isolates the kernels from the engine's FP layers."""
    from conftest import random_image

    from gdq_engine.models import EDSR
    from gdq_engine.runtime.intgraph import IntegerBody, calibrate, prepare_blocks

    torch.manual_seed(0)
    model = EDSR(scale=2, n_feats=64, n_blocks=2).eval().cuda()
    quants = calibrate(model, random_image(16, 16, n=4, seed=3).cuda(), (bits,))
    blocks = prepare_blocks(model)
    body = IntegerBody(blocks, quants, backend="cuda", cuda_graphs=graphs)
    reference = IntegerBody(blocks, quants, backend="reference")
    feats = torch.randn(6, 64, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(bits))
    for n in (4, 5, 4, 6, 5, 1):
        assert torch.equal(body(feats[:n], bits), reference(feats[:n], bits)), n
    assert bool(body.graphs and body.graphs.keys()) == graphs


def test_engine_cuda_backend_matches_reference():
    """Both engines run one quantized model (calibrated once), so only the integer body differs."""
    from gdq_engine import Engine, quantize
    from gdq_engine.models import EDSR

    torch.manual_seed(0)
    model = EDSR(scale=2, n_feats=64, n_blocks=2).eval()
    qmodel = quantize(model, "static", bits=4, calib=torch.rand(8, 3, 32, 32))
    lr = torch.rand(1, 3, 40, 52)
    outs = {}
    for backend in ("reference", "cuda"):
        engine = Engine(qmodel, backend=backend, device="cuda", patch_size=32, stride=30)
        assert engine.int_body.backend == backend
        assert (engine.network_graphs is not None) == (backend == "cuda")  # a static policy: the whole network
        outs[backend] = [engine.upscale(lr.cuda()).cpu() for _ in range(3)]  # eager, capture, replay
    for got, want in zip(outs["cuda"], outs["reference"]):
        assert torch.equal(got, want)
    assert engine.network_graphs.keys()  # the second call captured, the third replayed
