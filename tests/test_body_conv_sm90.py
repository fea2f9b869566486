"""The Gluon body conv (kernels/body_conv_sm90.py): bit-exact on an sm_90 GPU, compiled for sm_90 anywhere.

On a Hopper GPU every case runs the same launch three ways: the Gluon kernel, the flat Triton
kernel and the reference backend (CPU), on fresh random codes, odd H/W (not multiples of the 8 x 16
tile), batch 1 and > 1, signed and unsigned 8-bit codes, every epilogue the body uses; outputs are
poisoned first. Without one (CI), the kernel is compiled for sm_90 with Triton's bundled ptxas, in a
subprocess without ``TRITON_INTERPRET``: asynchronous int8 wgmma, TMA copies, no spills, no FMAs.
"""

import dataclasses
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import rand_codes, rand_weights, weights_for_adds

from gdq_engine.ops import reference as ref
from gdq_engine.quant.packing import pack_codes
from gdq_engine.quant.quantizer import ActQuant

tk = pytest.importorskip("gdq_engine.kernels.ops", reason="triton is a test dependency", exc_type=ImportError)
import triton  # noqa: E402
from gdq_engine.kernels.body_conv_sm90 import HALO_VIEWS, UP_VARIANTS, VARIANTS  # noqa: E402  (after the triton check)

_NO_VIEWS = "the halo's tap views need Triton 3.6's Gluon (a view past its source's extent); this Triton refuses them"

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and not tk.INTERPRET
_seed = itertools.count(5000)


def gen():
    return torch.Generator().manual_seed(next(_seed))


def _launch(x, signed, prep, mult, bias, kw, sm90: bool, poison):
    """The conv on the GPU into a poisoned output (fresh copies of residual / next buffers)."""
    kw = dict(kw)
    if kw.get("residual") is not None:
        kw["residual"] = kw["residual"].cuda().clone()
        if kw.get("out") == "residual":
            kw["out"] = kw["residual"]
    if kw.get("out") is None:
        kw["out"] = poison.cuda().clone()
    if kw.get("next_out") is not None:
        kw["next_out"] = torch.full_like(kw["next_out"], 0xA5).cuda()
    with tk.launch_options(sm90=sm90):
        got = tk.packed_conv3x3(x.cuda(), 8, signed, prep, mult.cuda(), bias.cuda(), **kw)
    torch.cuda.synchronize()
    return got.cpu(), None if kw.get("next_out") is None else kw["next_out"].cpu()


def _conv_inputs(shape, signed: bool, g):
    """Fresh random 8-bit codes of (N, H, W, 64) (and packed, on the GPU), 64 -> 64 weights and
    per-channel multipliers and biases: (codes, packed codes, weights, mult, bias)."""
    x_codes = rand_codes((*shape, 64), 8, signed, g)
    wt = rand_weights(64, 64, 8, g)
    mult, bias = torch.rand(64, generator=g) * 2e-3, torch.randn(64, generator=g) * 0.05
    return x_codes, pack_codes(x_codes, 8).cuda(), wt, mult, bias


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU (the kernel is compiled for sm_90 on any machine below)")
@pytest.mark.parametrize("shape", [(1, 96, 96), (3, 37, 50), (2, 8, 16), (1, 5, 3), (4, 17, 1)])
@pytest.mark.parametrize("case", ["conv1", "conv2", "conv2 scaled", "conv2+next", "conv2+next fp16", "fp32 out",
                                  "dense first segment"])
@pytest.mark.parametrize("signed", [True, False])
def test_gluon_body_conv_equals_flat_kernel_and_reference(shape, case, signed):
    """Each launch the integer bodies make (RDN's dense segments: "dense first segment", the bias
    and no residual; adding onto the partial sum is "conv2") on the Gluon conv, the flat kernel and
    the reference."""
    g = gen()
    n, h, w = shape
    x_codes = rand_codes((n, h, w, 64), 8, signed, g)
    x = pack_codes(x_codes, 8)
    wt = rand_weights(64, 64, 8, g)
    mult = torch.rand(64, generator=g) * 2e-3
    bias = torch.randn(64, generator=g) * 0.05
    prep = tk.prepare_conv_weight(wt, 8)
    res = torch.randn(n, h, w, 64, generator=g)
    kw = {}
    if case == "conv1":
        kw = dict(relu=True, out_quant=ActQuant(8, False, 0.02))
    elif case.startswith("conv2"):
        kw = dict(residual=res, res_scale=0.1 if case == "conv2 scaled" else 1.0)
    elif case == "fp32 out":
        kw = dict(relu=True)
    want = ref.packed_conv3x3(x, 8, signed, wt, mult, bias, **kw)
    dtype = torch.float16 if case.endswith("fp16") else torch.float32
    if case.startswith("conv2+next"):
        nq = ActQuant(8, True, 0.05)
        kw = dict(kw, residual=res.to(dtype), out="residual", out_dtype=dtype, next_quant=nq,
                  next_out=torch.empty(n, h, w, 64, dtype=torch.uint8))
        want = ref.epilogue(ref.conv3x3_int(x_codes, wt), mult, bias, False, res.to(dtype).float(), 1.0, None)
        want = want.to(dtype)
    poison = torch.full_like(want, float("nan")) if want.is_floating_point() else torch.full_like(want, 0xA5)
    got, got_next = _launch(x, signed, prep, mult, bias, kw, True, poison)
    flat, flat_next = _launch(x, signed, prep, mult, bias, kw, False, poison)
    assert torch.equal(got, flat)
    assert torch.equal(got, want)
    if got_next is not None:
        assert torch.equal(got_next, flat_next)
        assert torch.equal(got_next, ref.quantize_pack(want.float(), nq))


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("stages,per_sm,rows,ws,group,tma_out,in_flight", [
    (6, 2, True, False, None, None, None), (8, 1, False, False, None, None, None),
    (3, 3, True, False, None, None, None),
    (6, 2, True, True, 3, True, 1), (6, 2, True, True, 1, False, 1), (4, 2, False, True, 1, True, 1),
    (9, 1, True, True, 3, False, 1), (2, 1, True, True, 1, True, 1), (6, 2, True, True, 1, True, 2),
    (4, 1, False, True, 1, False, 2)])
@pytest.mark.parametrize("signed", [True, False])
def test_gluon_body_conv_knobs_give_the_same_bits(stages, per_sm, rows, ws, group, tma_out, in_flight, signed):
    """Ring depth, programs per SM, the row-layout epilogue, the warp-specialized twin, its stage
    release groups, its TMA stores of codes and its MMAs in flight change the schedule, not the
    bits: conv2 with the next codes on an fp16 stream and conv1 against the reference."""
    g = gen()
    n, h, w = 3, 37, 50
    x_codes, x, wt, mult, bias = _conv_inputs((n, h, w), signed, g)
    prep = tk.prepare_conv_weight(wt, 8)
    res = torch.randn(n, h, w, 64, generator=g).half()
    nq, oq = ActQuant(8, True, 0.05), ActQuant(8, False, 0.02)
    stream, nxt = res.cuda(), torch.full((n, h, w, 64), 0xA5, dtype=torch.uint8, device="cuda")
    codes = torch.full((n, h, w, 64), 0xA5, dtype=torch.uint8, device="cuda")
    with tk.launch_options(sm90=True, sm90_stages=stages, sm90_per_sm=per_sm, sm90_epi_rows=rows, sm90_ws=ws,
                           sm90_group=group, sm90_tma_out=tma_out, sm90_in_flight=in_flight):
        tk.packed_conv3x3(x, 8, signed, prep, mult.cuda(), bias.cuda(), residual=stream, out=stream,
                          out_dtype=torch.float16, next_quant=nq, next_out=nxt)
        tk.packed_conv3x3(x, 8, signed, prep, mult.cuda(), bias.cuda(), relu=True, out_quant=oq, out=codes)
    want = ref.epilogue(ref.conv3x3_int(x_codes, wt), mult, bias, False, res.float(), 1.0, None).half()
    assert torch.equal(stream.cpu(), want)
    assert torch.equal(nxt.cpu(), ref.quantize_pack(want.float(), nq))
    assert torch.equal(codes.cpu(), ref.packed_conv3x3(x.cpu(), 8, signed, wt, mult, bias, relu=True, out_quant=oq))


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("shape", [(1, 96, 96), (3, 37, 50), (1, 5, 3), (4, 17, 1)])
@pytest.mark.parametrize("case", ["next", "no next", "scaled", "not in place", "a4 next", "a2 next"])
@pytest.mark.parametrize("res_bufs,res_late", [(1, False), (2, True)])
@pytest.mark.parametrize("signed", [True, False])
def test_gluon_body_conv_fp16_stream_by_tma_gives_the_same_bits(shape, case, res_bufs, res_late, signed):
    """The twin's conv2 with its fp16 residual in and results out by TMA (``sm90_tma_res``, the
    default since the eleventh H100 run): the stream (in place or into another buffer) and the next
    codes equal the reference's, with ``res_scale`` too, with 4- and 2-bit next codes one per byte
    (static a4 / a2 and Granular-DQ's narrow groups on GPUs), on shapes whose tiles overhang the
    image; with one residual box, and with two copied after each tile's input boxes."""
    g = gen()
    n, h, w = shape
    x_codes, x, wt, mult, bias = _conv_inputs((n, h, w), signed, g)
    res = torch.randn(n, h, w, 64, generator=g).half()
    scale = 0.1 if case == "scaled" else 1.0
    stream = res.cuda()
    out = stream if case != "not in place" else torch.full_like(stream, float("nan"))
    # the narrow codes' steps put a quarter to a half of them at a bound (the stream's spread is ~100)
    nq = {"no next": None, "a4 next": ActQuant(4, True, 20.0, container=8),
          "a2 next": ActQuant(2, True, 100.0, container=8)}.get(case, ActQuant(8, True, 0.05))
    nxt = torch.full((n, h, w, 64), 0xA5, dtype=torch.uint8, device="cuda") if nq else None
    with tk.launch_options(sm90=True, sm90_ws=True, sm90_tma_res=True, sm90_res_bufs=res_bufs, sm90_res_late=res_late):
        tk.packed_conv3x3(x, 8, signed, tk.prepare_conv_weight(wt, 8), mult.cuda(), bias.cuda(), residual=stream,
                          res_scale=scale, out=out, out_dtype=torch.float16, next_quant=nq, next_out=nxt)
    want = ref.epilogue(ref.conv3x3_int(x_codes, wt), mult, bias, False, res.float(), scale, None).half()
    assert torch.equal(out.cpu(), want)
    if case == "not in place":
        assert torch.equal(stream.cpu(), res)
    if nq is not None:
        want_next = ref.quantize_pack(want.float(), nq)
        assert torch.equal(nxt.cpu(), want_next)
        assert want_next.unique().numel() >= 4  # codes across the range, not all at a bound


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("shape", [(1, 96, 96), (3, 37, 50), (2, 8, 16), (1, 5, 3), (4, 17, 1)])
@pytest.mark.parametrize("case", ["conv1", "conv2 scaled", "conv2+next", "conv2+next fp16", "conv2+next fp16 tma"])
@pytest.mark.parametrize("stages,in_flight", [(None, 1), (2, 2)])
@pytest.mark.parametrize("signed", [True, False])
def test_gluon_body_conv_halo_boxes_give_the_same_bits(shape, case, stages, in_flight, signed):
    """The twin reading halo boxes (``sm90_halo``: each tap a view 0-2 rows into its column's box),
    with the default ring and 1 tap in flight, or 2 boxes and 2 taps in flight: conv1's codes,
    conv2's result and next codes (fp32 / fp16 streams, the latter also by TMA) equal the
    reference's, on shapes whose tiles overhang the image (the boxes' rows above, below and beside
    it are TMA's zeros)."""
    g = gen()
    x_codes, x, wt, mult, bias = _conv_inputs(shape, signed, g)
    opts = dict(sm90=True, sm90_ws=True, sm90_halo=True, sm90_stages=stages, sm90_in_flight=in_flight,
                sm90_tma_res=case.endswith("tma"))
    _check_body_case(case, x_codes, signed, wt, mult, bias, torch.randn(*shape, 64, generator=g), opts)


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("shape", [(1, 96, 96), (3, 37, 50), (1, 5, 3), (4, 17, 1)])
@pytest.mark.parametrize("case", ["conv1", "conv2 scaled", "conv2+next", "conv2+next fp16 tma", "a4 next"])
@pytest.mark.parametrize("halo", [False, pytest.param(True, marks=pytest.mark.skipif(not HALO_VIEWS,
                                                                                     reason=_NO_VIEWS))])
