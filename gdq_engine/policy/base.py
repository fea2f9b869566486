"""The BitPolicy interface: one activation bit-width per LR patch (layer-invariant)."""

from __future__ import annotations

import torch


class BitPolicy:
    """Assigns each patch one bit-width from :attr:`bits`.

    ``assign(lr, head_feat)`` gets the (P,3,h,w) LR patches in [0,1] and their FP head features
    (P,F,h,w) and returns a (P,) int64 tensor of bit-widths. Deterministic at inference.
    """

    name = "policy"
    bits: tuple[int, ...] = ()

    def assign(self, lr: torch.Tensor, head_feat: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def is_fitted(self) -> bool:
        """Whether data-dependent parameters are set (policies without any are always fitted)."""
        return True

    def fit(self, lr_patches: torch.Tensor) -> BitPolicy:
        """Set data-dependent parameters (thresholds) from calibration patches; default: none."""
        return self

    def state(self) -> dict:
        """Plain-data parameters for checkpoints."""
        return {"name": self.name, "bits": list(self.bits)}
