"""Fit Granular-DQ's GBC on measured per-width quality: a controller-only stage after QAT.

QAT trains GBC with a straight-through Gumbel estimator of how L1 changes with each patch's width.
In a short run that signal is too weak to learn which patches gain from bits (docs/training.md,
"Where the bits should go"). This stage keeps the trained weights and activation steps fixed
and fits GBC on what each width really does to each patch:

1. :func:`width_psnr`: the Y-PSNR (dB, the evaluation protocol's) of LR training crops at the
   inference patch size, each crop run as one patch through the integer engine at every width.
2. :func:`option_table`: for each crop, the width and PSNR each GBC code gives it (codes 0 and 1:
   ``gbc_bits``; the top code: E2B's width from the crop's entropy, as at inference).
3. :func:`fit_gbc`: GBC's linear layer minimises the exact expected cost
   ``mean_n sum_k softmax(GBC(x_n))_k * (price * bits_nk - psnr_nk)`` (no estimator needed: every
   option's outcome is measured); ``price`` is in dB per bit.
4. :func:`fit_gbc_to_budget`: bisection over ``price`` for the highest-quality fit whose argmax
   allocation on the crops has FAB <= the target.

The policy's structure is unchanged (GBC on head features at three granularities, then E2B); only
how GBC's weights are found differs from the paper.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from ..metrics import psnr_y
from ..policy import GranularDQ, Static
from ..policy.granular import GBC


def width_psnr(qmodel, lr: torch.Tensor, hr: torch.Tensor, batch: int = 16, progress: bool = True) -> torch.Tensor:
    """Y-PSNR of each crop at each of the model's widths through its integer engine.

    Args:
        qmodel: a :class:`~gdq_engine.quantized.QuantizedSR` (its integer body at every width it
            was calibrated for).
        lr: (N,3,h,w) float32 LR crops in [0,1]; each runs as one patch.
        hr: (N,3,sh,sw) float32 HR crops in [0,1].
    Returns:
        (N, len(widths)) float64 PSNR in dB on Y, ``scale`` border cropped, SR rounded to 8 bit;
        columns in ``qmodel.act_bits`` order (ascending widths).
    """
    from ..runtime.scheduler import forward_quantized

    widths = qmodel.act_bits.tolist()
    device = qmodel.act_scales.device
    body = qmodel.integer_body()
    out = torch.zeros(lr.shape[0], len(widths), dtype=torch.float64)
    steps = [(k, i) for k in range(len(widths)) for i in range(0, lr.shape[0], batch)]
    with torch.inference_mode():
        for k, i in tqdm(steps, desc="per-width PSNR of the crops", disable=not progress, leave=False):
            x = lr[i:i + batch].to(device)
            sr, _, _ = forward_quantized(qmodel.fp, body, Static(widths[k]), x)
            sr = (sr.clamp(0, 1) * 255).round().cpu() / 255
            out[i:i + batch, k] = psnr_y(sr, hr[i:i + batch], qmodel.scale).double()
    return out


def option_table(policy: GranularDQ, lr: torch.Tensor, psnr: torch.Tensor,
                 widths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The width and PSNR each GBC code gives each crop.

    Args:
        policy: a fitted :class:`GranularDQ` (E2B thresholds set).
        lr: (N,3,h,w) LR crops in [0,1].
        psnr: (N, len(widths)) from :func:`width_psnr`.
        widths: the column widths of ``psnr``.
    Returns:
        (bits (N,3) float64, psnr (N,3) float64): code 0, code 1 (``gbc_bits[:2]``) and the top code
        (E2B's width for the crop).
    """
    e2b = policy.e2b.assign(lr, None).cpu()
    n = lr.shape[0]
    bits = torch.stack([torch.full((n,), policy.gbc_bits[0]), torch.full((n,), policy.gbc_bits[1]), e2b], 1)
    missing = set(bits.unique().tolist()) - set(widths)
    if missing:
        raise ValueError(f"the policy uses widths {sorted(missing)} that have no measured PSNR ({widths})")
    column = torch.tensor([widths.index(int(b)) for b in bits.flatten()]).view(n, 3)
    return bits.double(), psnr.gather(1, column)


def gbc_descriptors(qmodel, lr: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """(N, 3F) float32 CPU inputs of GBC's linear layer for (N,3,h,w) LR crops in [0,1]: the FP
    head's features through a fresh GBC's normalised, pooled views (GroupNorm affine = identity,
    which a fitted linear layer absorbs), in batches (head features never held for all crops)."""
    device = qmodel.act_scales.device
    gbc = GBC(qmodel.fp.head.out_channels, 3).to(device)
    with torch.no_grad():
        return torch.cat([gbc.descriptor(qmodel.fp.head(qmodel.fp.normalize(lr[i:i + batch].to(device)))).cpu()
                          for i in range(0, lr.shape[0], batch)])


def fit_gbc(desc: torch.Tensor, bits: torch.Tensor, psnr: torch.Tensor, price: float, steps: int = 400,
            lr: float = 0.05, weight_decay: float = 1e-3, seed: int = 0) -> torch.nn.Linear:
    """GBC's linear layer fitted to the expected cost at ``price`` dB per bit.

    Args:
        desc: (N, D) GBC descriptors (:func:`gbc_descriptors`).
        bits, psnr: (N, 3) per code, from :func:`option_table`.
        price: dB of PSNR one more bit must buy (larger: fewer bits).
    Returns:
        a ``Linear(D, 3)`` (float32) minimising ``mean_n sum_k p_nk * (price * bits_nk - psnr_nk)``,
        ``p_n = softmax(linear(desc_n))``, plus ``weight_decay`` times the squared weights, by
        full-batch Adam from a seeded start (deterministic).
    """
    gen = torch.Generator().manual_seed(seed)
    fc = torch.nn.Linear(desc.shape[1], 3)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=gen) * 0.01)
        fc.bias.zero_()
    # Costs relative to each crop's cheapest option: the same minimiser, better conditioned.
    cost = (price * bits - psnr).float()
    cost = cost - cost.min(1, keepdim=True).values
    x = desc.float()
    opt = torch.optim.Adam(fc.parameters(), lr=lr)
    for _ in range(steps):
        loss = (torch.softmax(fc(x), 1) * cost).sum(1).mean() + weight_decay * fc.weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return fc.requires_grad_(False)


