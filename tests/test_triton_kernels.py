"""Triton kernels vs the reference backend, bit for bit (interpreter on CPU, compiled on GPU).

Fresh random codes every case, odd H/W (not tile multiples), batch 1 and > 1, signed and unsigned
codes, every activation container and weight width, every epilogue; outputs are poisoned before
each launch so an element the kernel never wrote fails the comparison.
"""

import itertools

import pytest
import torch
from conftest import KERNEL_DEVICE, rand_codes, rand_weights, weights_for_adds

from gdq_engine.ops import reference as ref
from gdq_engine.quant.packing import pack_codes
from gdq_engine.quant.quantizer import ActQuant, container_bits

tk = pytest.importorskip("gdq_engine.kernels.ops", reason="triton is a test dependency", exc_type=ImportError)

DEV = torch.device(KERNEL_DEVICE)
_seed = itertools.count(1000)


def gen():
    return torch.Generator().manual_seed(next(_seed))


def run_both(x_codes, a_bits, signed, w, mult, bias, **kw):
    """(triton on DEV with poisoned output, reference on CPU) for the same inputs."""
    xp = pack_codes(x_codes, container_bits(a_bits))
    want = ref.packed_conv3x3(xp, a_bits, signed, w, mult, bias, **kw)
    kw_dev = dict(kw)
    if kw.get("residual") is not None:
        kw_dev["residual"] = kw["residual"].to(DEV)
    poison = torch.full_like(want, float("nan")) if want.is_floating_point() else torch.full_like(want, 0xA5)
    got = tk.packed_conv3x3(xp.to(DEV), a_bits, signed, tk.prepare_conv_weight(w, a_bits), mult.to(DEV),
                            bias.to(DEV), out=poison.to(DEV), **kw_dev)
    return got.cpu(), want


@pytest.mark.parametrize("a_bits", [8, 4, 2, 3, 5])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("w_bits", [8, 4, 2])
def test_int32_sums_equal_reference(a_bits, signed, w_bits):
    """mult = 1, bias = 0, fp32 out: the output is fp32(int32 accumulator), exact below 2^24."""
    g = gen()
    n, h, w = (1, 5, 7) if a_bits % 2 else (3, 9, 6)
    x = rand_codes((n, h, w, 64), a_bits, signed, g)
    wt = rand_weights(64, 64, w_bits, g)
    got, want = run_both(x, a_bits, signed, wt, torch.ones(64), torch.zeros(64))
    assert torch.equal(got, want)
    assert torch.equal(want, ref.conv3x3_int(x, wt).float())


