"""Quantization core: quantizers, DOBI, the reference integer conv, integer body, policies, scheduler."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_image

from gdq_engine import Engine
from gdq_engine.models import EDSR
from gdq_engine.ops import reference
from gdq_engine.policy import EntropyOnly, Static, patch_entropy
from gdq_engine.quant.calibrate import dobi_scale
from gdq_engine.quant.packing import pack_codes, unpack_codes
from gdq_engine.quant.quantizer import (
    ActQuant,
    code_range,
    container_bits,
    fake_quantize,
    quantize,
    quantize_weight,
    requant_args,
)
from gdq_engine.runtime.intgraph import IntegerBody, calibrate, collect_block_activations, prepare_blocks
from gdq_engine.runtime.scheduler import run_grouped


def test_quantize_hand_values():
    q = ActQuant(4, True, 0.5)
    x = torch.tensor([0.24, 0.25, -0.26, -0.75, 10.0, -10.0])
    # floor(x * 2 + 0.5), clamped to [-8, 7]: 0.25 -> 1 (half rounds up), -0.75 -> -1
    assert quantize(x, q).tolist() == [0, 1, -1, -1, 7, -8]
    u = ActQuant(2, False, 1.0)
    assert quantize(torch.tensor([-1.0, 0.49, 0.5, 2.6, 9.0]), u).tolist() == [0, 0, 1, 3, 3]
    assert fake_quantize(torch.tensor([0.3]), q).item() == 0.5


def test_code_ranges_and_containers():
    assert code_range(8, True) == (-128, 127) and code_range(8, False) == (0, 255)
    assert code_range(2, True) == (-2, 1) and code_range(5, False) == (0, 31)
    assert [container_bits(b) for b in (2, 3, 4, 5, 6, 8)] == [2, 4, 4, 8, 8, 8]
    for bad in (0, 1, 9, 16):
        with pytest.raises(ValueError, match="unsupported bit-width"):
            container_bits(bad)
    with pytest.raises(ValueError, match="positive"):
        ActQuant(8, True, 0.0)


def test_wider_containers_hold_the_same_codes():
    assert [ActQuant(b, True, 0.5).container for b in (2, 3, 4, 5, 8)] == [2, 4, 4, 8, 8]
    q, wide = ActQuant(4, True, 0.5), ActQuant(4, True, 0.5, container=8)
    assert wide.range == q.range == (-8, 7) and wide.bits == 4
    assert requant_args(q)[0] == 4 and requant_args(wide) == (8, -8, 7, 2.0)
    for bits, bad in ((4, 2), (8, 4), (3, 2), (2, 3), (2, 16)):
        with pytest.raises(ValueError, match="fit containers"):
            ActQuant(bits, True, 0.5, container=bad)
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(7)) * 4
    bytes_ = reference.quantize_pack(x, wide)
    assert bytes_.shape == (2, 3, 5, 16) and torch.equal(bytes_, pack_codes(quantize(x, q), 8))
    assert torch.equal(unpack_codes(bytes_, 8, True), unpack_codes(reference.quantize_pack(x, q), 4, True))


def test_weight_quant_hand_values():
    w = torch.tensor([[1.0, -0.5], [0.1, 0.2]]).view(2, 2, 1, 1)
    codes, scale = quantize_weight(w, 8)
    assert scale.tolist() == pytest.approx([1 / 127, 0.2 / 127])
    assert codes.view(2, 2).tolist() == [[127, -64], [64, 127]]  # -63.5 and 63.5 round half to even
    codes2, scale2 = quantize_weight(w, 2)
    assert codes2.view(2, 2).tolist() == [[1, 0], [0, 1]] and scale2.tolist() == pytest.approx([1.0, 0.2])
    _, per_tensor = quantize_weight(w, 8, per_channel=False)
    assert per_tensor.tolist() == pytest.approx([1 / 127, 1 / 127])
    with pytest.raises(ValueError):
        quantize_weight(w, 3)


def test_dobi_beats_max_bound_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g)
    x[:5] = 40.0  # outliers
    for bits, signed in ((4, True), (2, True), (4, False)):
        s = dobi_scale(x, bits, signed)
        _, hi = code_range(bits, signed)
        naive = 40.0 / hi  # the max bound

        def err(sc, bits=bits, signed=signed):
            return float(((fake_quantize(x, ActQuant(bits, signed, sc)) - x) ** 2).sum())

        assert s < naive and err(s) < err(naive)
    assert dobi_scale(torch.zeros(10), 8, True) == 1.0


def _naive_conv(codes, w):
    n, h, wd, c = codes.shape
    pad = F.pad(codes.permute(0, 3, 1, 2).long(), (1, 1, 1, 1))
    out = torch.zeros(n, w.shape[0], h, wd, dtype=torch.long)
    for ky in range(3):
        for kx in range(3):
            patch = pad[:, :, ky:ky + h, kx:kx + wd]
            out += torch.einsum("nchw,oc->nohw", patch, w[:, :, ky, kx].long())
    return out.permute(0, 2, 3, 1)


@pytest.mark.parametrize("n,h,w,c,co", [(1, 5, 7, 8, 4), (3, 9, 4, 16, 8), (2, 1, 1, 4, 4)])
@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (2, False)])
def test_int_conv_exact(n, h, w, c, co, bits, signed):
    g = torch.Generator().manual_seed(n * 100 + h)
    lo, hi = code_range(bits, signed)
    codes = torch.randint(lo, hi + 1, (n, h, w, c), generator=g)
    wc = torch.randint(-127, 128, (co, c, 3, 3), generator=g, dtype=torch.int8)
    acc = reference.conv3x3_int(codes, wc)
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), _naive_conv(codes, wc))
    packed = pack_codes(codes, bits)
    mult, bias = torch.rand(co, generator=g), torch.randn(co, generator=g)
    out = reference.packed_conv3x3(packed, bits, signed, wc, mult, bias, relu=True)
    manual = torch.clamp_min(acc.float() * mult + bias, 0)
    assert torch.equal(out, manual)
    q = ActQuant(4, False, 0.7)
    requant = reference.packed_conv3x3(packed, bits, signed, wc, mult, bias, relu=True, out_quant=q)
    assert torch.equal(requant, pack_codes(quantize(manual, q), 4))


def test_epilogue_residual_order():
    acc = torch.tensor([[[[3, -2]]]], dtype=torch.int32)
    res = torch.tensor([[[[1.0, 1.0]]]])
    y = reference.epilogue(acc, torch.tensor([0.5, 0.25]), torch.tensor([0.1, 0.0]), residual=res, res_scale=0.1)
    expect = res + (acc.float() * torch.tensor([0.5, 0.25]) + torch.tensor([0.1, 0.0])) * 0.1
    assert torch.equal(y, expect)


@pytest.fixture
def small_edsr():
    torch.manual_seed(0)
    return EDSR(2, n_feats=16, n_blocks=3).eval()


def _fake_quant_blocks(model, act_quants, blocks):
    """The float model of the integer path: fake-quant activations, dequantized weights."""
    def run(x):
        for qb, (q_in, q_mid) in zip(blocks, act_quants):
            w1 = qb.w1.float() * qb.s_w1.view(-1, 1, 1, 1)
            w2 = qb.w2.float() * qb.s_w2.view(-1, 1, 1, 1)
            mid = torch.relu(F.conv2d(fake_quantize(x, q_in), w1, qb.b1, padding=1))
            x = x + F.conv2d(fake_quantize(mid, q_mid), w2, qb.b2, padding=1)
        return x
    return run


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_integer_body_equals_fake_quant_model(small_edsr, bits):
    calib = random_image(16, 16, n=4, seed=1)
    quants = calibrate(small_edsr, calib, (bits,))
    blocks = prepare_blocks(small_edsr)
    body = IntegerBody(blocks, quants)
    x = random_image(11, 13, n=2, seed=2)
    with torch.no_grad():
        feat = small_edsr.head(small_edsr.normalize(x))
        ours = body(feat, bits)
        fake = _fake_quant_blocks(small_edsr, quants[bits], blocks)(feat)
        # First quantizer: identical codes by construction of the contract.
        q0 = quants[bits][0][0]
        assert torch.equal(quantize(feat.permute(0, 2, 3, 1), q0),
                           quantize(feat, q0).permute(0, 2, 3, 1))
    step = max(q[1].scale for q in quants[bits])
    diff = (ours - fake).abs()
    assert diff.mean() < 1e-3 * step and diff.max() < 2 * step * len(blocks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_residual_stream(small_edsr, dtype):
    """``stream_dtypes``: features of a listed dtype keep the residual stream in it. Each block's
    result is rounded to it and the next block quantizes the rounded values (a manual run of the
    reference ops says so bit for bit); the output is that dtype, close to the fp32 stream's,
    and fp32 features still run the fp32 stream."""
    from gdq_engine.ops import reference as ref

    quants = calibrate(small_edsr, random_image(16, 16, n=4, seed=1), (4,))
    blocks = prepare_blocks(small_edsr)
    body = IntegerBody(blocks, quants, stream_dtypes=(torch.float32, dtype))
    fp32_body = IntegerBody(blocks, quants)
    with torch.no_grad():
        feat = small_edsr.head(small_edsr.normalize(random_image(11, 13, n=2, seed=2)))
    out = body(feat.to(dtype), 4)
    x = feat.to(dtype).permute(0, 2, 3, 1).contiguous()
    for blk, (q_in, q_mid) in zip(blocks, quants[4]):
        m1, m2 = q_in.scale * blk.s_w1.float(), q_mid.scale * blk.s_w2.float()
        mid = ref.packed_conv3x3(ref.quantize_pack(x, q_in), 4, True, blk.w1, m1, blk.b1, relu=True, out_quant=q_mid)
        x = ref.packed_conv3x3(mid, 4, False, blk.w2, m2, blk.b2, residual=x, res_scale=blk.res_scale).to(dtype)
    assert out.dtype == dtype and torch.equal(out.permute(0, 2, 3, 1), x)
    full = fp32_body(feat.to(dtype), 4)  # a dtype the body was not given for the stream: fp32
    assert full.dtype == torch.float32 and torch.equal(body(feat, 4), fp32_body(feat, 4))
    assert not torch.equal(out.float(), full)
    rel = torch.finfo(dtype).eps * len(blocks) * 4
    assert ((out.float() - full).abs() <= rel * full.abs().amax() + max(q[0].scale for q in quants[4])).all()


def test_stream_dtypes_are_checked(small_edsr):
    quants = calibrate(small_edsr, random_image(8, 8, n=2), (8,))
    with pytest.raises(ValueError, match="stream_dtypes must be"):
        IntegerBody(prepare_blocks(small_edsr), quants, stream_dtypes=(torch.int8,))
    from gdq_engine.ops import cpu_ops

    if cpu_ops.available():
        with pytest.raises(ValueError, match="float32 only"):
            IntegerBody(prepare_blocks(small_edsr), quants, backend="cpp", stream_dtypes=(torch.bfloat16,))


def test_calibration_collects_every_block(small_edsr):
    acts = collect_block_activations(small_edsr, random_image(8, 8, n=2))
    assert len(acts) == 3 and all(mid.min() >= 0 for _, mid in acts)
    with pytest.raises(ValueError, match="no calibrated quantizers"):
        IntegerBody(prepare_blocks(small_edsr), calibrate(small_edsr, random_image(8, 8, n=2), (8,)))(
            torch.zeros(1, 16, 4, 4), 4)


def test_static8_close_to_fp_and_lower_bits_degrade(small_edsr):
    calib = random_image(24, 24, n=8, seed=3)
    x = random_image(30, 34, n=1, seed=4)
    fp = Engine(small_edsr, device="cpu", patch_size=24, stride=20).upscale(x)
    errs = {}
    for b in (8, 4, 2):
        y = Engine(small_edsr, policy="static", bits=b, calib=calib, device="cpu", patch_size=24, stride=20).upscale(x)
        errs[b] = (y - fp).abs().mean().item()
    assert errs[8] < 2e-3 and errs[8] < errs[4] < errs[2]


def _mixed_image():
    x = torch.full((1, 3, 48, 64), 0.5)
    x[..., :, 32:] = random_image(48, 32, n=1, seed=9)  # textured right half
    x[..., 24:, :16] = torch.linspace(0, 1, 16)  # gradient corner
    return x


def test_entropy_policy_orders_by_texture():
    x = _mixed_image()
    flat, noisy = x[:, :, :16, :16], x[:, :, :16, 40:56]
    h = patch_entropy(torch.cat([flat, noisy]))
    assert h[0] < h[1]
    p = EntropyOnly((2, 4, 8), thresholds=(float(h[0]) + 1e-3, float(h[0]) + 2e-3))
    assert p.assign(torch.cat([flat, noisy]), None).tolist() == [2, 8]
    with pytest.raises(RuntimeError, match="fit"):
        EntropyOnly().assign(flat, None)
    assert Static(4).assign(flat, None).tolist() == [4]


def _entropy_with_plain_exp(lr: torch.Tensor) -> torch.Tensor:
    """patch_entropy's definition with torch's exp on every term (subnormal and underflowed
    ones included): what the CPU path, which drops terms below fp32's normal range, must equal."""
    from gdq_engine.policy.entropy import BINS, GRAY, SIGMA

    gray = (lr.float() * torch.tensor(GRAY).view(1, 3, 1, 1)).sum(1).flatten(1)
    centres = torch.linspace(0, 1, BINS)
    hist = torch.zeros(lr.shape[0], BINS)
    for chunk in gray.split(4096, dim=1):
        hist += torch.exp(-((chunk.unsqueeze(-1) - centres) ** 2) / (2 * SIGMA**2)).sum(1)
    p = hist / hist.sum(1, keepdim=True).clamp_min(1e-12)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(1)


