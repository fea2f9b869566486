"""The FP weights shipped in the package: present, loadable, and better than bicubic on Set5."""

import pytest
import torch
from conftest import shared

from gdq_engine import Engine, load_model
from gdq_engine.evaluate import bicubic_upscaler, evaluate_folder


# Regression guards just below the measured gains (README table: x4 +2.99 dB, x2 +3.96 dB on Set5);
# the foundation issue's target is +2.0 dB at x4.
@pytest.mark.parametrize("scale,min_gain", [(4, 2.9), (2, 3.8)])
def test_shipped_model_beats_bicubic_on_set5(scale, min_gain):
    model = load_model(f"edsr-baseline-x{scale}")
    assert model.scale == scale and len(model.body) == 16 and model.config["n_feats"] == 64
    engine = Engine(model, device="cpu")  # the papers' 96/90 tiling
    ours = evaluate_folder(engine.upscale, shared("val", "Set5"), scale, progress=False)
    bicubic = evaluate_folder(bicubic_upscaler(scale), shared("val", "Set5"), scale, progress=False)
    assert ours.mean_psnr >= bicubic.mean_psnr + min_gain, (ours.mean_psnr, bicubic.mean_psnr)
    assert ours.mean_ssim > bicubic.mean_ssim


def test_shipped_checkpoint_records_its_training():
    from gdq_engine.models.pretrained import SHIPPED, WEIGHTS_DIR

    for name, file in SHIPPED.items():
        meta = torch.load(WEIGHTS_DIR / file, weights_only=True)["meta"]
        assert meta["steps"] > 0 and meta["history"]["val_psnr"], name
        assert meta["command"].startswith("python -m gdq_engine train"), name


def test_shipped_granular_model_is_the_default_for_policy_granular():
    from gdq_engine import quantize
    from gdq_engine.policy import GranularDQ
    from gdq_engine.quantized import shipped_quantized

    path = shipped_quantized("edsr-baseline-x4", "granular")
    assert path is not None and path.name == "edsr_baseline_x4.granular.pt"
    meta = torch.load(path, weights_only=True)["meta"]
    assert meta["command"].startswith("python -m gdq_engine train --method granular") and meta["steps"] > 0
    engine = Engine("edsr-baseline-x4", policy="granular", device="cpu")
    assert isinstance(engine.policy, GranularDQ) and engine.policy.trained and engine.policy.gbc_bits == (2, 4, 8)
    with pytest.raises(ValueError, match="uses bits"):
        quantize("edsr-baseline-x4", "granular", bits=(4, 6, 8))
    with pytest.raises(NotImplementedError, match="train --method granular"):
        quantize("edsr-baseline-x2", "granular")


# Guard just below the measured Set5 result of the shipped Granular-DQ {2,4,8} model (README table:
# 31.35 dB at FAB 4.00; FP 31.42); the training issue's target is within 0.1 dB of FP at FAB <= 4.0.
GRANULAR_SET5_MIN_PSNR = 31.32


def test_shipped_granular_model_quality_on_set5():
    engine = Engine("edsr-baseline-x4", policy="granular", device="cpu")
    fabs = []

    def upscale(x):
        hr, report = engine.upscale(x, return_report=True)
        fabs.extend(report.bits)
        return hr

    res = evaluate_folder(upscale, shared("val", "Set5"), 4, progress=False)
    assert res.mean_psnr >= GRANULAR_SET5_MIN_PSNR and sum(fabs) / len(fabs) <= 4.0, (res.mean_psnr, fabs)
