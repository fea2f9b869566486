"""Granular-DQ policy: GBC (three granularities, Gumbel straight-through / argmax), E2B, ATC."""

import pytest
import torch
from conftest import KERNEL_DEVICE, random_image

from gdq_engine import Engine, load_quantized, quantize, save_quantized
from gdq_engine.models import EDSR
from gdq_engine.policy import GBC, GranularDQ, patch_entropy


def force_gbc(policy: GranularDQ, code_index: int) -> GranularDQ:
    """Make GBC choose ``code_index`` for every patch (zero weights, one large bias)."""
    with torch.no_grad():
        policy.gbc.fc.weight.zero_()
        policy.gbc.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0]).index_fill(0, torch.tensor(code_index), 10.0))
    return policy


def test_gbc_shapes_and_granularities():
    torch.manual_seed(0)
    gbc = GBC(16, 3)
    feat = torch.randn(5, 16, 12, 8)
    assert gbc(feat).shape == (5, 3)
    assert gbc.fc.in_features == 48  # three GroupNorm'd granularities concatenated
    with pytest.raises(ValueError, match="at least 4x4"):
        gbc(torch.randn(1, 16, 3, 8))
    # The three granularities are not identical (GroupNorm statistics differ per pooling level).
    views = [feat, torch.nn.functional.avg_pool2d(feat, 2), torch.nn.functional.avg_pool2d(feat, 4)]
    pooled = [torch.nn.functional.adaptive_avg_pool2d(n(v), (3, 2)).mean((2, 3)) for n, v in zip(gbc.norms, views)]
    assert not torch.allclose(pooled[0], pooled[2])


def _gbc_with_affine(channels: int, seed: int) -> GBC:
    torch.manual_seed(seed)
    gbc = GBC(channels, 3)
    with torch.no_grad():
        for norm in gbc.norms:
            norm.weight.normal_()
            norm.bias.normal_()
    return gbc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gbc_descriptor_from_moments_matches_groupnorm_and_pooling(dtype):
    """The descriptor from per-channel moments (CUDA inference's path, patch sides multiples of 4)
    equals the GroupNorm + adaptive-pool one to fp32 rounding, on features with channel offsets and
    scales like a head conv's (a flat channel and a constant group included: their variance is
    the spread of the channel means, or zero)."""
    gbc = _gbc_with_affine(16, 1)
    g = torch.Generator().manual_seed(2)
    feat = torch.randn(7, 16, 24, 16, generator=g) * torch.rand(1, 16, 1, 1, generator=g) * 3
    feat = feat + torch.randn(1, 16, 1, 1, generator=g) * 5
    feat[:, 3] = 2.5  # a flat channel
    feat[1, :4] = 0.75  # a constant group in one patch: variance 0, GroupNorm's eps decides
    feat = feat.to(dtype).contiguous(memory_format=torch.channels_last).to(KERNEL_DEVICE)  # CUDA in GPU sessions
    gbc = gbc.to(KERNEL_DEVICE)
    with torch.no_grad():
        fast, exact = gbc.descriptor(feat, from_moments=True), gbc.descriptor(feat, from_moments=False)
    fast, exact = fast.cpu(), exact.cpu()
    assert fast.dtype == exact.dtype == torch.float32 and fast.shape == exact.shape == (7, 48)
    # fp32 rounding of sums of up to 384 values (either order: the CPU's or the GPU's reductions)
    # of results up to `scale`; in the constant group, (x - mu) is rounding noise of a few ulps of
    # 0.75 that rstd = eps^-1/2 amplifies, in either path
    tol = torch.full_like(exact, 1e-5 * max(exact.abs().amax().item(), 1.0))
    gamma = torch.cat([n.weight.detach().cpu() for n in gbc.norms])
    constant = [c for view in range(3) for c in range(view * 16, view * 16 + 4)]
    tol[1, constant] += 8 * 2.0**-24 * 0.75 * gbc.norms[0].eps ** -0.5 * gamma[constant].abs()
    assert bool(((fast - exact).abs() <= tol).all()), ((fast - exact).abs() - tol).max()


