"""EntropyOnly: training-free policy mapping patch pixel entropy to bit classes by quantiles.

Entropy is Granular-DQ's E2B measure: grayscale (0.2989, 0.5870, 0.1140) in [0,1], a Gaussian
soft histogram (sigma 0.0255) over 32 bin centres linspace(0, 1, 32), normalised, natural log.
Patches with entropy <= the ``quantiles[0]`` quantile of the calibration patches get ``bits[0]``,
<= ``quantiles[1]`` get ``bits[1]``, the rest ``bits[2]`` (flat patches need few bits).
"""

from __future__ import annotations

import torch

from ..quant.quantizer import container_bits
from ..runtime.hostreads import to_host
from .base import BitPolicy

GRAY = (0.2989, 0.5870, 0.1140)
BINS = 32
SIGMA = 0.0255


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton stage kernels read


def takes_stage_kernel(kernel: bool | None, t: torch.Tensor) -> bool:
    """Whether a policy-stage computation on ``t`` runs its Triton kernel (``kernels/policy_stage.py``):
    ``kernel`` where given, else on CUDA devices where Triton runs
    (:func:`~gdq_engine.ops.triton_ops.runs_by_default`) for the dtypes the kernels read."""
    from ..ops.triton_ops import runs_by_default

    return kernel if kernel is not None else runs_by_default(t.device) and t.dtype in KERNEL_DTYPES


def patch_entropy(lr: torch.Tensor, kernel: bool | None = None) -> torch.Tensor:
    """(P,3,h,w) images in [0,1] -> (P,) float32 soft-histogram entropy in nats.

    ``kernel``: two Triton launches (``kernels/policy_stage.py``) instead of this pure-torch
    reference; None: on CUDA devices where Triton runs (:func:`~gdq_engine.ops.triton_ops.runs_by_default`),
    for fp32, fp16 and bf16 images.
    The two differ in fp32 rounding only (summation order, exp)."""
    if lr.dim() != 4 or lr.shape[1] != 3:
        raise ValueError(f"patch_entropy expects (P,3,h,w), got {tuple(lr.shape)}")
    if takes_stage_kernel(kernel, lr):
        from ..ops.triton_ops import kernel_ops

        return kernel_ops().patch_entropy(lr, GRAY, SIGMA, BINS)
    # The weights filled in place (fill_ of a Python number) rather than made from host data
    # (torch.tensor, or item assignment): a CUDA graph can capture that.
    w = torch.empty(1, 3, 1, 1, dtype=torch.float32, device=lr.device)
    for i, weight in enumerate(GRAY):
        w[0, i].fill_(weight)
    gray = (lr.float() * w).sum(1).flatten(1)  # (P, h*w)
    centres = torch.linspace(0, 1, BINS, device=lr.device)
    hist = torch.zeros(lr.shape[0], BINS, device=lr.device)
    for chunk in gray.split(4096, dim=1):  # bounded memory for big patches
        hist += _gauss(-((chunk.unsqueeze(-1) - centres) ** 2) / (2 * SIGMA**2)).sum(1)
    p = hist / hist.sum(1, keepdim=True).clamp_min(1e-12)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(1)


# exp of arguments below this is under fp32's smallest normal number (1.18e-38 = exp(-87.34))
NORMAL_EXP_MIN = -87.0


def _gauss(arg: torch.Tensor) -> torch.Tensor:
    """``exp(arg)`` of the soft histogram's (P, n, BINS) arguments (all <= 0). On a CPU, arguments
    below ``NORMAL_EXP_MIN`` give 0 rather than a subnormal number or an underflowed 0: there,
    vectorised exp takes a slow path for a whole vector when one lane underflows, and a pixel's
    bins more than 0.34 away (most of them) underflow (``pytest benchmarks/ --benchmark-only -k
    entropy`` times it). A dropped term is below 1.2e-38, while each pixel adds more than 0.8 to
    its nearest bin, so the entropies stay the same: bit for bit on the validation images' patches
    and on flat and two-level patches (tests/test_quant.py). On GPUs exp has no such path: plain
    exp."""
    if arg.device.type != "cpu":
        return arg.exp()
    live = arg > NORMAL_EXP_MIN
    return torch.where(live, arg, 0.0).exp_().mul_(live)


def three_bit_widths(bits, who: str) -> tuple[int, int, int]:
    """Check and return three ascending code widths (each 2..8) of a three-class policy."""
    bits = tuple(int(b) for b in bits)
    if len(bits) != 3 or list(bits) != sorted(bits):
        raise ValueError(f"{who} needs three ascending bit-widths, got {bits}")
    for b in bits:
        container_bits(b)
    return bits


def entropy_quantiles(lr: torch.Tensor, quantiles) -> tuple[float, ...]:
    """The ``quantiles`` of the patches' entropies ((P,3,h,w) images in [0,1])."""
    h = patch_entropy(lr)
    return tuple(float(torch.quantile(h, q)) for q in quantiles)


class EntropyOnly(BitPolicy):
    """Entropy quantile thresholds -> ``bits`` (ascending, three classes)."""

    name = "entropy"

    def __init__(self, bits: tuple[int, int, int] = (2, 4, 8), quantiles: tuple[float, float] = (0.5, 0.9),
                 thresholds: tuple[float, float] | None = None):
        bits = three_bit_widths(bits, "EntropyOnly")
        if not 0 < quantiles[0] <= quantiles[1] < 1:
            raise ValueError(f"quantiles must satisfy 0 < q1 <= q2 < 1, got {quantiles}")
        self.bits, self.quantiles = bits, tuple(quantiles)
        self.thresholds = tuple(thresholds) if thresholds is not None else None

    @property
    def is_fitted(self) -> bool:
        return self.thresholds is not None

    def fit(self, lr_patches: torch.Tensor) -> EntropyOnly:
        self.thresholds = entropy_quantiles(lr_patches, self.quantiles)
        return self

    def assign(self, lr: torch.Tensor, head_feat: torch.Tensor) -> torch.Tensor:
        return self.assign_staged(lr, to_host(self.device_stage(lr, head_feat)))

    def device_stage(self, lr: torch.Tensor, head_feat: torch.Tensor | None) -> torch.Tensor:
        """(P,) float32 patch entropies (:func:`patch_entropy`) of the (P,3,h,w) patches in [0,1]."""
        if self.thresholds is None:
            raise RuntimeError("EntropyOnly has no thresholds: call fit() on calibration patches first")
        return patch_entropy(lr)

    def assign_staged(self, lr: torch.Tensor | None, stage: torch.Tensor) -> torch.Tensor:
        """(P,) int64 bit-widths from the (P,) entropies of :meth:`device_stage`, by the thresholds
        (``lr`` is not read: the entropies say all)."""
        if self.thresholds is None:
            raise RuntimeError("EntropyOnly has no thresholds: call fit() on calibration patches first")
        h = to_host(stage)
        t1, t2 = self.thresholds
        out = torch.full((h.shape[0],), self.bits[2], dtype=torch.int64)
        out[h <= t2] = self.bits[1]
        out[h <= t1] = self.bits[0]
        return out

    def state(self) -> dict:
        return {**super().state(), "quantiles": list(self.quantiles), "thresholds": list(self.thresholds or [])}