@pytest.mark.parametrize("signed", [True, False])
def test_gluon_body_conv_signed_codes_through_registers_give_the_same_bits(shape, case, halo, signed):
    """The twin taking signed codes into its MMAs through registers (``sm90_a_regs``), on tap and
    halo boxes: conv1's codes, conv2's result and next codes (fp32 stream, fp16 stream by TMA, 4-bit
    next codes one per byte on it as static a4 writes them) equal the reference's; unsigned codes,
    which always go through registers, alike."""
    g = gen()
    x_codes, _, wt, mult, bias = _conv_inputs(shape, signed, g)
    opts = dict(sm90=True, sm90_ws=True, sm90_halo=halo, sm90_a_regs=True,
                sm90_tma_res=case.endswith(("tma", "a4 next")))
    nq = ActQuant(4, True, 20.0, container=8) if case == "a4 next" else None
    body = "conv2+next fp16 tma" if case == "a4 next" else case
    _check_body_case(body, x_codes, signed, wt, mult, bias, torch.randn(*shape, 64, generator=g), opts, nq)


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("shape", [(1, 96, 96), (3, 37, 50), (1, 5, 3), (4, 17, 1)])
@pytest.mark.parametrize("case", ["conv1", "conv2 scaled", "conv2+next", "conv2+next fp16 tma", "a4 next",
                                  "res2 late"])
@pytest.mark.parametrize("halo", [False, pytest.param(True, marks=pytest.mark.skipif(not HALO_VIEWS,
                                                                                     reason=_NO_VIEWS))])
@pytest.mark.parametrize("signed", [True, False])
def test_gluon_body_conv_two_pairs_give_the_same_bits(shape, case, halo, signed):
    """The twin as two pairs of a producer warp and an MMA warpgroup a program (``sm90_pairs``),
    sharing the weights, each with its own ring and boxes and every other tile (with 1 or 3 tiles
    one pair has none or one fewer): conv1's codes, conv2's result and next codes (fp32 stream, fp16
    stream by TMA, 4-bit next codes one per byte on it, two residual boxes copied late) equal the
    reference's, on shapes whose tiles overhang the image."""
    g = gen()
    x_codes, _, wt, mult, bias = _conv_inputs(shape, signed, g)
    opts = dict(sm90=True, sm90_ws=True, sm90_halo=halo, sm90_pairs=2,
                sm90_tma_res=case.endswith(("tma", "a4 next", "late")))
    if case == "res2 late":
        opts.update(sm90_res_bufs=2, sm90_res_late=True)
    nq = ActQuant(4, True, 20.0, container=8) if case == "a4 next" else None
    body = "conv2+next fp16 tma" if case in ("a4 next", "res2 late") else case
    _check_body_case(body, x_codes, signed, wt, mult, bias, torch.randn(*shape, 64, generator=g), opts, nq)


def _check_body_case(case: str, x_codes, signed: bool, wt, mult, bias, res, opts: dict,
                     nq: ActQuant | None = None) -> torch.Tensor | None:
    """One body launch under ``launch_options(**opts)`` against the reference: "conv1" (ReLU, 8-bit
    codes out) or conv2 ("conv2 scaled": res_scale 0.1; "conv2+next": with the next codes of ``nq``,
    by default signed 8-bit ones; "fp16": on an fp16 stream), updating the stream ``res`` in place;
    outputs poisoned first. Returns conv2's reference stream."""
    n, h, w, _ = x_codes.shape
    x, prep = pack_codes(x_codes, 8).cuda(), tk.prepare_conv_weight(wt, 8)
    if case == "conv1":
        oq = ActQuant(8, False, 0.02)
        out = torch.full((n, h, w, 64), 0xA5, dtype=torch.uint8, device="cuda")
        with tk.launch_options(**opts):
            tk.packed_conv3x3(x, 8, signed, prep, mult.cuda(), bias.cuda(), relu=True, out_quant=oq, out=out)
        assert torch.equal(out.cpu(), ref.packed_conv3x3(x.cpu(), 8, signed, wt, mult, bias, relu=True, out_quant=oq))
        return None
    dtype = torch.float16 if "fp16" in case else torch.float32
    scale = 0.1 if case.endswith("scaled") else 1.0
    want = ref.epilogue(ref.conv3x3_int(x_codes, wt), mult, bias, False, res.to(dtype).float(), scale, None).to(dtype)
    stream = res.to(dtype).cuda()
    nq = (nq or ActQuant(8, True, 0.05)) if "next" in case else None
    nxt = torch.full((n, h, w, 64), 0xA5, dtype=torch.uint8, device="cuda") if nq else None
    with tk.launch_options(**opts):
        tk.packed_conv3x3(x, 8, signed, prep, mult.cuda(), bias.cuda(), residual=stream, res_scale=scale, out=stream,
                          out_dtype=dtype, next_quant=nq, next_out=nxt)
    assert torch.equal(stream.cpu(), want)
    if nq is not None:
        assert torch.equal(nxt.cpu(), ref.quantize_pack(want.float(), nq))
    return want


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("shape", [(3, 37, 50), (1, 5, 3)])
@pytest.mark.parametrize("case", ["conv1", "conv2 scaled", "conv2+next", "conv2+next fp16 tma"])
@pytest.mark.parametrize("weights", ["uniform", "normal", "edge"])
@pytest.mark.parametrize("signed", [True, False])
def test_gluon_body_conv_conversions_by_adds_give_the_same_bits(shape, case, weights, signed):
    """The twin's epilogue without the conversion pipe (``sm90_cvt_add``): codes by a round-down add
    and, where the weights bound every sum below ``2**22`` (``fp32_sums_by_add``: the normal and
    edge weights, not the uniform ones), floats by adds: conv1's codes, conv2's result and next
    codes (fp32 stream, fp16 stream by TMA) equal the reference's, sums at the bound included."""
    g = gen()
    wt, edge_code = weights_for_adds(weights, 64, 64, signed, g)
    assert tk.fp32_sums_by_add(tk.prepare_conv_weight(wt, 8), signed) == (weights != "uniform")
    x_codes = rand_codes((*shape, 64), 8, signed, g) if edge_code is None else edge_code.expand(*shape, 64)
    mult = torch.rand(64, generator=g) * (1e-6 if edge_code is not None else 2e-3)
    bias = torch.randn(64, generator=g) * 0.05
    opts = dict(sm90=True, sm90_ws=True, sm90_cvt_add=True, sm90_tma_res=case.endswith("tma"))
    _check_body_case(case, x_codes.contiguous(), signed, wt, mult, bias, torch.randn(*shape, 64, generator=g), opts)


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("shape", [(1, 96, 96), (3, 37, 50), (1, 5, 3), (4, 17, 1)])
@pytest.mark.parametrize("case", ["shuffled codes", "shuffled fp16", "shuffled fp32", "x3 shuffled fp16",
                                  "256 codes", "256 conv2"])
@pytest.mark.parametrize("cvt", [False, True])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("halo", [False, pytest.param(True, marks=pytest.mark.skipif(not HALO_VIEWS,
                                                                                     reason=_NO_VIEWS))])
