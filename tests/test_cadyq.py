"""CADyQ: per-layer, per-patch bit selectors; the integer body regroups patches before every conv."""

import pytest
import torch
from conftest import random_image

from gdq_engine import Engine, load_quantized, quantize, save_quantized
from gdq_engine.models import EDSR
from gdq_engine.policy import CADyQ, sobel_features
from gdq_engine.runtime.intgraph import IntegerBody, calibrate, prepare_blocks


def small_model():
    torch.manual_seed(0)
    return EDSR(scale=2, n_feats=16, n_blocks=2).eval()


def constant_policy(index: int, bits=(2, 4, 8)) -> CADyQ:
    policy = CADyQ(bits, channels=16, n_layers=4)
    with torch.no_grad():
        for sel in policy.selectors:
            sel.weight.zero_()
            sel.bias.copy_(torch.zeros(3).index_fill(0, torch.tensor(index), 5.0))
    return policy


def test_sobel_features():
    flat = torch.full((2, 3, 10, 10), 0.3)
    ramp = torch.linspace(0, 1, 10).view(1, 1, 1, 10).expand(1, 3, 10, 10)
    f = sobel_features(torch.cat([flat, ramp]))
    assert f.shape == (3, 2) and torch.all(f[:2] == 0)
    assert f[2, 0] > 100 and f[2, 0] > f[2, 1]  # horizontal ramp: x gradient dominates, x 1e3


def test_layerwise_run_equals_patchwise_when_layers_agree():
    """Selectors that always pick 4 bits: run_layerwise == the one-bit-width body, bit for bit."""
    model = small_model()
    calib = random_image(16, 16, n=8, seed=1)
    with torch.no_grad():
        body = IntegerBody(prepare_blocks(model), calibrate(model, calib, (2, 4, 8)))
        feat = model.head(model.normalize(random_image(9, 11, n=3, seed=2)))
        grads = torch.zeros(3, 2)
        out, bits, groups = body.run_layerwise(feat, constant_policy(1), grads)
        assert torch.equal(out, body(feat, 4))
        half = IntegerBody(prepare_blocks(model), calibrate(model, calib, (2, 4, 8)),
                           stream_dtypes=(torch.bfloat16,))  # a half-precision stream, rounded the same way
        out_half, _, _ = half.run_layerwise(feat.bfloat16(), constant_policy(1), grads)
        assert out_half.dtype == torch.bfloat16 and torch.equal(out_half, half(feat.bfloat16(), 4))
        assert not torch.equal(out_half.float(), out)
    assert bits.shape == (4, 3) and bits.unique().tolist() == [4]
    assert groups == [(layer, 4, 3) for layer in range(4)]


def test_mixed_selection_regroups_per_layer_and_matches_per_patch_runs():
    """Selectors driven by the Sobel features: each patch's output equals running it alone."""
    model = small_model()
    calib = random_image(16, 16, n=8, seed=3)
    policy = CADyQ((2, 4, 8), channels=16, n_layers=4)
    with torch.no_grad():
        for i, sel in enumerate(policy.selectors):
            sel.weight.zero_()
            sel.weight[2, -2] = 1.0 if i % 2 else -1.0  # textured patches: 8 bits on odd layers, else 2
            sel.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
        body = IntegerBody(prepare_blocks(model), calibrate(model, calib, (2, 4, 8)))
        lr = torch.cat([torch.full((1, 3, 8, 8), 0.5), random_image(8, 8, n=2, seed=4)])
        grads = sobel_features(lr)
        feat = model.head(model.normalize(lr))
        out, bits, groups = body.run_layerwise(feat, policy, grads)
        assert len({tuple(b.tolist()) for b in bits}) > 1  # bits change from layer to layer
        for p in range(3):
            alone, _, _ = body.run_layerwise(feat[p:p + 1], policy, grads[p:p + 1])
            assert torch.equal(out[p:p + 1], alone)
    assert sum(n for _, _, n in groups) == 4 * 3  # every patch runs every layer once
    wide = IntegerBody(prepare_blocks(model), calibrate(model, calib, (2, 4, 8)), containers="bytes")
    with torch.no_grad():
        again, again_bits, again_groups = wide.run_layerwise(feat, policy, grads)
    assert torch.equal(again, out) and torch.equal(again_bits, bits) and again_groups == groups


def test_cadyq_through_quantize_engine_and_checkpoint(tmp_path):
    model = small_model()
    calib = random_image(16, 16, n=8, seed=5)
    q = quantize(model, constant_policy(2), calib=calib)
    x = random_image(10, 12, n=2, seed=6)
    y, bits = q(x, return_bits=True)
    assert bits.tolist() == [8.0, 8.0]
    save_quantized(q, tmp_path / "c.pt")
    loaded = load_quantized(tmp_path / "c.pt")
    assert isinstance(loaded.policy, CADyQ) and torch.equal(loaded(x), y)
    engine = Engine(tmp_path / "c.pt", device="cpu", patch_size=8, stride=6)
    _, report = engine.upscale(random_image(14, 14, n=1, seed=7), return_report=True)
    assert report.fab == 8.0 and all(len(g) == 3 for g in report.groups)
    with pytest.raises(RuntimeError, match="per layer"):
        constant_policy(0).assign(x, x)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_layerwise_backends_equal_reference(backend):
    from conftest import KERNEL_DEVICE

    from gdq_engine.ops import cpu_ops

    if backend == "cpp" and not cpu_ops.available():
        pytest.skip("gdq_engine._C not built")
    device = "cpu" if backend == "cpp" else KERNEL_DEVICE
    model = small_model()
    policy = CADyQ((2, 4, 8), channels=16, n_layers=4)
    with torch.no_grad():
        for i, sel in enumerate(policy.selectors):
            sel.weight.zero_()
            sel.weight[2, -2] = 1.0 if i % 2 else -1.0
            sel.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
    kw = dict(policy=policy, calib=random_image(16, 16, n=8, seed=8), patch_size=8, stride=6, device=device)
    lr = torch.cat([torch.full((1, 3, 13, 11), 0.5), random_image(13, 11, n=1, seed=9)]).to(device)
    fast, rep = Engine(model, backend=backend, **kw).upscale(lr, return_report=True)
    slow = Engine(model, backend="reference", **kw).upscale(lr)
    assert torch.equal(fast.cpu(), slow.cpu()) and len({g[1] for g in rep.groups}) > 1