def test_patch_entropy_on_cpu_equals_the_plain_exp_definition():
    """The CPU path drops the soft histogram's terms below 1.2e-38 (vectorised exp is slow on
    them): the entropies are bit-identical to the definition on every 48x48 patch (40-pixel steps)
    of the Set5 and CSet14 images at x1, x2 and x4 (bicubic), on flat patches at every 8-bit value,
    two-level patches, and 96x96 patches (three 4096-pixel chunks)."""
    from conftest import shared

    from gdq_engine.io import load_image

    g = torch.Generator().manual_seed(0)
    batches = [torch.arange(256).div(255).view(-1, 1, 1, 1).expand(256, 3, 16, 16),
               torch.where(torch.rand(256, 1, 16, 16, generator=g) < 0.5, torch.rand(256, 1, 1, 1, generator=g),
                           torch.rand(256, 1, 1, 1, generator=g)).expand(256, 3, 16, 16),
               random_image(96, 96, n=8, seed=1)]
    paths = sorted(shared("val", "Set5", "HR").glob("*.png")) + sorted(shared("val", "CSet14").glob("*.png"))
    assert len(paths) >= 19
    for path in paths:
        img = load_image(path)[None]
        for s in (1, 2, 4):
            lr = img if s == 1 else F.interpolate(img, scale_factor=1 / s, mode="bicubic", antialias=True).clamp(0, 1)
            if min(lr.shape[-2:]) >= 48:
                batches.append(lr[0].unfold(1, 48, 40).unfold(2, 48, 40).permute(1, 2, 0, 3, 4).reshape(-1, 3, 48, 48))
    for batch in batches:
        assert torch.equal(patch_entropy(batch.contiguous()), _entropy_with_plain_exp(batch))