def test_gluon_twin_upsampler_convs_give_the_same_bits(shape, case, cvt, signed, halo):
    """The twin's 64 -> 64 k convs (``sm90_up``: one group of 64 output channels a program): the
    upsampler's pixel-shuffled stores (x2/x4: 64 -> 256, r = 2, codes / fp16 / fp32; x3: 64 -> 576,
    r = 3) and unshuffled 256-channel results (codes after a ReLU; an fp32 stream updated in place;
    the op's next codes take 128 channels at most), with and without the conversions by adds and
    the saturating codes (a Gaussian layer's weights then, every sum within the float adds), on
    tap boxes and on halo boxes, equal the flat kernel's and the reference's; outputs poisoned first."""
    from gdq_engine.runtime.inttail import _shuffle_nhwc

    g = gen()
    n, h, w = shape
    r = 3 if case.startswith("x3") else 2 if "shuffled" in case else 1
    cout = 64 * r * r if r > 1 else 256
    x_codes = rand_codes((n, h, w, 64), 8, signed, g)
    x = pack_codes(x_codes, 8)
    wt = weights_for_adds("normal", cout, 64, signed, g)[0] if cvt else rand_weights(cout, 64, 8, g)
    prep = tk.prepare_conv_weight(wt, 8)
    assert not cvt or tk.fp32_sums_by_add(prep, signed)
    mult, bias = torch.rand(cout, generator=g) * 2e-3, torch.randn(cout, generator=g) * 0.05
    q = ActQuant(8, True, 0.05) if case.endswith("codes") else None
    if case == "256 codes":
        q = ActQuant(8, False, 0.02)
    dtype = torch.float16 if case.endswith("fp16") else torch.float32
    kw = dict(out_quant=q, relu=case == "256 codes")
    res = torch.randn(n, h, w, cout, generator=g) if case == "256 conv2" else None
    if res is not None:
        want = ref.epilogue(ref.conv3x3_int(x_codes, wt), mult, bias, False, res, 1.0, None)
    else:
        want = ref.packed_conv3x3(x, 8, signed, wt, mult, bias, **kw)
        want = _shuffle_nhwc(want, r, torch.uint8 if q else dtype) if r > 1 else want
    results = []
    for sm90 in (True, False):
        if res is not None:
            stream = res.cuda()
            launch = dict(residual=stream, out=stream)
        else:
            poison = torch.full_like(want, 0xA5) if q else torch.full_like(want, float("nan"))
            launch = dict(kw, out=poison.cuda(), shuffle=r, **({} if q else dict(out_dtype=dtype)))
        with tk.launch_options(sm90=sm90, sm90_ws=True, sm90_up=True, sm90_halo=halo, sm90_cvt_add=cvt,
                               sm90_cvt_sat=cvt, cvt_add=cvt):
            got = tk.packed_conv3x3(x.cuda(), 8, signed, prep, mult.cuda(), bias.cuda(), **launch)
        torch.cuda.synchronize()
        results.append(got.cpu())
    assert torch.equal(results[0], results[1])  # the twin's and the flat kernel's
    assert torch.equal(results[0], want)


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("case", ["conv1", "conv2+next fp16", "conv2+next fp16 tma", "conv2+next fp16 tma late",
                                  "conv2+next fp16 tma res2", "conv2+next fp16 tma res2 late", "upsampler codes",
                                  "conv1 pairs", "conv2+next fp16 pairs", "conv2+next fp16 tma pairs",
                                  "conv2+next fp16 tma res2 late pairs", "upsampler codes pairs"])
@pytest.mark.parametrize("cvt", [False, True])
@pytest.mark.parametrize("halo", [False, pytest.param(True, marks=pytest.mark.skipif(not HALO_VIEWS,
                                                                                     reason=_NO_VIEWS))])
def test_gluon_body_conv_persistent_programs_give_the_same_bits(case, cvt, halo):
    """The twin with several tiles a program (12 images of 96 x 96: 864 tiles of 8 x 16 pixels, 3 a
    program at least), as the engine runs it on 18 patches and more; the other tests' shapes give
    most programs one tile. Across tiles each program refills its ring, reuses conv1's code box
    once the previous tile's TMA store has read it, and (``sm90_tma_res``) refills the residual box
    once the previous tile's stores have read it (``res2``: two boxes in turn, each refilled once the
    stores of the tile two back have read it; ``late``: each tile's residual copied after its input
    boxes; ``pairs``: two pairs of a producer and an MMA warpgroup a program, each with its own ring
    and boxes and every other tile, the weights shared); the upsampler's first stage (4 groups of 64
    output channels, stored pixel-shuffled) runs 13 tiles a program. Three launches each equal the
    flat kernel's result, and the first image the reference's."""
    from gdq_engine.runtime.inttail import _shuffle_nhwc

    g = gen()
    n, h, w = 12, 96, 96
    pairs, case = case.endswith(" pairs"), case.removesuffix(" pairs")
    up = case.startswith("upsampler")
    cout, signed = (256, True) if up else (64, case == "conv1")
    programs = tk.SM90_PER_SM * torch.cuda.get_device_properties(0).multi_processor_count // (4 if up else 1)
    assert n * (h // 8) * (w // 16) >= 3 * programs
    x_codes = rand_codes((n, h, w, 64), 8, signed, g)
    x = pack_codes(x_codes, 8).cuda()
    wt = weights_for_adds("normal", cout, 64, signed, g)[0]
    prep = tk.prepare_conv_weight(wt, 8)
    mult, bias = torch.rand(cout, generator=g) * 2e-3, torch.randn(cout, generator=g) * 0.05
    res = torch.randn(n, h, w, 64, generator=g).half()
    nq, oq = ActQuant(8, True, 0.05), ActQuant(8, False, 0.02)

    def launch(sm90: bool):
        if case == "conv1":
            kw = dict(relu=True, out_quant=oq, out=torch.full((n, h, w, 64), 0xA5, dtype=torch.uint8, device="cuda"))
        elif up:
            kw = dict(out_quant=nq, shuffle=2,
                      out=torch.full((n, 2 * h, 2 * w, 64), 0xA5, dtype=torch.uint8, device="cuda"))
        else:
            stream = res.cuda()
            kw = dict(residual=stream, out=stream, out_dtype=torch.float16, next_quant=nq,
                      next_out=torch.full((n, h, w, 64), 0xA5, dtype=torch.uint8, device="cuda"))
        with tk.launch_options(sm90=sm90, sm90_ws=True, sm90_up=True, sm90_halo=halo, sm90_cvt_add=cvt,
                               sm90_tma_res="tma" in case, sm90_res_bufs=2 if "res2" in case else 1,
                               sm90_res_late=case.endswith("late"), sm90_pairs=2 if pairs else 1):
            got = tk.packed_conv3x3(x, 8, signed, prep, mult.cuda(), bias.cuda(), **kw)
        torch.cuda.synchronize()
        return [got.cpu()] + ([kw["next_out"].cpu()] if "next_out" in kw else [])

    flat = launch(False)
    for _ in range(3):
        got = launch(True)
        assert all(torch.equal(a, b) for a, b in zip(got, flat))
    x0 = pack_codes(x_codes[:1], 8)
    if case == "conv1":
        want = ref.packed_conv3x3(x0, 8, signed, wt, mult, bias, relu=True, out_quant=oq)
    elif up:
        want = _shuffle_nhwc(ref.packed_conv3x3(x0, 8, signed, wt, mult, bias, out_quant=nq), 2, torch.uint8)
    else:
        want = ref.epilogue(ref.conv3x3_int(x_codes[:1], wt), mult, bias, False, res[:1].float(), 1.0, None).half()
        assert torch.equal(flat[1][:1], ref.quantize_pack(want.float(), nq))
    assert torch.equal(flat[0][:1], want)


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("shape", [(1, 96, 96), (3, 37, 50), (1, 5, 3)])
@pytest.mark.parametrize("bits,scale", [(8, 0.05), (8, 2.0), (4, 0.5), (2, 1.0)])
@pytest.mark.parametrize("weights,adds", [("uniform", False), ("normal", True), ("edge", True)])
@pytest.mark.parametrize("signed", [True, False])
def test_gluon_body_conv_saturating_codes_give_the_same_bits(shape, bits, scale, weights, adds, signed):
    """The twin's conv1 with its codes from 0 by one saturating floor conversion and its ReLU folded
    into it (``sm90_cvt_sat``, by default on conv1 since the eleventh H100 run), alone or with the
    conversions by adds: 8-bit codes (0..255; at a small scale most values saturate, at a large one
    most do not), 4- and 2-bit codes one per byte (0..15, 0..3: a clamp after the conversion) equal
    the reference's, negative values (the folded ReLU) and sums at the float adds' bound included."""
    g = gen()
    wt, edge_code = weights_for_adds(weights, 64, 64, signed, g)
    x_codes = rand_codes((*shape, 64), 8, signed, g) if edge_code is None else edge_code.expand(*shape, 64)
    x = pack_codes(x_codes.contiguous(), 8)
    mult = torch.rand(64, generator=g) * (1e-6 if edge_code is not None else 2e-3)
    bias = torch.randn(64, generator=g) * 0.05
    oq = ActQuant(bits, False, scale, container=8)
    want = ref.packed_conv3x3(x, 8, signed, wt, mult, bias, relu=True, out_quant=oq)
    assert bool((want == 0).any()) and bool((want > 0).any())  # the ReLU's zeros and some codes above
    out = torch.full_like(want, 0xA5).cuda()
    with tk.launch_options(sm90=True, sm90_ws=True, sm90_cvt_sat=True, sm90_cvt_add=adds):
        tk.packed_conv3x3(x.cuda(), 8, signed, tk.prepare_conv_weight(wt, 8), mult.cuda(), bias.cuda(), relu=True,
                          out_quant=oq, out=out)
    assert torch.equal(out.cpu(), want)


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("shape", [(3, 37, 50), (1, 5, 3)])
@pytest.mark.parametrize("case", ["fp32", "fp16", "fp16 tma", "a4 next"])
@pytest.mark.parametrize("weights,adds", [("uniform", False), ("normal", True)])
@pytest.mark.parametrize("signed", [True, False])
def test_gluon_body_conv_saturating_next_codes_give_the_same_bits(shape, case, weights, adds, signed):
    """The twin's conv2 with its signed next codes by ``max(t, LO)`` and one saturating conversion
    (``sm90_cvt_sat``), alone or with the conversions by adds: on the fp32 stream, the fp16 stream
    (by stores and by TMA), and 4-bit next codes one per byte (-8..7: a ``min`` too); the stream
    and the next codes equal the reference's."""
    g = gen()
    wt = weights_for_adds(weights, 64, 64, signed, g)[0]
    x_codes, _, _, mult, bias = _conv_inputs(shape, signed, g)
    nq = ActQuant(4, True, 0.3, container=8) if case == "a4 next" else ActQuant(8, True, 0.05)
    opts = dict(sm90=True, sm90_ws=True, sm90_cvt_sat=True, sm90_cvt_add=adds, sm90_tma_res=case.endswith("tma"))
    body_case = "conv2+next fp16" if case.startswith("fp16") else "conv2+next"
    want = _check_body_case(body_case, x_codes, signed, wt, mult, bias, torch.randn(*shape, 64, generator=g), opts,
                            nq)
    assert bool((ref.quantize_pack(want.float(), nq) != 0).any())  # the next codes are not all 0


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("stream_dtype", [torch.float32, torch.float16])
def test_gluon_body_conv_saturating_codes_match_the_clamps_on_nan_and_inf(stream_dtype):
    """A stream holding NaN, +-inf and values far outside the codes' range: the twin's next codes by
    the saturating conversion (with and without the adds) equal its codes by the floor and clamps,
    byte for byte (NaN -> the range's start, as the clamp's min/max give it), as do the streams."""
    g = gen()
    shape = (2, 19, 21)
    x_codes, x, wt, mult, bias = _conv_inputs(shape, True, g)
    res = torch.randn(*shape, 64, generator=g) * 1e3
    res.view(-1)[torch.randperm(res.numel(), generator=g)[:3000]] = float("nan")
    res.view(-1)[torch.randperm(res.numel(), generator=g)[:2000]] = float("inf")
    res.view(-1)[torch.randperm(res.numel(), generator=g)[:2000]] = float("-inf")
    prep = tk.prepare_conv_weight(wt, 8)
    got = []
    for sat, adds in ((False, False), (True, False), (True, True)):
        for nq in (ActQuant(8, True, 0.05), ActQuant(4, True, 0.3, container=8)):
            stream = res.to(stream_dtype).cuda()
            nxt = torch.full((*shape, 64), 0xA5, dtype=torch.uint8, device="cuda")
            with tk.launch_options(sm90=True, sm90_ws=True, sm90_cvt_sat=sat, sm90_cvt_add=adds):
                tk.packed_conv3x3(x, 8, True, prep, mult.cuda(), bias.cuda(), residual=stream, out=stream,
                                  out_dtype=stream_dtype, next_quant=nq, next_out=nxt)
            got.append((stream.cpu(), nxt.cpu()))
    plain = got[:2]
    assert bool(plain[0][0].isnan().any()) and bool((plain[0][1] == 0x80).any())  # NaN -> -128 by the clamps
    for i, (stream, nxt) in enumerate(got):
        assert torch.equal(stream.view(torch.uint8), plain[i % 2][0].view(torch.uint8))
        assert torch.equal(nxt, plain[i % 2][1])


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("adds", [False, True])
def test_gluon_body_conv_saturating_codes_from_0_match_the_clamps_on_nan_and_inf(bits, adds):
    """conv1's codes from 0 where the epilogue meets NaN, +-inf and values far outside the range (the
    channels' biases): by the saturating conversion (the ReLU folded in; below 255 a ``min``
    propagating NaN to it) they equal the codes by the ReLU, floor and clamps, byte for byte, NaN
    giving 0 as the ReLU's max gives it."""
    g = gen()
    shape = (2, 19, 21)
    x_codes, x, wt, mult, _ = _conv_inputs(shape, True, g)
    bias = torch.randn(64, generator=g) * 0.05
    bias[:24] = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 3e38] * 4)
    prep, oq = tk.prepare_conv_weight(wt, 8), ActQuant(bits, False, 0.02, container=8)
    got = []
    for sat in (False, True):
        out = torch.full((*shape, 64), 0xA5, dtype=torch.uint8, device="cuda")
        with tk.launch_options(sm90=True, sm90_ws=True, sm90_cvt_sat=sat, sm90_cvt_add=adds):
            tk.packed_conv3x3(x, 8, True, prep, mult.cuda(), bias.cuda(), relu=True, out_quant=oq, out=out)
        got.append(out.cpu())
    plain, by_sat = got
    hi = (1 << bits) - 1
    assert bool((plain[..., 0] == 0).all()) and bool((plain[..., 1] == hi).all())  # NaN -> 0, inf -> HI
    assert bool((plain[..., 24:] > 0).any()) and bool((plain[..., 24:] < hi).any())
    assert torch.equal(by_sat, plain)


