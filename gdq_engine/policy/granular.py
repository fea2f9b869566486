"""Granular-DQ's bit policy: GBC (granularity-bit controller) + E2B (entropy-to-bit) + ATC.

Patch-wise and layer-invariant (PAPERS.md, Granular-DQ):

* **GBC** reads the patch's head features (P, F, h, w) at three granularities (full resolution,
  2x2 and 4x4 average-pooled), GroupNorms each, pools them to the coarsest resolution,
  concatenates (3F channels), global-average-pools and maps the 3F vector with one Linear to
  logits over ``gbc_bits`` (paper: codes {4, 6, 8}). Training: Gumbel-softmax (tau = 1) with a
  straight-through estimator; inference: argmax (no noise, GroupNorm kept: the released code's
  test-time Gumbel noise and missing GroupNorm are not copied).
* **E2B** re-maps only the patches GBC sent to its top code, by pixel entropy: <= t1 ->
  ``e2b_bits[0]``, <= t2 -> ``e2b_bits[1]``, else ``e2b_bits[2]`` (paper: {4, 5, 8}, t1/t2 the 0.5
  and 0.9 quantiles of the training patches' entropies).
* **ATC** moves t1/t2 by an EMA (gamma = 0.9997) of each training batch's entropy quantiles,
  during the first epoch only (:meth:`GranularDQ.adapt_thresholds`).

The hardware variant uses ``gbc_bits = e2b_bits = (2, 4, 8)`` (one container per class).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.hostreads import to_host
from .base import BitPolicy
from .entropy import EntropyOnly, entropy_quantiles, patch_entropy, takes_stage_kernel, three_bit_widths


class GBC(nn.Module):
    """Granularity-bit controller: (P, F, h, w) head features -> (P, len(codes)) logits."""

    def __init__(self, channels: int = 64, n_codes: int = 3, groups: int = 4):
        super().__init__()
        if channels % groups:
            raise ValueError(f"GroupNorm needs channels ({channels}) divisible by groups ({groups})")
        self.norms = nn.ModuleList(nn.GroupNorm(groups, channels) for _ in range(3))
        self.fc = nn.Linear(3 * channels, n_codes)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.fc(self.descriptor(feat))

    def descriptor(self, feat: torch.Tensor, from_moments: bool | None = None,
                   kernel: bool | None = None) -> torch.Tensor:
        """(P, F, h, w) head features -> (P, 3F) fp32 input of the linear layer (normalised, pooled views).

        ``from_moments``: compute it from per-channel moments (:meth:`_normalized_means`; h and w
        multiples of 4) instead of GroupNorm and pooling. None: on CUDA at inference (autograd
        off) when h and w allow it, where it saves most of the GBC's time; torch's CPU GroupNorm
        is one fused pass and was no slower there (``benchmarks/test_cpu_bench.py``).
        ``kernel``: the moments from one Triton launch over the features (:meth:`moments`);
        None: where the features are on a CUDA device that runs Triton."""
        if feat.dim() != 4:
            raise ValueError(f"GBC expects (P, F, h, w) features, got {tuple(feat.shape)}")
        h, w = feat.shape[-2:]
        if min(h, w) < 4:
            raise ValueError(f"GBC needs patches of at least 4x4 pixels, got {h}x{w}")
        tiles = h % 4 == 0 and w % 4 == 0
        if from_moments is None:  # (the kernel's default device counts as CUDA: tests make the CPU one)
            from ..ops.triton_ops import runs_by_default

            from_moments = tiles and (feat.is_cuda or runs_by_default(feat.device)) and not torch.is_grad_enabled()
        if from_moments and not tiles:
            raise ValueError(f"the GBC descriptor from moments needs sides that are multiples of 4, got {h}x{w}")
        if from_moments:
            return self._normalized_means(*self.moments(feat, kernel))
        views = [feat, F.avg_pool2d(feat, 2), F.avg_pool2d(feat, 4)]
        coarse = views[2].shape[-2:]
        pooled = [F.adaptive_avg_pool2d(norm(v.float()), coarse) for norm, v in zip(self.norms, views)]
        return torch.cat(pooled, 1).mean((2, 3))

    @staticmethod
    def moments(feat: torch.Tensor, kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel means and mean squares, each (3, P, F) fp32, of the three views of (P, F, h, w)
        features (h and w multiples of 4): the features, their 2x2 and their 4x4 average pools
        (``avg_pool2d``, in the features' dtype). ``kernel``: from one read of the features by the
        Triton kernel (``kernels/policy_stage.py``; None: on CUDA devices where Triton runs, for
        fp32, fp16 and bf16 features)
        instead of torch's pools and reductions (this reference); equal up to fp32 rounding."""
        if takes_stage_kernel(kernel, feat):
            from ..ops.triton_ops import kernel_ops

            h, w = feat.shape[2:]
            mean = kernel_ops().pooled_moments(feat) / (h * w)  # (sums, squares) x views x (P, F)
            mean[:, 1] *= 4.0  # the pooled views have 4 and 16 times fewer pixels (exact: powers of 2)
            mean[:, 2] *= 16.0
            return mean[0], mean[1]
        views = [feat, F.avg_pool2d(feat, 2), F.avg_pool2d(feat, 4)]
        means = torch.stack([v.mean((2, 3), dtype=torch.float32) for v in views])
        rms = [torch.linalg.vector_norm(v, 2, dim=(2, 3), dtype=torch.float32) / (v.shape[2] * v.shape[3]) ** 0.5
               for v in views]
        return means, torch.stack(rms).square()

    def _normalized_means(self, means: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
        """The (3, P, F) channel means and mean squares of three views (:meth:`moments`) -> (P, 3F)
        fp32: the spatial means of ``norms[i](views[i])``.

        When the patch side is a multiple of 4, the pooled views tile exactly into the coarse grid,
        so adaptive-pooling a normalised view and averaging the result is its plain spatial mean:
        ``gamma * (mean_c - mu_g) * rstd_g + beta``, with the group's mean ``mu_g`` and biased
        variance (within-channel variance plus the spread of the channel means) from the channel
        means and mean squares. fp32-accumulating reductions over the views replace the fp32 copies,
        GroupNorms and pools (about 0.8 ms of a 4.0 ms 1080p frame on an H100), and the small
        arithmetic after them runs once on the three views stacked. Equal in exact arithmetic; in
        floats it differs in rounding (tests bound it)."""
        p, f = means.shape[1:]
        norms = list(self.norms)
        g, eps = norms[0].num_groups, norms[0].eps  # GBC builds the three alike
        within = (squares - means.square()).clamp_min(0).view(3, p, g, f // g)
        means = means.view(3, p, g, f // g)
        centred = means - means.mean(3, keepdim=True)
        var = (within + centred.square()).mean(3, keepdim=True)
        y = (centred * torch.rsqrt(var + eps)).view(3, p, f)
        if norms[0].affine:
            y = y * torch.stack([n.weight for n in norms])[:, None] + torch.stack([n.bias for n in norms])[:, None]
        return y.permute(1, 0, 2).reshape(p, 3 * f)


class GranularDQ(BitPolicy):
    """Granular-DQ policy (see module doc). ``gbc`` weights come from QAT (issue: training)."""

    name = "granular"

    def __init__(self, gbc_bits: tuple[int, int, int] = (4, 6, 8), e2b_bits: tuple[int, int, int] = (4, 5, 8),
                 channels: int = 64, quantiles: tuple[float, float] = (0.5, 0.9), ema: float = 0.9997,
                 thresholds: tuple[float, float] | None = None, gbc_state: dict | None = None):
        self.gbc_bits = three_bit_widths(gbc_bits, "Granular-DQ")
        # E2B is EntropyOnly applied to the patches GBC sent to its top code.
        self.e2b = EntropyOnly(three_bit_widths(e2b_bits, "Granular-DQ"), quantiles, thresholds)
        self.bits = tuple(sorted(set(self.gbc_bits[:2]) | set(self.e2b_bits)))
        self.ema = float(ema)
        self.gbc = GBC(channels, 3)
        self.trained = gbc_state is not None
        if gbc_state is not None:
            self.gbc.load_state_dict(gbc_state)
        self.gbc.eval()

    @property
    def e2b_bits(self) -> tuple[int, int, int]:
        return self.e2b.bits

    @property
    def quantiles(self) -> tuple[float, float]:
        return self.e2b.quantiles

    @property
    def thresholds(self) -> tuple[float, float] | None:
        """E2B's entropy thresholds (t1, t2)."""
        return self.e2b.thresholds

    @thresholds.setter
    def thresholds(self, value) -> None:
        self.e2b.thresholds = tuple(value) if value is not None else None

    @property
    def is_fitted(self) -> bool:
        return self.e2b.is_fitted

    def fit(self, lr_patches: torch.Tensor) -> GranularDQ:
        """E2B thresholds: the ``quantiles`` of the calibration patches' entropies."""
        self.e2b.fit(lr_patches)
        return self

    def adapt_thresholds(self, lr_batch: torch.Tensor) -> None:
        """ATC step (first training epoch): thresholds <- ema * t + (1 - ema) * batch quantiles."""
        batch = entropy_quantiles(lr_batch, self.quantiles)
        if self.thresholds is None:
            self.thresholds = tuple(batch)
        else:
            self.thresholds = tuple(self.ema * t + (1 - self.ema) * b for t, b in zip(self.thresholds, batch))

    def gbc_choice(self, head_feat: torch.Tensor, training: bool = False, generator=None) -> torch.Tensor:
        """(P, 3) one-hot over ``gbc_bits``: straight-through Gumbel-softmax when ``training``
        (gradients flow to GBC), argmax otherwise."""
        logits = self.gbc(head_feat)
        if not training:
            return F.one_hot(logits.argmax(1), 3).to(logits.dtype)
        gumbel = -torch.log(-torch.log(torch.rand(logits.shape, generator=generator, device=logits.device)
                                       .clamp(1e-10, 1 - 1e-10)))
        soft = torch.softmax(logits + gumbel, dim=1)  # tau = 1
        hard = F.one_hot(soft.argmax(1), 3).to(soft.dtype)
        return hard + soft - soft.detach()

    def assign(self, lr: torch.Tensor, head_feat: torch.Tensor) -> torch.Tensor:
        return self.assign_staged(lr, to_host(self.device_stage(lr, head_feat)))

    def device_stage(self, lr: torch.Tensor, head_feat: torch.Tensor) -> torch.Tensor:
        """(P, 2) float32: each patch's GBC code index (0, 1, 2 over ``gbc_bits``), from its
        (P,F,h,w) head features, and the entropy of its (P,3,h,w) pixels in [0,1]
        (:func:`~gdq_engine.policy.entropy.patch_entropy`), which E2B reads for the top code's
        patches. Every patch's entropy, not only the top code's: the bits are then decided in one
        host read (an image graph's stage holds the whole image's), and a patch's entropy is
        computed in the same batch whatever the codes are."""
        if self.thresholds is None:
            raise RuntimeError("GranularDQ has no E2B thresholds: call fit() on calibration patches first")
        if next(self.gbc.parameters()).device != head_feat.device:
            self.gbc.to(head_feat.device)
        with torch.no_grad():  # gbc_choice's index at inference, without its one_hot (which reads values back on a CPU)
            codes = self.gbc(head_feat).argmax(1).to(torch.float32)
        return torch.stack([codes, patch_entropy(lr).to(codes.device)], 1)

    def assign_staged(self, lr: torch.Tensor | None, stage: torch.Tensor) -> torch.Tensor:
        """(P,) int64 bit-widths on the CPU from :meth:`device_stage`'s (P, 2) codes and
        entropies: GBC's widths, with E2B's entropy thresholds deciding for the top code's patches
        (``lr`` is not read: the stage says all)."""
        stage = to_host(stage)
        choice = stage[:, 0].long()
        out = torch.tensor(self.gbc_bits, dtype=torch.int64)[choice]
        top = choice == 2
        out[top] = self.e2b.assign_staged(None, stage[top, 1])
        return out

    def state(self) -> dict:
        return {**super().state(), "gbc_bits": list(self.gbc_bits), "e2b_bits": list(self.e2b_bits),
                "quantiles": list(self.quantiles), "ema": self.ema, "thresholds": list(self.thresholds or []),
                "channels": self.gbc.fc.in_features // 3, "trained": self.trained,
                "gbc": {k: v.detach().cpu() for k, v in self.gbc.state_dict().items()}}

    @classmethod
    def from_state(cls, state: dict) -> GranularDQ:
        policy = cls(tuple(state["gbc_bits"]), tuple(state["e2b_bits"]), int(state["channels"]),
                     tuple(state["quantiles"]), float(state["ema"]),
                     tuple(state["thresholds"]) if state.get("thresholds") else None, gbc_state=state["gbc"])
        policy.trained = bool(state.get("trained"))
        return policy
