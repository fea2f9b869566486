"""Post-training calibration of activation scales (2DQuant's DOBI bound search).

For every quantizer, DOBI tries ``candidates`` clipping bounds and keeps the one with the smallest
``||x - Q(x)||^2`` on calibration activations. Our quantizers are symmetric (no zero point, so the
integer kernels stay zero-point free): signed codes search the bound ``u`` of ``|x|``
(two-sided distributions), unsigned codes the upper bound of post-ReLU values (one-sided).
"""

from __future__ import annotations

import torch

from .quantizer import ActQuant, code_range, fake_quantize


def dobi_scale(samples: torch.Tensor, bits: int, signed: bool, candidates: int = 100,
               max_samples: int = 200_000, seed: int = 0) -> float:
    """Scale of a ``bits``-bit quantizer minimising the MSE on ``samples`` (any shape, float).

    Bounds tried: ``u_k = max|x| * k / candidates`` for k = 1..candidates; ``scale = u / hi``.
    """
    x = samples.detach().flatten().to(torch.float32)
    if x.numel() == 0 or not torch.isfinite(x).all():
        raise ValueError("calibration samples must be non-empty and finite")
    if x.numel() > max_samples:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randint(x.numel(), (max_samples,), generator=g)]
    _, hi = code_range(bits, signed)
    top = float(x.abs().max()) if signed else float(x.clamp_min(0).max())
    if top == 0.0:
        return 1.0
    best, best_err = top / hi, float("inf")
    for k in range(1, candidates + 1):
        scale = top * k / candidates / hi
        err = float(((fake_quantize(x, ActQuant(bits, signed, scale)) - x) ** 2).sum())
        if err < best_err:
            best, best_err = scale, err
    return best
