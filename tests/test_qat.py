"""Quantization-aware training (gdq_engine/train/qat.py, fakebody.py) on a tiny model and images
the tests write: the fake-quant model is the integer engine's float twin, runs resume exactly, the
result is a working quantized checkpoint, and GBC, steps and weights all learn."""

import json

import pytest
import torch
from conftest import qat_config, random_image, write_training_images

from gdq_engine import Engine, load_quantized, quantize
from gdq_engine.models import EDSR
from gdq_engine.models.checkpoints import save_checkpoint
from gdq_engine.policy import CADyQ, GranularDQ, Static
from gdq_engine.train.fakebody import fake_quantize_weight
from gdq_engine.train.qat import QATConfig, QATModel, attention_transfer, bit_penalty, train_qat, warm_start


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder of 4 HR images (smooth and textured) and a tiny trained-looking EDSR x2 checkpoint."""
    root = tmp_path_factory.mktemp("qat")
    write_training_images(root / "images")
    torch.manual_seed(0)
    model = EDSR(scale=2, n_feats=8, n_blocks=2)
    save_checkpoint(model, root / "tiny.pt")
    return root


def config(workdir, **kw) -> QATConfig:
    return qat_config(str(workdir / "tiny.pt"), str(workdir / "images"), **kw)


def test_fake_quantize_weight_matches_engine_codes_and_passes_gradients():
    from gdq_engine.quant.quantizer import quantize_weight

    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    for bits in (8, 4, 2):
        codes, scale = quantize_weight(w, bits)
        assert torch.equal(fake_quantize_weight(w, bits), codes.float() * scale.view(-1, 1, 1, 1))
    fake_quantize_weight(w, 4).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through inside the clamp (max |w| maps to qmax)


def test_fake_quant_model_is_the_integer_engines_twin(workdir):
    q = quantize(str(workdir / "tiny.pt"), GranularDQ((2, 4, 8), (2, 4, 8), channels=8),
                 calib=str(workdir / "images"), calib_patch=16, backend="reference")
    net = QATModel(q).eval()
    x = random_image(16, 16, n=6, seed=9)
    with torch.no_grad():
        fake, bits = net(x, training=False)
    exported = net.export(backend="reference")
    real, real_bits = exported(x, return_bits=True)
    assert torch.equal(bits.long(), real_bits)  # same GBC argmax + E2B per patch
    # Codes agree except where a value sits on a rounding boundary (float conv vs exact integer sums).
    assert (fake - real).abs().mean() < 1e-4 and (fake - real).abs().max() < 0.05


def test_granular_qat_learns_and_exports_a_working_checkpoint(workdir, tmp_path):
    cfg = config(workdir)
    out = train_qat(cfg, tmp_path / "g.pt", progress=False, log=lambda *_: None)
    q = load_quantized(out)
    assert isinstance(q.policy, GranularDQ) and q.policy.trained and q.policy.gbc_bits == (2, 4, 8)
    start = quantize(cfg.model, GranularDQ((2, 4, 8), (2, 4, 8), channels=8), calib=cfg.calib, calib_patch=16)
    assert not torch.equal(q.act_scales, start.act_scales)  # LSQ steps moved
    assert not torch.equal(q.fp.body[0].conv1.weight, start.fp.body[0].conv1.weight)  # weights trained
    assert not torch.equal(q.policy.gbc.fc.weight, start.policy.gbc.fc.weight)  # GBC trained
    log = json.loads((tmp_path / "g.log.json").read_text())
    assert [r["step"] for r in log["train"]] == [1, 2, 3, 4] and all(r["l1"] > 0 for r in log["train"])
    hr, report = Engine(out, patch_size=16, stride=14).upscale(random_image(30, 34), return_report=True)
    assert hr.shape == (3, 60, 68) and set(report.bits) <= {2, 4, 8}


def test_bit_penalty_is_a_mean_or_a_hinge_above_the_target():
    bits = torch.tensor([2.0, 4.0, 8.0, 8.0], requires_grad=True)
    assert bit_penalty(bits, None).item() == 5.5
    assert bit_penalty(bits, 5.0).item() == 0.5
    assert bit_penalty(bits, 6.0).item() == 0.0
    assert bit_penalty(bits, 6.0, exact=True).item() == 0.5  # below the target: pushed up too
    assert bit_penalty(bits, 5.0, exact=True).item() == 0.5
    bit_penalty(bits, 6.0).backward()
    assert torch.equal(bits.grad, torch.zeros(4))  # under budget: no pull towards fewer bits
    bits.grad = None
    bit_penalty(bits, 6.0, exact=True).backward()
    assert torch.equal(bits.grad, torch.full((4,), -0.25))  # exact budget: under it, a push to more bits


def test_attention_transfer_is_zero_for_equal_maps_and_scale_invariant():
    f = [torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)]
    assert attention_transfer(f, [3 * t for t in f]).item() < 1e-10  # maps are normalised
    g = [torch.randn(2, 8, 6, 6) for _ in f]
    assert attention_transfer(f, g).item() > 1e-3


def test_cadyq_fake_quant_model_is_the_integer_engines_twin(workdir):
    """Per-layer selectors (driven by hand to mix widths): the exported integer model picks the same
    bits per layer and gives the same outputs as the float training model."""
    policy = CADyQ((2, 4, 8), channels=8, n_layers=4)
    q = quantize(str(workdir / "tiny.pt"), policy, calib=str(workdir / "images"), calib_patch=16, backend="reference")
    net = QATModel(q).eval()
    with torch.no_grad():
        for i, sel in enumerate(net.selectors):
            sel.weight[2, -2] = 0.05 if i % 2 else -0.05  # Sobel x feature: textured patches differ per layer
            sel.bias.copy_(torch.tensor([0.0, 3.0, 0.0]))
    x = torch.cat([torch.full((2, 3, 16, 16), 0.4), random_image(16, 16, n=4, seed=5)])
    with torch.no_grad():
        fake, bits = net(x, training=False)
    assert len(set(bits.tolist())) > 1  # the selectors really mix widths
    exported = net.export(backend="reference")
    real, real_bits = exported(x, return_bits=True)
    assert torch.allclose(bits, real_bits.float())
    assert (fake - real).abs().mean() < 1e-4 and (fake - real).abs().max() < 0.05


def test_cadyq_qat_trains_selectors_with_growing_penalty_and_distillation(workdir, tmp_path):
    cfg = config(workdir, method="cadyq", bits=(2, 4, 8), bit_weight=1e-2, bit_ramp=3, at_weight=1.0)
    out = train_qat(cfg, tmp_path / "c.pt", progress=False, log=lambda *_: None)
    q = load_quantized(out)
    assert isinstance(q.policy, CADyQ) and q.policy.trained and q.policy.bits == (2, 4, 8)
    start = QATModel(quantize(cfg.model, CADyQ((2, 4, 8), channels=8, n_layers=4), calib=cfg.calib,
                              calib_patch=16))
    assert not torch.equal(q.policy.selectors[0].weight, start.selectors[0].weight)  # selectors trained
    log = json.loads((tmp_path / "c.log.json").read_text())
    assert all(r["at"] > 0 for r in log["train"]) and all(2 <= r["fab"] <= 8 for r in log["train"])
    hr, report = Engine(out, patch_size=16, stride=14).upscale(random_image(30, 34), return_report=True)
    assert hr.shape == (3, 60, 68) and 2 <= report.fab <= 8


def test_resumed_run_equals_uninterrupted_run(workdir, tmp_path):
    cfg = config(workdir, iters=4, bit_weight=1e-3)
    straight = load_quantized(train_qat(cfg, tmp_path / "a.pt", progress=False, log=lambda *_: None))
    assert train_qat(cfg, tmp_path / "b.pt", progress=False, log=lambda *_: None, stop_at=2) is None
    assert (tmp_path / "b.state.pt").exists() and not (tmp_path / "b.pt").exists()
    resumed = load_quantized(train_qat(cfg, tmp_path / "b.pt", progress=False, log=lambda *_: None))
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), k
    assert straight.policy.thresholds == resumed.policy.thresholds


def test_static_qat_w4a4(workdir, tmp_path):
    out = train_qat(config(workdir, method="static", bits=(4,), w_bits=4, iters=2), tmp_path / "s.pt",
                    progress=False, log=lambda *_: None)
    q = load_quantized(out)
    assert isinstance(q.policy, Static) and q.policy.bits == (4,) and q.w_bits == 4
    assert q(random_image(16, 16, n=1)).shape == (1, 3, 32, 32)


def test_warm_start_from_another_quantized_checkpoint(workdir, tmp_path):
    """--init: a {4,6,8} run starts from a {2,4,8} run's weights and its 4- and 8-bit steps."""
    from gdq_engine.models.checkpoints import CheckpointError

    src = load_quantized(train_qat(config(workdir, iters=2), tmp_path / "src.pt", progress=False,
                                   log=lambda *_: None))
    cfg = config(workdir, bits=(4, 6, 8), e2b_bits=(4, 5, 8))
    fresh = quantize(cfg.model, GranularDQ((4, 6, 8), (4, 5, 8), channels=8), calib=cfg.calib, calib_patch=16)
    warm = quantize(cfg.model, GranularDQ((4, 6, 8), (4, 5, 8), channels=8), calib=cfg.calib, calib_patch=16)
    assert warm_start(warm, tmp_path / "src.pt") == [4, 8]
    for name, tensor in src.fp.state_dict().items():
        assert torch.equal(warm.fp.state_dict()[name], tensor)
    own, theirs = warm.act_bits.tolist(), src.act_bits.tolist()
    for b in (4, 8):
        assert torch.equal(warm.act_scales[own.index(b)], src.act_scales[theirs.index(b)])
    for b in (5, 6):  # not in the source: the calibrated steps stay
        assert torch.equal(warm.act_scales[own.index(b)], fresh.act_scales[own.index(b)])
    out = train_qat(config(workdir, bits=(4, 6, 8), e2b_bits=(4, 5, 8), iters=1, init=str(tmp_path / "src.pt")),
                    tmp_path / "warm.pt", progress=False, log=lambda *_: None)
    assert load_quantized(out).policy.gbc_bits == (4, 6, 8)
    other = EDSR(scale=2, n_feats=16, n_blocks=2)
    save_checkpoint(other, tmp_path / "other.pt")
    wrong = quantize(str(tmp_path / "other.pt"), "static", bits=8, calib=cfg.calib, calib_patch=16)
    with pytest.raises(CheckpointError, match="not the edsr"):
        warm_start(wrong, tmp_path / "src.pt")
    w4 = quantize(cfg.model, "static", bits=8, calib=cfg.calib, calib_patch=16, w_bits=4)
    with pytest.raises(ValueError, match="8-bit weights"):
        warm_start(w4, tmp_path / "src.pt")