def test_grouped_equals_per_patch_and_shuffled(small_edsr):
    calib = torch.cat([random_image(16, 16, n=4, seed=5), torch.full((4, 3, 16, 16), 0.4)])
    engine = Engine(small_edsr, policy="entropy", bits=(2, 4, 8), calib=calib, device="cpu", patch_size=16,
                    stride=12, batch_size=64)
    x = _mixed_image()
    y, report = engine.upscale(x, return_report=True)
    assert len(set(report.bits)) >= 2, report.bits  # really mixed precision
    assert sum(c for _, c in report.groups) == report.patches == len(report.bits)
    assert report.fab == pytest.approx(sum(report.bits) / len(report.bits))
    one, one_report = Engine(small_edsr, policy=engine.policy, calib=calib, device="cpu", patch_size=16, stride=12,
                             batch_size=1).upscale(x, return_report=True)
    assert one_report.bits == report.bits
    # within fp32 rounding: the FP last conv may round another batch size differently on some CPUs
    # (oneDNN; seen on one without AVX512-VNNI); the grouped integer body is exact (below)
    assert (y - one).abs().max() <= 1e-6
    # Scheduler level: any order of patches gives the same per-patch results.
    feats = torch.randn(7, 16, 6, 6)
    bits = torch.tensor([8, 2, 4, 2, 8, 8, 4])
    run = lambda f, b: engine.int_body(f, b)
    out, groups = run_grouped(bits, feats, run)
    assert groups == [(2, 2), (4, 2), (8, 3)]
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    out_perm, _ = run_grouped(bits[perm], feats[perm], run)
    assert torch.equal(out_perm, out[perm])
    for i in range(7):
        assert torch.equal(run(feats[i:i + 1], int(bits[i]))[0], out[i])


