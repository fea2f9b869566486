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

    def device_stage(self, lr: torch.Tensor, head_feat: torch.Tensor) -> torch.Tensor | None:
        """The part of :meth:`assign` that runs where the patches are, with no host read: a (P, ...)
        float32 tensor in which each patch's row depends on that patch alone, turned into
        bit-widths by :meth:`assign_staged` on the host. None (the default): the policy has no
        such stage, and only :meth:`assign` is called.

        With one, the Engine on CUDA captures the FP head and this stage in one CUDA graph, so a
        batch's policy costs one replay and one host read instead of dozens of eager launches."""
        return None

    def assign_staged(self, lr: torch.Tensor | None, stage: torch.Tensor
                      ) -> torch.Tensor:  # pragma: no cover - interface
        """(P,) int64 bit-widths on the CPU from :meth:`device_stage`'s result, copied to the CPU.
        ``lr``: the patches, or None where the caller has none at hand (an image graph's stage,
        :mod:`~gdq_engine.runtime.imagegraph`): the stage must say all."""
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