def test_bad_qat_configs_raise(workdir, tmp_path):
    with pytest.raises(ValueError, match="unknown QAT method"):
        train_qat(config(workdir, method="pams"), tmp_path / "x.pt", progress=False)
    with pytest.raises(ValueError, match="three widths"):
        train_qat(config(workdir, method="cadyq", bits=(4, 8)), tmp_path / "x.pt", progress=False)
    with pytest.raises(ValueError, match="three GBC widths"):
        train_qat(config(workdir, bits=(4, 8)), tmp_path / "x.pt", progress=False)
    with pytest.raises(ValueError, match="one activation width"):
        train_qat(config(workdir, method="static", bits=(4, 8)), tmp_path / "x.pt", progress=False)


def test_cli_train_granular(workdir, tmp_path):
    from gdq_engine.cli import main

    out = tmp_path / "cli.pt"
    args = ["train", "--method", "granular", "--model", str(workdir / "tiny.pt"), "--calib", str(workdir / "images"),
            "--data", str(workdir / "images"), "--val", "", "--iters", "2", "--batch", "2", "--patch", "16",
            "--bits", "2,4,8", "--out", str(out)]
    assert main(args) == 2 and not out.exists()  # default --calib-patch 96 > these 32-pixel LR images: clear error
    assert main(args + ["--calib-patch", "16"]) == 0
    q = load_quantized(out)
    assert q.policy.trained and "--method granular" in json.loads(out.with_suffix(".log.json").read_text())["command"]
    assert main(["train", "--method", "granular", "--bits", "2,x", "--out", str(tmp_path / "y.pt")]) == 2


