"""RDN's dense blocks in training (gdq_engine/train/fakedense.py through qat.py and dqc.py), on a tiny
RDN and images the tests write: the fake-quant body is the integer dense body's float twin, QAT and
DQC train its steps and weights and export working checkpoints, and what dense blocks cannot train
is refused with a reason."""

import pytest
import torch
from conftest import qat_config, random_image, write_training_images

from gdq_engine import Engine, load_quantized, quantize
from gdq_engine.models import RDN
from gdq_engine.models.checkpoints import save_checkpoint
from gdq_engine.policy import GranularDQ
from gdq_engine.train.fakebody import FakeQuantBody, fake_quant_body
from gdq_engine.train.fakedense import FakeQuantDenseBody
from gdq_engine.train.qat import QATConfig, QATModel, block_features, train_qat, warm_start


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder of 4 HR images (smooth and textured) and a tiny RDN x2 checkpoint."""
    root = tmp_path_factory.mktemp("rdnqat")
    write_training_images(root / "images", seed=40)
    torch.manual_seed(3)
    save_checkpoint(RDN(2, n_feats=8, n_blocks=2, n_layers=2, growth=8), root / "rdn.pt")
    return root


def config(workdir, **kw) -> QATConfig:
    return qat_config(str(workdir / "rdn.pt"), str(workdir / "images"), **{"iters": 3, **kw})


def granular(workdir):
    return quantize(str(workdir / "rdn.pt"), GranularDQ((2, 4, 8), (2, 4, 8), channels=8),
                    calib=str(workdir / "images"), calib_patch=16, backend="reference")


def test_the_fake_quant_body_is_the_integer_dense_body_in_float(workdir):
    """Same quantizers and weights: the float body differs from the integer one only where a value
    sits on a rounding boundary (float convs of code * scale vs exact integer sums), far less than
    either differs from the FP blocks at 4 bits."""
    q = quantize(str(workdir / "rdn.pt"), "static", bits=4, calib=str(workdir / "images"), calib_patch=16,
                 backend="reference")
    fake = fake_quant_body(q.fp, q.act_quants(), q.w_bits)
    assert isinstance(fake, FakeQuantDenseBody)
    x = q.fp.blocks_input(q.fp.head(q.fp.normalize(random_image(14, 18, n=2, seed=5))))
    with torch.no_grad():
        got, want, fp = fake(x), q.integer_body()(x, 4), q.fp.run_blocks(x)
    assert got.shape == want.shape == fp.shape
    quant_err, twin_err = (want - fp).abs().mean(), (got - want).abs().mean()
    assert twin_err < 1e-3 * quant_err, (twin_err, quant_err)
    for b, per_block in fake.act_quants().items():  # the steps it starts from are the calibrated scales
        assert [[pytest.approx(m.scale, rel=1e-6) for m in qs] for qs in per_block] == \
               [[m.scale for m in qs] for qs in q.act_quants()[b]]
        assert all(qs[0].signed and not any(m.signed for m in qs[1:]) for qs in per_block)


def test_fake_quant_model_is_the_integer_engines_twin(workdir):
    """QATModel on RDN: the blocks run after SFENet2 as the engine runs them; same widths per patch."""
    net = QATModel(granular(workdir)).eval()
    x = random_image(16, 16, n=6, seed=9)
    with torch.no_grad():
        fake, bits = net(x, training=False)
    real, real_bits = net.export(backend="reference")(x, return_bits=True)
    assert torch.equal(bits.long(), real_bits)
    assert (fake - real).abs().mean() < 1e-4 and (fake - real).abs().max() < 0.05


def test_every_step_and_weight_gets_a_gradient(workdir):
    net = QATModel(granular(workdir)).train()
    sr, bits = net(random_image(16, 16, n=4, seed=11), training=True)
    (sr.mean() + bits.mean()).backward()
    for quants in net.body.quants:
        for quant in quants:  # one per segment; at least the widths the batch ran get a gradient
            assert any(q.step.grad is not None and q.step.grad.abs().sum() > 0 for q in quant.quants)
    for blk in net.fp.body:
        assert all(layer.conv.weight.grad.abs().sum() > 0 for layer in blk.convs)
        assert blk.fuse.weight.grad.abs().sum() > 0
    assert net.fp.body_entry.weight.grad.abs().sum() > 0  # SFENet2 is in the graph


def test_granular_qat_trains_rdn_and_exports_a_working_checkpoint(workdir, tmp_path):
    cfg = config(workdir, at_weight=1.0)  # with attention transfer on the dense blocks' outputs
    out = train_qat(cfg, tmp_path / "g.pt", progress=False, log=lambda *_: None)
    q, start = load_quantized(out), granular(workdir)
    assert isinstance(q.policy, GranularDQ) and q.policy.trained
    assert q.act_scales.shape == start.act_scales.shape == (3, 2, 3)  # widths, blocks, 1 + C
    assert not torch.equal(q.act_scales, start.act_scales)
    assert not torch.equal(q.fp.body[1].convs[1].conv.weight, start.fp.body[1].convs[1].conv.weight)
    assert not torch.equal(q.fp.body[0].fuse.weight, start.fp.body[0].fuse.weight)
    assert not torch.equal(q.policy.gbc.fc.weight, start.policy.gbc.fc.weight)
    hr, report = Engine(out, patch_size=16, stride=14).upscale(random_image(30, 34), return_report=True)
    assert hr.shape == (3, 60, 68) and set(report.bits) <= {2, 4, 8}
    # a second run warm-starts from it: weights and every shared width's steps
    again = quantize(str(workdir / "rdn.pt"), "static", bits=4, calib=str(workdir / "images"), calib_patch=16)
    assert warm_start(again, out) == [4]
    assert torch.equal(again.act_scales[0], q.act_scales[q.act_bits.tolist().index(4)])
    assert torch.equal(again.fp.body[0].fuse.weight, q.fp.body[0].fuse.weight)


def test_static_w4a4_qat_on_rdn(workdir, tmp_path):
    out = train_qat(config(workdir, method="static", bits=(4,), w_bits=4), tmp_path / "s.pt", progress=False,
                    log=lambda *_: None)
    q = load_quantized(out)
    assert q.w_bits == 4 and q.act_bits.tolist() == [4]
    assert Engine(q, patch_size=None).upscale(random_image(10, 12)).shape == (3, 20, 24)


def test_block_features_follow_the_blocks_input(workdir):
    """The distillation teacher's features: every dense block's output, after SFENet2."""
    from gdq_engine.models import load_model

    fp = load_model(str(workdir / "rdn.pt"))
    lr = random_image(12, 12, n=2, seed=3)
    feats = block_features(fp, lr)
    x = fp.blocks_input(fp.head(fp.normalize(lr)))
    assert len(feats) == 2 and torch.equal(torch.cat(feats, 1), fp.run_blocks(x))


def test_what_dense_blocks_cannot_train_says_why(workdir, tmp_path):
    with pytest.raises(NotImplementedError, match="CADyQ"):
        train_qat(config(workdir, method="cadyq"), tmp_path / "c.pt", progress=False, log=lambda *_: None)
    with pytest.raises((ValueError, NotImplementedError), match="full depth|depth versions"):
        train_qat(config(workdir, method="static", bits=(4,), depths=(1, 2)), tmp_path / "d.pt", progress=False,
                  log=lambda *_: None)
    q = granular(workdir)
    with pytest.raises(NotImplementedError, match="no residual scales"):
        fake_quant_body(q.fp, q.act_quants(), 8, learn_res_scale=True)
    with pytest.raises(NotImplementedError, match="FakeQuantDenseBody"):
        FakeQuantBody(q.fp, q.act_quants(), 8)
    body = fake_quant_body(q.fp, q.act_quants(), 8)
    x = torch.zeros(1, 8, 4, 4)
    with pytest.raises(NotImplementedError, match="depth versions"):
        body(x, torch.ones(1, 3) / 3, depth=1)
    with pytest.raises(NotImplementedError, match="CADyQ"):
        body(x, lambda layer, inp: None)
    with pytest.raises(ValueError, match="one input and one per dense layer"):
        FakeQuantDenseBody(q.fp, {8: [qs[:2] for qs in q.act_quants()[8]]}, 8)


def test_dqc_trains_rdn_scales(workdir):
    from gdq_engine.train.dqc import dqc_calibrate

    q = quantize(str(workdir / "rdn.pt"), "static", bits=4, calib=str(workdir / "images"), calib_patch=16,
                 backend="reference")
    trained, history = dqc_calibrate(q, random_image(12, 12, n=8, seed=6), iters=3, batch=4, progress=False)
    assert list(history) == [4] and len(history[4]) == 3
    assert trained.act_scales.shape == q.act_scales.shape and not torch.equal(trained.act_scales, q.act_scales)
    assert torch.equal(trained.fp.body[0].fuse.weight, q.fp.body[0].fuse.weight)  # only the scales train
    assert trained(random_image(10, 10, n=1)).shape == (1, 3, 20, 20)


def test_cli_trains_an_rdn_checkpoint(workdir, tmp_path):
    from gdq_engine.cli import main

    out = tmp_path / "cli.pt"
    assert main(["train", "--method", "granular", "--model", str(workdir / "rdn.pt"), "--calib",
                 str(workdir / "images"), "--calib-patch", "16", "--data", str(workdir / "images"), "--val", "",
                 "--iters", "2", "--batch", "2", "--patch", "16", "--bits", "2,4,8", "--out", str(out)]) == 0
    q = load_quantized(out)
    assert q.fp.arch == "rdn" and q.policy.trained
