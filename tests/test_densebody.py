"""RDN's residual dense blocks on the integer path (runtime/densebody.py, docs/numerics.md "Dense blocks").

The body is checked bit for bit against the contract written out here with independent integer
math (segment convs as float64 convs of integer codes, the 1x1 fusion as a real 1x1 conv), on
every backend, and through quantize / checkpoints / calibration tables / the Engine.
"""

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE, random_image

from gdq_engine import Engine, load_quantized, quantize, save_quantized
from gdq_engine.models import RDN
from gdq_engine.quant.quantizer import ActQuant, quantize_weight
from gdq_engine.quant.quantizer import quantize as quantize_codes
from gdq_engine.runtime.densebody import DenseIntegerBody, has_dense_body, prepare_dense_blocks
from gdq_engine.runtime.intgraph import calibrate, has_integer_body, has_residual_body

_seed = itertools.count(7000)


def small_rdn(seed: int = 0, n_feats: int = 16, growth: int = 16, n_layers: int = 3, n_blocks: int = 2) -> RDN:
    torch.manual_seed(seed)
    return RDN(2, n_feats=n_feats, n_blocks=n_blocks, n_layers=n_layers, growth=growth).eval()


def random_quants(model: RDN, bits: int, g: torch.Generator) -> list[tuple[ActQuant, ...]]:
    """Per block: a signed input quantizer and one unsigned per dense layer, random scales."""
    n_layers = len(model.body[0].convs)
    return [tuple(ActQuant(bits, k == 0, float(torch.empty(1).uniform_(0.02, 0.3, generator=g)))
                  for k in range(1 + n_layers)) for _ in model.body]


