"""Bit-grouped scheduling: patches of one bit-width run through the body as one batch."""

from __future__ import annotations

from collections.abc import Callable

import torch


def run_grouped(bits: torch.Tensor, feats: torch.Tensor,
                run: Callable[[torch.Tensor, int], torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Run ``run(feats[idx], b)`` once per distinct bit-width ``b`` and scatter results back.

    Args:
        bits: (P,) int bit-width per patch.
        feats: (P, ...) per-patch inputs.
        run: the body at one bit-width; maps (p, ...) -> (p, ...).
    Returns:
        (outputs in the original patch order, [(bits, patch count), ...] in launch order).
    """
    if bits.shape[0] != feats.shape[0]:
        raise ValueError(f"{bits.shape[0]} bit assignments for {feats.shape[0]} patches")
    out = None
    groups = []
    for b in sorted(set(bits.tolist())):
        idx = torch.nonzero(bits == b, as_tuple=True)[0]
        y = run(feats[idx.to(feats.device)], int(b))
        if out is None:
            out = y.new_empty((feats.shape[0],) + tuple(y.shape[1:]))
        out[idx.to(y.device)] = y
        groups.append((int(b), int(idx.numel())))
    return out, groups
