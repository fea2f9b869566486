import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gdq_engine import ops
from gdq_engine.quant.packing import pack_codes, unpack_codes


def _codes(bits, signed, shape, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int32)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), signed=st.booleans(), rows=st.integers(1, 5),
       groups=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_round_trip(bits, signed, rows, groups, seed):
    channels = groups * (8 // bits)
    codes = _codes(bits, signed, (rows, channels), seed)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, channels * bits // 8)
    out = unpack_codes(packed, bits, signed)
    assert out.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(out.to(torch.int32), codes)


def test_layout_by_hand():
    # int4, C=4: byte j = channel j (low nibble) | channel j+2 (high nibble)
    codes = torch.tensor([[1, 2, 3, -1]])
    assert pack_codes(codes, 4).tolist() == [[1 | (3 << 4), 2 | (15 << 4)]]
    # int2, C=8: byte j holds channels j, j+2, j+4, j+6 at bit offsets 0, 2, 4, 6
    codes = torch.tensor([[0, 1, 2, 3, -1, -2, 1, 0]])
    b0 = 0 | (2 << 2) | (3 << 4) | (1 << 6)
    b1 = 1 | (3 << 2) | (2 << 4) | (0 << 6)
    assert pack_codes(codes, 2).tolist() == [[b0, b1]]
    # The high-nibble group is recoverable with a mask alone: (b & 0xF0) as int8 == 16 * code.
    codes = _codes(4, True, (3, 64), 1)
    packed = pack_codes(codes, 4)
    high = (packed & 0xF0).view(torch.int8).to(torch.int32)
    assert torch.equal(high, 16 * codes[:, 32:])


@pytest.mark.skipif(not ops.HAS_CPP, reason="C++ extension not built")
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(1, 8), (3, 5, 64), (2, 7, 9, 24)])
def test_cpp_equals_reference(bits, signed, shape):
    codes = _codes(bits, signed, shape, seed=bits * 7 + len(shape))
    for dtype in (torch.int32, torch.int8 if signed else torch.uint8):
        ref = pack_codes(codes.to(dtype), bits)
        cpp = ops.pack_codes(codes.to(dtype), bits, backend="cpp")
        assert torch.equal(cpp, ref)
    assert torch.equal(ops.unpack_codes(ref, bits, signed, backend="cpp"), unpack_codes(ref, bits, signed))


@pytest.mark.skipif(not ops.HAS_CPP, reason="C++ extension not built")
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_pack_dispatch_equals_reference(bits, signed):
    # ops.quantize_pack is one torch.library op with a kernel per device; on CPU tensors "auto"
    # and "cpp" take the compiled kernel, which must match the reference code for code.
    from gdq_engine.ops import reference
    from gdq_engine.quant.quantizer import ActQuant

    g = torch.Generator().manual_seed(bits * 2 + signed)
    x = torch.randn(3, 5, 7, 32, generator=g) * 3
    q = ActQuant(bits, signed, 0.37)
    want = reference.quantize_pack(x, q)
    assert ops.has_kernel("quantize_pack", "cpu")
    for backend in ("auto", "cpp"):
        assert torch.equal(ops.quantize_pack(x, q, backend=backend), want)
    assert torch.equal(ops.quantize_pack(x, q, backend="reference"), want)


def test_has_kernel_answers_per_device():
    assert ops.has_kernel("pack_codes", "cpu") == ops.HAS_CPP
    assert not ops.has_kernel("pack_codes", "meta")  # no kernel there: the reference runs
    assert not ops.has_kernel("no_such_op", "cpu")


def test_cpp_extension_is_built():
    # CI installs the package; a missing extension must fail loudly, not skip everything.
    assert ops.HAS_CPP


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_errors(backend):
    with pytest.raises((ValueError, RuntimeError), match="bit-width"):
        ops.pack_codes(torch.zeros(1, 8, dtype=torch.int32), 3, backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="multiple of 4"):
        ops.pack_codes(torch.zeros(1, 6, dtype=torch.int32), 2, backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="uint8"):
        ops.unpack_codes(torch.zeros(1, 8, dtype=torch.int32), 4, True, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.pack_codes(torch.zeros(1, 8, dtype=torch.int32), 4, backend="fpga")
