"""The last conv on the Triton FP kernel (kernels/fp_conv.py, runtime/lastconv.py).

An FP layer: the kernel is checked against torch's conv of the same fp16 values in float64, within
the worst-case error of summing its K = 9 * C + 1 terms in fp32 (products of fp16 values are exact
in fp32), on odd sizes (not tile multiples), batch 1 and > 1, poisoned outputs.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE, random_image
from torch import nn

tk = pytest.importorskip("gdq_engine.kernels.ops", reason="triton is a test dependency", exc_type=ImportError)

import triton  # noqa: E402

from gdq_engine.runtime.lastconv import (  # noqa: E402
    KernelConv2d,
    image_conv,
    use_kernel_last_conv,
    with_kernel_last_conv,
)

DEV = torch.device(KERNEL_DEVICE)
_seed = itertools.count(7000)


def gen():
    return torch.Generator().manual_seed(next(_seed))


def fp16_case(n, c, h, w, cout, g, bias=True):
    x = torch.randn(n, c, h, w, generator=g).half()
    wt = (torch.randn(cout, c, 3, 3, generator=g) * 0.1).half()
    b = torch.randn(cout, generator=g).half() if bias else None
    return x, wt, b


def assert_within_fp32_summation(got, x, wt, b):
    """|got - exact| <= (K + 1) * 2^-24 * sum of |terms|, K = 9 * C: the bound of summing K products
    and the bias in fp32, in any order."""
    exact = F.conv2d(x.double(), wt.double(), None if b is None else b.double(), padding=1)
    terms = F.conv2d(x.double().abs(), wt.double().abs(), None if b is None else b.double().abs(), padding=1)
    k = 9 * x.shape[1] + 1
    err = (got.double().cpu() - exact).abs()
    assert got.dtype == torch.float32 and got.shape == exact.shape
    assert bool(torch.isfinite(got).all())
    assert bool((err <= (k + 1) * 2.0**-24 * terms + 1e-30).all()), float((err - (k + 1) * 2.0**-24 * terms).max())


@pytest.mark.parametrize("n,c,h,w,cout", [(2, 64, 7, 13, 3), (1, 32, 1, 5, 16), (3, 16, 9, 33, 1),
                                          (1, 128, 6, 40, 3), (2, 64, 5, 2, 7), (1, 48, 4, 7, 3), (1, 96, 3, 9, 2)])
def test_fp_conv_matches_torch_within_fp32_summation(n, c, h, w, cout):
    g = gen()
    x, wt, b = fp16_case(n, c, h, w, cout, g, bias=cout != 7)
    pw, pb = tk.prepare_fp_weight(wt.to(DEV), None if b is None else b.to(DEV))
    out = torch.full((n, cout, h, w), float("nan"), device=DEV)  # poisoned: every element must be written
    got = tk.fp_conv3x3(x.to(DEV).permute(0, 2, 3, 1).contiguous(), pw, pb, cout, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_within_fp32_summation(got, x, wt, b)


def seam_configs() -> list:
    """The FP conv's tile configs and a 2 x 16 one (many strips and bands at small cost); in
    Triton's interpreter, which ignores warps and stages, one config per tile shape."""
    configs = [*tk.FP_TUNE_CONFIGS, triton.Config({"BLOCK_H": 2, "BLOCK_W": 16})]
    if DEV.type == "cuda":
        return configs
    per_shape = {}
    for c in configs:
        per_shape.setdefault((c.kwargs["BLOCK_H"], c.kwargs["BLOCK_W"]), c)
    return list(per_shape.values())


@pytest.mark.parametrize("config", [pytest.param(c, id=f"{c.kwargs['BLOCK_H']}x{c.kwargs['BLOCK_W']}")
                                    for c in seam_configs()])
def test_fp_conv_strips_and_bands_meet_without_seams(config):
    """Every tile config (on CPUs every tile shape) on a shape that is no multiple of its tiles:
    the rows above and below each band and the pixels beside each strip are the neighbours'
    inputs, read at the seams."""
    g = gen()
    x, wt, b = fp16_case(2, 32, 2 * config.kwargs["BLOCK_H"] + 3, config.kwargs["BLOCK_W"] + 5, 3, g)
    pw, pb = tk.prepare_fp_weight(wt.to(DEV), b.to(DEV))
    out = torch.full((2, 3, *x.shape[2:]), float("nan"), device=DEV)  # poisoned: every element must be written
    with tk.launch_options(config=config):
        got = tk.fp_conv3x3(x.to(DEV).permute(0, 2, 3, 1).contiguous(), pw, pb, 3, out=out)
    assert_within_fp32_summation(got, x, wt, b)


