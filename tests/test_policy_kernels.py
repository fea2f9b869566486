"""The policy stage's Triton kernels (kernels/policy_stage.py) against their pure-torch references:
patch entropies and the GBC's pooled moments, on fresh random inputs, odd shapes and strides
(Triton's interpreter on a CPU, compiled on a GPU), and the policies' use of them."""

import pytest
import torch
from conftest import KERNEL_DEVICE, random_image

from gdq_engine.ops.triton_ops import kernel_ops
from gdq_engine.policy import GBC, EntropyOnly, GranularDQ, patch_entropy
from gdq_engine.policy.entropy import BINS, GRAY, SIGMA

ops = kernel_ops()


def _images(p: int, h: int, w: int, seed: int) -> torch.Tensor:
    """(p, 3, h, w) patches in [0, 1]: random ones, a flat one, a two-level one, a smooth ramp."""
    x = random_image(h, w, n=p, seed=seed)
    if p >= 4:
        x[1] = 0.5
        x[2, :, : h // 2] = 0.1
        x[2, :, h // 2:] = 0.9
        x[3] = torch.linspace(0, 1, w).expand(3, h, w)
    return x


@pytest.mark.parametrize("p,h,w", [(1, 8, 8), (5, 9, 13), (4, 17, 40), (2, 37, 45)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_patch_entropy_kernel_matches_the_reference(p, h, w, layout):
    """fp32 rounding apart (entropies up to ln 32 = 3.47 nats): odd sides (a last block of pixels
    part-masked), one run of pixels per patch and two (1665 pixels: 1024 per program), one patch
    and several, flat and two-level patches, any strides."""
    x = _images(p, h, w, seed=h * w + p)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = _images(p, h, 2 * w, seed=h * w + p)[..., ::2]
    want = patch_entropy(x, kernel=False)
    got = patch_entropy(x.to(KERNEL_DEVICE), kernel=True).cpu()
    assert got.dtype == torch.float32 and got.shape == (p,)
    assert torch.allclose(got, want, rtol=0, atol=2e-5), (got - want).abs().max()
    if p >= 4:
        assert got[1] < got[2] < got[0]  # flat: a few neighbouring bins; two levels: twice that; noise: all


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_patch_entropy_kernel_reads_half_images(dtype):
    x = _images(4, 12, 20, seed=7).to(dtype)
    got = patch_entropy(x.to(KERNEL_DEVICE), kernel=True).cpu()
    assert torch.allclose(got, patch_entropy(x, kernel=False), rtol=0, atol=2e-5)


def test_patch_entropy_kernel_errors():
    with pytest.raises(ValueError, match=r"\(P,3,h,w\)"):
        ops.patch_entropy(torch.rand(2, 4, 8, 8), GRAY, SIGMA, BINS)
    with pytest.raises(ValueError, match="floating-point"):
        ops.patch_entropy(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), GRAY, SIGMA, BINS)
    with pytest.raises(ValueError, match="power of two"):
        ops.patch_entropy(torch.rand(2, 3, 8, 8), GRAY, SIGMA, 30)
    assert ops.patch_entropy(torch.rand(0, 3, 8, 8, device=KERNEL_DEVICE), GRAY, SIGMA, BINS).shape == (0,)


def _features(p: int, f: int, h: int, w: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Head-conv-like features: channel offsets and scales, a flat channel."""
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(p, f, h, w, generator=g) * torch.rand(1, f, 1, 1, generator=g) * 3
    feat = feat + torch.randn(1, f, 1, 1, generator=g) * 5
    feat[:, min(3, f - 1)] = 2.5
    return feat.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p,f,h,w", [(1, 8, 4, 4), (3, 24, 12, 20), (2, 80, 24, 52)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pooled_moments_kernel_matches_the_reference(dtype, p, f, h, w, channels_last):
    """The kernel's means and mean squares of the three views equal float64 ones of the views
    avg_pool2d makes (pools in the features' dtype) to fp32 rounding: one tile and many (the last
    run of tiles part-masked: 15 and 78 tiles against 32 per program), channels past one block
    (80 > 64) and fewer than one. (The float64 oracle rather than torch's fp32 path: on a CPU,
    torch's bf16 channels_last norms are off by 1.5e-5 of their size here, the kernel by 1e-7.)"""
    import torch.nn.functional as F

    feat = _features(p, f, h, w, dtype, seed=p * f + h)
    if channels_last:
        feat = feat.contiguous(memory_format=torch.channels_last)
    views = [feat, F.avg_pool2d(feat, 2), F.avg_pool2d(feat, 4)]
    want = [torch.stack([v.double().mean((2, 3)) for v in views]),
            torch.stack([v.double().square().mean((2, 3)) for v in views])]
    got = GBC.moments(feat.to(KERNEL_DEVICE), kernel=True)
    for g, e in zip(got, want):
        g = g.cpu()
        assert g.dtype == torch.float32 and g.shape == (3, p, f)
        # fp32 sums of up to 1248 values of up to about 40 (squares: 1600), in any order
        assert torch.allclose(g.double(), e, rtol=0, atol=1e-6 * float(e.abs().max())), (g - e).abs().max()
    torch_path = GBC.moments(feat, kernel=False)  # the reference path, held to fp32 rounding too
    assert torch.allclose(torch_path[0].double(), want[0], rtol=0, atol=1e-6 * float(want[0].abs().max()))


def test_pooled_moments_kernel_errors():
    with pytest.raises(ValueError, match="multiples of 4"):
        ops.pooled_moments(torch.randn(2, 8, 8, 10))
    with pytest.raises(ValueError, match=r"\(P, F, h, w\)"):
        ops.pooled_moments(torch.randn(8, 8, 8))
    with pytest.raises(ValueError, match="floating-point"):
        ops.pooled_moments(torch.zeros(1, 8, 8, 8, dtype=torch.int32))


def test_gbc_descriptor_with_the_kernel_matches_groupnorm_and_pooling():
    """The descriptor from the kernel's moments equals the GroupNorm + pooling one (fp16 features
    like the network's head, channels_last) to the rounding the torch moments path is held to."""
    torch.manual_seed(1)
    gbc = GBC(16, 3)
    with torch.no_grad():
        for norm in gbc.norms:
            norm.weight.normal_()
            norm.bias.normal_()
        feat = _features(7, 16, 24, 16, torch.float16, seed=2).contiguous(memory_format=torch.channels_last)
        exact = gbc.descriptor(feat, from_moments=False)
        fast = gbc.to(KERNEL_DEVICE).descriptor(feat.to(KERNEL_DEVICE), from_moments=True, kernel=True).cpu()
    assert fast.shape == exact.shape == (7, 48)
    assert torch.allclose(fast, exact, rtol=0, atol=1e-5 * max(float(exact.abs().max()), 1.0))


def test_policies_take_the_kernels_where_they_run_by_default(monkeypatch):
    """Where Triton runs by default (CUDA; on a CPU made to look like it), the policies' device
    stages use the kernels: their results equal the torch stages' to fp32 rounding, the codes and
    bit-widths agree, and the torch ops the kernels replace do not run."""
    from torch.profiler import profile

    import gdq_engine.ops.triton_ops as triton_ops

    lr = torch.cat([torch.full((2, 3, 8, 8), 0.5), random_image(8, 8, n=6, seed=3)]).to(KERNEL_DEVICE)
    feat = _features(8, 16, 8, 8, torch.float32, seed=4).to(KERNEL_DEVICE)
    policies = [GranularDQ(channels=16).fit(lr.cpu()), EntropyOnly().fit(lr.cpu())]
    kernels = {"on": False}
    monkeypatch.setattr(triton_ops, "runs_by_default", lambda device: kernels["on"])
    with torch.no_grad():
        torch_stages = [policy.device_stage(lr, feat).cpu() for policy in policies]
        kernels["on"] = True
        with profile() as prof:
            stages = [policy.device_stage(lr, feat).cpu() for policy in policies]
            gbc_codes = policies[0].gbc.fc(policies[0].gbc.descriptor(feat, from_moments=True)).argmax(1).cpu()
    names = {e.name for e in prof.events()}
    assert not names & {"aten::avg_pool2d", "aten::exp", "aten::linalg_vector_norm"}, names
    assert torch.equal(stages[0][:, 0], torch_stages[0][:, 0]) and torch.equal(stages[0][:, 0].long(), gbc_codes)
    for got, want in zip(stages, torch_stages):
        assert torch.allclose(got, want, rtol=0, atol=2e-5)
    for policy, got, want in zip(policies, stages, torch_stages):
        assert torch.equal(policy.assign_staged(None, got), policy.assign_staged(None, want))
    # float64 images, which the kernel does not read, keep the torch path there
    assert torch.equal(patch_entropy(lr.double()), patch_entropy(lr.double(), kernel=False))
