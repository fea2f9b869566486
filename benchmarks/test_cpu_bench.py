"""pytest-benchmark suite on CPU: ``pytest benchmarks/ --benchmark-only`` (any session, no GPU).

The latency.py cases at CPU scale: EDSR-baseline x4 on one 96x96 LR patch through the Engine
(fp32, bf16 channels_last, static a8/a4 and EntropyOnly on the auto backend, static a8 with the
integer tail (fp32 and bf16 FP layers), static a8 on the reference backend), and one 64->64 conv
of the C++ kernel (best path and VNNI) against torch fp32 and bf16 channels_last, and Granular-DQ's
GBC descriptor on a 1080p frame's head features (its two paths). Not part of the test
suite (``testpaths = ["tests"]``); results are pytest-benchmark's own tables and JSON
(``--benchmark-json``).
"""

from pathlib import Path

import pytest
import torch

from gdq_engine import Engine, load_model

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT.parent / "shared" / "data" / "train"


@pytest.fixture(scope="module")
def lr():
    return torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def calib():
    from gdq_engine.quantized import calibration_patches

    return calibration_patches(CALIB, 4, 96)


CASES = {
    "fp32": dict(policy="fp"),
    "bf16-CL": dict(policy="fp", dtype=torch.bfloat16),
    "static-a8": dict(policy="static", bits=8),
    "static-a4": dict(policy="static", bits=4),
    "entropy-248": dict(policy="entropy", bits=(2, 4, 8)),
    "static-a8-tail8": dict(policy="static", bits=8, tail_bits=8),
    "static-a8-tail8-bf16": dict(policy="static", bits=8, tail_bits=8, dtype=torch.bfloat16),
    "static-a8-reference": dict(policy="static", bits=8, backend="reference"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_edsr_x4_one_patch(benchmark, case, lr, calib):
    kw = dict(CASES[case])
    if kw["policy"] != "fp":
        kw["calib"] = calib
    engine = Engine(load_model("edsr-baseline-x4"), device="cpu", **kw)
    with torch.inference_mode():
        out = benchmark.pedantic(engine.upscale, args=(lr,), rounds=5, warmup_rounds=1)
    assert out.shape == (1, 3, 384, 384)


@pytest.mark.parametrize("impl", ["cpp-a8", "cpp-a8-vnni", "torch-fp32-CL", "torch-bf16-CL"])
def test_conv_64(benchmark, impl):
    from gdq_engine.ops import cpu_ops
    from gdq_engine.quant.packing import pack_codes

    g = torch.Generator().manual_seed(0)
    if impl.startswith("cpp"):  # the best path of this CPU (AMX where present), or VNNI
        if not cpu_ops.available():
            pytest.skip("gdq_engine._C not built")
        xp = pack_codes(torch.randint(-128, 128, (4, 96, 96, 64), generator=g), 8)
        w = cpu_ops.prepare_conv_weight(torch.randint(-127, 128, (64, 64, 3, 3), generator=g).to(torch.int8))
        m, b = torch.rand(64) * 1e-3, torch.zeros(64)
        out = torch.empty(4, 96, 96, 64)  # a reused output, as the integer body's workspaces are
        benchmark.pedantic(cpu_ops.packed_conv3x3, args=(xp, 8, True, w, m, b),
                           kwargs=dict(allow_amx=impl == "cpp-a8", out=out), rounds=20, warmup_rounds=2)
    else:
        dtype = torch.bfloat16 if "bf16" in impl else torch.float32
        conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last, dtype=dtype)
        x = torch.randn(4, 64, 96, 96, generator=g).to(memory_format=torch.channels_last, dtype=dtype)
        with torch.no_grad():
            benchmark.pedantic(conv, args=(x,), rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("path", ["moments", "groupnorm"])
def test_gbc_descriptor_1080p_batch(benchmark, path):
    """Granular-DQ's GBC descriptor on the head features of a 1080p x4 frame's 18 patches
    (18 x 64 x 96 x 96, fp32 channels_last): from per-channel moments (CUDA inference's path)
    against GroupNorm + pooling (the CPU's and training's)."""
    from gdq_engine.policy import GBC

    gbc = GBC(64, 3)
    feat = torch.randn(18, 64, 96, 96, generator=torch.Generator().manual_seed(0)).to(
        memory_format=torch.channels_last)
    with torch.no_grad():
        out = benchmark.pedantic(gbc.descriptor, args=(feat,), kwargs=dict(from_moments=path == "moments"),
                                 rounds=5, warmup_rounds=1)
    assert out.shape == (18, 192)


@pytest.mark.parametrize("exp", ["normal-range", "plain"])
def test_patch_entropy_cpu_batch(benchmark, exp, monkeypatch):
    """EntropyOnly's and E2B's patch entropy on a CPU batch of four 96x96 LR patches: the soft
    histogram's exp with the terms below fp32's normal range dropped (patch_entropy on a CPU)
    against plain exp, whose vectorised CPU code is slow on underflowing lanes."""
    from gdq_engine.policy import entropy

    if exp == "plain":
        monkeypatch.setattr(entropy, "_gauss", torch.exp)
    lr = torch.rand(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    out = benchmark.pedantic(entropy.patch_entropy, args=(lr,), rounds=10, warmup_rounds=1)
    assert out.shape == (4,)