def test_conv_sum_bounds_are_reached_and_decide_the_fp32_adds():
    """PreparedWeight.sum_bounds is the largest conv sum over 8-bit codes, reached by the codes
    that follow the signs of a channel's weights (the reference conv's centre pixel of a 3 x 3
    image, every tap inside it); fp32_sums_by_add holds strictly below 2**22."""
    g = gen()
    wt = rand_weights(16, 32, 8, g)
    wt[3] = 127  # one channel of all-positive codes, one of all-negative
    wt[7] = -127
    w = tk.prepare_conv_weight(wt, 8)
    pos = (wt > 0).permute(2, 3, 1, 0)  # (3, 3, C, Cout): the centre pixel's tap (ky, kx) reads pixel (ky, kx)
    reached = []
    for lo, hi in ((-128, 127), (0, 255)):
        sums = [ref.conv3x3_int(torch.where(pos[..., o], a, b)[None], wt)[0, 1, 1, o]
                for o in range(16) for a, b in ((hi, lo), (lo, hi))]
        reached.append(int(torch.stack(sums).abs().max()))
    assert tuple(reached) == w.sum_bounds
    for signed_bound, unsigned_bound, signed_ok, unsigned_ok in ((2**22 - 1, 2**22, True, False),
                                                                (2**22, 2**22 - 1, False, True)):
        cut = dataclasses.replace(w, sum_bounds=(signed_bound, unsigned_bound))
        assert tk.fp32_sums_by_add(cut, True) == signed_ok and tk.fp32_sums_by_add(cut, False) == unsigned_ok
    assert not tk.fp32_sums_by_add(dataclasses.replace(w, sum_bounds=None), True)


def test_weights_prepared_during_a_graph_capture_leave_their_sum_bounds_unknown(monkeypatch):
    """The bounds need a host read, which a CUDA graph capture forbids: weights first prepared
    there get None (the conversion of sums by adds then stays off for them) instead of an error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    prep = tk.prepare_conv_weight(rand_weights(16, 32, 8, gen()), 8)
    assert prep.sum_bounds is None and not tk.fp32_sums_by_add(prep, True)


@pytest.mark.parametrize("scale", [2, 4])
def test_shipped_edsr_weights_bound_every_sum_for_the_fp32_adds(scale):
    """Every integer 3x3 conv (64 input channels, a multiple of 16 out) in the shipped EDSR-baseline
    weights, quantized to 8-bit codes per channel as the integer engine does, bounds its sums below
    2**22 for signed and unsigned codes: the Gluon conv's conversions by adds cover the whole body."""
    from gdq_engine import load_model
    from gdq_engine.quant.quantizer import quantize_weight

    convs = [m for m in load_model(f"edsr-baseline-x{scale}").modules() if isinstance(m, torch.nn.Conv2d)
             and m.in_channels == 64 and m.out_channels % 16 == 0 and m.kernel_size == (3, 3)]
    assert len(convs) == 33 + scale // 2  # 16 blocks' two, the body's end, the upsampler's one or two
    for conv in convs:
        prep = tk.prepare_conv_weight(quantize_weight(conv.weight.detach().float(), 8)[0], 8)
        assert tk.fp32_sums_by_add(prep, True) and tk.fp32_sums_by_add(prep, False), prep.sum_bounds


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("ws,halo", [(False, False), (True, False), (True, True)])
def test_gluon_body_conv_skips_the_padding_images(k, ws, halo):
    """items=k: the first k images are computed; the others' outputs stay as they were."""
    g = gen()
    x_codes = rand_codes((4, 19, 21, 64), 8, True, g)
    x = pack_codes(x_codes, 8)
    wt = rand_weights(64, 64, 8, g)
    mult, bias = torch.rand(64, generator=g) * 1e-3, torch.zeros(64)
    out = torch.full((4, 19, 21, 64), 0xA5, dtype=torch.uint8, device="cuda")
    items = torch.tensor([k], dtype=torch.int32, device="cuda")
    with tk.launch_options(sm90=True, sm90_ws=ws, sm90_halo=halo):
        tk.packed_conv3x3(x.cuda(), 8, True, tk.prepare_conv_weight(wt, 8), mult.cuda(), bias.cuda(), relu=True,
                          out_quant=ActQuant(8, False, 0.02), out=out, items=items)
    want = ref.packed_conv3x3(x, 8, True, wt, mult, bias, relu=True, out_quant=ActQuant(8, False, 0.02))
    assert torch.equal(out[:k].cpu(), want[:k])
    assert bool((out[k:] == 0xA5).all())


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
def test_gluon_body_conv_applies_only_where_it_can():
    out = torch.empty(1, 4, 4, 64, device="cuda")
    with tk.launch_options(sm90=True, sm90_up=False):
        assert tk.sm90_body_applies(out, 8, 64, 64, 1, 0, 8)
        assert not tk.sm90_body_applies(out, 4, 64, 64, 1, 0, 0)  # packed 4-bit codes
        assert not tk.sm90_body_applies(out, 8, 64, 256, 2, 0, 0)  # the upsampler: only with sm90_up
        assert not tk.sm90_body_applies(out, 8, 64, 64, 2, 0, 0)  # pixel shuffle
    with tk.launch_options(sm90=True, sm90_ws=True, sm90_up=True):
        assert tk.sm90_body_applies(out, 8, 64, 256, 2, 8, 0) and tk.sm90_body_applies(out, 8, 64, 576, 3, 0, 0)
        assert tk.sm90_body_applies(out, 8, 64, 256, 1, 0, 0)  # unshuffled, in groups of 64
        assert not tk.sm90_body_applies(out, 8, 64, 64, 2, 0, 0)  # 16 channels a sub-pixel
        assert not tk.sm90_body_applies(out, 8, 64, 576, 2, 0, 0)  # 144 a sub-pixel
        assert not tk.sm90_body_applies(out, 8, 64, 96, 1, 0, 0)  # not a multiple of 64
        assert not tk.sm90_body_applies(out, 8, 32, 256, 2, 0, 0)
        with tk.launch_options(sm90_ws=False):  # the first-built kernel computes 64 channels only
            assert not tk.sm90_body_applies(out, 8, 64, 256, 2, 0, 0)
        assert not tk.sm90_body_applies(out.bfloat16(), 8, 64, 64, 1, 0, 0)
    with tk.launch_options(sm90=False):
        assert not tk.sm90_body_applies(out, 8, 64, 64, 1, 0, 8)
    x = pack_codes(rand_codes((1, 4, 4, 64), 8, True, gen()), 8).cuda()
    prep = tk.prepare_conv_weight(rand_weights(64, 64, 8, gen()), 8)
    for stages, group, in_flight, what in ((4, 3, 1, "releases 1 or 3 stages"), (3, 3, 1, "releases"),
                                           (6, 2, 1, "releases"), (6, 3, 2, "1 or 2 taps"), (3, 1, 2, "1 or 2 taps"),
                                           (6, 1, 3, "1 or 2 taps")):
        # the twin's ring: two release groups of 1 or 3 stages; 2 taps in flight with groups of 1, 4 stages
        with tk.launch_options(sm90=True, sm90_ws=True, sm90_stages=stages, sm90_group=group, sm90_in_flight=in_flight,
                               sm90_halo=False):
            with pytest.raises(ValueError, match=what):
                tk.packed_conv3x3(x, 8, True, prep, torch.ones(64, device="cuda"), torch.zeros(64, device="cuda"))


