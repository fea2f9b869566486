"""Checkpoints written here in each public layout must load to the same function."""

import pytest
import torch

from gdq_engine.models import EDSR, RDN, CheckpointError, MSRResNet, load_model, pretrained, save_checkpoint
from gdq_engine.models.common import DIV2K_RGB_MEAN


def _edsr_pytorch_state(model: EDSR) -> dict:
    """Our EDSR as EDSR-PyTorch would save it (keys written out by hand, mean-shift convs included)."""
    sd, out = model.state_dict(), {}
    n = len(model.body)
    mean = torch.tensor(DIV2K_RGB_MEAN) * 255
    out["sub_mean.weight"] = torch.eye(3).view(3, 3, 1, 1)
    out["sub_mean.bias"] = -mean
    out["add_mean.weight"] = torch.eye(3).view(3, 3, 1, 1)
    out["add_mean.bias"] = mean.clone()
    for p in ("weight", "bias"):
        out[f"head.0.{p}"] = sd[f"head.{p}"]
        for i in range(n):
            out[f"body.{i}.body.0.{p}"] = sd[f"body.{i}.conv1.{p}"]
            out[f"body.{i}.body.2.{p}"] = sd[f"body.{i}.conv2.{p}"]
        out[f"body.{n}.{p}"] = sd[f"body_tail.{p}"]
        for k in (0, 2):
            if f"upsampler.{k}.{p}" in sd:
                out[f"tail.0.{k}.{p}"] = sd[f"upsampler.{k}.{p}"]
        out[f"tail.1.{p}"] = sd[f"tail.{p}"]
    return out


def _basicsr_edsr_state(model: EDSR) -> dict:
    names = {"head": "conv_first", "body_tail": "conv_after_body", "upsampler": "upsample", "tail": "conv_last"}
    out = {}
    for k, v in model.state_dict().items():
        first, rest = k.split(".", 1)
        out[f"{names.get(first, first)}.{rest}"] = v
    return out


def _basicsr_msrresnet_state(model: MSRResNet) -> dict:
    names = {"head.0": "conv_first", "upsampler.0": "upconv1", "upsampler.3": "upconv2", "tail.0": "conv_hr",
             "tail.2": "conv_last"}
    out = {}
    for k, v in model.state_dict().items():
        mod, p = k.rsplit(".", 1)
        out[f"{names.get(mod, mod)}.{p}"] = v
    return out


def _rdn_state(model: RDN) -> dict:
    out = {}
    up_last = "UPNet.4" if model.scale == 4 else "UPNet.2"
    for k, v in model.state_dict().items():
        mod, p = k.rsplit(".", 1)
        parts = mod.split(".")
        if mod == "head":
            mod = "SFENet1"
        elif mod == "body_entry":
            mod = "SFENet2"
        elif parts[0] == "body" and parts[2] == "convs":
            mod = f"RDBs.{parts[1]}.convs.{parts[3]}.conv.0"
        elif parts[0] == "body" and parts[2] == "fuse":
            mod = f"RDBs.{parts[1]}.LFF"
        elif parts[0] == "body_tail":
            mod = f"GFF.{parts[1]}"
        elif parts[0] == "upsampler":
            mod = f"UPNet.{parts[1]}"
        elif mod == "tail":
            mod = up_last
        out[f"{mod}.{p}"] = v
    return out


def _same_function(a, b, shape=(1, 3, 9, 11)):
    x = torch.rand(shape)
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-5)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_edsr_pytorch_and_basicsr_load_to_same_function(tmp_path, scale):
    torch.manual_seed(scale)
    model = EDSR(scale, n_feats=16, n_blocks=3).eval()
    torch.save(_edsr_pytorch_state(model), tmp_path / "edsr_pytorch.pt")
    wrapped = {"params_ema": {f"module.{k}": v for k, v in _basicsr_edsr_state(model).items()},
               "params": {k: torch.zeros_like(v) for k, v in _basicsr_edsr_state(model).items()}}
    torch.save(wrapped, tmp_path / "basicsr.pth")
    a = load_model(tmp_path / "edsr_pytorch.pt")
    b = load_model(tmp_path / "basicsr.pth")
    assert a.config["n_blocks"] == 3 and a.config["n_feats"] == 16 and a.scale == scale
    assert _same_function(a, model) and _same_function(b, model)
    # Picking the other wrapper entry really reads other tensors.
    c = load_model(tmp_path / "basicsr.pth", key="params")
    assert not _same_function(c, model)