def test_gbc_descriptor_path_choice():
    """Auto: moments on CUDA at inference only; CPU, autograd (training) and sides that are no
    multiple of 4 take GroupNorm and pooling; moments on such sides is an error."""
    gbc = _gbc_with_affine(16, 5)
    feat = torch.randn(3, 16, 8, 12)
    with torch.no_grad():
        assert torch.equal(gbc.descriptor(feat), gbc.descriptor(feat, from_moments=False))  # CPU
        with pytest.raises(ValueError, match="multiples of 4"):
            gbc.descriptor(feat[..., :10], from_moments=True)
    if torch.cuda.is_available():
        cuda = gbc.cuda()
        with torch.no_grad():
            assert torch.equal(cuda.descriptor(feat.cuda()), cuda.descriptor(feat.cuda(), from_moments=True))
            odd = feat[..., :10].cuda()
            assert torch.equal(cuda.descriptor(odd), cuda.descriptor(odd, from_moments=False))
        assert torch.equal(cuda.descriptor(feat.cuda()).detach(), cuda.descriptor(feat.cuda(), from_moments=False))


def test_gbc_choices_agree_between_the_two_descriptor_paths():
    """The bit choices (argmax of the logits) of 200 patches' features agree between the paths."""
    gbc = _gbc_with_affine(16, 4)
    torch.manual_seed(3)
    feat = torch.randn(200, 16, 8, 8) * torch.rand(200, 16, 1, 1) + torch.randn(200, 16, 1, 1)
    with torch.no_grad():
        fast = gbc.fc(gbc.descriptor(feat, from_moments=True)).argmax(1)
        exact = gbc.fc(gbc.descriptor(feat, from_moments=False)).argmax(1)
    assert torch.equal(fast, exact)
    assert len(set(fast.tolist())) > 1  # not a degenerate all-one-class case