def test_bit_groups_are_ascending_with_indices_in_patch_order():
    from gdq_engine.runtime.scheduler import bit_groups

    groups = [(b, idx.tolist()) for b, idx in bit_groups(torch.tensor([8, 2, 4, 2, 8, 2]), torch.device("cpu"))]
    assert groups == [(2, [1, 3, 5]), (4, [2]), (8, [0, 4])]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_integer_body_leaves_its_input_alone(small_edsr, backend):
    """The C++ backend updates the residual stream in place: never in the caller's (fp32, NHWC) tensor."""
    from gdq_engine.ops import cpu_ops

    if backend == "cpp" and not cpu_ops.available():
        pytest.skip("the C++ extension is not built")
    body = IntegerBody(prepare_blocks(small_edsr), calibrate(small_edsr, random_image(16, 16, n=4, seed=1), (8,)),
                       backend=backend)
    feat = torch.randn(2, 16, 7, 9, generator=torch.Generator().manual_seed(4)).to(memory_format=torch.channels_last)
    before = feat.clone()
    out = body(feat, 8)
    assert torch.equal(feat, before) and not torch.equal(out, feat)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_byte_containers_change_the_bytes_not_the_results(small_edsr, backend, bits, monkeypatch):
    """containers='bytes': codes narrower than 8 bits go one per byte through the 8-bit kernels;
    every output value equals the packed run's, bit for bit."""
    from gdq_engine.ops import cpu_ops
    from gdq_engine.runtime import intgraph

    if backend == "cpp" and not cpu_ops.available():
        pytest.skip("the C++ extension is not built")
    ops = intgraph._backend_module(backend)
    quants = calibrate(small_edsr, random_image(16, 16, n=4, seed=1), (bits,))
    blocks = prepare_blocks(small_edsr)
    packed = IntegerBody(blocks, quants, backend=backend)
    wide = IntegerBody(blocks, quants, backend=backend, containers="bytes")
    assert (packed.containers, wide.containers) == ("packed", "bytes")
    assert all(q.container == 8 and q.bits == bits for pair in wide.act_quants[bits] for q in pair)
    feat = torch.randn(3, 16, 9, 7, generator=torch.Generator().manual_seed(5))
    inputs = []  # (container passed to the conv, bytes per pixel of its input)
    real = ops.packed_conv3x3

    def spy(x_packed, a_bits, *args, **kwargs):
        inputs.append((a_bits, x_packed.shape[-1]))
        return real(x_packed, a_bits, *args, **kwargs)

    monkeypatch.setattr(ops, "packed_conv3x3", spy)
    want = packed(feat, bits)
    assert set(inputs) == {(container_bits(bits), 16 * container_bits(bits) // 8)}
    inputs.clear()
    assert torch.equal(wide(feat, bits), want)
    assert set(inputs) == {(8, 16)} and len(inputs) == 2 * len(blocks)
    with pytest.raises(ValueError, match="unknown containers"):
        IntegerBody(blocks, quants, containers="nibbles")


@pytest.mark.parametrize("bits,containers", [(4, "bytes"), (7, "bytes"), (8, "bytes"), (4, "packed")])
def test_backends_preferring_signed_bytes_read_narrow_unsigned_codes_as_signed(small_edsr, bits, containers,
                                                                               monkeypatch):
    """``ops.SIGNED_BYTES_FASTER`` (Triton): conv2's unsigned mid codes of at most 7 bits, one per
    byte, go in as signed codes (the same bytes); 8-bit codes and packed containers stay unsigned.
    The results do not change. Checked on the reference backend with the flag set."""
    from gdq_engine.runtime import intgraph

    ops = intgraph._backend_module("reference")
    blocks = prepare_blocks(small_edsr)
    body = IntegerBody(blocks, calibrate(small_edsr, random_image(16, 16, n=4, seed=1), (bits,)),
                       containers=containers)
    feat = torch.randn(3, 16, 9, 7, generator=torch.Generator().manual_seed(6))
    want = body(feat, bits)
    signedness = []  # (conv, a_signed) per call
    real = ops.packed_conv3x3

    def spy(x_packed, a_bits, a_signed, *args, **kwargs):
        signedness.append(("conv2" if kwargs.get("residual") is not None else "conv1", a_signed))
        return real(x_packed, a_bits, a_signed, *args, **kwargs)

    monkeypatch.setattr(ops, "packed_conv3x3", spy)
    monkeypatch.setattr(ops, "SIGNED_BYTES_FASTER", True, raising=False)
    assert torch.equal(body(feat, bits), want)
    as_signed = containers == "bytes" and bits <= 7
    assert sorted(set(signedness)) == [("conv1", True), ("conv2", as_signed)]
    assert len(signedness) == 2 * len(blocks)
    q_mid = body.act_quants[bits][0][1]
    monkeypatch.delattr(ops, "SIGNED_BYTES_FASTER")
    assert intgraph.reads_signed(ops, q_mid) is False  # other backends: as the quantizer says


def test_graph_batch_buckets_pad_by_at_most_a_third():
    from gdq_engine.runtime.graphs import graph_batch

    buckets = [graph_batch(n) for n in range(1, 257)]
    assert sorted(set(buckets)) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert all(n <= b and (b - n) * 3 <= b for n, b in zip(range(1, 257), buckets))
    assert buckets == sorted(buckets)
    with pytest.raises(ValueError, match="at least one patch"):
        graph_batch(0)


def test_zero_padding_patches_leave_the_real_patches_unchanged(small_edsr):
    """What the CUDA-graph buckets rely on: a padded batch's first n outputs are the unpadded ones."""
    body = IntegerBody(prepare_blocks(small_edsr), calibrate(small_edsr, random_image(16, 16, n=4, seed=1), (4,)))
    feats = torch.randn(5, 16, 7, 9, generator=torch.Generator().manual_seed(3))
    padded = torch.cat([feats, torch.zeros(1, 16, 7, 9)])
    assert torch.equal(body(padded, 4)[:5], body(feats, 4))


@pytest.mark.parametrize("fill", ["random", "extreme"])
def test_int_conv_exact_full_width(fill):
    """64 channels (K = 576), 8-bit unsigned codes: the fp32 fast path must stay exact, borders too."""
    g = torch.Generator().manual_seed(11)
    if fill == "extreme":
        codes = torch.full((1, 7, 9, 64), 255)
        w = torch.full((64, 64, 3, 3), 127, dtype=torch.int8)
        w[::2] = -127
    else:
        codes = torch.randint(0, 256, (2, 13, 11, 64), generator=g)
        w = torch.randint(-127, 128, (64, 64, 3, 3), generator=g, dtype=torch.int8)
    assert torch.equal(reference.conv3x3_int(codes, w).long(), _naive_conv(codes, w))