def test_edsr_large_res_scale_inferred(tmp_path):
    torch.manual_seed(0)
    model = EDSR(2, n_feats=256, n_blocks=2, res_scale=0.1).eval()
    torch.save({"state_dict": _edsr_pytorch_state(model)}, tmp_path / "large.pt")
    loaded = load_model(tmp_path / "large.pt")
    assert loaded.body[0].res_scale == 0.1
    assert _same_function(loaded, model, shape=(1, 3, 5, 5))


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_basicsr_msrresnet(tmp_path, scale):
    torch.manual_seed(0)
    model = MSRResNet(scale, n_feats=8, n_blocks=2).eval()
    torch.save({"params": _basicsr_msrresnet_state(model)}, tmp_path / "msr.pth")
    loaded = load_model(tmp_path / "msr.pth", scale=scale)
    assert isinstance(loaded, MSRResNet) and _same_function(loaded, model)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_edsr_pytorch_rdn(tmp_path, scale):
    torch.manual_seed(0)
    model = RDN(scale, n_feats=8, n_blocks=3, n_layers=2, growth=4).eval()
    torch.save(_rdn_state(model), tmp_path / "rdn.pt")
    loaded = load_model(tmp_path / "rdn.pt")
    assert isinstance(loaded, RDN)
    assert loaded.config == model.config
    assert _same_function(loaded, model)


def test_native_round_trip(tmp_path, tiny_edsr):
    save_checkpoint(tiny_edsr, tmp_path / "m.pt", meta={"note": "x"})
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.config == tiny_edsr.config and _same_function(loaded, tiny_edsr)


def test_scale_mismatch_is_an_error(tmp_path, tiny_edsr):
    save_checkpoint(tiny_edsr, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="requested scale x4 but the model is x2"):
        load_model(tmp_path / "m.pt", scale=4)


def test_bad_files(tmp_path, tiny_edsr):
    save_checkpoint(tiny_edsr, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    cases = {"truncated.pt": "truncated", "empty.pt": "empty", "text.pt": "cannot read",
             "foreign.pt": "unrecognised checkpoint layout.*foo.weight", "list.pt": "expected a dict",
             "missing.pt": "neither a checkpoint file nor a known model"}
    for name, msg in cases.items():
        with pytest.raises(CheckpointError, match=msg):
            load_model(tmp_path / name)


def test_wrong_shapes_named(tmp_path):
    model = EDSR(2, n_feats=16, n_blocks=2)
    sd = _edsr_pytorch_state(model)
    sd["body.1.body.0.weight"] = torch.zeros(16, 16, 1, 1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_model(tmp_path / "bad.pt")
    del sd["body.1.body.2.weight"]
    torch.save(sd, tmp_path / "bad2.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path / "bad2.pt")


def test_official_from_hub_cache_and_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    name = "edsr-baseline-x2-official"
    with pytest.raises(CheckpointError, match="not in the torch.hub cache"):
        load_model(name, download=False)

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError, match="cannot download .*edsr_baseline_x2-1bc95232.pt by hand"):
        load_model(name)
    assert not pretrained.official_cache_path(name).exists()
    torch.manual_seed(0)
    model = EDSR(2, n_feats=64, n_blocks=16).eval()
    path = pretrained.official_cache_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_edsr_pytorch_state(model), path)
    assert _same_function(load_model(name), model)
    from gdq_engine import Engine, from_pretrained

    assert _same_function(from_pretrained(name), model)
    engine = Engine.from_pretrained(name, device="cpu", patch_size=None)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(engine.upscale(x), model(x).clamp(0, 1), atol=1e-5)
    with pytest.raises(CheckpointError, match="unknown pretrained model"):
        from_pretrained("edsr-huge")


def test_unknown_model_lists_known():
    with pytest.raises(CheckpointError, match="edsr-baseline-x4"):
        load_model("edsr-nonexistent")


@pytest.mark.parametrize("arch, scale", [("edsr", 2), ("edsr", 4), ("msrresnet", 3), ("msrresnet", 4)])
def test_bare_state_dicts_of_the_own_modules_load(tmp_path, arch, scale):
    """``torch.save(model.state_dict())`` of a gdq_engine model from a training loop of one's own."""
    torch.manual_seed(scale)
    model = (EDSR(scale, n_feats=16, n_blocks=2) if arch == "edsr" else MSRResNet(scale, n_feats=8, n_blocks=2)).eval()
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "bare.pth")
    if arch == "edsr":
        with pytest.warns(UserWarning, match="bare EDSR state dict .* assumed res_scale=1.0"):
            loaded = load_model(tmp_path / "bare.pth")
    else:
        loaded = load_model(tmp_path / "bare.pth")
    assert type(loaded) is type(model) and loaded.config == model.config and _same_function(loaded, model)


def test_a_bare_rdn_state_dict_says_how_to_save_it(tmp_path):
    torch.save(RDN(2, n_feats=8, n_blocks=2, n_layers=2, growth=4).state_dict(), tmp_path / "rdn.pth")
    with pytest.raises(CheckpointError, match="bare state dict of gdq_engine's RDN: save it with"):
        load_model(tmp_path / "rdn.pth")