def test_fp_conv_is_the_conv_not_a_lookalike():
    """A wrong tap order or a transposed kernel stays within no bound: flipping the weights
    spatially changes the result far beyond the summation error."""
    g = gen()
    x, wt, b = fp16_case(1, 32, 6, 9, 3, g)
    pw, pb = tk.prepare_fp_weight(wt.flip(-1, -2).to(DEV), b.to(DEV))
    got = tk.fp_conv3x3(x.to(DEV).permute(0, 2, 3, 1).contiguous(), pw, pb, 3)
    with pytest.raises(AssertionError):
        assert_within_fp32_summation(got, x, wt, b)


def cuda_glue(y, pixel_range, mean):
    """``y / pixel_range + mean`` as torch computes it on a CUDA tensor: times the fp32 reciprocal."""
    inv = torch.tensor(1.0) / torch.tensor(pixel_range, dtype=torch.float32)
    return (y.cpu() * inv) + mean.float().cpu().view(1, -1, 1, 1)


@pytest.mark.parametrize("n,c,h,w,cout", [(2, 64, 7, 13, 3), (1, 32, 5, 9, 5)])
def test_fp_conv_output_glue_is_two_fp32_roundings_after_the_conv(n, c, h, w, cout):
    """out_scale / out_shift: each result times the factor, rounded, plus the channel's shift,
    rounded: bit for bit what the same two fp32 operations give on the plain result."""
    g = gen()
    x, wt, b = fp16_case(n, c, h, w, cout, g)
    pw, pb = tk.prepare_fp_weight(wt.to(DEV), b.to(DEV))
    nhwc = x.to(DEV).permute(0, 2, 3, 1).contiguous()
    plain = tk.fp_conv3x3(nhwc, pw, pb, cout)
    mean = torch.rand(cout, generator=g)
    out = torch.full((n, cout, h, w), float("nan"), device=DEV)
    got = tk.fp_conv3x3(nhwc, pw, pb, cout, out=out, out_scale=float(1 / torch.tensor(255.0)),
                        out_shift=mean.to(DEV))
    assert torch.equal(got.cpu(), cuda_glue(plain, 255.0, mean))
    scaled = tk.fp_conv3x3(nhwc, pw, pb, cout, out_scale=float(1 / torch.tensor(255.0)), out_shift=0 * mean.to(DEV))
    assert not torch.equal(scaled.cpu(), plain.cpu() / 255.0)  # a multiply by the reciprocal, not a division
    with pytest.raises(ValueError, match="go together"):
        tk.fp_conv3x3(nhwc, pw, pb, cout, out_scale=0.5)
    with pytest.raises(ValueError, match="out_shift must be"):
        tk.fp_conv3x3(nhwc, pw, pb, cout, out_scale=0.5, out_shift=mean[:1].to(DEV))
    with pytest.raises(ValueError, match="finite"):
        tk.fp_conv3x3(nhwc, pw, pb, cout, out_scale=float("inf"), out_shift=mean.to(DEV))


