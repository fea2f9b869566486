"""Fitting Granular-DQ's GBC on measured per-width quality (gdq_engine/train/controller.py): the
measurement is what the integer engine does at inference, the fit picks the options that pay for
their bits, the budget search meets its FAB target, and `train --gbc-fit` refits a trained model."""

import json

import pytest
import torch
from conftest import random_image
from test_qat import config, workdir  # noqa: F401  (the module-scoped tiny model and images)

from gdq_engine import load_quantized, quantize
from gdq_engine.metrics import psnr_y
from gdq_engine.policy import GranularDQ
from gdq_engine.policy.granular import GBC
from gdq_engine.train.controller import (
    allocation,
    fit_gbc,
    fit_gbc_to_budget,
    fit_granular_controller,
    option_table,
    width_psnr,
)
from gdq_engine.train.qat import train_qat


def separable_crops(n: int = 200, seed: int = 0):
    """Descriptors whose first feature says whether a crop gains from bits: gainers get +0.5 dB at
    code 1 (6 bits: 0.25 dB per extra bit) and +0.7 dB at code 2 (8 bits: 0.175 dB per extra bit),
    the others nothing."""
    g = torch.Generator().manual_seed(seed)
    desc = torch.randn(n, 6, generator=g)
    gains = desc[:, 0] > 0
    desc[:, 0] += torch.where(gains, 1.0, -1.0)  # a margin between the two kinds of crops
    bits = torch.tensor([4.0, 6.0, 8.0], dtype=torch.float64).expand(n, 3).clone()
    psnr = torch.full((n, 3), 30.0, dtype=torch.float64)
    psnr[gains, 1] += 0.5
    psnr[gains, 2] += 0.7
    return desc, bits, psnr, gains


def test_gbc_descriptor_is_the_input_of_its_linear_layer():
    gbc = GBC(8, 3)
    feat = torch.randn(5, 8, 12, 12)
    assert torch.equal(gbc(feat), gbc.fc(gbc.descriptor(feat)))
    assert gbc.descriptor(feat).shape == (5, 24)


def test_fit_gbc_gives_bits_to_the_crops_that_pay_for_them():
    desc, bits, psnr, gains = separable_crops()
    cheap = allocation(fit_gbc(desc, bits, psnr, price=0.05), desc, bits, psnr)  # 8 bits: +0.7 dB for 0.2 dB
    assert torch.equal(cheap["code"], torch.where(gains, 2, 0))
    dear = allocation(fit_gbc(desc, bits, psnr, price=0.4), desc, bits, psnr)  # no option pays: all lowest
    assert torch.equal(dear["code"], torch.zeros_like(dear["code"]))
    assert dear["fab"] == 4.0 and dear["psnr"] == 30.0


def test_fit_gbc_to_budget_meets_the_target_and_spends_it_well():
    desc, bits, psnr, gains = separable_crops()
    share = gains.double().mean().item()
    target = 4.0 + 2 * share + 0.01  # 2 more bits for every gainer, not 4
    fc, record = fit_gbc_to_budget(desc, bits, psnr, fab_target=target)
    chosen = allocation(fc, desc, bits, psnr)
    assert chosen["fab"] <= target and record["fab"] == chosen["fab"]
    # The best use of that budget: 6 bits (the most dB per bit) for every gainer, nothing for the rest.
    assert torch.equal(chosen["code"], torch.where(gains, 1, 0))
    assert record["psnr"] == pytest.approx(30.0 + 0.5 * share)
    assert record["lowest_code"] == {"fab": 4.0, "psnr": 30.0}
    with pytest.raises(ValueError, match="below what the lowest code"):
        fit_gbc_to_budget(desc, bits, psnr, fab_target=3.0)


def test_option_table_follows_gbc_codes_and_e2b():
    from gdq_engine.policy.entropy import patch_entropy

    flat = torch.full((1, 3, 16, 16), 0.5)
    noisy = random_image(16, 16, n=1, seed=1)
    lr = torch.cat([flat, noisy])
    low, high = patch_entropy(lr).tolist()
    assert high > low + 1.0
    # The flat crop at t1 (E2B's lowest width), the noisy one above t2 (its top width).
    policy = GranularDQ((4, 6, 8), (4, 5, 8), channels=8, thresholds=(low, low + 0.5))
    widths = [4, 5, 6, 8]
    psnr = torch.tensor([[30.0, 31.0, 32.0, 33.0], [20.0, 21.0, 22.0, 23.0]], dtype=torch.float64)
    bits, option_psnr = option_table(policy, lr, psnr, widths)
    assert bits.tolist() == [[4, 6, 4], [4, 6, 8]]
    assert option_psnr.tolist() == [[30, 32, 30], [20, 22, 23]]
    with pytest.raises(ValueError, match="no measured PSNR"):
        option_table(policy, lr, psnr[:, :2], [4, 5])