@pytest.mark.skipif(any(k.startswith(("GDQ_SM90", "GDQ_CVT_")) for k in os.environ),
                    reason="a GDQ_SM90_* / GDQ_CVT_* variable overrides a default")
def test_gluon_body_conv_defaults_are_the_eleventh_runs():
    """The switches' defaults as the tenth and eleventh H100 runs set them (kernels/ops.py,
    docs/kernels.md): halo boxes, the conversions by adds, the upsampler on the twin and the fp16
    stream by TMA on; the saturating codes on every conv but those writing an fp16 stream ("auto");
    two taps in flight, signed codes through registers, two residual boxes and late residual copies
    (A/B switches no GPU has timed yet) and the flat kernel's conversions off."""
    assert tk.SM90_BODY and tk.SM90_WS and tk.SM90_HALO and tk.SM90_CVT_ADD and tk.SM90_UP and tk.SM90_TMA_RES
    assert tk.SM90_CVT_SAT == "auto"
    assert not (tk.CVT_ADD or tk.CVT_SAT or tk.SM90_A_REGS or tk.SM90_RES_LATE) and tk.SM90_RES_BUFS == 1
    assert (tk.SM90_IN_FLIGHT, tk.SM90_WS_GROUP, tk.SM90_PER_SM, tk.SM90_HALO_STAGES) == (1, 1, 2, 4)


def test_gluon_body_conv_settings_are_the_enclosing_options_else_the_defaults(monkeypatch):
    """ops.sm90_settings: what a launch gets, field by field, nested launch_options included."""
    monkeypatch.setattr(tk, "SM90_HALO", False)  # the halo default aside (checked below)
    want = dict(sm90_stages=tk.SM90_STAGES, sm90_per_sm=tk.SM90_PER_SM, sm90_epi_rows=tk.SM90_EPI_ROWS,
                sm90_ws=tk.SM90_WS, sm90_group=tk.SM90_WS_GROUP, sm90_in_flight=tk.SM90_IN_FLIGHT,
                sm90_tma_out=tk.SM90_TMA_OUT, sm90_tma_res=tk.SM90_TMA_RES, sm90_halo=False,
                sm90_cvt_add=tk.SM90_CVT_ADD, sm90_up=tk.SM90_UP, sm90_cvt_sat=tk.SM90_CVT_SAT,
                sm90_a_regs=tk.SM90_A_REGS, sm90_res_bufs=tk.SM90_RES_BUFS, sm90_res_late=tk.SM90_RES_LATE,
                sm90_pairs=tk.SM90_PAIRS)
    assert tk.sm90_settings() == want
    with tk.launch_options(sm90_stages=8, sm90_ws=not tk.SM90_WS):
        with tk.launch_options(sm90_tma_res=True, sm90_in_flight=2, sm90_cvt_add=not tk.SM90_CVT_ADD,
                               sm90_up=not tk.SM90_UP, sm90_cvt_sat=False, sm90_a_regs=not tk.SM90_A_REGS):
            assert tk.sm90_settings() == dict(want, sm90_stages=8, sm90_ws=not tk.SM90_WS, sm90_tma_res=True,
                                              sm90_in_flight=2, sm90_cvt_add=not tk.SM90_CVT_ADD,
                                              sm90_up=not tk.SM90_UP, sm90_cvt_sat=False,
                                              sm90_a_regs=not tk.SM90_A_REGS)
        assert tk.sm90_settings() == dict(want, sm90_stages=8, sm90_ws=not tk.SM90_WS)
    # the twin's halo ring counts 10 KB boxes: its own default depth unless one is asked for
    with tk.launch_options(sm90_ws=True, sm90_halo=True):
        assert tk.sm90_settings()["sm90_stages"] == tk.SM90_HALO_STAGES
        with tk.launch_options(sm90_stages=3):
            assert tk.sm90_settings()["sm90_stages"] == 3
    with tk.launch_options(sm90_ws=False, sm90_halo=True):
        assert tk.sm90_settings()["sm90_stages"] == tk.SM90_STAGES
    assert tk.sm90_settings() == want
    # halo boxes by default (GDQ_SM90_HALO unset or 1) only where this Triton's Gluon builds them and
    # stages are released one at a time; asked for, always
    from gdq_engine.kernels import body_conv_sm90 as bc

    monkeypatch.setattr(tk, "SM90_HALO", True)
    for views in (True, False):
        monkeypatch.setattr(bc, "HALO_VIEWS", views)
        got = tk.sm90_settings()
        assert got["sm90_halo"] == views
        assert got["sm90_stages"] == (tk.SM90_HALO_STAGES if views and tk.SM90_WS else tk.SM90_STAGES)
        with tk.launch_options(sm90_halo=True):
            assert tk.sm90_settings()["sm90_halo"]
        with tk.launch_options(sm90_group=3):
            assert not tk.sm90_settings()["sm90_halo"] and tk.sm90_settings()["sm90_stages"] == tk.SM90_STAGES