def test_gumbel_straight_through_is_one_hot_forward_and_differentiable():
    torch.manual_seed(0)
    policy = GranularDQ(channels=16)
    feat = torch.randn(6, 16, 8, 8)
    choice = policy.gbc_choice(feat, training=True, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(choice.sum(1), torch.ones(6)) and set(choice.detach().unique().tolist()) <= {0.0, 1.0}
    (choice * torch.tensor([4.0, 6.0, 8.0])).sum().backward()  # expected bits: gradients reach GBC
    assert policy.gbc.fc.weight.grad is not None and policy.gbc.fc.weight.grad.abs().sum() > 0
    eval_choice = policy.gbc_choice(feat)
    assert torch.equal(eval_choice, policy.gbc_choice(feat))  # deterministic argmax at inference


def test_e2b_remaps_only_top_code_patches_by_entropy():
    lr = torch.cat([torch.full((4, 3, 8, 8), 0.5), random_image(8, 8, n=4, seed=3)])  # flat, then textured
    feat = torch.randn(8, 16, 8, 8)
    policy = GranularDQ(channels=16).fit(lr)
    t1, t2 = policy.thresholds
    h = patch_entropy(lr)
    want = torch.where(h <= t1, 4, torch.where(h <= t2, 5, 8))
    assert torch.equal(force_gbc(policy, 2).assign(lr, feat), want)  # GBC -> 8: E2B decides
    assert force_gbc(policy, 0).assign(lr, feat).tolist() == [4] * 8  # GBC -> 4: E2B not consulted
    assert force_gbc(policy, 1).assign(lr, feat).tolist() == [6] * 8
    assert policy.bits == (4, 5, 6, 8)


@pytest.mark.parametrize("code", [0, 1, 2, None])
def test_device_stage_holds_gbc_codes_and_the_host_step_applies_e2b(code):
    """The split the Engine's policy graph uses: ``device_stage`` is GBC's code index and the
    pixel entropy of each patch, and ``assign_staged`` of it (without the patches) gives the bits
    the two-step rule defines (E2B's thresholds on the entropies of the top code's patches), for
    each forced code and an untrained GBC (None: mixed codes)."""
    lr = torch.cat([torch.full((4, 3, 8, 8), 0.5), random_image(8, 8, n=4, seed=3)])
    feat = torch.randn(8, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    policy = GranularDQ(channels=16).fit(lr)
    if code is not None:
        force_gbc(policy, code)
    stage = policy.device_stage(lr, feat)
    codes = policy.gbc_choice(feat).argmax(1)
    h = patch_entropy(lr)
    assert stage.dtype == torch.float32 and stage.shape == (8, 2)
    assert torch.equal(stage[:, 0].long(), codes) and torch.equal(stage[:, 1], h)
    assert torch.equal(policy.assign_staged(None, stage), policy.assign_staged(lr, stage))
    t1, t2 = policy.thresholds
    e2b = torch.where(h <= t1, 4, torch.where(h <= t2, 5, 8))
    want = torch.where(codes == 2, e2b, torch.tensor([4, 6, 8])[codes])
    assert torch.equal(policy.assign_staged(lr, stage), want)
    assert torch.equal(policy.assign(lr, feat), want)


def test_policy_device_stages_read_nothing_from_the_host_and_nothing_back():
    """What lets a CUDA graph capture the stages (GBC's codes; EntropyOnly's entropies): no tensor
    made from host data (``torch.tensor``, which patch_entropy's grey weights were) and no value
    read back (``.item()``, ``bool()``; GBC's one_hot reads on a CPU)."""
    from torch.profiler import profile

    from gdq_engine.policy import EntropyOnly

    lr = random_image(8, 8, n=4, seed=3)
    feat = torch.randn(4, 16, 8, 8)
    policies = [GranularDQ(channels=16).fit(lr), EntropyOnly().fit(lr)]
    with profile() as prof:
        for policy in policies:
            policy.device_stage(lr, feat)
        policies[0].gbc.descriptor(feat, from_moments=True)  # GBC's path on CUDA
    names = {e.name for e in prof.events()}
    assert names and not names & {"aten::lift_fresh", "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero"}


def test_atc_is_an_ema_of_batch_quantiles():
    policy = GranularDQ(channels=16, ema=0.9)
    a, b = random_image(8, 8, n=16, seed=1), random_image(8, 8, n=16, seed=2) * 0.2
    policy.adapt_thresholds(a)
    first = policy.thresholds
    policy.adapt_thresholds(b)
    hb = patch_entropy(b)
    want = tuple(0.9 * t + 0.1 * float(torch.quantile(hb, q)) for t, q in zip(first, (0.5, 0.9)))
    assert policy.thresholds == pytest.approx(want)


def test_granular_policy_through_quantize_engine_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = EDSR(scale=2, n_feats=16, n_blocks=2).eval()
    policy = force_gbc(GranularDQ(gbc_bits=(2, 4, 8), e2b_bits=(2, 4, 8), channels=16), 2)
    calib = random_image(16, 16, n=12, seed=4)
    q = quantize(model, policy, calib=calib)
    assert sorted(q.act_quants()) == [2, 4, 8]
    x = random_image(12, 12, n=4, seed=5)
    y, bits = q(x, return_bits=True)
    save_quantized(q, tmp_path / "g.pt")
    loaded = load_quantized(tmp_path / "g.pt")
    assert isinstance(loaded.policy, GranularDQ) and loaded.policy.thresholds == q.policy.thresholds
    y2, bits2 = loaded(x, return_bits=True)
    assert torch.equal(y, y2) and torch.equal(bits, bits2)
    engine = Engine(tmp_path / "g.pt", device="cpu", patch_size=8, stride=6)
    _, report = engine.upscale(random_image(20, 17, n=1, seed=6), return_report=True)
    assert set(report.bits) <= {2, 4, 8} and report.patches == len(report.bits)
    with pytest.raises(NotImplementedError, match="trained"):
        Engine(model, policy="granular", calib=calib, device="cpu")