def test_width_psnr_is_what_the_integer_engine_gives_at_that_width(workdir):  # noqa: F811
    cfg = config(workdir)
    q = quantize(cfg.model, GranularDQ((2, 4, 8), (2, 4, 8), channels=8), calib=cfg.calib, calib_patch=16,
                 backend="reference")
    lr = random_image(16, 16, n=5, seed=4)
    hr = random_image(32, 32, n=5, seed=5)
    measured = width_psnr(q, lr, hr, batch=2, progress=False)
    assert measured.shape == (5, 3)
    for code, width in enumerate((2, 4, 8)):  # force GBC's code: the model itself runs at that width
        with torch.no_grad():
            q.policy.gbc.fc.weight.zero_()
            q.policy.gbc.fc.bias.copy_(torch.nn.functional.one_hot(torch.tensor(code), 3) * 10.0)
        if code == 2:  # every crop's entropy above t2: E2B's top width
            q.policy.e2b.thresholds = (-2.0, -1.0)
        sr, ran = q(lr, return_bits=True)
        assert ran.tolist() == [width] * 5
        expected = psnr_y((sr.clamp(0, 1) * 255).round() / 255, hr, 2).double()
        assert torch.equal(measured[:, code], expected)


def test_train_gbc_fit_refits_a_trained_model_to_the_budget(workdir, tmp_path):  # noqa: F811
    base = train_qat(config(workdir, bits=(4, 6, 8), e2b_bits=(4, 5, 8), iters=2), tmp_path / "base.pt",
                     progress=False, log=lambda *_: None)
    cfg = config(workdir, bits=(4, 6, 8), e2b_bits=(4, 5, 8), iters=0, init=str(base), gbc_fit=24, gbc_fit_patch=16,
                 fab_target=5.0, val=str(workdir / "images"))
    out = train_qat(cfg, tmp_path / "fit.pt", progress=False, log=lambda *_: None)
    q, start = load_quantized(out), load_quantized(base)
    for name, tensor in start.fp.state_dict().items():  # weights and steps as trained: only GBC changed
        assert torch.equal(q.fp.state_dict()[name], tensor)
    assert torch.equal(q.act_scales, start.act_scales)
    assert not torch.equal(q.policy.gbc.fc.weight, start.policy.gbc.fc.weight) and q.policy.trained
    log = json.loads((tmp_path / "fit.log.json").read_text())
    record = log["gbc_fit"]
    assert record["crops"] == 24 and record["fab"] <= 5.0 and log["val"][-1]["after"] == "gbc_fit"
    # The exported GBC reproduces the fitted allocation on the same seeded crops.
    from gdq_engine.train.data import PairedPatches

    lr, _ = PairedPatches([str(workdir / "images")], 2, 16, progress=False).sample(
        24, torch.Generator().manual_seed(cfg.seed + 1))
    _, ran = q(lr, return_bits=True)
    assert ran.double().mean().item() == pytest.approx(record["fab"])
    # The same from the command line; --iters 0 is zero iterations, not the default.
    from gdq_engine.cli import main

    cli_out = tmp_path / "cli.pt"
    assert main(["train", "--method", "granular", "--bits", "4,6,8", "--e2b-bits", "4,5,8", "--model", cfg.model,
                 "--calib", cfg.calib, "--calib-patch", "16", "--data", str(workdir / "images"), "--val", "",
                 "--init", str(base), "--iters", "0", "--patch", "16", "--fab-target", "5.0", "--gbc-fit", "24",
                 "--gbc-fit-patch", "16", "--out", str(cli_out)]) == 0
    cli_log = json.loads(cli_out.with_suffix(".log.json").read_text())
    assert cli_log["train"] == [] and cli_log["gbc_fit"] == record  # same seeded crops, same fit
    with pytest.raises(ValueError, match="needs method 'granular' and fab_target"):
        train_qat(config(workdir, gbc_fit=8), tmp_path / "x.pt", progress=False)
    with pytest.raises(ValueError, match="number of crops"):
        train_qat(config(workdir, gbc_fit=-1, fab_target=4.0), tmp_path / "x.pt", progress=False)


def test_fit_granular_controller_refuses_other_policies(workdir):  # noqa: F811
    cfg = config(workdir)
    q = quantize(cfg.model, "static", bits=4, calib=cfg.calib, calib_patch=16)
    with pytest.raises(ValueError, match="needs a Granular-DQ model"):
        fit_granular_controller(q, random_image(16, 16, n=2), random_image(32, 32, n=2), 4.0, progress=False)