def test_depth_versions_dqa(workdir, tmp_path):
    """QuantSR's DQA: one run trains depth versions 1 and 2 of the 2-block model with per-block
    residual weights; depth d is exactly the model cut after its first d blocks, the float twin
    agrees with the integer model at every depth, and depths survive checkpoints, Engine and CLI."""
    from gdq_engine import QuantizedSR, save_quantized
    from gdq_engine.cli import main

    out = train_qat(config(workdir, method="static", bits=(4,), depths=(2, 1), iters=6), tmp_path / "d.pt",
                    progress=False, log=lambda *_: None)
    q = load_quantized(out)
    assert q.depths == (1, 2) and q.depth == 2
    betas = [blk.res_scale for blk in q.fp.body]
    assert all(b != 1.0 for b in betas)  # beta trained (starts at the model's res_scale, 1)
    x = random_image(16, 16, n=3, seed=3)
    full = q(x)
    shallow = q.set_depth(1)(x)
    assert not torch.equal(full, shallow)
    # Depth 1 = the same model with only its first block, bit for bit.
    cut = load_quantized(out)
    cut.fp.body = torch.nn.ModuleList(list(cut.fp.body)[:1])
    quants = {b: pairs[:1] for b, pairs in cut.act_quants().items()}
    assert torch.equal(QuantizedSR(cut.fp, cut.policy, quants, w_bits=cut.w_bits)(x), shallow)
    # The float training model is the integer model's twin at each depth.
    start = quantize(str(workdir / "tiny.pt"), Static(4), calib=str(workdir / "images"), calib_patch=16)
    net = QATModel(start, depths=(1, 2)).eval()
    with torch.no_grad():
        net.body.res_scales.copy_(torch.tensor([0.7, 1.3]))
        for d in (1, 2):
            fake, _ = net(x, training=False, depth=d)
            real = net.export(backend="reference").set_depth(d)(x)
            assert (fake - real).abs().mean() < 1e-4 and (fake - real).abs().max() < 0.05
    with pytest.raises(ValueError, match="trained for depths"):
        q.set_depth(3)
    # Checkpoints keep the depth versions, the chosen depth and the betas.
    save_quantized(q, tmp_path / "d1.pt")
    again = load_quantized(tmp_path / "d1.pt")
    assert again.depths == (1, 2) and again.depth == 1 and [b.res_scale for b in again.fp.body] == betas
    assert torch.equal(again(x), shallow)
    eng = Engine(out, patch_size=16, stride=14, depth=1)
    assert eng.depth == 1 and "depth=1" in repr(eng)
    hr, report = eng.upscale(x[:1], return_report=True)
    # within fp32 rounding: the FP convs may round another batch size or memory layout differently
    # on some CPUs (oneDNN; seen on one without AVX512-VNNI); the integer body is exact either way
    assert (hr[0] - shallow[0].clamp(0, 1)).abs().max() <= 1e-6
    full_report = Engine(out, patch_size=16, stride=14).upscale(x[:1], return_report=True)[1]
    q_macs = 2 * 2 * 16 * 16 * 8 * 8 * 9  # 2 blocks x 2 convs x 16x16 pixels x 8x8 channels x 3x3
    assert full_report.bitops - report.bitops == q_macs // 2 * 8 * 4  # one block less at W8A4
    with pytest.raises(ValueError, match="trained for depths"):
        Engine(out, depth=5)
    with pytest.raises(ValueError, match="runs FP"):
        Engine(str(workdir / "tiny.pt"), depth=1)
    with pytest.raises(ValueError, match="depth versions must be"):
        train_qat(config(workdir, method="static", bits=(4,), depths=(0, 2)), tmp_path / "x.pt", progress=False)
    table = tmp_path / "t.json"
    assert main(["eval", "--model", str(workdir / "tiny.pt"), "--data", str(workdir / "images"), "--policies",
                 str(out), f"{out}@1", "--patch-size", "16", "--stride", "14", "--json", str(table)]) == 0
    rows = json.loads(table.read_text())
    assert [r["method"] for r in rows] == ["d.pt", "d.pt@1"] and rows[0]["psnr"] != rows[1]["psnr"]
    assert main(["eval", "--model", str(workdir / "tiny.pt"), "--data", str(workdir / "images"), "--policies",
                 f"{out}@x"]) == 2
