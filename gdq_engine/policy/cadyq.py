"""CADyQ's bit policy: a selector before every quantized conv, per patch **and** per layer.

PAPERS.md (CADyQ): the selector of layer l reads the patch's mean absolute Sobel gradient of the
grayscale LR (x and y, x 1e3) and the per-channel standard deviation of the layer's FP input
(C values), and maps them with one Linear(C + 2 -> 3) to logits over ``bits`` (paper {4, 6, 8}).
Inference: argmax. Training: a softmax mixture of the three quantizers' outputs with a
straight-through argmax (:meth:`CADyQ.choice`). Because bits change from layer to layer, the
integer body regroups the patches before every conv (:meth:`IntegerBody.run_layerwise`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import BitPolicy
from .entropy import GRAY, three_bit_widths

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_features(lr: torch.Tensor) -> torch.Tensor:
    """(P,3,h,w) images in [0,1] -> (P,2) mean |Sobel x|, |Sobel y| of the grayscale (borders
    replicated), x 1e3."""
    if lr.dim() != 4 or lr.shape[1] != 3:
        raise ValueError(f"sobel_features expects (P,3,h,w), got {tuple(lr.shape)}")
    w = torch.tensor(GRAY, dtype=torch.float32, device=lr.device).view(1, 3, 1, 1)
    gray = F.pad((lr.float() * w).sum(1, keepdim=True), (1, 1, 1, 1), mode="replicate")  # flat stays 0
    kx = _SOBEL_X.to(lr.device).view(1, 1, 3, 3)
    gx = F.conv2d(gray, kx)
    gy = F.conv2d(gray, kx.transpose(-1, -2))
    return torch.stack([gx.abs().mean((1, 2, 3)), gy.abs().mean((1, 2, 3))], 1) * 1e3


class CADyQ(BitPolicy):
    """Per-layer, per-patch bit selectors (see module doc). ``n_layers`` = quantized convs
    (two per residual block). Selector weights come from CADyQ's QAT (`train --method cadyq`,
    gdq_engine/train/qat.py); a trained EDSR-baseline x4 ships as `policy="cadyq"`."""

    name = "cadyq"
    layerwise = True

    def __init__(self, bits: tuple[int, int, int] = (4, 6, 8), channels: int = 64, n_layers: int = 32,
                 selector_state: dict | None = None):
        bits = three_bit_widths(bits, "CADyQ")
        self.bits, self.channels, self.n_layers = bits, int(channels), int(n_layers)
        self.selectors = nn.ModuleList(nn.Linear(self.channels + 2, 3) for _ in range(self.n_layers))
        self.trained = selector_state is not None
        if selector_state is not None:
            self.selectors.load_state_dict(selector_state)

    def logits(self, layer: int, x: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """(P, 3) selector logits of quantized conv ``layer``: ``x`` is its FP input, NHWC
        (P, h, w, C) as the integer body holds it; ``grads`` the patches' Sobel features (P, 2)."""
        if x.dim() != 4 or x.shape[-1] != self.channels:
            raise ValueError(f"CADyQ selectors expect NHWC inputs with {self.channels} channels, got {tuple(x.shape)}")
        sel = self.selectors[layer]
        if next(sel.parameters()).device != x.device:
            self.selectors.to(x.device)
        std = x.float().flatten(1, 2).std(1)
        return sel(torch.cat([std, grads.to(x.device).float()], 1))

    def choice(self, layer: int, x: torch.Tensor, grads: torch.Tensor, training: bool = False) -> torch.Tensor:
        """(P, 3) weights over ``bits``: one-hot argmax; in training, straight-through softmax."""
        logits = self.logits(layer, x, grads)
        hard = F.one_hot(logits.argmax(1), 3).to(logits.dtype)
        if not training:
            return hard
        soft = torch.softmax(logits, 1)
        return hard + soft - soft.detach()

    def select(self, layer: int, x: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """(P,) int64 bit-widths of quantized conv ``layer`` (inference, CPU tensor)."""
        with torch.no_grad():
            idx = self.logits(layer, x, grads).argmax(1).cpu()
        return torch.tensor(self.bits, dtype=torch.int64)[idx]

    def assign(self, lr: torch.Tensor, head_feat: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CADyQ chooses bits per layer: the integer body runs it with run_layerwise()")

    def state(self) -> dict:
        return {**super().state(), "channels": self.channels, "n_layers": self.n_layers, "trained": self.trained,
                "selectors": {k: v.detach().cpu() for k, v in self.selectors.state_dict().items()}}

    @classmethod
    def from_state(cls, state: dict) -> CADyQ:
        policy = cls(tuple(state["bits"]), int(state["channels"]), int(state["n_layers"]), state["selectors"])
        policy.trained = bool(state.get("trained"))
        return policy