def int_conv(codes: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 conv of NCHW integer codes with integer weights (3x3 pad 1 or 1x1), via float64."""
    pad = w.shape[-1] // 2
    return F.conv2d(codes.double(), w.double(), padding=pad).round().to(torch.int32)


def contract(model: RDN, quants, w_bits: int, x: torch.Tensor) -> torch.Tensor:
    """docs/numerics.md's dense-block contract, written out: (N,G0,H,W) fp32 -> (N, D*G0, H, W)."""
    f32 = torch.float32
    outs = []
    for block, qs in zip(model.body, quants):
        codes = [quantize_codes(x, qs[0]).to(torch.int32)]
        for i, layer in enumerate(block.convs):
            wc, s_w = quantize_weight(layer.conv.weight, w_bits)
            p, start = None, 0
            for j, c in enumerate(codes):
                acc = int_conv(c, wc[:, start:start + c.shape[1]])
                start += c.shape[1]
                term = acc.to(f32) * (torch.tensor(qs[j].scale, dtype=f32) * s_w).view(1, -1, 1, 1)
                p = term + layer.conv.bias.detach().view(1, -1, 1, 1) if p is None else p + term
            codes.append(quantize_codes(torch.relu(p), qs[i + 1]).to(torch.int32))
        wc, s_w = quantize_weight(block.fuse.weight, w_bits)
        start = 0
        for j, c in enumerate(codes):
            acc = int_conv(c, wc[:, start:start + c.shape[1]])
            start += c.shape[1]
            term = acc.to(f32) * (torch.tensor(qs[j].scale, dtype=f32) * s_w).view(1, -1, 1, 1)
            x = x + (term + block.fuse.bias.detach().view(1, -1, 1, 1)) if j == 0 else x + term
        outs.append(x)
    return torch.cat(outs, 1)


def backends():
    from gdq_engine.ops import cpu_ops

    out = ["reference"]
    if cpu_ops.available():
        out.append("cpp")
    try:
        import gdq_engine.kernels.ops  # noqa: F401

        out.append("triton")
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("bits,w_bits", [(8, 8), (4, 8), (2, 4), (8, 2)])
@pytest.mark.parametrize("n", [1, 2])
def test_the_body_is_the_contract_bit_for_bit(bits, w_bits, n):
    g = torch.Generator().manual_seed(next(_seed))
    model = small_rdn(seed=bits + n)
    quants = random_quants(model, bits, g)
    x = torch.randn(n, 16, 5, 7, generator=g) * 2  # odd H, W; codes clamp at both ends
    want = contract(model, quants, w_bits, x)
    for backend in backends():
        device = KERNEL_DEVICE if backend == "triton" else "cpu"
        for containers in ("packed", "bytes"):
            body = DenseIntegerBody(prepare_dense_blocks(model.to(device), w_bits), {bits: quants}, backend=backend,
                                    containers=containers)
            got = body(x.to(device), bits).cpu()
            assert got.shape == want.shape and got.dtype == torch.float32
            assert torch.equal(got, want), (backend, containers)
            # the fusion conv's first segment: a real 1x1 conv in C++, the reference's a centre-tap 3x3
            fuse = body._weights_for(quants[0][0].container, quants[0][1].container)[0][-1][0]
            if backend in ("cpp", "reference"):
                assert fuse.w.shape[0] == 1 if backend == "cpp" else fuse.shape[2:] == (3, 3)
        model.cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Gluon body conv takes 64-channel segments on H100/H200")
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_full_width_segments_on_the_gpu_are_the_contract(bits):
    """64-channel segments (RDN-B's): on sm_90 the Triton backend runs them on the Gluon body conv."""
    g = torch.Generator().manual_seed(next(_seed))
    model = small_rdn(seed=bits, n_feats=64, growth=64, n_layers=3)
    quants = random_quants(model, bits, g)
    x = torch.randn(3, 64, 19, 23, generator=g) * 2
    want = contract(model, quants, 8, x)
    for containers in ("packed", "bytes"):
        body = DenseIntegerBody(prepare_dense_blocks(model.cuda(), 8), {bits: quants}, backend="triton",
                                containers=containers)
        assert torch.equal(body(x.cuda(), bits).cpu(), want), containers
    model.cpu()


def kernel_ops_or_none():
    try:
        from gdq_engine.kernels import ops
    except ImportError:
        return None
    return ops


@pytest.mark.skipif(kernel_ops_or_none() is None, reason="Triton is not installed")
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("g0,growth,n_layers,shape", [(32, 32, 3, (1, 5, 7)), (64, 32, 2, (3, 4, 9)),
                                                      (32, 64, 1, (2, 1, 1))])
def test_one_launch_per_conv_gives_the_chains_bits(bits, g0, growth, n_layers, shape, monkeypatch):
    """Triton backend, codes one per byte: each conv as one dense_conv launch over all its segments
    (kernels/dense_conv.py) gives the segment chain's values and the contract's, bit for bit: 8-bit
    unsigned codes (read shifted), 4 and 2 bits (read as signed bytes), an input wider or narrower
    than the growth, odd H, W, a 1x1 image, batch 1 and 3. Every launch's outputs are poisoned first,
    so an element a launch leaves unwritten fails."""
    ops = kernel_ops_or_none()
    g = torch.Generator().manual_seed(next(_seed))
    model = small_rdn(seed=bits, n_feats=g0, growth=growth, n_layers=n_layers, n_blocks=3)
    quants = random_quants(model, bits, g)
    n, h, w = shape
    x = torch.randn(n, g0, h, w, generator=g) * 2  # codes clamp at both ends
    want = contract(model, quants, 8, x)
    blocks = prepare_dense_blocks(model.to(KERNEL_DEVICE), 8)
    launches, real = [], ops.dense_conv

    def poisoned(codes, weight, mult, bias, out, **kw):
        out.fill_(0xA5 if out.dtype == torch.uint8 else float("nan"))
        if kw.get("next_codes") is not None:
            kw["next_codes"].fill_(0x5A)
        launches.append((weight.segments, weight.taps))
        return real(codes, weight, mult, bias, out, **kw)

    monkeypatch.setattr(ops, "dense_conv", poisoned)
    fused = DenseIntegerBody(blocks, {bits: quants}, backend="triton", containers="bytes", fused=True)
    chain = DenseIntegerBody(blocks, {bits: quants}, backend="triton", containers="bytes", fused=False)
    assert fused.runs_fused(torch.device(KERNEL_DEVICE)) and not chain.runs_fused(torch.device(KERNEL_DEVICE))
    got = fused(x.to(KERNEL_DEVICE), bits).cpu()
    per_block = [(i + 1, 9) for i in range(n_layers)] + [(n_layers + 1, 1)]
    assert launches == per_block * 3  # one launch per conv: C layers of 1..C segments, the 1x1 fusion of C + 1
    assert torch.equal(got, want)
    assert torch.equal(chain(x.to(KERNEL_DEVICE), bits).cpu(), want)
    assert len(launches) == 3 * len(per_block)  # the chain launches no dense conv
    model.cpu()


@pytest.mark.skipif(kernel_ops_or_none() is None, reason="Triton is not installed")
def test_dense_conv_refuses_what_it_cannot_run():
    ops = kernel_ops_or_none()
    dev = torch.device(KERNEL_DEVICE)
    w = ops.prepare_dense_weight([torch.ones(32, 32, 3, 3, dtype=torch.int8)] * 2)
    assert (w.c0, w.cg, w.segments, w.taps, w.cout) == (32, 32, 2, 9, 32) and w.w.stride() == (1, 9 * 64)
    codes = torch.zeros(1, 4, 4, 96, dtype=torch.uint8, device=dev)
    mult, bias = torch.ones(2, 32, device=dev), torch.zeros(32, device=dev)
    q8 = ActQuant(8, False, 0.1)
    for call, message in (
            (lambda: ops.dense_conv(codes[..., :48], w, mult, bias, codes[..., 64:]), "need 64 bytes per pixel"),
            (lambda: ops.dense_conv(codes, w, mult[:1], bias, codes[..., 64:], out_quant=q8), "mult must be (2, 32)"),
            (lambda: ops.dense_conv(codes, w, mult, bias, codes[..., 64:], out_quant=ActQuant(4, False, 0.1)),
             "container 8"),
            (lambda: ops.dense_conv(codes, w, mult, bias, codes[..., 64:]), "must be a torch.float32"),
            (lambda: ops.dense_conv(codes, w, mult, bias, codes[..., 64:].transpose(1, 2), out_quant=q8),
             "channel slice of a contiguous NHWC tensor"),
            (lambda: ops.dense_conv(codes, w, mult, bias, codes[..., 48:], out_quant=q8), "Cout = 32 channels"),
            (lambda: ops.dense_conv(codes, w, mult, bias, codes[..., 32:64], out_quant=q8),
             "overlaps the 64 bytes a pixel the conv reads"),
            (lambda: ops.dense_conv(codes, w, mult, bias, codes[..., 64:], out_quant=q8, next_quant=q8,
                                    next_codes=codes[..., :32]), "must not share the codes' buffer"),
            (lambda: ops.prepare_dense_weight([torch.ones(32, 32, 3, 3, dtype=torch.int8),
                                               torch.ones(32, 16, 3, 3, dtype=torch.int8),
                                               torch.ones(32, 32, 3, 3, dtype=torch.int8)]), "equally wide"),
            (lambda: ops.prepare_dense_weight([torch.ones(32, 32, 5, 5, dtype=torch.int8)]), "(Cout, C, 3, 3)")):
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
    assert not ops.dense_conv_applies(24, 32, 32, dev) and not ops.dense_conv_applies(32, 32, 24, dev)


def test_a_conv_per_segment_is_not_the_same_as_one_scale():
    """The contract is really per segment: one shared scale for the concatenation gives other codes."""
    g = torch.Generator().manual_seed(1)
    model = small_rdn(seed=3)
    quants = random_quants(model, 4, g)
    x = torch.randn(2, 16, 6, 6, generator=g)
    shared = [tuple(ActQuant(4, q.signed, qs[0].scale) for q in qs) for qs in quants]
    assert not torch.equal(contract(model, quants, 8, x), contract(model, shared, 8, x))
    body = DenseIntegerBody(prepare_dense_blocks(model, 8), {4: quants})
    assert torch.equal(body(x, 4), contract(model, quants, 8, x))


def test_calibration_gives_one_signed_and_c_unsigned_scales_per_block():
    model = small_rdn(n_layers=3, n_blocks=2)
    assert has_dense_body(model) and has_integer_body(model) and not has_residual_body(model)
    quants = calibrate(model, random_image(12, 12, n=4, seed=2), (2, 8))
    for b in (2, 8):
        assert len(quants[b]) == 2
        for qs in quants[b]:
            assert [q.signed for q in qs] == [True, False, False, False] and all(q.bits == b for q in qs)
            assert all(q.scale > 0 for q in qs)
    # 2-bit codes clip more: their steps are wider than the 8-bit ones
    assert all(q2.scale > q8.scale for b2, b8 in zip(quants[2], quants[8]) for q2, q8 in zip(b2, b8))


@pytest.mark.parametrize("backend", backends())
def test_quantized_rdn_is_a_drop_in_module_on_every_backend(backend):
    model = small_rdn(seed=5)
    calib = random_image(16, 16, n=6, seed=3)
    x = random_image(9, 11, n=2, seed=4)
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    # the reference on the same device: the FP layers (cuDNN on a GPU) then compute the same values
    ref = quantize(model, "static", bits=8, calib=calib, backend="reference").to(device)
    q = quantize(model, "static", bits=8, calib=calib, backend=backend).to(device)
    y = q(x.to(device)).cpu()
    assert y.shape == (2, 3, 18, 22)
    assert torch.equal(y, ref(x.to(device)).cpu())
    with torch.no_grad():
        fp = model(x)
    mse = float(((y - fp) ** 2).mean())
    assert 0 < mse < 1e-3 * float((fp ** 2).mean()), mse  # really quantized, and close at 8 bits
    q4 = quantize(model, "static", bits=4, calib=calib, backend="reference")
    assert float(((q4(x) - fp) ** 2).mean()) > mse  # fewer bits, further from FP


def test_entropy_policy_groups_rdn_patches_and_checkpoints_round_trip(tmp_path):
    model = small_rdn(seed=6)
    calib = torch.cat([torch.full((4, 3, 16, 16), 0.3), random_image(16, 16, n=4, seed=5)])  # flat and busy
    q = quantize(model, "entropy", bits=(2, 4, 8), calib=calib, backend="reference")
    flat = torch.full((1, 3, 10, 10), 0.5)
    x = torch.cat([flat, random_image(10, 10, n=1, seed=9)])
    y, bits = q(x, return_bits=True)
    assert bits.tolist()[0] == 2 and bits.tolist()[1] in (4, 8)
    assert tuple(q.act_scales.shape) == (3, 2, 4)  # (widths, blocks, 1 + layers)
    save_quantized(q, tmp_path / "rdn.q.pt")
    loaded = load_quantized(tmp_path / "rdn.q.pt", backend="reference")
    assert torch.equal(loaded(x), y)
    assert loaded.get_extra_state()["res_scales"] is None


def test_a_calibration_table_gives_the_same_rdn(tmp_path):
    from gdq_engine.quantized import save_calibration_table

    model = small_rdn(seed=7)
    calib = random_image(16, 16, n=6, seed=6)
    save_calibration_table(model, calib, tmp_path / "rdn.calib.pt")
    from_table = quantize(model, "static", bits=4, calib=str(tmp_path / "rdn.calib.pt"), backend="reference")
    direct = quantize(model, "static", bits=4, calib=calib, backend="reference")
    x = random_image(8, 9, n=1, seed=8)
    assert torch.equal(from_table(x), direct(x))


def test_engine_tiles_a_quantized_rdn_exactly():
    model = small_rdn(seed=8, n_layers=2)
    calib = random_image(16, 16, n=6, seed=10)
    img = random_image(23, 29, seed=11)
    margin = model.receptive_radius
    tiled = Engine(model, policy="static", bits=8, calib=calib, patch_size=12, margin=margin, backend="reference")
    whole = Engine(model, policy="static", bits=8, calib=calib, patch_size=None, backend="reference")
    a, report = tiled.upscale(img, return_report=True)
    assert report.patches > 1
    assert torch.equal(a, whole.upscale(img))
    mixed = Engine(model, policy="entropy", bits=(2, 4, 8), calib=calib, patch_size=12, margin=margin,
                   backend="reference")
    y, report = mixed.upscale(img, return_report=True)
    assert y.shape == a.shape and set(report.bits) <= {2, 4, 8}


def test_integer_tail_runs_on_rdn():
    model = small_rdn(seed=9, n_feats=32, growth=32, n_layers=2)
    calib = random_image(12, 12, n=4, seed=12)
    q = quantize(model, "static", bits=8, calib=calib, backend="reference", tail_bits=8)
    from gdq_engine.runtime.inttail import tail_conv_names

    assert tail_conv_names(model) == ["upsampler.0"]  # the body-end 3x3 has 32 outputs: it stays FP
    assert q.tail_bits == 8 and len(q.tail_scales) == 1
    x = random_image(8, 8, n=1, seed=13)
    with torch.no_grad():
        fp = model(x)
    assert float(((q(x) - fp) ** 2).mean()) < 1e-3 * float((fp ** 2).mean())


def test_what_dense_blocks_refuse_says_why():
    model = small_rdn(seed=1)
    calib = random_image(12, 12, n=4, seed=14)
    q = quantize(model, "static", bits=8, calib=calib, backend="reference")
    with pytest.raises(ValueError, match="float32"):
        q.integer_body(residual_stream="dtype")
    with pytest.raises(ValueError, match="padded"):
        q.integer_body(containers="padded")
    with pytest.raises(ValueError, match="trained for depths"):
        q.set_depth(1)
    with pytest.raises(ValueError, match="no residual scale"):
        q.set_res_scales([0.5, 0.5])
    with pytest.raises(NotImplementedError, match="CADyQ"):
        q.integer_body().run_layerwise(torch.zeros(1, 16, 4, 4), None, None)
    with pytest.raises(ValueError, match="full depth"):
        from gdq_engine.quantized import QuantizedSR

        QuantizedSR(q.fp, q.policy, q.act_quants(), depths=(1, 2))
    from gdq_engine.train.fakebody import FakeQuantBody

    with pytest.raises(NotImplementedError, match="residual-block bodies"):
        FakeQuantBody(model, q.act_quants(), 8)
    with pytest.raises(ValueError, match="signed input quantizer"):
        DenseIntegerBody(prepare_dense_blocks(model, 8), {8: [qs[:2] for qs in q.act_quants()[8]]})


def test_cli_calibrates_and_runs_an_rdn_checkpoint(tmp_path, capsys):
    from PIL import Image

    from gdq_engine.cli import main
    from gdq_engine.io import save_image
    from gdq_engine.models import save_checkpoint

    save_checkpoint(small_rdn(seed=10, n_layers=2), tmp_path / "rdn.pt")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(2):
        save_image(random_image(40, 40, seed=20 + i), calib / f"{i}.png")
    qpath = tmp_path / "rdn.q.pt"
    assert main(["calibrate", "--model", str(tmp_path / "rdn.pt"), "--policy", "static:4", "--calib", str(calib),
                 "--calib-patch", "12", "--out", str(qpath)]) == 0
    save_image(random_image(14, 18, seed=22), tmp_path / "a.png")
    assert main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model", str(qpath)]) == 0
    assert Image.open(tmp_path / "b.png").size == (36, 28)
    capsys.readouterr()
    assert main(["calibrate", "--model", str(tmp_path / "rdn.pt"), "--policy", "static:4", "--calib", str(calib),
                 "--calib-patch", "12", "--dqc-iters", "2", "--dqc-patch", "12",
                 "--out", str(tmp_path / "dqc.pt")]) == 0  # 2DQuant's DQC trains the dense blocks' scales too
    dqc = load_quantized(tmp_path / "dqc.pt")
    assert dqc.act_scales.shape == load_quantized(qpath).act_scales.shape == (1, 2, 3)


def test_train_builds_the_architecture_it_is_told(tmp_path, monkeypatch, capsys):
    """`train --arch rdn --arch-config ...` hands FP training that model; bad items and QAT are refused."""
    import gdq_engine.train.fp as fp_train
    from gdq_engine.cli import main

    seen = {}

    def fake_train_fp(cfg, out, device=None, command=None, **kw):
        seen.update(arch=cfg.arch, config=cfg.model_config, scale=cfg.scale)
        return out

    monkeypatch.setattr(fp_train, "train_fp", fake_train_fp)
    args = ["train", "--scale", "2", "--out", str(tmp_path / "m.pt")]
    assert main([*args, "--arch", "rdn", "--arch-config", "n_feats=32,n_blocks=4,n_layers=4,growth=32"]) == 0
    assert seen == {"arch": "rdn", "config": {"n_feats": 32, "n_blocks": 4, "n_layers": 4, "growth": 32}, "scale": 2}
    assert main(args) == 0 and seen["arch"] == "edsr" and seen["config"]["n_blocks"] == 16  # EDSR-baseline
    assert main([*args, "--arch", "edsr", "--arch-config", "n_feats=8,res_scale=1"]) == 0
    assert seen["config"] == {"n_feats": 8, "res_scale": 1.0} and isinstance(seen["config"]["res_scale"], float)
    capsys.readouterr()
    assert main([*args, "--arch", "rdn", "--arch-config", "width=3"]) == 2
    assert "n_layers" in capsys.readouterr().err  # says which keys exist
    assert main([*args, "--arch", "rdn", "--arch-config", "growth=big"]) == 2
    assert main([*args, "--method", "static", "--arch", "rdn"]) == 2
    assert "--model" in capsys.readouterr().err
