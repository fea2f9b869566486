import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("GDQ_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Without a GPU the Triton kernels run in Triton's CPU interpreter (must be set before Triton is
# imported). With a GPU they are compiled and run there.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


def shared(*parts: str) -> Path:
    """Path under ../shared/data; the test fails (not skips) when the shared data is absent."""
    path = SHARED_DATA.joinpath(*parts)
    assert path.exists(), f"shared test data missing: {path}"
    return path


@pytest.fixture
def tiny_edsr():
    """A 1-block, 8-channel EDSR x2 with random weights: fast and exercises every part."""
    from gdq_engine.models import EDSR

    torch.manual_seed(0)
    return EDSR(scale=2, n_feats=8, n_blocks=1).eval()


@pytest.fixture
def ckpt(tmp_path, tiny_edsr):
    """:func:`tiny_edsr` saved as a gdq_engine checkpoint; its path (for ``--model``)."""
    from gdq_engine.models import save_checkpoint

    path = tmp_path / "tiny.pt"
    save_checkpoint(tiny_edsr, path)
    return str(path)


def random_image(h: int, w: int, n: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (3, h, w) if n is None else (n, 3, h, w)
    return torch.rand(shape, generator=g)


def rand_codes(shape, bits: int, signed: bool, g: torch.Generator) -> torch.Tensor:
    """Uniform random integer codes of a ``bits``-bit (signed or unsigned) quantizer, int64."""
    from gdq_engine.quant.quantizer import code_range

    lo, hi = code_range(bits, signed)
    return torch.randint(lo, hi + 1, shape, generator=g)


def weights_for_adds(kind: str, cout: int, cin: int, signed: bool, g: torch.Generator):
    """(cout, cin, 3, 3) int8 weight codes for the conversions by adds (``ops.fp32_sums_by_add``),
    and for "edge" the one 8-bit code to fill the input with: "uniform" over -127..127, whose sums
    may pass 2**22 (the float conversion then stays); "normal" (rounded N(0, 32^2), a Gaussian
    layer's per-channel codes), whose sums stay far below; "edge": channels of all +m or all -m
    codes with every input code at its extreme (-128 signed, 255 unsigned), so that the sums of
    pixels whose taps are all inside sit just below 2**22 (4,128,768 signed, 4,112,640 unsigned)."""
    if kind == "uniform":
        return rand_weights(cout, cin, 8, g), None
    if kind == "normal":
        return (torch.randn(cout, cin, 3, 3, generator=g) * 32).round().clamp(-127, 127).to(torch.int8), None
    reach, code = (128, -128) if signed else (255, 255)  # the largest |code| of a sum's terms
    m = (2**22 - 1) // (reach * 9 * cin)  # 56 signed, 28 unsigned for 64 inputs
    sign = torch.where(torch.rand(cout, generator=g) < 0.5, -1, 1)
    return (sign[:, None, None, None] * torch.full((cout, cin, 3, 3), m)).to(torch.int8), torch.tensor(code)


def rand_weights(cout: int, cin: int, w_bits: int, g: torch.Generator) -> torch.Tensor:
    """Random (cout, cin, 3, 3) int8 weight codes in the narrow symmetric ``w_bits`` range."""
    hi = (1 << (w_bits - 1)) - 1
    return torch.randint(-hi, hi + 1, (cout, cin, 3, 3), generator=g).to(torch.int8)


def qat_config(model: str, images: str, **kw):
    """A :class:`~gdq_engine.train.qat.QATConfig` for the tests' tiny models: 16-pixel crops of the
    ``images`` folder (calibration and training), no validation, 4 steps; ``kw`` overrides."""
    from gdq_engine.train.qat import QATConfig

    base = dict(model=model, calib=images, calib_patch=16, data=(images,), val=None, iters=4, batch=3, lr_patch=16,
                save_every=100, log_every=1, lr=1e-3, step_lr=1e-2, gbc_lr=1e-2)
    return QATConfig(**{**base, **kw})


def write_training_images(folder, seed: int = 0, n: int = 4) -> None:
    """``n`` 64x72 HR PNGs in ``folder`` (created), textured and smooth in turn (low-entropy
    patches for the bit controllers)."""
    import pathlib

    from gdq_engine.io import save_image

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = random_image(64, 72, seed=seed + i)
        if i % 2:  # smooth: low entropy patches
            img = torch.nn.functional.avg_pool2d(img[None], 9, stride=1, padding=4)[0]
        save_image(img, folder / f"img{i}.png")