def test_gluon_body_conv_launcher_hands_each_kernel_its_arguments(monkeypatch):
    """ops._sm90_body_into without a GPU, the kernels replaced by recorders: each launch passes its
    kernel's runtime parameters in order (the TMA descriptors' tensors, shapes, boxes and dtypes
    included) and constexprs that follow the launch options and the conv."""
    from gdq_engine.kernels import body_conv_sm90 as bc

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append((self.kernel, grid, args, meta))

    for name in ("_body_conv_sm90_kernel", "_body_conv_sm90_ws_kernel"):
        monkeypatch.setattr(bc, name, Recorder(getattr(bc, name)))
    monkeypatch.setattr(bc, "HALO_VIEWS", True)  # as with Triton 3.6 (the kernel is not compiled here)
    g = gen()
    n, h, w = 2, 9, 20
    x = pack_codes(rand_codes((n, h, w, 64), 8, True, g), 8)
    prep = tk.prepare_conv_weight(rand_weights(64, 64, 8, g), 8)
    mult, bias = torch.ones(64), torch.zeros(64)
    codes, stream = torch.empty(n, h, w, 64, dtype=torch.uint8), torch.randn(n, h, w, 64).half()
    nxt = torch.empty(n, h, w, 64, dtype=torch.uint8)
    conv1 = (codes, x, prep.w, prep.wsum, mult, bias, None, True, True, 1.0, 8, 0, 255, 50.0, None, (0, 0, 0, 1.0))
    conv2 = (stream, x, prep.w, prep.wsum, mult, bias, stream, False, False, 1.0, 0, 0, 0, 1.0, nxt,
             (8, -128, 127, 20.0))
    with tk.launch_options(sm90_ws=True, sm90_tma_out=True, sm90_in_flight=1, sm90_halo=False):
        tk._sm90_body_into(*conv1, None)
    with tk.launch_options(sm90_ws=True, sm90_tma_res=True, sm90_in_flight=2, sm90_stages=4, sm90_halo=False):
        tk._sm90_body_into(*conv2, None)
    with tk.launch_options(sm90_ws=False):
        tk._sm90_body_into(*conv2, torch.tensor([1], dtype=torch.int32))
    with tk.launch_options(sm90_ws=True, sm90_halo=True, sm90_tma_res=False, sm90_in_flight=2):
        tk._sm90_body_into(*conv2, None)
    box, box2 = [1, 8, 16, 64], [1, 2, 16, 64]
    for (kernel, grid, args, _), (ws, descs) in zip(launches, [
            (True, [(x, box), (x, box), (None, [64, 64]), (codes, box), (x, box), (x, box)]),
            (True, [(x, box), (x, box), (None, [64, 64]), (stream, box), (stream, box), (nxt, box)]),
            (False, [(x, box), (None, [64, 64])]),
            (True, [(x, box), (x, box2), (None, [64, 64]), (x, box), (x, box), (x, box)])]):
        assert len(args) == sum(not p.is_constexpr for p in kernel.params)
        # 8 tiles of 8 x 16 pixels; SM90_PER_SM programs on each of a CPU device's 2 "SMs" (ops._sm_count)
        assert grid == (min(n * 2 * 2, tk.SM90_PER_SM * 2),)
        assert (kernel is bc._body_conv_sm90_ws_kernel.kernel) == ws
        for desc, (tensor, block) in zip(args, descs):
            assert list(desc.block_shape) == block
            if tensor is not None:
                assert desc.base.data_ptr() == tensor.data_ptr() and list(desc.shape) == [n, h, w, 64]
                assert desc.base.element_size() == tensor.element_size()
    assert launches[0][3]["TMA_OUT"] and not launches[0][3]["TMA_RES"] and launches[0][3]["IN_FLIGHT"] == 1
    assert launches[1][3]["TMA_RES"] and not launches[1][3]["TMA_OUT"] and launches[1][3]["IN_FLIGHT"] == 2
    assert launches[1][3]["STAGES"] == 4 and launches[1][3]["NEXT_BITS"] == 8
    assert launches[2][3]["SKIP_PAD"] and "TMA_OUT" not in launches[2][3]
    assert not any(meta["HALO"] for _, _, _, meta in launches[:2])
    assert launches[3][3]["HALO"] and launches[3][3]["STAGES"] == tk.SM90_HALO_STAGES
    assert launches[3][3]["IN_FLIGHT"] == 2 and launches[3][3]["GROUP"] == 1
    # halo boxes are released one at a time, and need Gluon's views past a view's extent
    with tk.launch_options(sm90_ws=True, sm90_halo=True, sm90_group=3, sm90_stages=6):
        with pytest.raises(ValueError, match="halo boxes one at a time"):
            tk._sm90_body_into(*conv2, None)
    monkeypatch.setattr(bc, "HALO_VIEWS", False)
    with tk.launch_options(sm90_ws=True, sm90_halo=True):
        with pytest.raises(ValueError, match="halo boxes .sm90_halo. need"):
            tk._sm90_body_into(*conv2, None)
    assert len(launches) == 4
    # conversions by adds: codes always, floats only where the weights bound the sums (sums_by_add)
    launches.clear()
    with tk.launch_options(sm90_ws=True, sm90_cvt_add=True, sm90_cvt_sat=False):
        tk._sm90_body_into(*conv1, None, True)
        tk._sm90_body_into(*conv2, None, False)
    with tk.launch_options(sm90_ws=True, sm90_cvt_add=False, sm90_cvt_sat=True):
        tk._sm90_body_into(*conv1, None, True)
    with tk.launch_options(sm90_ws=False, sm90_cvt_add=True, sm90_cvt_sat=True):  # the twin's only
        tk._sm90_body_into(*conv2, None, True)
    assert [(meta["ROUND_ADD"], meta["I2F_ADD"], meta["ROUND_SAT"]) for _, _, _, meta in launches[:3]] == [
        (True, True, False), (True, False, False), (False, False, True)]
    assert launches[3][0] is bc._body_conv_sm90_kernel.kernel
    assert "ROUND_ADD" not in launches[3][3] and "ROUND_SAT" not in launches[3][3]
    assert not any("OUT_GROUPS" in meta for _, _, _, meta in launches)  # 64 channels: the kernel's defaults
    # the saturating codes' "auto" (ops.SM90_CVT_SAT's default): every conv but those writing an fp16
    # stream; True and False as they say
    launches.clear()
    stream32 = stream.float()
    conv2_fp32 = (stream32, *conv2[1:6], stream32, *conv2[7:])
    for sat in ("auto", True, False):
        with tk.launch_options(sm90_ws=True, sm90_cvt_sat=sat):
            for conv in (conv1, conv2, conv2_fp32):
                tk._sm90_body_into(*conv, None)
    assert [meta["ROUND_SAT"] for _, _, _, meta in launches] == [True, False, True] + [True] * 3 + [False] * 3
    with tk.launch_options(sm90_ws=True, sm90_cvt_sat="yes"):
        with pytest.raises(ValueError, match="True, False or 'auto'"):
            tk._sm90_body_into(*conv1, None)
    # signed codes through registers (sm90_a_regs): the twin's signed launches only (unsigned codes
    # always go so); off by default
    launches.clear()
    for regs in (None, True, False):
        with tk.launch_options(sm90_ws=True, sm90_a_regs=regs):
            for conv in (conv1, conv2):
                tk._sm90_body_into(*conv, None)
    assert [meta["A_REGS"] for _, _, _, meta in launches] == [False, False, True, False, False, False]
    # two residual boxes and late residual copies (sm90_res_bufs, sm90_res_late): the fp16 stream by
    # TMA only, its ring one halo box (two tap boxes) shorter; 1 or 2 boxes
    launches.clear()
    monkeypatch.setattr(bc, "HALO_VIEWS", True)
    for halo in (False, True):
        with tk.launch_options(sm90_ws=True, sm90_halo=halo, sm90_tma_res=True, sm90_res_bufs=2, sm90_res_late=True):
            for conv in (conv1, conv2):
                tk._sm90_body_into(*conv, None)
            ring = tk.sm90_settings()["sm90_stages"]
        fewer = tk.SM90_RES2_FEWER[halo]
        assert [(m["RES_BUFS"], m["RES_LATE"], m["STAGES"]) for _, _, _, m in launches[-2:]] == [
            (1, False, ring), (2, True, ring - fewer)]
    with tk.launch_options(sm90_ws=True, sm90_res_bufs=3):
        with pytest.raises(ValueError, match="1 or 2 residual boxes"):
            tk._sm90_body_into(*conv2, None)
    # two pairs a program (sm90_pairs): half the programs, each with two pairs (the same tiles in
    # flight), at the pairs' registers; with two residual boxes the ring kept; one pair: the kernel's
    # defaults, as before
    launches.clear()
    for pairs in (2, 1):
        with tk.launch_options(sm90_ws=True, sm90_halo=True, sm90_tma_res=True, sm90_res_bufs=2, sm90_pairs=pairs):
            tk._sm90_body_into(*conv2, None)
            ring = tk.sm90_settings()["sm90_stages"]
    (_, grid2, _, two), (_, grid1, _, one) = launches
    assert grid2 == (tk.SM90_PER_SM * 2 // 2,) and grid1 == (tk.SM90_PER_SM * 2,)  # 2 "SMs", 8 tiles
    assert two["PAIRS"] == 2 and two["MMA_REGS"] == tk.SM90_PAIRS_MMA_REGS and two["maxnreg"] == tk.SM90_PAIRS_MAXNREG
    assert two["STAGES"] == ring and one["STAGES"] == ring - tk.SM90_RES2_FEWER[True]
    assert "PAIRS" not in one and one["maxnreg"] == tk.SM90_WS_MAXNREG
    launches.clear()
    small = torch.randn(1, 3, 5, 64).half()  # one tile: one program (its second pair has none)
    x_small = pack_codes(rand_codes((1, 3, 5, 64), 8, False, g), 8)
    with tk.launch_options(sm90_ws=True, sm90_pairs=2):
        tk._sm90_body_into(small, x_small, *conv2[2:6], small, *conv2[7:14],
                           torch.empty(1, 3, 5, 64, dtype=torch.uint8), conv2[15], None)
    assert launches[0][1] == (1,) and launches[0][3]["PAIRS"] == 2
    with tk.launch_options(sm90_ws=True, sm90_pairs=3):
        with pytest.raises(ValueError, match="1 or 2 pairs"):
            tk._sm90_body_into(*conv2, None)
    # the upsampler's 64 -> 256 conv (sm90_up): a group of 64 output channels a program, on the grid's
    # second axis; the weights' descriptor spans all 256 rows; stored shuffled by masked stores (no TMA_OUT)
    launches.clear()
    up = tk.prepare_conv_weight(rand_weights(256, 64, 8, g), 8)
    up_fp16 = torch.empty(n, 2 * h, 2 * w, 64, dtype=torch.float16)
    up_codes = torch.empty(n, 2 * h, 2 * w, 64, dtype=torch.uint8)
    ones, zeros = torch.ones(256), torch.zeros(256)
    tail = (None, True, False, 1.0)  # residual, a_signed, relu, res_scale
    with tk.launch_options(sm90_ws=True, sm90_up=True, sm90_tma_out=True, sm90_per_sm=4):
        tk._sm90_body_into(up_fp16, x, up.w, up.wsum, ones, zeros, *tail, 0, 0, 0, 1.0, None, (0, 0, 0, 1.0), None,
                           False, 2)
        tk._sm90_body_into(up_codes, x, up.w, up.wsum, ones, zeros, *tail, 8, -128, 127, 20.0, None, (0, 0, 0, 1.0),
                           None, True, 2)
    for (kernel, grid, args, meta), out in zip(launches, (up_fp16, up_codes)):
        assert kernel is bc._body_conv_sm90_ws_kernel.kernel
        assert grid == (min(n * 2 * 2, 4 * 2 // 4), 4)  # 4 programs per "SM", 2 "SMs", 4 groups
        assert meta["OUT_GROUPS"] == 4 and meta["SHUFFLE"] == 2 and not meta["TMA_OUT"] and not meta["TMA_RES"]
        w_desc = args[2]
        assert list(w_desc.shape) == [256, 9 * 64] and list(w_desc.block_shape) == [64, 64]
        assert w_desc.base.data_ptr() == up.w.data_ptr()
        params = [p.name for p in kernel.params if not p.is_constexpr]
        assert args[params.index("out_ptr")] is out and args[params.index("mult_ptr")] is ones
    assert [meta["ROUND_ADD"] for _, _, _, meta in launches] == [tk.SM90_CVT_ADD] * 2
    with tk.launch_options(sm90_ws=False, sm90_up=True):
        with pytest.raises(ValueError, match="only the warp-specialized body conv"):
            tk._sm90_body_into(up_fp16, x, up.w, up.wsum, ones, zeros, *tail, 0, 0, 0, 1.0, None, (0, 0, 0, 1.0),
                               None, False, 2)


def _compile_cli(*flags: str) -> subprocess.CompletedProcess:
    """``python -m gdq_engine.kernels.body_conv_sm90 *flags`` in a subprocess without
    ``TRITON_INTERPRET`` (it compiles for sm_90 with Triton's ptxas, no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "gdq_engine.kernels.body_conv_sm90", *flags], env=env,
                          capture_output=True, text=True)


def _compile_reports(*flags: str) -> list[dict]:
    """The CLI's JSON reports for ``flags`` (:func:`_compile_cli`); its error output if it fails."""
    done = _compile_cli("--json", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


# The local frame (bytes) of the twin's conv2 + next on the fp32 stream at 128 registers, by (taps'
# MMAs in flight, conversions by adds, saturating codes), with Triton 3.9 (CI's) and 3.6 (the GPU
# machine's): each Triton's register allocation differs; no other variant has one.
_CONV2_NEXT_FRAME = {
    False: {(1, False, False): 8, (2, False, False): 48, (1, True, False): 32, (1, False, True): 16,
            (1, True, True): 16},
    True: {(1, False, False): 16, (2, False, False): 72, (1, True, False): 24, (1, False, True): 16,
           (1, True, True): 8},
}


def test_gluon_body_conv_compiles_for_sm90_with_async_int8_wgmma():
    """Every variant the body launches, compiled for sm_90 without a GPU: wgmma on int8 with one
    MMA group left in flight (two for the twin's ``in_flight=2``), TMA copies, no local memory, no
    fused multiply-adds; the twin with its conversions by adds has none of the epilogue's
    conversion-pipe instructions left; the twin's upsampler convs (``--up``: a 64-channel group of
    256, pixel-shuffled) alike."""
    reports = _compile_reports("--ws", "--tma-res", "--in-flight", "2", "--cvt-add", "--cvt-sat", "--up")
    assert len(reports) >= 12
    assert sorted((r["name"], r["shuffle"], r["cvt_add"], r["cvt_sat"]) for r in reports if r["shuffle"] > 1) == sorted(
        [(name, 2, add, sat) for name in ("up shuffled codes", "up shuffled fp16") for add in (False, True)
         for sat in (False, True) if not (sat and name.endswith("fp16"))])
    assert sum(r["in_flight"] == 2 for r in reports) == sum(not r["ws"] for r in reports)  # each variant's twin at 2
    twin = {r["name"]: r for r in reports
            if r["ws"] and not (r["tma_res"] or r["cvt_add"] or r["cvt_sat"] or r["in_flight"] == 2)}
    by_adds = [r for r in reports if r["cvt_add"] and not r["cvt_sat"]]
    assert sorted(r["name"] for r in by_adds) == sorted(twin)
    for r in by_adds:
        codes = r["name"].startswith("conv1") or "next" in r["name"] or r["name"].endswith("codes")  # requantizes
        # per value the int -> float conversion (64 a thread) and, for codes, the floor and the
        # float -> int conversion (64 each) leave the conversion pipe; its index arithmetic stays
        assert r["conversions"] == twin[r["name"]]["conversions"] - 64 * (1 + 2 * codes), (r, twin[r["name"]])
        assert r["round_adds"] == 64 * codes, r
        assert twin[r["name"]]["round_adds"] == 0
    # 8-bit codes by one saturating conversion each, alone or with the floats by adds (one more
    # conversion a value gone): the floor and the conversion become one; of the clamps (FMNMX) conv1's
    # 0..255 keeps none (its ReLU folded in too), its 0..15 a min (propagating NaN, which the
    # conversion takes to 0), signed codes a max (NaN -> LO)
    sat = [r for r in reports if r["cvt_sat"] and not r["tma_res"]]
    writes_codes = ["conv1", "conv1 skip", "conv2+next", "conv2+next signed", "conv2+next fp16 stream",
                    "conv2+next fp16 stream signed", "up shuffled codes"]
    assert sorted((r["name"], r["cvt_add"]) for r in sat) == [(n, a) for n in sorted(writes_codes) for a in (0, 1)]
    for r in sat:
        plain = twin[r["name"]]
        assert r["sat_cvts"] == 64 and plain["sat_cvts"] == 0 and r["round_adds"] == 0, r
        assert plain["fmnmx"] == 64 * (3 if r["name"].startswith("conv1") else 2), plain
        assert r["fmnmx"] == {"conv1": 0}.get(r["name"], 64), r
        assert r["min_nans"] == 64 * (r["name"] == "conv1 skip") and plain["min_nans"] == 0, (r, plain)
        assert r["conversions"] == plain["conversions"] - 64 * (1 + r["cvt_add"]), (r, plain)
        assert r["instructions"] < plain["instructions"], (r, plain)
    fp16_stream = ["conv2+next fp16 stream", "conv2+next fp16 stream signed"]  # a8's codes in, a4's / a2's
    sat_tma = [r for r in reports if r["cvt_sat"] and r["tma_res"]]  # the fp16 stream by TMA, with the adds
    assert [r["name"] for r in sat_tma] == fp16_stream, sat_tma
    for r in sat_tma:
        assert r["sat_cvts"] == 64 and r["cvt_add"] and r["fmnmx"] == 64 and r["tma_stores"] == 2, r
    assert {(r["a_signed"], r["ws"]) for r in reports} == {(True, False), (False, False), (True, True), (False, True)}
    assert sorted({r["name"] for r in reports if r["tma_res"]}) == fp16_stream
    for r in reports:
        if r["ws"]:  # the warp-specialized twin: the MMA warpgroup and the producer's, 128 registers each
            assert r["warps"] == 8 and r["registers"] <= 128, r
            # conv2 + next on the fp32 stream keeps a local frame at that budget, the others none
            frame = _CONV2_NEXT_FRAME[triton.__version__[:3] == "3.6"][r["in_flight"], r["cvt_add"], r["cvt_sat"]]
            assert r["local_bytes"] <= (frame if r["name"] == "conv2+next" else 0), r
            r["local_bytes"] = 0
            # each tap's stage released once its MMA retired: 9 arrivals a tile (the fp16 stream by
            # TMA: one more, its residual box handed back)
            assert r["arrives"] == 9 + r["tma_res"], r
            # conv1's codes (no residual) leave by TMA from the MMA layout; with tma_res the stream's
            # box and the next codes' box too; the others' by stores
            assert r["tma_stores"] == (1 if r["name"].startswith("conv1") else 2 * r["tma_res"]), r
            # each wait for the stores' reads (before the code box is rewritten, before the residual
            # box is handed back, at the end) is followed by a CTA barrier: the storing thread's wait
            # holds every thread
            assert r["store_waits"] == (2 if r["tma_stores"] else 0) == r["store_waits_synced"], r
        assert r["wgmma"] == 36, r  # 9 taps x 2 row halves x 2 K halves, m64n64k32 s8.s8
        assert r["async_waits"] >= 9, r  # wgmma.wait_group 1 (2: in_flight) after each tap
        assert r["tma_copies"] >= 10, r  # the weights' 9 boxes and the taps'
        assert r["local_bytes"] == 0 and r["fma_f32"] == 0, r
        assert r["shared_bytes"] <= 232448 // 2, r  # two programs fit on an SM
        assert r["register_hazards"] == 0, r  # no write into an in-flight wgmma's A registers
        # unsigned codes reach the MMA through registers, loaded while the previous tap's MMA runs
        assert (r["loads_in_flight"] > 0) == (not r["a_signed"]), r


@pytest.mark.skipif(any(k.startswith("GDQ_SM90") for k in os.environ),
                    reason="a GDQ_SM90_* variable overrides a default")
def test_gluon_body_conv_compiles_each_variant_as_the_engine_launches_it():
    """``--defaults``: each variant as ``ops.sm90_settings()`` launches it (the twin; halo boxes where
    this Triton builds them; the conversions by adds; the fp16 stream by TMA; the saturating codes on
    every conv but the fp16 stream's), compiled for sm_90: 128 registers, no local memory but the
    fp32 stream's 16-byte frame, two programs to an SM, each TMA store's read waited for by every
    thread before its box is reused, one saturating conversion per code where they apply."""
    reports = _compile_reports("--defaults")
    assert [r["name"] for r in reports] == [v[0] for v in VARIANTS + UP_VARIANTS]
    for r in reports:
        assert r["ws"] and r["halo"] == HALO_VIEWS and r["cvt_add"] and r["in_flight"] == 1, r
        assert r["stages"] == (tk.SM90_HALO_STAGES if HALO_VIEWS else tk.SM90_STAGES), r
        fp16_stream = r["name"].startswith("conv2+next fp16 stream")  # a8's codes in, or a4's / a2's
        assert r["tma_res"] == fp16_stream, r
        assert r["cvt_sat"] == (not fp16_stream and r["name"] != "up shuffled fp16"), r
        codes = r["name"].startswith("conv1") or "next" in r["name"] or r["name"].endswith("codes")
        assert r["sat_cvts"] == 64 * (codes and r["cvt_sat"]) and r["round_adds"] == 64 * (codes and not r["cvt_sat"])
        assert r["warps"] == 8 and r["registers"] <= 128 and r["wgmma"] == 36 and r["fma_f32"] == 0, r
        assert r["local_bytes"] <= (16 if r["name"] == "conv2+next" else 0), r
        assert r["shared_bytes"] <= 232448 // 2 and r["register_hazards"] == 0, r
        assert r["store_waits"] == r["store_waits_synced"] == (2 if r["tma_stores"] else 0), r
    done = _compile_cli("--defaults", "--halo")
    assert done.returncode != 0 and "--defaults takes the engine's settings" in done.stderr


@pytest.mark.skipif(any(k.startswith("GDQ_SM90") for k in os.environ),
                    reason="a GDQ_SM90_* variable overrides a default")
def test_gluon_body_conv_compiles_signed_codes_through_registers():
    """``--a-regs``: each signed variant as the engine launches it, and again with its codes into the
    MMAs through registers (``A_REGS``), compiled for sm_90: the register operands are loaded while
    the previous tap's MMA runs, and nothing writes them while their MMA is in flight; no more
    registers or local memory than from shared memory."""
    reports = [r for r in _compile_reports("--a-regs") if r["ws"]]
    signed = [v[0] for v in VARIANTS + UP_VARIANTS if v[1]]
    assert [(r["name"], r["a_regs"]) for r in reports] == [(n, regs) for n in signed for regs in (False, True)]
    for plain, regs in zip(reports[::2], reports[1::2]):
        assert plain["loads_in_flight"] == 0 and regs["loads_in_flight"] > 0, (plain, regs)
        assert regs["register_hazards"] == 0 and regs["wgmma"] == 36 and regs["fma_f32"] == 0, regs
        assert regs["registers"] <= 128 and regs["local_bytes"] <= plain["local_bytes"], (plain, regs)
        assert {k: v for k, v in regs.items() if k not in ("a_regs", "instructions", "loads_in_flight", "registers")} \
            == {k: v for k, v in plain.items() if k not in ("a_regs", "instructions", "loads_in_flight", "registers")}


@pytest.mark.skipif(any(k.startswith("GDQ_SM90") for k in os.environ),
                    reason="a GDQ_SM90_* variable overrides a default")
def test_gluon_body_conv_compiles_two_residual_boxes_and_late_residual_copies():
    """``--res-bufs``: conv2 + next codes on the fp16 stream by TMA as the engine launches it, with 1
    and 2 residual boxes (``RES_BUFS``; with 2 the ring one halo box or two tap boxes shorter,
    ``ops.sm90_ring_stages``) and each tile's residual copied after its first input boxes or after
    all of them (``RES_LATE``), compiled for sm_90: two programs still fit an SM, the second box's
    16 KB in place of the ring's stage(s) it takes; each TMA store's read waited for by every thread
    before a box is reused."""
    reports = [r for r in _compile_reports("--res-bufs") if r["ws"]]
    assert [(r["res_bufs"], r["res_late"]) for r in reports] == [(1, False), (1, True), (2, False), (2, True)]
    ring = tk.SM90_HALO_STAGES if HALO_VIEWS else tk.SM90_STAGES
    one = reports[0]
    for r in reports:
        assert r["name"] == "conv2+next fp16 stream" and r["tma_res"] and r["halo"] == HALO_VIEWS, r
        assert r["stages"] == ring - (tk.SM90_RES2_FEWER[HALO_VIEWS] if r["res_bufs"] == 2 else 0), r
        assert r["registers"] <= 128 and r["local_bytes"] == 0 and r["register_hazards"] == 0, r
        assert r["shared_bytes"] <= 232448 // 2, r  # two programs fit on an SM
        assert r["tma_stores"] == 2 and r["store_waits"] == r["store_waits_synced"] == 2, r
        assert r["wgmma"] == 36 and r["arrives"] == one["arrives"] and r["tma_copies"] == one["tma_copies"], r
    # the second box is one more 16 KB box in shared memory, the stages it replaces fewer (barriers aside)
    box = 10 * 1024 if HALO_VIEWS else 8 * 1024
    for r in reports[2:]:
        grown = r["shared_bytes"] - one["shared_bytes"]
        assert abs(grown - (16384 - box * (one["stages"] - r["stages"]))) <= 64, (r, one)
    assert reports[1]["shared_bytes"] == one["shared_bytes"]


@pytest.mark.skipif(any(k.startswith("GDQ_SM90") for k in os.environ),
                    reason="a GDQ_SM90_* variable overrides a default")
def test_gluon_body_conv_compiles_two_pairs_a_program():
    """``--pairs``: each variant as the engine launches it but as two pairs of a producer warp and an
    MMA warpgroup a program sharing the weights (``PAIRS``), and the fp16 stream with two residual
    boxes copied late, compiled for sm_90: each pair's 36 wgmmas, waits and releases; 12 warps at
    ``ops.SM90_PAIRS_MAXNREG`` registers, which fit an SM's 65,536; no local memory, no write into an
    in-flight MMA's registers; the program fits its shared memory, the ring kept with two residual
    boxes."""
    reports = [r for r in _compile_reports("--pairs") if r["pairs"] == 2]
    fp16 = ["conv2+next fp16 stream", "conv2+next fp16 stream signed"]
    assert [r["name"] for r in reports] == [v[0] for v in VARIANTS + UP_VARIANTS] + fp16
    ring = tk.SM90_HALO_STAGES if HALO_VIEWS else tk.SM90_STAGES
    for r in reports:
        assert r["ws"] and r["halo"] == HALO_VIEWS and r["stages"] == ring, r
        assert r["warps"] == 12 and r["registers"] <= tk.SM90_PAIRS_MAXNREG and 12 * 32 * r["registers"] <= 65536, r
        assert r["local_bytes"] == 0 and r["register_hazards"] == 0 and r["fma_f32"] == 0, r
        assert r["wgmma"] == 2 * 36 and r["async_waits"] == 2 * 9, r
        assert r["arrives"] == 2 * ((3 if HALO_VIEWS else 9) + r["tma_res"]), r
        assert r["shared_bytes"] <= 232448, r
        assert r["store_waits"] == r["store_waits_synced"] == (4 if r["tma_stores"] else 0), r
        assert (r["loads_in_flight"] > 0) == (not r["a_signed"]), r
    assert [(r["name"], r["res_bufs"], r["res_late"]) for r in reports if r["tma_res"]] == [
        (fp16[0], 1, False), (fp16[1], 1, False), (fp16[0], 2, True), (fp16[1], 2, True)]


@pytest.mark.skipif(not HALO_VIEWS, reason=_NO_VIEWS + " (the next test checks that it says so)")
def test_gluon_body_conv_with_halo_boxes_compiles_for_sm90():
    """The twin reading halo boxes, every variant (and the fp16 stream by TMA), compiled for sm_90:
    the same 36 wgmmas and waits; per tile 6 copies of the input (an 8-row and a 2-row box per
    column offset) and 3 releases (one per box); no spills beyond the fp32 stream's frame; fewer
    mbarrier operations and CTA barriers than the twin reading 9 tap boxes."""
    everything = _compile_reports("--ws", "--halo")
    reports = [r for r in everything if r["halo"]]
    twin = {r["name"]: r for r in everything if r["ws"] and not r["halo"]}
    fp16_stream = [v for v in VARIANTS if v[10] == v[11] == "fp16"]  # each also with the stream by TMA
    assert len(fp16_stream) == 2 and len(reports) == len(VARIANTS) + 2
    assert sorted(r["name"] for r in reports if r["tma_res"]) == sorted(v[0] for v in fp16_stream)
    for r in reports:
        if not r["tma_res"]:
            assert r["mbarrier_ops"] < twin[r["name"]]["mbarrier_ops"], (r, twin[r["name"]])
            assert r["bar_syncs"] < twin[r["name"]]["bar_syncs"], (r, twin[r["name"]])
        assert r["ws"] and r["warps"] == 8 and r["registers"] <= 128, r
        assert r["wgmma"] == 36 and r["async_waits"] == 9 and r["fma_f32"] == 0, r
        conv1 = r["name"].startswith("conv1")
        # the weights' 9 boxes, the tile's 6 input boxes, the residual's, then the stores
        stores = 1 if conv1 else 2 * r["tma_res"]
        assert r["tma_stores"] == stores and r["tma_copies"] == 9 + 6 + r["tma_res"] + stores, r
        assert r["arrives"] == 3 + r["tma_res"], r
        assert r["store_waits"] == 2 == r["store_waits_synced"] if stores else r["store_waits"] == 0, r
        assert r["local_bytes"] <= (16 if r["name"] == "conv2+next" else 0), r
        assert r["shared_bytes"] <= 232448 // 2, r
        assert r["register_hazards"] == 0 and (r["loads_in_flight"] > 0) == (not r["a_signed"]), r


@pytest.mark.skipif(HALO_VIEWS, reason="this Triton's Gluon has the halo's views (the test above compiles them)")
def test_gluon_body_conv_halo_is_refused_by_name_where_gluon_cannot_view_it():
    done = _compile_cli("--halo")
    assert done.returncode == 2 and "Triton 3.6" in done.stderr and "refuses" in done.stderr, done.stderr


def _sass(*instructions: str) -> str:
    return "\n".join(f"        /*{16 * i:04x}*/  {ins} ;  /* 0x0 */" for i, ins in enumerate(instructions))


def test_register_hazard_check_sees_writes_into_an_in_flight_operand():
    """body_conv_sm90.register_hazards on hand-written SASS: a load into the registers of a wgmma
    still in flight is a hazard; into other registers, or after the wait that retires it, is not."""
    from gdq_engine.kernels.body_conv_sm90 import register_hazards

    mma = ["LDSM.16.M88.4 R100, [R13+0x9000]", "WARPGROUP.ARRIVE",
           "IGMMA.64x64x32.S8.S8 R56, R100, gdesc[UR8], R56, gsb0"]
    assert register_hazards(_sass(*mma, "LDSM.16.M88.4 R104, [R13+0xa000]",
                                  "WARPGROUP.DEPBAR.LE gsb0, 0x1")) == (0, 1)
    assert register_hazards(_sass(*mma, "LDSM.16.M88.4 R102, [R13+0xa000]")) == (1, 1)
    assert register_hazards(_sass(*mma, "@P0 IADD3 R103, R1, 0x1, RZ")) == (1, 0)
    assert register_hazards(_sass(*mma, "WARPGROUP.DEPBAR.LE gsb0, 0x0", "LDSM.16.M88.4 R100, [R13]")) == (0, 0)