def test_kernel_conv_finishes_the_image_in_its_epilogue():
    """KernelConv2d.image: the conv then the model's output glue; on the kernel in its epilogue
    (CUDA's rounding), else the conv then ``model.denormalize_``. Only where the last conv's output
    is the network's (EDSR, not MSRResNet with its bilinear base)."""
    from gdq_engine.models import EDSR, MSRResNet

    g = gen()
    model = with_kernel_last_conv(EDSR(scale=2, n_feats=32, n_blocks=1).eval(), tk).to(DEV)
    conv = image_conv(model)
    assert conv is model.tail and image_conv(with_kernel_last_conv(MSRResNet(scale=2, n_feats=16, n_blocks=1),
                                                                   tk)) is None
    x = torch.randn(2, 32, 5, 11, generator=g).to(DEV)
    with torch.no_grad():
        assert torch.equal(conv.image(x, model), model.denormalize_(conv(x)))  # fp32: no kernel
        model.half()
        conv.kernel_on_cpu = True
        xh = x.half().contiguous(memory_format=torch.channels_last)
        got = conv.image(xh, model)
        assert got.dtype == torch.float32 and torch.equal(got.cpu(), cuda_glue(conv(xh), model.pixel_range,
                                                                                model.mean))
        assert torch.equal(conv.image(xh, model), got)  # the glue's constants are kept, and give the same
        conv.fuse_output = False  # the kernel's conv, then the glue in torch
        assert torch.equal(conv.image(xh, model), model.denormalize_(conv(xh).float()))
        # torch's glue divides on a CPU and multiplies by the reciprocal on a GPU, as the epilogue
        # does (with the mean at 0, whose add would round most last-bit differences away)
        model.mean.zero_()
        unfused = conv.image(xh, model)
        conv.fuse_output = True
        assert torch.equal(conv.image(xh, model), unfused) == (DEV.type == "cuda")
        conv.fuse_output = False
        conv.use_kernel = False
        assert torch.equal(conv.image(xh, model), model.denormalize_(conv(xh).float()))


def test_fp_conv_rejects_what_it_cannot_run():
    g = gen()
    x, wt, b = fp16_case(1, 32, 4, 4, 3, g)
    pw, pb = tk.prepare_fp_weight(wt, b)
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    cases = [
        (lambda: tk.prepare_fp_weight(wt.bfloat16(), b), "fp16 weights"),
        (lambda: tk.prepare_fp_weight(wt[:, :24], b), "multiple of 16"),
        (lambda: tk.prepare_fp_weight(torch.zeros(17, 32, 3, 3).half(), None), "at most 16"),
        (lambda: tk.prepare_fp_weight(torch.zeros(3, 32, 1, 1).half(), None), "3x3"),
        (lambda: tk.fp_conv3x3(nhwc.float(), pw, pb, 3), "fp16 tensor"),
        (lambda: tk.fp_conv3x3(x.permute(0, 2, 3, 1), pw, pb, 3), "contiguous"),
        (lambda: tk.fp_conv3x3(nhwc[..., :16].contiguous(), pw, pb, 3), "from prepare_fp_weight for 16 input"),
        (lambda: tk.fp_conv3x3(nhwc, pw, pb, 5), "for 32 input and 5 output"),
        (lambda: tk.fp_conv3x3(nhwc, pw, pb.half(), 3), "bias must be"),
        (lambda: tk.fp_conv3x3(nhwc, pw, pb, 17), "1 to 16 output channels"),
        (lambda: tk.fp_conv3x3(nhwc, pw, pb, 3, out=torch.empty(1, 3, 4, 5)), "out must be"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_kernel_conv_module_runs_the_kernel_on_fp16_channels_last_and_is_a_plain_conv_otherwise(monkeypatch):
    g = gen()
    conv = nn.Conv2d(32, 3, 3, padding=1).to(DEV)
    module = KernelConv2d(conv, tk)
    assert module.state_dict().keys() == conv.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), conv.state_dict().values()))
    x = torch.randn(2, 32, 5, 11, generator=g).to(DEV)
    assert not module.uses_kernel(x) and torch.equal(module(x), conv(x))  # fp32: nn.Conv2d's own forward
    module.half()
    module.kernel_on_cpu = True  # on a CPU, Triton's interpreter
    xh = x.half().contiguous(memory_format=torch.channels_last)
    assert module.uses_kernel(xh) and not module.uses_kernel(x.half())  # NCHW fp16: torch
    prepared = []
    real = tk.prepare_fp_weight
    monkeypatch.setattr(tk, "prepare_fp_weight", lambda *a: prepared.append(1) or real(*a))
    y = module(xh)
    assert y.is_contiguous() and len(prepared) == 1
    assert_within_fp32_summation(y, xh.cpu(), module.weight.detach().cpu(), module.bias.detach().cpu())
    module(xh)
    assert len(prepared) == 1  # operands prepared once per weight storage
    with torch.no_grad():
        module.weight.mul_(-1)  # an in-place update re-prepares them
    assert_within_fp32_summation(module(xh), xh.cpu(), module.weight.detach().cpu(), module.bias.detach().cpu())
    assert len(prepared) == 2
    module.use_kernel = False
    assert not module.uses_kernel(xh)