def allocation(fc: torch.nn.Linear, desc: torch.Tensor, bits: torch.Tensor, psnr: torch.Tensor) -> dict:
    """The argmax choice of ``fc`` on the crops: code per crop, FAB and mean PSNR (dB)."""
    with torch.no_grad():
        code = fc(desc.float()).argmax(1)
    rows = torch.arange(code.shape[0])
    return {"code": code, "fab": float(bits[rows, code].mean()), "psnr": float(psnr[rows, code].mean())}


def fit_gbc_to_budget(desc: torch.Tensor, bits: torch.Tensor, psnr: torch.Tensor, fab_target: float,
                      rounds: int = 16, seed: int = 0, log=None) -> tuple[torch.nn.Linear, dict]:
    """:func:`fit_gbc` at the lowest price (in a bisection) whose allocation has FAB <= ``fab_target``.

    Returns (the fitted linear layer, a record: price, FAB and mean PSNR of the crops under it, and
    for reference the all-lowest-code, all-top-code and best-per-crop (oracle at that price) values).
    """
    if fab_target < float(bits.min(1).values.mean()):
        raise ValueError(f"FAB target {fab_target} is below what the lowest code gives these crops "
                         f"({float(bits.min(1).values.mean()):.2f})")
    lo, hi = 0.0, 1.0
    while allocation(fit_gbc(desc, bits, psnr, hi, seed=seed), desc, bits, psnr)["fab"] > fab_target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise RuntimeError("no price meets the FAB target; the GBC fit does not converge")
    best = fit_gbc(desc, bits, psnr, hi, seed=seed)
    price = hi
    for _ in range(rounds):
        mid = (lo + hi) / 2
        fc = fit_gbc(desc, bits, psnr, mid, seed=seed)
        fab = allocation(fc, desc, bits, psnr)["fab"]
        if log is not None:
            log(f"GBC fit: price {mid:.4f} dB/bit -> crop FAB {fab:.3f}")
        if fab <= fab_target:
            hi, best, price = mid, fc, mid
        else:
            lo = mid
    chosen = allocation(best, desc, bits, psnr)
    rows = torch.arange(bits.shape[0])
    oracle = (price * bits - psnr).argmin(1)
    record = {"price_db_per_bit": price, "crops": int(bits.shape[0]), "fab": chosen["fab"], "psnr": chosen["psnr"],
              "codes": torch.bincount(chosen["code"], minlength=3).tolist(),
              "lowest_code": {"fab": float(bits[:, 0].mean()), "psnr": float(psnr[:, 0].mean())},
              "top_code": {"fab": float(bits[:, 2].mean()), "psnr": float(psnr[:, 2].mean())},
              "oracle_at_price": {"fab": float(bits[rows, oracle].mean()), "psnr": float(psnr[rows, oracle].mean())}}
    return best, record


def fit_granular_controller(qmodel, lr: torch.Tensor, hr: torch.Tensor, fab_target: float, seed: int = 0,
                            progress: bool = True, log=None) -> dict:
    """Refit ``qmodel``'s GBC in place (GroupNorms reset to identity, a new linear layer) so its
    allocation of the (N,3,h,w) LR crops ``lr`` (HR ``hr``) has FAB <= ``fab_target`` at the best
    PSNR the fit finds. Returns the record of :func:`fit_gbc_to_budget`."""
    policy = qmodel.policy
    if not isinstance(policy, GranularDQ):
        raise ValueError(f"GBC fitting needs a Granular-DQ model, got policy {policy.name!r}")
    desc = gbc_descriptors(qmodel, lr)
    psnr = width_psnr(qmodel, lr, hr, progress=progress)
    bits, option_psnr = option_table(policy, lr, psnr, qmodel.act_bits.tolist())
    fc, record = fit_gbc_to_budget(desc, bits, option_psnr, fab_target, seed=seed, log=log)
    gbc = GBC(qmodel.fp.head.out_channels, 3)  # identity GroupNorm affine, as in the descriptors
    gbc.fc.load_state_dict(fc.state_dict())
    policy.gbc.load_state_dict(gbc.state_dict())
    policy.gbc.eval()
    policy.trained = True
    record["width_psnr"] = {str(b): float(psnr[:, k].mean()) for k, b in enumerate(qmodel.act_bits.tolist())}
    return record