@pytest.mark.parametrize("a_bits,signed", [(8, True), (8, False), (4, True), (2, False)])
def test_any_weight_layout_gives_the_same_sums(a_bits, signed):
    """Prepared weights are K-contiguous (wgmma's 8-bit B operands are K-major); the kernel reads
    them through strides, so the old N-contiguous layout (benchmarks/kernels.py's A/B rows) and a
    layout with no unit stride give the reference's sums too."""
    g = gen()
    x = rand_codes((2, 5, 9, 64), a_bits, signed, g)
    wt = rand_weights(128, 64, 8, g)
    prep = tk.prepare_conv_weight(wt, a_bits)
    groups = 8 // container_bits(a_bits)
    assert prep.w.shape == (groups, 9 * 64 // groups, 128) and prep.w.stride(1) == 1
    spread = torch.zeros(*prep.w.shape, 2, dtype=torch.int8)  # every element 2 bytes from the next: no unit stride
    spread[..., 0] = prep.w
    want = ref.packed_conv3x3(pack_codes(x, container_bits(a_bits)), a_bits, signed, wt, torch.ones(128),
                              torch.zeros(128))
    for w in (prep.w.contiguous(), spread[..., 0]):
        layout = tk.PreparedWeight(w.to(DEV), prep.wsum, prep.a_bits, 64, 128)
        got = tk.packed_conv3x3(pack_codes(x, container_bits(a_bits)).to(DEV), a_bits, signed, layout,
                                torch.ones(128).to(DEV), torch.zeros(128).to(DEV),
                                out=torch.full((2, 5, 9, 128), float("nan"), device=DEV))
        assert torch.equal(got.cpu(), want), w.stride()


@pytest.mark.parametrize("signed", [True, False])
def test_l1_cached_activation_loads_give_the_same_results(signed):
    """``launch_options(a_l1=True)`` (kernels.py's "L1 A" rows: 8-byte L1-cached copies of the
    activation tiles) changes how tiles are loaded, never a value: conv1's re-quantized codes and
    conv2's residual sums equal the reference's. On a GPU it runs the fixed tile config, the
    path the benchmark forces a config through."""
    g = gen()
    x = rand_codes((2, 7, 13, 64), 8, signed, g)
    wt = rand_weights(64, 64, 8, g)
    mult, bias = torch.rand(64, generator=g) * 1e-3, torch.randn(64, generator=g) * 0.1
    kw = (dict(relu=True, out_quant=ActQuant(8, False, 0.02)) if signed
          else dict(residual=torch.randn(2, 7, 13, 64, generator=g), res_scale=0.5))
    config = tk.fixed_config(64) if DEV.type == "cuda" else None
    with tk.launch_options(config=config, a_l1=True):
        assert tk._options.a_l1
        got, want = run_both(x, 8, signed, wt, mult, bias, **kw)
    assert torch.equal(got, want)
    assert tk._options == tk.LaunchOptions()  # restored
    with pytest.raises(RuntimeError, match="inside"), tk.launch_options(a_l1=True):
        raise RuntimeError("inside")
    assert not tk._options.a_l1


@pytest.mark.parametrize("a_bits", [8, 4, 2])
@pytest.mark.parametrize("o_bits,o_signed", [(8, False), (4, False), (2, False), (4, True), (6, False)])
def test_relu_requantize_pack_epilogue(a_bits, o_bits, o_signed):
    g = gen()
    x = rand_codes((2, 7, 11, 64), a_bits, True, g)
    wt = rand_weights(64, 64, 8, g)
    mult = torch.rand(64, generator=g) * 2e-3
    bias = torch.randn(64, generator=g) * 0.1
    q = ActQuant(o_bits, o_signed, float(torch.rand(1, generator=g)) * 0.05 + 0.01)
    got, want = run_both(x, a_bits, True, wt, mult, bias, relu=not o_signed, out_quant=q)
    assert got.dtype == torch.uint8 and torch.equal(got, want)


@pytest.mark.parametrize("a_bits", [8, 4, 2])
@pytest.mark.parametrize("res_scale", [1.0, 0.1])
def test_residual_fp32_epilogue(a_bits, res_scale):
    g = gen()
    x = rand_codes((2, 6, 9, 64), a_bits, False, g)
    wt = rand_weights(64, 64, 8, g)
    residual = torch.randn(2, 6, 9, 64, generator=g)
    got, want = run_both(x, a_bits, False, wt, torch.rand(64, generator=g) * 1e-3, torch.randn(64, generator=g),
                         residual=residual, res_scale=res_scale)
    assert torch.equal(got, want)


@pytest.mark.parametrize("cin,cout,a_bits", [(64, 256, 8), (32, 32, 4), (16, 16, 2), (48, 48, 8), (48, 64, 4),
                                             (96, 32, 2)])
def test_other_channel_counts(cin, cout, a_bits):
    """Upsampler-wide outputs (256), small layers, and C not a power of two (general K path)."""
    g = gen()
    x = rand_codes((1, 5, 6, cin), a_bits, True, g)
    wt = rand_weights(cout, cin, 8, g)
    got, want = run_both(x, a_bits, True, wt, torch.rand(cout, generator=g) * 1e-3, torch.randn(cout, generator=g),
                         relu=True)
    assert torch.equal(got, want)
    if cout & (cout - 1) == 0:
        q = ActQuant(a_bits, False, 0.02)
        got, want = run_both(x, a_bits, True, wt, torch.rand(cout, generator=g) * 1e-3,
                             torch.randn(cout, generator=g), relu=True, out_quant=q)
        assert torch.equal(got, want)


@pytest.mark.parametrize("bits", [8, 4, 2, 3])
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_pack_and_unpack(bits, signed):
    g = gen()
    x = torch.randn(2, 5, 7, 64, generator=g) * 3
    q = ActQuant(bits, signed, 0.07)
    x[0, 0, 0, :4] = torch.tensor([0.035, -0.035, 0.105, 1e9])  # exact half-way points and saturation
    want = ref.quantize_pack(x, q)
    got = tk.quantize_pack(x.to(DEV), q).cpu()
    assert torch.equal(got, want)
    cb = container_bits(bits)
    assert torch.equal(tk.unpack_codes(want.to(DEV), cb, signed).cpu(), ref.unpack_codes(want, cb, signed))


def test_bad_inputs_raise_clear_errors():
    g = gen()
    w = rand_weights(64, 40, 8, g)
    with pytest.raises(ValueError, match="multiple of 16"):
        tk.prepare_conv_weight(w, 8)
    w = rand_weights(64, 64, 8, g)
    with pytest.raises(ValueError, match="int8"):
        tk.prepare_conv_weight(w.float(), 8)
    prepared = tk.prepare_conv_weight(w, 4)
    xp = torch.zeros(1, 4, 4, 64, dtype=torch.uint8, device=DEV)
    with pytest.raises(ValueError, match="prepared for 4-bit"):
        tk.packed_conv3x3(xp, 8, True, prepared, torch.ones(64), torch.zeros(64))
    with pytest.raises(ValueError, match="channels"):
        tk.packed_conv3x3(xp[..., :16], 4, True, prepared, torch.ones(64), torch.zeros(64))
    with pytest.raises(ValueError, match="bit-width"):
        tk.packed_conv3x3(xp, 9, True, w, torch.ones(64), torch.zeros(64))


@pytest.mark.parametrize("a_bits", [8, 4, 2])
@pytest.mark.parametrize("next_bits", [8, 4, 2])
def test_residual_in_place_with_the_next_blocks_codes(a_bits, next_bits):
    """conv2 as the body runs it: fp32 residual updated in place (out=residual) and the next
    block's packed input codes written beside it, equal to quantize_pack of the result."""
    g = gen()
    shape = (2, 7, 10, 64)
    x = pack_codes(rand_codes(shape, a_bits, False, g), container_bits(a_bits))
    wt, mult, bias = rand_weights(64, 64, 8, g), torch.rand(64, generator=g) * 1e-3, torch.randn(64, generator=g)
    residual = torch.randn(shape, generator=g)
    nq = ActQuant(next_bits, True, float(torch.rand(1, generator=g)) * 0.05 + 0.02)
    want = ref.packed_conv3x3(x, a_bits, False, wt, mult, bias, residual=residual, res_scale=0.1)
    stream = residual.to(DEV)  # updated in place
    codes = torch.full((*shape[:3], 64 * container_bits(next_bits) // 8), 0xA5, dtype=torch.uint8, device=DEV)
    got = tk.packed_conv3x3(x.to(DEV), a_bits, False, tk.prepare_conv_weight(wt, a_bits), mult.to(DEV),
                            bias.to(DEV), residual=stream, res_scale=0.1, out=stream, next_quant=nq, next_out=codes)
    assert got.data_ptr() == stream.data_ptr() and torch.equal(stream.cpu(), want)
    assert torch.equal(codes.cpu(), ref.quantize_pack(want, nq))


@pytest.mark.parametrize("a_bits,dtype,early", [(8, torch.float16, False), (2, torch.float16, True),
                                                (4, torch.bfloat16, False)])
def test_half_precision_residual_stream_in_place_with_the_next_blocks_codes(a_bits, dtype, early):
    """conv2 on an fp16 / bf16 residual stream (``IntegerBody(stream_dtypes=...)``): the residual
    is added in fp32, the result stored rounded to nearest even in place, and the next codes are
    those of the rounded values, bit for bit; with the residual read early (RES_EARLY) too."""
    g = gen()
    shape = (2, 9, 11, 64)
    x = pack_codes(rand_codes(shape, a_bits, False, g), container_bits(a_bits))
    wt, mult, bias = rand_weights(64, 64, 8, g), torch.rand(64, generator=g) * 1e-3, torch.randn(64, generator=g)
    residual = (torch.randn(shape, generator=g) * 4).to(dtype)
    nq = ActQuant(8, True, 0.011)
    want32 = ref.packed_conv3x3(x, a_bits, False, wt, mult, bias, residual=residual, res_scale=0.1)
    want = want32.to(dtype)
    codes_want = ref.quantize_pack(want, nq)
    assert not torch.equal(codes_want, ref.quantize_pack(want32, nq))  # the rounding shows in the codes
    stream = residual.to(DEV)
    codes = torch.full((*shape[:3], 64), 0xA5, dtype=torch.uint8, device=DEV)
    config = [c for c in tk.TUNE_CONFIGS if c.kwargs.get("RES_EARLY")][0] if early else None
    with tk.launch_options(config=config):
        got = tk.packed_conv3x3(x.to(DEV), a_bits, False, tk.prepare_conv_weight(wt, a_bits), mult.to(DEV),
                                bias.to(DEV), residual=stream, res_scale=0.1, out=stream, out_dtype=dtype,
                                next_quant=nq, next_out=codes)
    assert got.data_ptr() == stream.data_ptr() and got.dtype == dtype
    assert torch.equal(stream.cpu().view(torch.int16), want.view(torch.int16))
    assert torch.equal(codes.cpu(), codes_want)
    assert torch.equal(tk.quantize_pack(want.to(DEV), nq).cpu(), codes_want)  # the next body call's first codes


@pytest.mark.parametrize("a_bits", [8, 4, 2])
def test_residual_loaded_before_the_k_loop_gives_the_same_bits(a_bits):
    """RES_EARLY (an autotuning option of residual convs): the residual tile is read before the
    K loop. conv2 as the body runs it (residual updated in place, next codes beside it) equals the
    reference bit for bit, on a shape of several row tiles with a ragged last one. On a GPU it runs
    the 128 x 64 tile config the autotuner may pick; in the interpreter the small tiles."""
    g = gen()
    shape = (3, 9, 23, 64)
    x = pack_codes(rand_codes(shape, a_bits, False, g), container_bits(a_bits))
    wt, mult, bias = rand_weights(64, 64, 8, g), torch.rand(64, generator=g) * 1e-3, torch.randn(64, generator=g)
    residual = torch.randn(shape, generator=g)
    nq = ActQuant(8, True, 0.03)
    want = ref.packed_conv3x3(x, a_bits, False, wt, mult, bias, residual=residual)
    early = [c for c in tk.TUNE_CONFIGS if c.kwargs.get("RES_EARLY")]
    assert early and all(c in tk.tune_configs(True) and c not in tk.tune_configs(False) for c in early)
    stream = residual.to(DEV)
    codes = torch.zeros((*shape[:3], 64), dtype=torch.uint8, device=DEV)
    with tk.launch_options(config=early[0]):
        got = tk.packed_conv3x3(x.to(DEV), a_bits, False, tk.prepare_conv_weight(wt, a_bits), mult.to(DEV),
                                bias.to(DEV), residual=stream, out=stream, next_quant=nq, next_out=codes)
    assert got.data_ptr() == stream.data_ptr() and torch.equal(stream.cpu(), want)
    assert torch.equal(codes.cpu(), ref.quantize_pack(want, nq))


@pytest.mark.parametrize("k", [1, 3])
def test_items_skip_the_row_tiles_of_padding_images(k):
    """``items=[k]`` (a graph captured for a padded batch, replayed for k images): the first k
    images equal the reference exactly, for conv1 (codes out) and conv2 (residual in place + the
    next codes); the last image, past any tile that holds the boundary (tiles of at most 256 rows),
    is left as it was, so its tiles were skipped."""
    g = gen()
    n, h, w = 6, 7, 9  # 63 rows an image: the boundary falls inside a tile
    rows = h * w
    items = torch.tensor([k], dtype=torch.int32, device=DEV)
    xp = pack_codes(rand_codes((n, h, w, 64), 8, True, g), 8)
    wt, mult, bias = rand_weights(64, 64, 8, g), torch.rand(64, generator=g) * 1e-3, torch.randn(64, generator=g)
    prep = tk.prepare_conv_weight(wt, 8)
    q = ActQuant(8, False, 0.05)
    want = ref.packed_conv3x3(xp, 8, True, wt, mult, bias, relu=True, out_quant=q)
    poison = torch.full_like(want, 0xA5, device=DEV)
    got = tk.packed_conv3x3(xp.to(DEV), 8, True, prep, mult.to(DEV), bias.to(DEV), relu=True, out_quant=q,
                            out=poison, items=items).cpu()
    assert torch.equal(got[:k], want[:k])
    assert (got[-1] == 0xA5).all() and (n - 1) * rows >= -(-k * rows // 256) * 256

    residual = torch.randn(n, h, w, 64, generator=g)
    nq = ActQuant(8, True, 0.03)
    want = ref.packed_conv3x3(xp, 8, True, wt, mult, bias, residual=residual)
    stream = residual.to(DEV)
    codes = torch.full((n, h, w, 64), 0xA5, dtype=torch.uint8, device=DEV)
    tk.packed_conv3x3(xp.to(DEV), 8, True, prep, mult.to(DEV), bias.to(DEV), residual=stream, out=stream,
                      next_quant=nq, next_out=codes, items=items)
    assert torch.equal(stream.cpu()[:k], want[:k]) and torch.equal(codes.cpu()[:k], ref.quantize_pack(want, nq)[:k])
    assert torch.equal(stream.cpu()[-1], residual[-1]) and (codes.cpu()[-1] == 0xA5).all()


def test_graph_replays_of_a_padded_bucket_skip_the_padding_patches(monkeypatch):
    """IntegerBody with graphs (a fake capture, so it runs here too): a group of 5 patches replays
    the bucket-6 graph, its convs get ``items`` = 5, and the 5 results equal the reference body's."""
    from conftest import random_image
    from test_graphs import FakeGraphs

    from gdq_engine.models import EDSR
    from gdq_engine.runtime.intgraph import IntegerBody, calibrate, prepare_blocks

    torch.manual_seed(0)
    model = EDSR(scale=2, n_feats=32, n_blocks=2).eval()
    quants, blocks = calibrate(model, random_image(12, 12, n=4, seed=2), (4,)), prepare_blocks(model)
    body = IntegerBody(blocks, quants, backend="triton", cuda_graphs=True, containers="bytes")
    body.graphs = FakeGraphs()
    reference = IntegerBody(blocks, quants, backend="reference")
    counts, real = [], tk.packed_conv3x3

    def spy(*args, items=None, **kwargs):
        counts.append(None if items is None else int(items))
        return real(*args, items=items, **kwargs)

    monkeypatch.setattr(tk, "packed_conv3x3", spy)
    feat = torch.randn(5, 32, 6, 7, generator=torch.Generator().manual_seed(3)).to(DEV)
    for _ in range(3):  # eager, capture (+ the fake's first replay), replay
        assert torch.equal(body(feat, 4).cpu(), reference(feat.cpu(), 4))
    assert counts[:4] == [None] * 4 and set(counts[4:8]) == {6} and set(counts[8:]) == {5}


@pytest.mark.parametrize("containers,dtype", [("bytes", torch.float16), ("packed", torch.bfloat16),
                                              ("padded", torch.float16)])
def test_integer_body_on_a_half_precision_stream_equals_reference(containers, dtype):
    """IntegerBody(stream_dtypes=(fp32, dtype)) on the Triton backend (in-place half stream, fused
    next codes; the padded layout too) equals the reference body on the same stream, bit for bit."""
    from conftest import random_image

    from gdq_engine.models import EDSR
    from gdq_engine.runtime.intgraph import IntegerBody, calibrate, prepare_blocks

    torch.manual_seed(0)
    model = EDSR(scale=2, n_feats=32, n_blocks=3).eval()
    quants, blocks = calibrate(model, random_image(12, 12, n=4, seed=2), (8, 4)), prepare_blocks(model)
    kinds = (torch.float32, dtype)
    body = IntegerBody(blocks, quants, backend="triton", containers=containers, stream_dtypes=kinds)
    reference = IntegerBody(blocks, quants, backend="reference", stream_dtypes=kinds)
    # channels_last, as the FP head gives it: the NHWC stream is the caller's tensor, which stays untouched
    feat = torch.randn(2, 32, 7, 9, generator=torch.Generator().manual_seed(4)).to(dtype)
    feat = feat.contiguous(memory_format=torch.channels_last)
    for bits in (8, 4):
        on_dev = feat.to(DEV)
        got, want = body(on_dev, bits).cpu(), reference(feat, bits)
        assert got.dtype == dtype and torch.equal(got.view(torch.int16), want.view(torch.int16))
        assert torch.equal(on_dev.cpu().view(torch.int16), feat.view(torch.int16))


def test_items_must_be_one_int32_on_the_device():
    g = gen()
    x = pack_codes(rand_codes((2, 4, 4, 32), 8, True, g), 8).to(DEV)
    w = tk.prepare_conv_weight(rand_weights(32, 32, 8, g), 8)
    for bad in (torch.tensor([1]), torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1.0])):
        with pytest.raises(ValueError, match="one-element int32"):
            tk.packed_conv3x3(x, 8, True, w, torch.ones(32, device=DEV), torch.zeros(32, device=DEV),
                              items=bad.to(DEV))
    xp = torch.nn.functional.pad(x, (0, 0, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="padded layout"):
        tk.packed_conv3x3(xp, 8, True, w, torch.ones(32, device=DEV), torch.zeros(32, device=DEV), padded=True,
                          items=torch.tensor([1], dtype=torch.int32, device=DEV))


@pytest.mark.parametrize("r,cout,out_dtype", [(2, 64, torch.float32), (2, 64, torch.float16),
                                              (2, 64, torch.bfloat16), (3, 144, torch.float16)])
def test_pixel_shuffled_store_in_the_output_dtype(r, cout, out_dtype):
    """shuffle=r: the kernel stores (N, rH, rW, Cout/r^2) itself, in fp32/fp16/bf16; equal to the
    reference conv, then the sub-pixel-major shuffle and ``.to`` (round to nearest even).
    Cout 144 (r = 3) spans two 128-wide channel tiles, the second one partly masked."""
    from gdq_engine.runtime.inttail import _shuffle_nhwc

    g = gen()
    x = pack_codes(rand_codes((2, 5, 7, 32), 8, True, g), 8)
    wt, mult, bias = rand_weights(cout, 32, 8, g), torch.rand(cout, generator=g) * 1e-2, torch.randn(cout, generator=g)
    want = _shuffle_nhwc(ref.packed_conv3x3(x, 8, True, wt, mult, bias), r, out_dtype)
    poison = torch.full(want.shape, float("nan"), dtype=out_dtype, device=DEV)
    got = tk.packed_conv3x3(x.to(DEV), 8, True, tk.prepare_conv_weight(wt, 8), mult.to(DEV), bias.to(DEV),
                            shuffle=r, out_dtype=out_dtype, out=poison)
    assert got.dtype == out_dtype and got.shape == (2, 5 * r, 7 * r, cout // (r * r))
    assert torch.equal(got.cpu(), want)


def test_pixel_shuffled_store_of_8bit_codes():
    """The x4 upsampler's first stage: re-quantized 8-bit codes stored pixel-shuffled."""
    from gdq_engine.runtime.inttail import _shuffle_nhwc

    g = gen()
    x = pack_codes(rand_codes((1, 6, 5, 64), 4, True, g), 4)
    wt, mult, bias = rand_weights(64, 64, 8, g), torch.rand(64, generator=g) * 1e-3, torch.randn(64, generator=g)
    q = ActQuant(8, True, 0.03)
    want = _shuffle_nhwc(ref.packed_conv3x3(x, 4, True, wt, mult, bias, out_quant=q), 2, torch.uint8)
    got = tk.packed_conv3x3(x.to(DEV), 4, True, tk.prepare_conv_weight(wt, 4), mult.to(DEV), bias.to(DEV),
                            out_quant=q, shuffle=2, out=torch.full(want.shape, 0xA5, dtype=torch.uint8, device=DEV))
    assert torch.equal(got.cpu(), want)


@pytest.mark.skipif(DEV.type != "cuda" or tk.INTERPRET, reason="inline PTX: compiled kernels on a GPU only")
@pytest.mark.parametrize("case", ["conv1", "conv1 a4", "conv2+next", "conv2+next fp16", "upsampler codes",
                                  "upsampler fp16", "padded conv2+next"])
@pytest.mark.parametrize("weights", ["uniform", "normal", "edge"])
@pytest.mark.parametrize("signed", [True, False])
def test_flat_conv_conversions_by_adds_give_the_same_bits(case, weights, signed):
    """The flat and padded convs' epilogue without the conversion pipe (``cvt_add``): codes by a
    round-down add (packed 4-bit ones too) and, where the weights bound every sum below ``2**22``
    (the normal and edge weights), floats by adds: conv1, conv2 with the next codes on fp32 and
    fp16 streams, the upsampler's shuffled codes and fp16, the padded conv2 equal the reference's,
    sums at the bound included (the Gluon body conv off: the flat kernel on every GPU)."""
    _check_flat_conversions(case, weights, signed, dict(cvt_add=True))


@pytest.mark.skipif(DEV.type != "cuda" or tk.INTERPRET, reason="inline PTX: compiled kernels on a GPU only")
@pytest.mark.parametrize("case", ["conv1", "conv1 a4", "conv2+next", "conv2+next fp16", "upsampler codes",
                                  "padded conv2+next"])
@pytest.mark.parametrize("weights,adds", [("uniform", False), ("normal", True), ("edge", True)])
@pytest.mark.parametrize("signed", [True, False])
def test_flat_conv_saturating_codes_give_the_same_bits(case, weights, adds, signed):
    """The flat and padded convs' codes by one saturating conversion each (``cvt_sat``), alone and
    with the conversions by adds: conv1's codes from 0 (8-bit, the ReLU folded in; 4-bit packed),
    the signed next codes on fp32 and fp16 streams, the upsampler's shuffled signed codes and the
    padded conv2's next codes equal the reference's."""
    _check_flat_conversions(case, weights, signed, dict(cvt_add=adds, cvt_sat=True))


def test_conversion_options_give_the_reference_bits_interpreted_or_compiled():
    """``cvt_add`` / ``cvt_sat`` asked for everywhere: Triton's interpreter cannot run their inline
    PTX, so there the launcher leaves them off; on a GPU they run. Either way conv1's codes (the
    ReLU folded into the saturating ones) and conv2's stream and next codes equal the reference's."""
    g = gen()
    x_codes = rand_codes((2, 5, 7, 64), 8, True, g)
    x = pack_codes(x_codes, 8)
    wt = weights_for_adds("normal", 64, 64, True, g)[0]
    mult, bias = torch.rand(64, generator=g) * 2e-3, torch.randn(64, generator=g) * 0.05
    prep = tk.prepare_conv_weight(wt, 8)
    oq, nq = ActQuant(8, False, 0.02), ActQuant(8, True, 0.05)
    res = torch.randn(2, 5, 7, 64, generator=g)
    stream, nxt = res.clone().to(DEV), torch.full((2, 5, 7, 64), 0xA5, dtype=torch.uint8, device=DEV)
    with tk.launch_options(sm90=False, cvt_add=True, cvt_sat=True):
        codes = tk.packed_conv3x3(x.to(DEV), 8, True, prep, mult.to(DEV), bias.to(DEV), relu=True, out_quant=oq)
        tk.packed_conv3x3(x.to(DEV), 8, True, prep, mult.to(DEV), bias.to(DEV), residual=stream, out=stream,
                          next_quant=nq, next_out=nxt)
    assert torch.equal(codes.cpu(), ref.packed_conv3x3(x, 8, True, wt, mult, bias, relu=True, out_quant=oq))
    want = ref.epilogue(ref.conv3x3_int(x_codes, wt), mult, bias, False, res, 1.0, None)
    assert torch.equal(stream.cpu(), want)
    assert torch.equal(nxt.cpu(), ref.quantize_pack(want, nq))


def _check_flat_conversions(case: str, weights: str, signed: bool, opts: dict) -> None:
    """One flat or padded conv launch (``case``) on ``weights_for_adds(weights)`` codes under
    ``launch_options(sm90=False, **opts)`` against the reference; outputs poisoned first."""
    from gdq_engine.runtime.inttail import _shuffle_nhwc

    g = gen()
    a_bits = 4 if case == "conv1 a4" else 8
    cout = 256 if case.startswith("upsampler") else 64
    shape = (2, 9, 13, 64)
    wt, edge_code = weights_for_adds(weights, cout, 64, signed, g)
    prep = tk.prepare_conv_weight(wt, a_bits)
    assert tk.fp32_sums_by_add(prep, signed) == (weights != "uniform")
    x = rand_codes(shape, a_bits, signed, g) if edge_code is None else edge_code.expand(shape).contiguous()
    if a_bits == 4 and edge_code is not None:
        x = torch.full(shape, -8 if signed else 15)
    xp = pack_codes(x, container_bits(a_bits))
    mult = torch.rand(cout, generator=g) * (1e-6 if edge_code is not None else 1e-3)
    bias = torch.randn(cout, generator=g) * 0.05
    res = torch.randn(*shape[:3], cout, generator=g)
    with tk.launch_options(sm90=False, **opts):
        if case.startswith("conv1"):
            q = ActQuant(a_bits, False, 0.02)
            want = ref.packed_conv3x3(xp, a_bits, signed, wt, mult, bias, relu=True, out_quant=q)
            got = tk.packed_conv3x3(xp.to(DEV), a_bits, signed, prep, mult.to(DEV), bias.to(DEV), relu=True,
                                    out_quant=q, out=torch.full_like(want, 0xA5).to(DEV))
            assert torch.equal(got.cpu(), want)
        elif case.startswith("upsampler"):
            q = ActQuant(8, True, 0.05) if case.endswith("codes") else None
            out_dtype = torch.uint8 if q else torch.float16
            want = _shuffle_nhwc(ref.packed_conv3x3(xp, 8, signed, wt, mult, bias, out_quant=q), 2, out_dtype)
            poison = torch.full_like(want, 0xA5) if q else torch.full_like(want, float("nan"))
            got = tk.packed_conv3x3(xp.to(DEV), 8, signed, prep, mult.to(DEV), bias.to(DEV), out_quant=q, shuffle=2,
                                    out=poison.to(DEV), **({} if q else dict(out_dtype=torch.float16)))
            assert torch.equal(got.cpu(), want)
        else:
            dtype = torch.float16 if case.endswith("fp16") else torch.float32
            nq = ActQuant(8, True, 0.05)
            want = ref.epilogue(ref.conv3x3_int(x, wt), mult, bias, False, res.to(dtype).float(), 1.0, None).to(dtype)
            padded = case.startswith("padded")
            stream = (pad_ring(res.to(dtype)) if padded else res.to(dtype)).to(DEV)
            nxt = torch.full((shape[0], shape[1] + 2 * padded, shape[2] + 2 * padded, 64), 0xA5, dtype=torch.uint8,
                             device=DEV)
            tk.packed_conv3x3((pad_ring(xp) if padded else xp).to(DEV), 8, signed, prep, mult.to(DEV), bias.to(DEV),
                              residual=stream, out=stream, out_dtype=dtype, next_quant=nq, next_out=nxt,
                              padded=padded)
            codes = ref.quantize_pack(want.float(), nq)
            assert torch.equal(stream.cpu(), pad_ring(want) if padded else want)
            assert torch.equal(nxt.cpu(), pad_ring(codes) if padded else codes)


def test_quantize_pack_into_a_buffer():
    g = gen()
    x = torch.randn(2, 3, 5, 64, generator=g) * 3
    q = ActQuant(4, True, 0.05)
    buf = torch.full((2, 3, 5, 32), 0xA5, dtype=torch.uint8, device=DEV)
    assert tk.quantize_pack(x.to(DEV), q, out=buf).data_ptr() == buf.data_ptr()
    assert torch.equal(buf.cpu(), ref.quantize_pack(x, q))
    with pytest.raises(ValueError, match="out must be"):
        tk.quantize_pack(x.to(DEV), q, out=torch.empty(2, 3, 5, 64, dtype=torch.uint8, device=DEV))


def test_fused_output_options_refuse_what_they_cannot_do():
    g = gen()
    x = pack_codes(rand_codes((1, 4, 4, 64), 8, True, g), 8).to(DEV)
    w = tk.prepare_conv_weight(rand_weights(64, 64, 8, g), 8)
    mult, bias = torch.ones(64, device=DEV), torch.zeros(64, device=DEV)
    res = torch.zeros(1, 4, 4, 64, device=DEV)
    with pytest.raises(ValueError, match="no residual"):
        tk.packed_conv3x3(x, 8, True, w, mult, bias, residual=res, shuffle=2)
    with pytest.raises(ValueError, match="8-bit containers"):
        tk.packed_conv3x3(x, 8, True, w, mult, bias, out_quant=ActQuant(4, False, 0.1), shuffle=2)
    with pytest.raises(ValueError, match="divisible by 9"):
        tk.packed_conv3x3(x, 8, True, w, mult, bias, shuffle=3)
    with pytest.raises(ValueError, match="next_out"):
        tk.packed_conv3x3(x, 8, True, w, mult, bias, next_quant=ActQuant(8, True, 0.1))
    with pytest.raises(ValueError, match="without next_quant"):
        tk.packed_conv3x3(x, 8, True, w, mult, bias, next_out=torch.empty(1, 4, 4, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out_dtype"):
        tk.packed_conv3x3(x, 8, True, w, mult, bias, out_dtype=torch.int32)


@pytest.mark.parametrize("policy,bits", [("static", 8), ("static", 2), ("entropy", (2, 4, 8))])
def test_engine_triton_backend_equals_reference(policy, bits):
    """The whole network: Engine(backend='triton') gives the reference backend's output exactly."""
    from conftest import random_image

    from gdq_engine import Engine
    from gdq_engine.models import EDSR

    torch.manual_seed(0)
    model = EDSR(scale=2, n_feats=16, n_blocks=2).eval()
    calib = random_image(12, 12, n=8, seed=1)
    lr = random_image(13, 11, n=2, seed=2)
    kw = dict(policy=policy, bits=bits, calib=calib, patch_size=8, stride=6, device=DEV)
    fast = Engine(model, backend="triton", **kw)
    slow = Engine(model, backend="reference", **kw)
    assert fast.int_body.backend == "triton" and slow.int_body.backend == "reference"
    out_fast, rep_fast = fast.upscale(lr.to(DEV), return_report=True)
    out_slow, rep_slow = slow.upscale(lr.to(DEV), return_report=True)
    assert rep_fast.bits == rep_slow.bits and len(set(rep_fast.bits)) >= (2 if policy == "entropy" else 1)
    assert torch.equal(out_fast.cpu(), out_slow.cpu())
    # auto: 2/4-bit codes one per byte on CUDA (the 8-bit kernel runs them), packed elsewhere
    assert fast.containers == ("bytes" if DEV.type == "cuda" else "packed") and slow.containers == "packed"


def test_engine_triton_byte_containers_equal_packed_reference():
    """EntropyOnly {2,4,8} with every code one per byte on Triton == the packed reference engine."""
    from conftest import random_image

    from gdq_engine import Engine
    from gdq_engine.models import EDSR

    torch.manual_seed(0)
    model = EDSR(scale=2, n_feats=16, n_blocks=2).eval()
    kw = dict(policy="entropy", bits=(2, 4, 8), calib=random_image(12, 12, n=8, seed=1), patch_size=8, stride=6,
              device=DEV)
    fast = Engine(model, backend="triton", containers="bytes", **kw)
    slow = Engine(model, backend="reference", containers="packed", **kw)
    assert (fast.containers, slow.containers) == ("bytes", "packed")
    lr = random_image(13, 11, n=2, seed=2).to(DEV)
    out_fast, rep = fast.upscale(lr, return_report=True)
    assert {2, 4} <= set(rep.bits) and torch.equal(out_fast.cpu(), slow.upscale(lr).cpu())



def test_engine_triton_x4_tail_stores_shuffled_and_equals_reference():
    """x4 integer tail on Triton: the first stage stores shuffled 8-bit codes, the second the
    shuffled fp32 result; no shuffle copy runs, and the output is the reference's."""
    from conftest import random_image

    from gdq_engine import Engine
    from gdq_engine.models import EDSR
    from gdq_engine.runtime import inttail
    from gdq_engine.runtime.inttail import IntegerUpsampler

    torch.manual_seed(0)
    model = EDSR(scale=4, n_feats=32, n_blocks=2).eval()  # the tail takes 32+ input, 64+ output channels
    kw = dict(policy="static", bits=8, calib=random_image(12, 12, n=4, seed=1), patch_size=6, stride=6, device=DEV,
              tail_bits=8)
    fast, slow = Engine(model, backend="triton", **kw), Engine(model, backend="reference", **kw)
    assert isinstance(fast.model.upsampler, IntegerUpsampler) and fast.model.upsampler.factors == [2, 2]
    lr = random_image(7, 6, n=1, seed=2).to(DEV)
    want = slow.upscale(lr).cpu()
    copies = []
    real_shuffle = inttail._shuffle_nhwc
    inttail._shuffle_nhwc = lambda *a: copies.append(a) or real_shuffle(*a)
    try:
        got = fast.upscale(lr).cpu()
    finally:
        inttail._shuffle_nhwc = real_shuffle
    assert not copies and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_tail_reads_half_input_as_it_is_and_stores_half_like_to(dtype):
    """With half-precision FP layers the Triton tail quantizes its input as it lies (no fp32 copy)
    and the body-end conv stores the half result from its epilogue: the reference's values, which
    widen to fp32 first and round with .to(dtype) after."""
    from gdq_engine.models import EDSR
    from gdq_engine.runtime.inttail import IntegerConv, IntegerUpsampler

    torch.manual_seed(0)
    model = EDSR(scale=4, n_feats=32, n_blocks=1).eval()
    g = gen()
    x = (torch.randn(2, 32, 5, 7, generator=g) * 3).to(dtype).contiguous(memory_format=torch.channels_last)
    q = ActQuant(8, True, float(x.float().abs().max()) / 127)
    conv = torch.nn.Conv2d(32, 64, 3, padding=1)
    read = []
    real = tk.quantize_pack
    tk.quantize_pack = lambda t, *a, **k: read.append(t.dtype) or real(t, *a, **k)
    try:
        y = IntegerConv(conv, q, tk)(x.to(DEV))
        up = IntegerUpsampler([(model.upsampler[0], q, 2), (model.upsampler[2], q, 2)], tk)(x.to(DEV))
    finally:
        tk.quantize_pack = real
    assert read == [dtype, dtype]
    assert y.dtype == dtype and torch.equal(y.cpu(), IntegerConv(conv, q, ref)(x))
    want = IntegerUpsampler([(model.upsampler[0], q, 2), (model.upsampler[2], q, 2)], ref)(x)
    assert up.dtype == dtype and torch.equal(up.cpu(), want)


@pytest.mark.parametrize("tail_bits", [8, 4])
def test_engine_triton_integer_tail_equals_reference(tail_bits):
    """The integer tail (64 -> 256 upsampler conv, fp32 out) on Triton gives the reference's output."""
    from conftest import random_image

    from gdq_engine import Engine
    from gdq_engine.models import EDSR

    torch.manual_seed(0)
    model = EDSR(scale=2, n_feats=64, n_blocks=1).eval()
    kw = dict(policy="static", bits=4, calib=random_image(12, 12, n=4, seed=1), patch_size=6, stride=6, device=DEV,
              tail_bits=tail_bits)
    fast, slow = Engine(model, backend="triton", **kw), Engine(model, backend="reference", **kw)
    from gdq_engine.runtime.inttail import IntegerConv

    convs = [m for m in fast.model.modules() if isinstance(m, IntegerConv)]
    assert len(convs) == 2 and all(c._ops.__name__ == "gdq_engine.kernels.ops" for c in convs)  # Triton launchers
    lr = random_image(7, 6, n=1, seed=2).to(DEV)
    assert torch.equal(fast.upscale(lr).cpu(), slow.upscale(lr).cpu())

def test_engine_rejects_triton_where_it_cannot_run(monkeypatch, tiny_edsr):
    from gdq_engine import Engine

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA device"):
        Engine(tiny_edsr, policy="static", bits=8, calib=torch.rand(2, 3, 8, 8), device="cpu", backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (GPU sessions run this)")
def test_cuda_graph_replay_equals_eager_and_reference():
    """A static policy's whole network as a CUDA graph: first call eager (autotunes), second
    captures, third replays: all equal the reference."""
    from conftest import random_image

    from gdq_engine import Engine
    from gdq_engine.models import EDSR

    torch.manual_seed(0)
    model = EDSR(scale=2, n_feats=64, n_blocks=3).eval()
    kw = dict(policy="static", bits=4, calib=random_image(24, 24, n=8, seed=3), patch_size=16, stride=14,
              device="cuda")
    graphed = Engine(model, backend="triton", cuda_graphs=True, **kw)
    reference = Engine(model, backend="reference", **kw)
    for seed in (4, 5, 6):
        lr = random_image(37, 29, n=1, seed=seed).cuda()
        assert torch.equal(graphed.upscale(lr), reference.upscale(lr))
    assert graphed.network_graphs.keys() and graphed.int_body.graphs is None  # the body runs inside
    assert graphed.containers == "bytes"  # auto on CUDA: the 4-bit codes ran through the 8-bit kernel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (GPU sessions run this)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graphs_of_a_dynamic_policy_and_of_the_whole_tail_network(dtype):
    """EntropyOnly {2,4,8}: the groups' integer blocks as the body's graphs, the upsampler and tail
    as one graph; static a8 with the x4 integer tail and fp16 FP layers: the whole network in one
    graph (the latency rows' setup). Three calls each: eager, capture, replay, all equal to the
    reference backend."""
    from conftest import random_image

    from gdq_engine import Engine
    from gdq_engine.models import EDSR
    from gdq_engine.runtime.lastconv import use_kernel_last_conv

    torch.manual_seed(0)
    calib = random_image(24, 24, n=8, seed=3)
    for scale, kw in ((2, dict(policy="entropy", bits=(2, 4, 8))), (4, dict(policy="static", bits=8, tail_bits=8))):
        model = EDSR(scale=scale, n_feats=64, n_blocks=2).eval()
        kw = dict(kw, calib=calib, patch_size=16, stride=14, device="cuda", dtype=dtype)
        graphed = Engine(model, backend="triton", **kw)  # fp16: an fp16 residual stream (residual_stream="auto")
        reference = Engine(model, backend="reference", residual_stream="dtype", **kw)  # the same stream
        assert graphed.int_body.stream_dtype(dtype) == reference.int_body.stream_dtype(dtype) == dtype
        use_kernel_last_conv(graphed.model, False)  # fp16: cuDNN's last conv, as the reference has (test_lastconv.py)
        for seed in (4, 4, 4):  # the same frame: same groups, so the graphs are reused
            lr = random_image(37, 29, n=1, seed=seed).cuda()
            got, report = graphed.upscale(lr, return_report=True)
            assert torch.equal(got, reference.upscale(lr)), kw["policy"]
        # a mixed frame (3 groups on the CPU): the grouped path, not the one-width whole-network graph
        assert kw["policy"] == "static" or len(report.groups) > 1, report.groups
        graphs = graphed.network_graphs
        tags = {key[0] for key in graphs.keys()}
        assert graphs.enabled and tags == ({8} if kw["policy"] == "static" else {"tail"}), tags
        if kw["policy"] == "static":
            assert graphed.int_body.graphs is None  # the body runs inside the network's graph
        else:  # every group's integer blocks replayed; the head and the entropies in one replay of their own
            assert {key[0] for key in graphed.int_body.graphs.keys()} <= set(graphed.policy.bits)
            assert graphed.int_body.graphs.keys()
            assert graphed.policy_graphs.enabled and len(graphed.policy_graphs.keys()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (GPU sessions run this)")
def test_cuda_graph_of_granular_head_and_gbc(tmp_path):
    """GranularDQ on CUDA: the FP head and GBC (its descriptor from moments) are captured as one
    graph (a capture failure would turn the policy's graphs off: checked), and the bits, groups and
    output of three calls (eager, capture, replay) equal an engine without CUDA graphs, on mixed
    widths (GBC sent to its top code, so E2B's entropies, computed after the graph, decide)."""
    from conftest import random_image

    from gdq_engine import Engine
    from gdq_engine.models import EDSR
    from gdq_engine.policy import GranularDQ
    from gdq_engine.quantized import quantize, save_quantized

    torch.manual_seed(0)
    policy = GranularDQ(gbc_bits=(2, 4, 8), e2b_bits=(2, 4, 8), channels=64)
    with torch.no_grad():
        policy.gbc.fc.weight.mul_(1e-3)
        policy.gbc.fc.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))  # the top code, unless a descriptor is huge
    save_quantized(quantize(EDSR(scale=2, n_feats=64, n_blocks=2).eval(), policy,
                            calib=random_image(24, 24, n=8, seed=3)), tmp_path / "g.pt")
    kw = dict(patch_size=16, stride=16, device="cuda", backend="triton")
    graphed, plain = Engine(tmp_path / "g.pt", **kw), Engine(tmp_path / "g.pt", cuda_graphs=False, **kw)
    assert graphed.policy_graphs is not None and plain.policy_graphs is None
    flat = torch.full((3, 16, 16), 0.5)
    lr = torch.cat([torch.cat([flat, random_image(16, 16, seed=4)], 2), random_image(16, 32, seed=5)], 1).cuda()
    for _ in range(3):
        got, report = graphed.upscale(lr, return_report=True)
        want, want_report = plain.upscale(lr, return_report=True)
        assert torch.equal(got, want) and report.bits == want_report.bits and report.groups == want_report.groups
    assert len(report.groups) > 1, report.groups
    assert graphed.policy_graphs.enabled and len(graphed.policy_graphs.keys()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a CUDA device (GPU sessions run this)")
def test_group_streams_give_the_same_image_under_cuda_graphs():
    """EntropyOnly {2,4,8} with group_streams: each width's integer blocks on a stream of its own,
    through their first (eager) call, the capture and replays, on two frames with mixed widths,
    give the bits, groups and output of an engine running the groups one after another."""
    from conftest import random_image

    from gdq_engine import Engine
    from gdq_engine.models import EDSR

    torch.manual_seed(0)
    model = EDSR(scale=2, n_feats=64, n_blocks=2).eval()
    # the tiled path: inside an image graph (the default on CUDA) a dynamic policy's groups run one after another
    kw = dict(policy="entropy", bits=(2, 4, 8), calib=random_image(24, 24, n=8, seed=3), patch_size=16, stride=14,
              device="cuda", backend="triton", dtype=torch.float16, image_graphs=False)
    streamed, plain = Engine(model, group_streams=True, **kw), Engine(model, **kw)
    assert streamed.group_streams is not None and plain.group_streams is None
    widths = set()
    for seed in (4, 4, 4, 5, 5, 5):
        lr = random_image(37, 29, n=1, seed=seed).cuda()
        got, report = streamed.upscale(lr, return_report=True)
        want, want_report = plain.upscale(lr, return_report=True)
        assert torch.equal(got, want) and report.groups == want_report.groups
        assert len(report.groups) > 1, report.groups
        widths |= {b for b, _ in report.groups}
    assert set(streamed.group_streams._streams) == widths
    assert streamed.int_body.graphs.keys()  # the groups replayed their graphs on their streams


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (GPU sessions run this)")
def test_cuda_graphs_of_the_padded_layout():
    """containers="padded" under CUDA graphs: the TMA descriptors are captured with the launches
    (static a8 + x4 integer tail: the whole network; EntropyOnly {2,4,8}: the groups' bodies).
    Eager, capture and replay all equal the reference backend."""
    from conftest import random_image

    from gdq_engine import Engine
    from gdq_engine.models import EDSR
    from gdq_engine.runtime.lastconv import use_kernel_last_conv

    torch.manual_seed(0)
    calib = random_image(24, 24, n=8, seed=3)
    for scale, kw in ((4, dict(policy="static", bits=8, tail_bits=8)), (2, dict(policy="entropy", bits=(2, 4, 8)))):
        model = EDSR(scale=scale, n_feats=64, n_blocks=2).eval()
        kw = dict(kw, calib=calib, patch_size=16, stride=14, device="cuda", dtype=torch.float16)
        graphed = Engine(model, backend="triton", containers="padded", **kw)
        use_kernel_last_conv(graphed.model, False)  # cuDNN's last conv, as the reference has (test_lastconv.py)
        reference = Engine(model, backend="reference", residual_stream="dtype", **kw)  # fp16 stream, as Triton's
        lr = random_image(37, 29, n=1, seed=4).cuda()
        for _ in range(3):
            assert torch.equal(graphed.upscale(lr), reference.upscale(lr)), kw["policy"]
        assert graphed.network_graphs.keys() and graphed.int_body.padded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (GPU sessions run this)")
def test_cuda_graph_buckets_pad_varying_group_sizes_without_changing_results():
    """Batches of 5 and 6 share the bucket-6 graph; 3 and 4 are buckets of their own
    (:func:`graph_batch`): replays of padded batches equal eager runs and the reference backend."""
    from conftest import random_image

    from gdq_engine.models import EDSR
    from gdq_engine.runtime.intgraph import IntegerBody, calibrate, prepare_blocks

    torch.manual_seed(0)
    model = EDSR(scale=2, n_feats=64, n_blocks=2).eval().cuda()
    quants = calibrate(model, random_image(16, 16, n=4, seed=3).cuda(), (4,))
    blocks = prepare_blocks(model)
    graphed = IntegerBody(blocks, quants, backend="triton", cuda_graphs=True)
    reference = IntegerBody(blocks, quants, backend="reference")
    feats = torch.randn(6, 64, 13, 11, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for n in (5, 6, 5, 6, 3, 4, 3, 4, 3):
        assert torch.equal(graphed(feats[:n], 4), reference(feats[:n], 4)), n
    assert sorted(key[1][0][0][0] for key in graphed.graphs.keys()) == [3, 4, 6]

def _op_args(g, a_bits=4):
    x = pack_codes(rand_codes((2, 5, 6, 64), a_bits, True, g), a_bits)
    prep = tk.prepare_conv_weight(rand_weights(64, 64, 8, g), a_bits)
    q = ActQuant(a_bits, False, 0.05)
    return (x.to(DEV), prep.w.to(DEV), prep.wsum.to(DEV), (torch.rand(64, generator=g) * 1e-3).to(DEV),
            torch.randn(64, generator=g).to(DEV), None, a_bits, True, True, 1.0, a_bits, *q.range, q.inv_scale)


def test_registered_torch_op_equals_direct_launch():
    """The registered ops (what torch.compile traces) == the eager launchers (what the Engine calls)."""
    g = gen()
    args = _op_args(g)
    via_op = torch.ops.gdq_engine.triton_packed_conv3x3(*args)
    x, w, wsum, mult, bias = args[:5]
    direct = torch.full_like(via_op, 0xA5)
    tk._conv_into(direct, x, w, wsum, mult, bias, None, 4, True, True, 1.0, 4, *args[11:])
    assert via_op.dtype == torch.uint8 and torch.equal(via_op, direct)
    assert torch.equal(via_op, tk.packed_conv3x3(x, 4, True, tk.PreparedWeight(w, wsum, 4, 64, 64), mult, bias,
                                                 relu=True, out_quant=ActQuant(4, False, 0.05)))
    act = torch.randn(2, 3, 5, 64, generator=g).to(DEV)
    q = ActQuant(4, True, 0.1)
    via_op = torch.ops.gdq_engine.triton_quantize_pack(act, 4, *q.range, q.inv_scale)
    assert torch.equal(via_op, tk.quantize_pack(act, q))
    # The schema and registration checks run everywhere; fake-tensor tracing needs a real GPU
    # launch path (the interpreter copies tensors to the host), so it runs in GPU sessions.
    utils = ("test_schema", "test_autograd_registration") + (("test_faketensor",) if DEV.type == "cuda" else ())
    torch.library.opcheck(torch.ops.gdq_engine.triton_packed_conv3x3, args, test_utils=utils)


def test_flat_conv_configs_name_every_tile_constexpr():
    """torch.compile's tracing of a launch (wrap_triton) counts the arguments passed against the
    kernel's, defaults not filled in, so a GPU launch must name every constexpr: the flat conv has
    no defaulted argument, and its fixed config and every autotuning candidate name the same tile
    constexprs (the fixed config without RES_EARLY failed test_torch_compile_sees_the_op on the H100)."""
    import inspect

    from gdq_engine.kernels.conv3x3 import _packed_conv3x3_kernel

    params = inspect.signature(_packed_conv3x3_kernel.fn).parameters.values()
    defaulted = [p.name for p in params if p.default is not inspect.Parameter.empty]
    assert defaulted == []
    tiles = {"BLOCK_M", "BLOCK_K", "RES_EARLY"}
    for config in [tk.fixed_config(64), tk.fixed_config(256), *tk.TUNE_CONFIGS]:
        assert set(config.kwargs) == tiles, config


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of Triton ops needs a CUDA device")
def test_torch_compile_sees_the_op():
    g = gen()
    args = _op_args(g, a_bits=8)
    eager = torch.ops.gdq_engine.triton_packed_conv3x3(*args)
    compiled = torch.compile(lambda *a: torch.ops.gdq_engine.triton_packed_conv3x3(*a), fullgraph=True)
    assert torch.equal(compiled(*args), eager)


def pad_ring(t: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) -> (N, H + 2, W + 2, C) with a zero ring: the padded layout."""
    return torch.nn.functional.pad(t, (0, 0, 1, 1, 1, 1))


@pytest.mark.parametrize("signed,cin,shape", [(True, 64, (2, 7, 13)), (False, 64, (1, 5, 9)), (True, 32, (3, 4, 6)),
                                              (True, 96, (1, 1, 3))])
def test_padded_layout_sums_equal_reference_with_a_zero_ring(signed, cin, shape):
    """padded=True (the TMA kernel): (N, H+2, W+2, C) codes with a zero ring in, int32 sums out in
    the same layout: the interior equals the reference conv, the ring is 0. Odd H, W (and a
    1-pixel-high image, whose taps all but the middle row read the ring); the poisoned output
    catches any element, ring included, the kernel does not write."""
    g = gen()
    n, h, w = shape
    x = rand_codes((n, h, w, cin), 8, signed, g)
    wt = rand_weights(64, cin, 8, g)
    want = ref.packed_conv3x3(pack_codes(x, 8), 8, signed, wt, torch.ones(64), torch.zeros(64))
    prep = tk.prepare_conv_weight(wt, 8)
    n_major = tk.PreparedWeight(prep.w.contiguous(), prep.wsum, 8, cin, 64)  # not TMA's layout: copied for it
    for weight in (prep, n_major):
        got = tk.packed_conv3x3(pad_ring(pack_codes(x, 8)).to(DEV), 8, signed, weight, torch.ones(64, device=DEV),
                                torch.zeros(64, device=DEV), padded=True,
                                out=torch.full((n, h + 2, w + 2, 64), float("nan"), device=DEV)).cpu()
        assert torch.equal(got, pad_ring(want))


@pytest.mark.parametrize("persistent", [1, 3])
def test_persistent_padded_programs_walk_every_tile(persistent):
    """PERSISTENT = p: at most p programs per SM (the interpreter counts 2 SMs) walk the row tiles
    in one flattened loop; every tile, the last partial one included, equals the reference, and a
    persistent config on a GPU compiles as the autotuner would run it."""
    import triton

    g = gen()
    # interpreter: 2 * 9 * 15 = 270 padded pixels in 32-row tiles; GPU: 4 * 98 * 98 in 64-row tiles, more than 3 per SM
    (n, h, w), block_m = ((2, 7, 13), 32) if DEV.type == "cpu" else ((4, 96, 96), 64)
    x = rand_codes((n, h, w, 64), 8, True, g)
    wt = rand_weights(64, 64, 8, g)
    mult, bias = torch.rand(64, generator=g) * 2e-3, torch.randn(64, generator=g) * 0.1
    q = ActQuant(8, False, 0.02)
    want = ref.packed_conv3x3(pack_codes(x, 8), 8, True, wt, mult, bias, relu=True, out_quant=q)
    m = n * (h + 2) * (w + 2)
    assert tk._padded_grid(m, 64, 64, dict(BLOCK_M=block_m, PERSISTENT=persistent), DEV)[0] < triton.cdiv(m, block_m)
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_K": 64 if DEV.type == "cuda" else 32, "PERSISTENT": persistent},
                           num_warps=4, num_stages=3)
    with tk.launch_options(config=config):
        got = tk.packed_conv3x3(pad_ring(pack_codes(x, 8)).to(DEV), 8, True, tk.prepare_conv_weight(wt, 8),
                                mult.to(DEV), bias.to(DEV), relu=True, out_quant=q, padded=True,
                                out=torch.full((n, h + 2, w + 2, 64), 0xA5, dtype=torch.uint8, device=DEV)).cpu()
    assert torch.equal(got, pad_ring(want))


@pytest.mark.parametrize("o_bits,o_signed", [(8, False), (4, False), (6, True)])
def test_padded_layout_requantized_codes(o_bits, o_signed):
    """conv1 as the padded body runs it: ReLU (or not) and codes of ``o_bits`` in 8-bit containers
    (the GPU's byte containers), ring code 0."""
    g = gen()
    x = rand_codes((2, 6, 11, 64), 8, True, g)
    wt = rand_weights(64, 64, 4, g)
    mult, bias = torch.rand(64, generator=g) * 2e-3, torch.randn(64, generator=g) * 0.1
    q = ActQuant(o_bits, o_signed, float(torch.rand(1, generator=g)) * 0.05 + 0.01, container=8)
    want = ref.packed_conv3x3(pack_codes(x, 8), 8, True, wt, mult, bias, relu=not o_signed, out_quant=q)
    got = tk.packed_conv3x3(pad_ring(pack_codes(x, 8)).to(DEV), 8, True, tk.prepare_conv_weight(wt, 8),
                            mult.to(DEV), bias.to(DEV), relu=not o_signed, out_quant=q, padded=True,
                            out=torch.full((2, 8, 13, 64), 0xA5, dtype=torch.uint8, device=DEV)).cpu()
    assert torch.equal(got, pad_ring(want))


@pytest.mark.parametrize("signed", [True, False])
def test_padded_layout_residual_in_place_with_the_next_blocks_codes(signed):
    """conv2 as the padded body runs it: the padded fp32 stream updated in place and the next
    block's codes (8-bit containers) beside it, both with zero rings."""
    g = gen()
    shape = (2, 5, 10, 64)
    x = rand_codes(shape, 8, signed, g)
    wt, mult, bias = rand_weights(64, 64, 8, g), torch.rand(64, generator=g) * 1e-3, torch.randn(64, generator=g)
    residual = torch.randn(shape, generator=g)
    nq = ActQuant(4, True, 0.03, container=8)
    want = ref.packed_conv3x3(pack_codes(x, 8), 8, signed, wt, mult, bias, residual=residual, res_scale=0.1)
    stream = pad_ring(residual).to(DEV)
    codes = torch.full((2, 7, 12, 64), 0xA5, dtype=torch.uint8, device=DEV)
    got = tk.packed_conv3x3(pad_ring(pack_codes(x, 8)).to(DEV), 8, signed, tk.prepare_conv_weight(wt, 8),
                            mult.to(DEV), bias.to(DEV), residual=stream, res_scale=0.1, out=stream, next_quant=nq,
                            next_out=codes, padded=True)
    assert got.data_ptr() == stream.data_ptr() and torch.equal(stream.cpu(), pad_ring(want))
    assert torch.equal(codes.cpu(), pad_ring(ref.quantize_pack(want, nq)))


def test_padded_layout_offset_codes_between_conv1_and_conv2():
    """8-bit unsigned codes as code ^ 0x80 (offset_out on conv1, offset_in on conv2): conv1's bytes
    are the reference codes ^ 0x80, its ring 0x80 (code 0); conv2 reading such bytes (ring 0x80)
    gives the reference's sums."""
    g = gen()
    shape = (2, 5, 9, 64)
    x = rand_codes(shape, 8, True, g)
    w1, w2 = rand_weights(64, 64, 8, g), rand_weights(64, 64, 8, g)
    mult, bias = torch.rand(64, generator=g) * 2e-3, torch.randn(64, generator=g) * 0.1
    q = ActQuant(8, False, 0.02)
    mid_want = ref.packed_conv3x3(pack_codes(x, 8), 8, True, w1, mult, bias, relu=True, out_quant=q)
    mid = tk.packed_conv3x3(pad_ring(pack_codes(x, 8)).to(DEV), 8, True, tk.prepare_conv_weight(w1, 8), mult.to(DEV),
                            bias.to(DEV), relu=True, out_quant=q, padded=True, offset_out=True,
                            out=torch.full((2, 7, 11, 64), 0x5A, dtype=torch.uint8, device=DEV))
    assert torch.equal(mid.cpu() ^ 0x80, pad_ring(mid_want))
    codes = rand_codes(shape, 8, False, g)  # every unsigned code, 0 and 255 included
    codes[0, 0, 0, :2] = torch.tensor([0, 255])
    want = ref.packed_conv3x3(pack_codes(codes, 8), 8, False, w2, torch.ones(64), torch.zeros(64))
    got = tk.packed_conv3x3(pad_ring(pack_codes(codes, 8)).to(DEV) ^ 0x80, 8, False, tk.prepare_conv_weight(w2, 8),
                            torch.ones(64, device=DEV), torch.zeros(64, device=DEV), padded=True, offset_in=True,
                            out=torch.full((2, 7, 11, 64), float("nan"), device=DEV))
    assert torch.equal(got.cpu(), pad_ring(want))


def test_padded_layout_refuses_what_it_cannot_do():
    g = gen()
    w = tk.prepare_conv_weight(rand_weights(64, 64, 8, g), 8)
    x = torch.zeros(1, 6, 6, 64, dtype=torch.uint8, device=DEV)
    ones, zeros = torch.ones(64, device=DEV), torch.zeros(64, device=DEV)
    with pytest.raises(ValueError, match="8-bit containers"):
        tk.packed_conv3x3(x[..., :32], 4, True, tk.prepare_conv_weight(rand_weights(64, 64, 8, g), 4), ones, zeros,
                          padded=True)
    with pytest.raises(ValueError, match="8-bit containers"):
        tk.packed_conv3x3(x, 8, True, w, ones, zeros, out_quant=ActQuant(4, False, 0.1), padded=True)
    with pytest.raises(ValueError, match="pixel-shuffled"):
        tk.packed_conv3x3(x, 8, True, w, ones, zeros, shuffle=2, padded=True)
    with pytest.raises(ValueError, match="multiple of 32"):
        w48 = tk.prepare_conv_weight(rand_weights(64, 48, 8, g), 8)
        tk.packed_conv3x3(x[..., :48], 8, True, w48, ones, zeros, padded=True)
    with pytest.raises(ValueError, match="at least 3 x 3"):
        tk.packed_conv3x3(x[:, :2], 8, True, w, ones, zeros, padded=True)
    with pytest.raises(ValueError, match="these codes are signed"):
        tk.packed_conv3x3(x, 8, True, w, ones, zeros, padded=True, offset_in=True)
    with pytest.raises(ValueError, match="out_quant unsigned"):
        tk.packed_conv3x3(x, 8, True, w, ones, zeros, out_quant=ActQuant(8, True, 0.1), padded=True, offset_out=True)
    with pytest.raises(ValueError, match="padded=True"):
        tk.packed_conv3x3(x, 8, False, w, ones, zeros, offset_in=True)


@pytest.mark.parametrize("policy,bits", [("static", 8), ("entropy", (2, 4, 8))])
def test_engine_padded_layout_equals_packed_reference(policy, bits):
    """containers='padded': the body's codes and residual stream in the zero-ringed layout, every
    conv on the TMA kernel; the output is the packed reference engine's, bit for bit."""
    from conftest import random_image

    from gdq_engine import Engine
    from gdq_engine.models import EDSR

    torch.manual_seed(0)
    model = EDSR(scale=2, n_feats=32, n_blocks=2, res_scale=0.5).eval()
    kw = dict(policy=policy, bits=bits, calib=random_image(12, 12, n=8, seed=1), patch_size=8, stride=6, device=DEV)
    fast = Engine(model, backend="triton", containers="padded", **kw)
    slow = Engine(model, backend="reference", containers="packed", **kw)
    assert fast.containers == "padded" and fast.int_body.padded
    launched = []
    real = tk._padded_conv_into
    tk._padded_conv_into = lambda *a, **k: launched.append(a) or real(*a, **k)
    try:
        lr = random_image(13, 11, n=2, seed=2).to(DEV)
        out, rep = fast.upscale(lr, return_report=True)
    finally:
        tk._padded_conv_into = real
    assert len(launched) >= 4 and torch.equal(out.cpu(), slow.upscale(lr).cpu())
    assert policy == "static" or {2, 4} <= set(rep.bits)
    # 8-bit unsigned mid codes travel as offset codes (conv1 writes, conv2 reads); narrower ones as signed bytes
    assert any(args[-1] for args in launched) and any(args[-2] for args in launched)


def test_padded_containers_need_a_backend_and_channels_that_take_them(tiny_edsr):
    from gdq_engine import Engine

    calib = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="padded"):
        Engine(tiny_edsr, policy="static", bits=8, calib=calib, device="cpu", backend="reference", containers="padded")
    with pytest.raises(ValueError, match="multiple of 32"):  # tiny_edsr has 8 channels
        Engine(tiny_edsr, policy="static", bits=8, calib=calib, device=DEV, backend="triton", containers="padded")


def test_the_first_in_place_launch_of_an_autotuned_conv_adds_its_sums_once(monkeypatch):
    """Autotuning runs a kernel once per benchmark repetition of every config. A conv updating its
    residual in place (the body's conv2) must still add its sums once: its first launch per variant
    writes a scratch result that is copied into place. A stand-in autotuner runs the kernel 5 times
    on an untuned variant, once after, as Triton's does (``_launch_tuned``; GPU only otherwise)."""
    tuned = set()

    class FakeAutotuner:
        def __getitem__(self, grid):
            def run(*args, **meta):
                key = tuple(sorted(meta.items()))
                for _ in range(1 if key in tuned else 5):
                    args[6].copy_(args[5] + 1.0)  # out = residual + sums (the sums are 1 here)
                tuned.add(key)
            return run

    monkeypatch.setattr(tk, "_TUNED_IN_PLACE", set())
    meta = dict(HAS_RES=True, NEXT_BITS=0)
    for variant in ("first", "second"):  # each variant tunes once; each call adds 1 once
        stream = torch.zeros(4)
        for want in (1.0, 2.0, 3.0):
            tk._launch_tuned(FakeAutotuner(), "fake", None, (None,) * 5 + (stream, stream, stream),
                             dict(meta, V=variant))
            assert torch.equal(stream, torch.full((4,), want)), (variant, want)
    # not in place: launched as it is (the stand-in's repeated runs give the same result)
    res, out = torch.zeros(4), torch.full((4,), float("nan"))
    tk._launch_tuned(FakeAutotuner(), "fake", None, (None,) * 5 + (res, out, out), dict(meta, V="third"))
    assert torch.equal(out, torch.ones(4)) and torch.equal(res, torch.zeros(4))


def test_padded_autotuning_candidates_suit_the_channels():
    """The autotuner's prune keeps K steps inside one tap, 64 bytes where C allows: six candidates
    at C = 64 (two persistent), one at C = 32 or 96; each with its TMA boxes set by its pre-hook."""
    at64 = tk._prune_padded(tk.PADDED_TUNE_CONFIGS, {}, C=64)
    assert len(at64) == 6 and {c.kwargs["BLOCK_K"] for c in at64} == {64}
    assert sorted(c.kwargs["PERSISTENT"] for c in at64) == [0, 0, 0, 0, 1, 2]
    for cin in (32, 96):
        assert [c.kwargs["BLOCK_K"] for c in tk._prune_padded(tk.PADDED_TUNE_CONFIGS, {}, C=cin)] == [32]
    assert all(c.pre_hook is not None for c in tk.PADDED_TUNE_CONFIGS)
    x = torch.zeros(4, 64, dtype=torch.uint8)
    w = tk.prepare_conv_weight(torch.zeros(64, 64, 3, 3, dtype=torch.int8), 8).w
    x_desc, w_desc = tk._padded_descriptors(x.view(1, 2, 2, 64), w, as_int8=True)
    at64[3].pre_hook({"x_desc": x_desc, "w_desc": w_desc, "BLOCK_N": 64, **at64[3].kwargs})
    assert x_desc.block_shape == [256, 64] and w_desc.block_shape == [1, 64, 64] and x_desc.base.dtype == torch.int8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton's autotuner benchmarks on a CUDA device")
def test_real_autotuning_of_an_in_place_conv_adds_its_sums_once(monkeypatch):
    """With Triton's own autotuner (the GPU tests otherwise run fixed configs): the padded conv2 at
    C = 32, updating its residual in place, tunes on its first launch (one candidate after the
    prune, benchmarked over many repetitions) and still equals the reference, then again tuned."""
    monkeypatch.setattr(tk, "AUTOTUNE", True)
    monkeypatch.setattr(tk, "_TUNED_IN_PLACE", set())
    monkeypatch.setattr(tk._tuned_padded_conv, "cache", {})
    g = gen()
    shape = (2, 9, 11, 32)
    x = rand_codes(shape, 8, True, g)
    wt, mult, bias = rand_weights(32, 32, 8, g), torch.rand(32, generator=g) * 1e-3, torch.randn(32, generator=g)
    residual = torch.randn(shape, generator=g)
    want = ref.packed_conv3x3(pack_codes(x, 8), 8, True, wt, mult, bias, residual=residual)
    prep, xs = tk.prepare_conv_weight(wt, 8), pad_ring(pack_codes(x, 8)).to(DEV)
    for _ in range(2):  # the tuning launch, then a tuned one
        stream = pad_ring(residual).to(DEV)
        tk.packed_conv3x3(xs, 8, True, prep, mult.to(DEV), bias.to(DEV), residual=stream, out=stream, padded=True)
        assert torch.equal(stream.cpu(), pad_ring(want))
    assert tk._tuned_padded_conv.cache and tk._TUNED_IN_PLACE