def test_last_conv_swap_copies_or_changes_in_place_and_keeps_the_mac_count():
    from gdq_engine.models import EDSR, MSRResNet
    from gdq_engine.ops import reference
    from gdq_engine.runtime.cost import conv_macs

    edsr = EDSR(scale=2, n_feats=16, n_blocks=1).eval()
    swapped = with_kernel_last_conv(edsr, tk)
    assert isinstance(swapped.tail, KernelConv2d) and type(edsr.tail) is nn.Conv2d  # a copy
    assert conv_macs(swapped, 8, 8) == conv_macs(edsr, 8, 8)
    x = random_image(8, 8, n=1)
    assert torch.equal(swapped(x), edsr(x))  # fp32 on the CPU: nn.Conv2d's own forward
    assert with_kernel_last_conv(edsr, reference) is edsr  # no FP kernel on that backend
    assert with_kernel_last_conv(swapped, tk) is swapped  # already swapped
    srresnet = MSRResNet(scale=2, n_feats=16, n_blocks=1)
    assert with_kernel_last_conv(srresnet, tk, in_place=True) is srresnet
    assert isinstance(srresnet.tail[-1], KernelConv2d)
    assert use_kernel_last_conv(srresnet, False) == 1 and not srresnet.tail[-1].use_kernel
    wide = EDSR(scale=2, n_feats=20, n_blocks=1)  # 20 input channels: not a multiple of 16
    assert with_kernel_last_conv(wide, tk) is wide


def test_engine_swaps_the_last_conv_on_the_triton_backend_only():
    from gdq_engine import Engine
    from gdq_engine.models import EDSR

    model = EDSR(scale=2, n_feats=16, n_blocks=1).eval()
    kw = dict(policy="static", bits=8, calib=random_image(16, 16, n=2), device=KERNEL_DEVICE, patch_size=8,
              stride=8)
    fast, slow = Engine(model, backend="triton", **kw), Engine(model, backend="reference", **kw)
    assert isinstance(fast.model.tail, KernelConv2d) and type(slow.model.tail) is nn.Conv2d
    assert type(model.tail) is nn.Conv2d  # the engine swaps its own copy, never the caller's model
    x = random_image(12, 10, n=1).to(DEV)
    assert torch.equal(fast.upscale(x), slow.upscale(x))  # fp32: the kernel does not run


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel runs in the engine on CUDA fp16 only")
def test_engine_fp16_last_conv_kernel_is_close_to_cudnn_and_graphs_replay_it():
    """Static a8 with the x4 integer tail, fp16 FP layers: the whole network as one CUDA graph with
    the kernel's last conv (eager, capture, replay give the same bits), within fp16 rounding of
    the same engine with cuDNN's last conv."""
    from gdq_engine import Engine
    from gdq_engine.models import EDSR

    torch.manual_seed(0)
    model = EDSR(scale=4, n_feats=64, n_blocks=2).eval()
    kw = dict(policy="static", bits=8, tail_bits=8, calib=random_image(24, 24, n=8, seed=3), patch_size=16,
              stride=14, device="cuda", dtype=torch.float16, backend="triton")
    fast, cudnn = Engine(model, **kw), Engine(model, **kw)
    assert use_kernel_last_conv(cudnn.model, False) == 1
    lr = random_image(37, 29, n=1, seed=4).cuda()
    outs = [fast.upscale(lr) for _ in range(3)]
    assert fast.model.tail.uses_kernel(torch.zeros(1, 64, 4, 4, device="cuda", dtype=torch.float16,
                                                   ).contiguous(memory_format=torch.channels_last))
    assert all(torch.equal(o, outs[0]) for o in outs) and fast.network_graphs.keys()
    diff = (outs[0] - cudnn.upscale(lr)).abs().max().item()
    assert diff < 2e-3, diff  # cuDNN rounds the last conv's output to fp16 (about 1e-3 of a pixel value)
    # the output glue in the kernel's epilogue gives what denormalize_ gives on the GPU, bit for bit
    feats = torch.randn(2, 64, 24, 20, device="cuda").half().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.equal(fast.model.tail.image(feats, fast.model), fast.model.denormalize_(fast.model.tail(feats)))
