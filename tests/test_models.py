import pytest
import torch

from gdq_engine.models import EDSR, RDN, MSRResNet, edsr_baseline, edsr_large


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("make", [
    lambda s: EDSR(s, n_feats=8, n_blocks=2),
    lambda s: MSRResNet(s, n_feats=8, n_blocks=2),
    lambda s: RDN(s, n_feats=8, n_blocks=2, n_layers=2, growth=4),
])
def test_output_shape_and_parts(make, scale):
    model = make(scale).eval()
    x = torch.rand(2, 3, 7, 9)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3, 7 * scale, 9 * scale)
    for part in ("head", "body", "body_tail", "upsampler", "tail"):
        assert hasattr(model, part)
    assert isinstance(model.body, torch.nn.ModuleList) and len(model.body) == 2
    assert model.scale == scale


def test_forward_equals_manual_parts():
    torch.manual_seed(1)
    model = EDSR(4, n_feats=8, n_blocks=3).eval()
    x = torch.rand(1, 3, 6, 5)
    with torch.no_grad():
        xn = (x - model.mean) * 255
        h = model.head(xn)
        r = h
        for blk in model.body:
            r = r + blk.conv2(torch.relu(blk.conv1(r)))
        manual = model.tail(model.upsampler(model.body_tail(r) + h)) / 255 + model.mean
        assert torch.allclose(model(x), manual, atol=1e-5)


def test_named_configs():
    assert sum(p.numel() for p in edsr_baseline(4).parameters()) == 1_517_571
    large = edsr_large(2)
    assert large.config["n_feats"] == 256 and len(large.body) == 32 and large.body[0].res_scale == 0.1


@pytest.mark.parametrize("bad", [1, 5, 8, 2.5])
def test_unsupported_scale(bad):
    with pytest.raises(ValueError, match="unsupported scale"):
        EDSR(bad, n_feats=8, n_blocks=1)


def test_receptive_radius_bounds_dependency(tiny_edsr):
    # Perturbing one LR pixel must leave HR pixels farther than the radius untouched.
    x = torch.rand(1, 3, 40, 40)
    x2 = x.clone()
    x2[0, :, 20, 20] += 0.5
    with torch.no_grad():
        d = (tiny_edsr(x) - tiny_edsr(x2)).abs().sum(1)[0]
    r = tiny_edsr.receptive_radius
    ys, xs = torch.nonzero(d > 0, as_tuple=True)
    s = tiny_edsr.scale
    assert ys.numel() > 0
    assert (ys // s - 20).abs().max() <= r and (xs // s - 20).abs().max() <= r
