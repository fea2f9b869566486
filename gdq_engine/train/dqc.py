"""2DQuant-style DQC for the engine's quantizers: learn the activation scales, everything else frozen.

PAPERS.md (2DQuant): after DOBI, train only the quantizer bounds with L1(quantized output, FP
output) + 5 x normalised feature MSE, Adam lr 1e-2, batch 16 (4000 iterations in the paper; a few
hundred are what a CPU session runs). The engine's quantizers are per-tensor, zero-point free
(signed block inputs, unsigned post-ReLU: docs/numerics.md), so the learnable bound is the scale:
each quantizer becomes an :class:`~gdq_engine.quant.fakequant.LSQQuantizer` started at its DOBI
scale, the weights are fake-quantized with the engine's fixed per-channel codes, and the trained
steps are written back as the :class:`~gdq_engine.quantized.QuantizedSR`'s activation scales.
The feature term compares the body output (EDSR has no residual groups; RDN's: every dense block's
output, the global fusion's input) normalised by the FP body output's mean square.
"""

from __future__ import annotations

import copy

import torch
from tqdm import tqdm

from .fakebody import fake_quant_body


def dqc_calibrate(qmodel, lr_patches: torch.Tensor, iters: int = 200, batch: int = 16, lr: float = 1e-2,
                  feature_weight: float = 5.0, seed: int = 0, progress: bool = True):
    """Return a copy of ``qmodel`` (a :class:`~gdq_engine.quantized.QuantizedSR`) whose activation
    scales were trained by DQC on ``lr_patches`` ((N,3,h,w) in [0,1]) for every bit-width it holds.

    Also returns the loss history: {bits: [loss per iteration]}.
    """
    from ..quantized import QuantizedSR

    out = copy.deepcopy(qmodel)
    fp = out.fp.eval()
    for p in fp.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    quants = out.act_quants()
    history = {}
    device = next(fp.parameters()).device
    patches = lr_patches.float().to(device)
    for bits, pairs in quants.items():
        body = fake_quant_body(fp, {bits: pairs}, out.w_bits).to(device)
        opt = torch.optim.Adam(body.parameters(), lr=lr)
        losses = []
        for _ in tqdm(range(iters), desc=f"DQC {bits}-bit", disable=not progress):
            idx = torch.randint(len(patches), (min(batch, len(patches)),), generator=gen).to(device)
            x = patches[idx]
            with torch.no_grad():
                xn = fp.normalize(x)
                feat = fp.head(xn)
                blocks_in = fp.blocks_input(feat)  # RDN: SFENet2's output; EDSR: feat
                body_fp = fp.run_blocks(blocks_in)
                y_fp = fp.forward_output(fp.forward_body(feat, run_blocks=lambda g, b=body_fp: b), xn)
            body_q = body(blocks_in)
            y_q = fp.forward_output(fp.forward_body(feat, run_blocks=lambda g, b=body_q: b), xn)
            loss = (y_q - y_fp).abs().mean() + feature_weight * ((body_q - body_fp) ** 2).mean() / (
                body_fp.pow(2).mean() + 1e-12)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        history[bits] = losses
        quants[bits] = body.act_quants()[bits]
    trained = QuantizedSR(out.fp, out.policy, quants, w_bits=out.w_bits, backend=out.backend).eval()
    return trained, history
