"""Quantization-aware training: Granular-DQ (GBC + E2B + ATC), CADyQ (per-layer selectors) and static
LSQ (QuantSR-style WxAx).

Recipe (PAPERS.md; scaled down to what a session can run, see docs/training.md): start from the FP
model and its DOBI activation scales (the shipped calibration table or calib images); train the
model's weights (fake-quantized at ``w_bits``, straight-through), every LSQ step and the bit
controller with L1 to the HR crops.

* Granular-DQ: each patch runs the whole body at one width. GBC picks one of ``gbc_bits`` by
  Gumbel-softmax straight-through, patches sent to its top code get E2B's width from their entropy,
  and the per-patch mixing matrix of :class:`~gdq_engine.train.fakebody.FakeQuantBody` makes every
  layer use it. ATC moves E2B's thresholds by EMA during the first ``atc_iters``.
* CADyQ: a selector before every quantized conv (Sobel features + the layer input's channel std),
  softmax straight-through, so widths change from layer to layer; the bit penalty may grow over
  ``bit_ramp`` steps and ``at_weight`` adds attention-transfer distillation (the teacher is the
  starting FP model, not the paper's 8-bit PAMS model). Residual-block bodies only (EDSR, MSRResNet).
* Depth versions (QuantSR's DQA, any method): with ``depths`` every step runs a depth drawn from
  them (the first ``d`` residual blocks, weights shared) and each block's residual branch gets a
  trained weight beta (the engine's per-block ``res_scale``); the exported model runs any of them
  (``QuantizedSR.set_depth``, ``Engine(depth=...)``). Residual-block bodies only.
* RDN: its dense blocks train as :class:`~gdq_engine.train.fakedense.FakeQuantDenseBody` (a
  quantizer per input segment, as the engine runs them) with the patch-wise methods (granular,
  static).

PAPERS.md lists L1 as Granular-DQ's only loss. With L1 alone nothing rewards fewer bits, so GBC
drifts to its top code and E2B alone sets the FAB; ``bit_weight`` adds ``bit_weight * mean bits``
of the straight-through choice (CADyQ's bit penalty) for users who want the controller to trade
quality for bits; with ``fab_target`` only the batch FAB above the target is penalised, a budget
rather than a price, so the patches whose L1 gains most from bits keep them (``fab_exact``: the
budget is spent too, ``|FAB - target|``). ``init`` warm-starts from another quantized checkpoint of
the same model (:func:`warm_start`). ``gbc_fit``: after the iterations, GBC is refitted on how each
width really changes the PSNR of ``gbc_fit`` training crops, to meet ``fab_target``
(:mod:`gdq_engine.train.controller`). The result is a :class:`~gdq_engine.quantized.QuantizedSR`
checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..compute import resolve_device
from ..models.checkpoints import atomic_torch_save
from ..policy import CADyQ, GranularDQ, Static
from ..policy.cadyq import sobel_features
from ..runtime.densebody import has_dense_body
from .data import PairedPatches
from .fakebody import fake_quant_body

QAT_METHODS = ("granular", "cadyq", "static")


@dataclass
class QATConfig:
    """Hyperparameters of :func:`train_qat` (plain values, stored in the output's meta)."""

    model: str = "edsr-baseline-x4"
    method: str = "granular"
    bits: tuple[int, ...] = (2, 4, 8)  # granular: GBC codes; cadyq: selector codes; static: one width
    e2b_bits: tuple[int, ...] | None = None  # granular: E2B codes (default: ``bits``)
    w_bits: int = 8
    calib: str | None = None  # None: the shipped calibration table of a shipped model
    calib_patch: int = 96  # LR crop side when ``calib`` is an image folder
    data: tuple[str, ...] = ("../shared/data/train",)
    val: str | None = "../shared/data/val/Set5"
    iters: int = 1000
    batch: int = 8
    lr_patch: int = 48
    lr: float = 1e-5  # model weights (fine-tuning a trained FP model)
    step_lr: float = 1e-3  # LSQ steps
    gbc_lr: float = 1e-3  # the bit controller: GBC (granular) or the per-layer selectors (cadyq)
    bit_weight: float = 0.0
    fab_target: float | None = None  # with bit_weight: penalise only the batch FAB above this (hinge)
    fab_exact: bool = False  # with fab_target: penalise |FAB - target| (spend the whole budget)
    bit_ramp: int = 0  # the bit weight grows linearly over the first bit_ramp steps (CADyQ's growing penalty)
    at_weight: float = 0.0  # attention-transfer distillation from the starting FP model (CADyQ)
    depths: tuple[int, ...] = ()  # DQA depth versions (block counts) trained together; () = full depth only
    atc_iters: int = 0
    init: str | None = None  # warm start: a quantized checkpoint of the same model (weights + shared widths' steps)
    gbc_fit: int = 0  # granular: after QAT, refit GBC on the measured per-width PSNR of this many crops (0: off)
    gbc_fit_patch: int = 96  # LR side of those crops (the inference patch)
    gbc_init_top: float = 2.0  # logit bias for the controller's top code at the start (GBC: E2B's allocation)
    seed: int = 0
    val_every: int = 250
    save_every: int = 50
    log_every: int = 10


def _policy(cfg: QATConfig, channels: int, n_blocks: int):
    if cfg.method == "cadyq":
        if len(tuple(cfg.bits)) != 3:
            raise ValueError(f"CADyQ selects among three widths, got {cfg.bits}")
        return CADyQ(tuple(cfg.bits), channels=channels, n_layers=2 * n_blocks)
    if cfg.method == "granular":
        if len(tuple(cfg.bits)) != 3:
            raise ValueError(f"Granular-DQ needs three GBC widths, got {cfg.bits}")
        return GranularDQ(tuple(cfg.bits), tuple(cfg.e2b_bits or cfg.bits), channels=channels)
    if cfg.method == "static":
        if len(tuple(cfg.bits)) != 1:
            raise ValueError(f"static QAT trains one activation width, got {cfg.bits}")
        return Static(int(cfg.bits[0]))
    raise ValueError(f"unknown QAT method {cfg.method!r}; choose from {QAT_METHODS}")


class QATModel(torch.nn.Module):
    """FP model + fake-quantized body + bit controller (Granular-DQ's GBC or CADyQ's per-layer
    selectors): the trained unit of :func:`train_qat`.

    ``forward(lr, training, features=None, depth=None)``: (N,3,h,w) in [0,1] -> (SR (N,3,sh,sw),
    bits (N,) float: the width each patch ran at (CADyQ: its mean over layers), carrying the
    controller's straight-through gradient); ``features``: a list that receives every block's
    output; ``depth``: the depth version (first blocks) to run, default all. ``depths``: the depth
    versions trained (given: the residual scales are trained too, DQA's beta).
    """

    def __init__(self, qmodel, gbc_init_top: float = 0.0, depths: tuple[int, ...] = ()):
        super().__init__()
        from ..quantized import check_depths

        self.fp = qmodel.fp
        self.policy = qmodel.policy
        self.w_bits = qmodel.w_bits
        self.depths = check_depths(depths, len(self.fp.body))
        if has_dense_body(self.fp) and isinstance(self.policy, CADyQ):
            raise NotImplementedError("CADyQ's per-layer widths run on residual-block bodies (EDSR, MSRResNet); "
                                      "train RDN with a patch-wise method (granular, static)")
        if has_dense_body(self.fp) and depths:
            raise NotImplementedError("dense blocks have no depth versions: RDN's global fusion reads every block")
        self.body = fake_quant_body(self.fp, qmodel.act_quants(), qmodel.w_bits, learn_res_scale=bool(depths))
        self.gbc = self.policy.gbc if isinstance(self.policy, GranularDQ) else None
        self.selectors = self.policy.selectors if isinstance(self.policy, CADyQ) else None
        if self.gbc is not None and not self.policy.trained:
            with torch.no_grad():
                self.gbc.fc.bias[-1] += gbc_init_top
        if self.selectors is not None and not self.policy.trained:
            with torch.no_grad():  # Sobel inputs are O(100): random weights would saturate every softmax
                for sel in self.selectors:
                    sel.weight.zero_()
                    sel.bias.copy_(torch.tensor([0.0, 0.0, gbc_init_top]))

    def mix(self, lr: torch.Tensor, feat: torch.Tensor, training: bool):
        """(N, widths) mixing matrix (None for one width) and the (N,) bits of each patch."""
        widths = torch.tensor(self.body.widths, device=feat.device, dtype=torch.float32)
        if self.gbc is None:
            return None, widths.expand(feat.shape[0])
        choice = self.policy.gbc_choice(feat.detach(), training=training)  # (N, 3), straight-through
        e2b = self.policy.e2b.assign(lr, None).to(feat.device, torch.float32)
        gbc = torch.tensor(self.policy.gbc_bits[:2], device=feat.device, dtype=torch.float32)
        options = torch.cat([gbc.expand(feat.shape[0], 2), e2b[:, None]], 1)  # (N, 3) width per GBC code
        onehot = (options[:, :, None] == widths[None, None, :]).to(choice.dtype)  # (N, 3, W)
        return torch.einsum("nk,nkw->nw", choice, onehot), (choice * options).sum(1)

    def layer_mix(self, lr: torch.Tensor, training: bool, layer_bits: list):
        """CADyQ: the mixing function of :class:`~gdq_engine.train.fakebody.FakeQuantBody` (selector of
        each quantized conv on its FP input and the patches' Sobel features); appends each layer's (N,)
        bits to ``layer_bits``."""
        grads = sobel_features(lr)
        codes = torch.tensor(self.policy.bits, device=lr.device, dtype=torch.float32)
        widths = torch.tensor(self.body.widths, device=lr.device, dtype=torch.float32)
        onehot = (codes[:, None] == widths[None, :]).float()  # (3, W)

        def mix(layer: int, x: torch.Tensor) -> torch.Tensor:
            choice = self.policy.choice(layer, x.detach().permute(0, 2, 3, 1), grads, training=training)
            layer_bits.append(choice @ codes)
            return choice @ onehot

        return mix

    def forward(self, lr: torch.Tensor, training: bool = True, features: list | None = None,
                depth: int | None = None):
        fp = self.fp
        xn = fp.normalize(lr)
        feat = fp.head(xn)
        layer_bits: list[torch.Tensor] = []
        if self.selectors is not None:
            mix = self.layer_mix(lr, training, layer_bits)
        else:
            mix, bits = self.mix(lr, feat, training)
        # the fake-quantized blocks on the blocks' input (RDN: after SFENet2), as the engine runs them
        body = fp.forward_body(feat, run_blocks=lambda x: self.body(x, mix, features, depth))
        if self.selectors is not None:
            bits = torch.stack(layer_bits).mean(0)
        return fp.denormalize(fp.forward_output(body, xn)), bits

    def export(self, backend: str = "auto"):
        """The trained model as a :class:`~gdq_engine.quantized.QuantizedSR` (copies; eval mode)."""
        from ..quantized import QuantizedSR

        policy = copy.deepcopy(self.policy)
        if isinstance(policy, GranularDQ):
            policy.trained = True
            policy.gbc.eval()
        if isinstance(policy, CADyQ):
            policy.trained = True
        fp = copy.deepcopy(self.fp).eval()
        q = QuantizedSR(fp, policy, self.body.act_quants(), w_bits=self.w_bits, backend=backend, depths=self.depths)
        if not has_dense_body(fp):  # RDN's dense blocks have no residual scales
            q.set_res_scales(self.body.res_scales.detach().tolist())
        return q.eval()


def bit_penalty(bits: torch.Tensor, fab_target: float | None, exact: bool = False) -> torch.Tensor:
    """The bit term of the QAT loss from the (N,) straight-through widths of a batch: their mean, or
    with ``fab_target`` the hinge ``max(0, mean - fab_target)``: no pull below the target, so L1 alone
    decides which patches keep the widths the budget allows. ``exact``: ``|mean - fab_target|``,
    a push up as well when the controller leaves budget unspent (L1 still decides which patches)."""
    fab = bits.mean()
    if fab_target is None:
        return fab
    return (fab - fab_target).abs() if exact else (fab - fab_target).clamp(min=0)


def block_features(model, lr: torch.Tensor, depth: int | None = None) -> list[torch.Tensor]:
    """Every residual (or dense) block's output (N,F,h,w) of an FP model on LR images (N,3,h,w) in
    [0,1] (the first ``depth`` blocks; default all)."""
    x = model.blocks_input(model.head(model.normalize(lr)))
    out = []
    for blk in list(model.body)[:depth]:
        x = blk(x)
        out.append(x)
    return out


def attention_transfer(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Attention-transfer loss (Zagoruyko & Komodakis; CADyQ's distillation): per block, the
    L2-normalised spatial map of mean squared activations, squared distance summed over pixels,
    averaged over patches and blocks. Lists of (N,F,h,w) -> scalar."""
    def attention(f):
        return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)

    return torch.stack([(attention(s) - attention(t)).pow(2).sum(1).mean() for s, t in zip(student, teacher)]).mean()


def warm_start(qmodel, init: str | Path) -> list[int]:
    """Start QAT from another quantized checkpoint of the same FP model: copy its (fake-quant
    trained) FP weights and residual scales, and the activation steps of every width both models
    use; the other widths keep their calibrated steps. The controller starts fresh. Returns the
    widths whose steps were copied.
    """
    from ..models.checkpoints import CheckpointError
    from ..quantized import load_quantized

    src = load_quantized(init)
    if src.fp.arch != qmodel.fp.arch or dict(src.fp.config) != dict(qmodel.fp.config):
        raise CheckpointError(f"{init}: a quantized {src.fp.arch} {dict(src.fp.config)}, "
                              f"not the {qmodel.fp.arch} {dict(qmodel.fp.config)} being trained")
    if src.w_bits != qmodel.w_bits:
        raise ValueError(f"{init} has {src.w_bits}-bit weights, this run trains {qmodel.w_bits}-bit ones")
    qmodel.fp.load_state_dict(src.fp.state_dict())
    if not has_dense_body(qmodel.fp):
        qmodel.set_res_scales([float(getattr(b, "res_scale", 1.0)) for b in src.fp.body])
    own, theirs = qmodel.act_bits.tolist(), src.act_bits.tolist()
    shared = [b for b in own if b in theirs]
    with torch.no_grad():
        for b in shared:
            qmodel.act_scales[own.index(b)] = src.act_scales[theirs.index(b)].to(qmodel.act_scales.device)
    return shared


def _fit_controller(cfg: QATConfig, qmodel, progress: bool, log) -> dict:
    """The ``gbc_fit`` stage: seeded 96x96 (``gbc_fit_patch``) training crops, GBC refitted in place."""
    from .controller import fit_granular_controller

    crops = PairedPatches(list(cfg.data), qmodel.scale, cfg.gbc_fit_patch, progress=progress)
    lr, hr = crops.sample(cfg.gbc_fit, torch.Generator().manual_seed(cfg.seed + 1))
    record = fit_granular_controller(qmodel, lr, hr, cfg.fab_target, seed=cfg.seed, progress=progress)
    log(f"GBC fit on {cfg.gbc_fit} crops: price {record['price_db_per_bit']:.4f} dB/bit, crop FAB {record['fab']:.2f}, "
        f"crop PSNR {record['psnr']:.3f} dB (lowest code {record['lowest_code']['psnr']:.3f})")
    return record


def _lr_factor(cfg: QATConfig, step: int) -> float:
    """Cosine decay to 1% over the run (no warm-up: training starts from trained weights)."""
    progress = min(step / max(cfg.iters, 1), 1.0)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def validate(qmodel, folder: str, progress: bool = False) -> dict:
    """Set-level PSNR / SSIM (means over images) and FAB (mean over every patch of the set, as in
    ``eval``'s table; logs before 2026-11-25 hold the mean of per-image FABs) of a quantized model
    through the Engine (96-pixel patches)."""
    from ..engine import Engine
    from ..evaluate import evaluate_folder

    engine = Engine(qmodel, device=qmodel.act_scales.device)
    bits: list[float] = []

    def upscale(x):
        hr, report = engine.upscale(x, return_report=True)
        bits.extend(report.bits)
        return hr

    res = evaluate_folder(upscale, folder, qmodel.scale, progress=progress)
    return {"psnr": res.mean_psnr, "ssim": res.mean_ssim, "fab": sum(bits) / len(bits)}


def train_qat(cfg: QATConfig, out: str | Path, device: str | None = None, progress: bool = True, log=print,
              command: str | None = None, stop_at: int | None = None) -> Path | None:
    """Train (or resume) a quantized model and write a quantized checkpoint to ``out``.

    ``out.state.pt`` beside it makes the run resumable (model, quantizers, GBC, thresholds,
    optimizer, RNG, step): a resumed run continues exactly where the state was saved.
    ``out.log.json`` is the loss / FAB / validation log, rewritten as it grows. ``stop_at``: save
    the state and return None after that many steps (time-sliced runs); rerun to continue.
    Returns ``out`` when the run is complete.
    """
    from ..models import load_model
    from ..quantized import quantize, save_quantized

    out = Path(out)
    state_path = out.with_suffix(".state.pt")
    log_path = out.with_suffix(".log.json")
    device = resolve_device(device)
    torch.manual_seed(cfg.seed)
    if cfg.method not in QAT_METHODS:
        raise ValueError(f"unknown QAT method {cfg.method!r}; choose from {QAT_METHODS}")
    if cfg.gbc_fit < 0:
        raise ValueError(f"gbc_fit is a number of crops (0: off), got {cfg.gbc_fit}")
    if cfg.gbc_fit and (cfg.method != "granular" or cfg.fab_target is None):
        raise ValueError("gbc_fit refits Granular-DQ's GBC to a bit budget: it needs method 'granular' and fab_target")
    fp = load_model(cfg.model)
    policy = _policy(cfg, fp.head.out_channels, len(fp.body))
    calib = cfg.calib
    if calib is None:  # quantize() gets the loaded module, not the name: look the shipped table up here
        from ..quantized import shipped_calibration

        calib = shipped_calibration(cfg.model)
    qmodel = quantize(fp, policy, calib=calib, w_bits=cfg.w_bits, calib_patch=cfg.calib_patch,
                      device=device)
    if cfg.init:
        warm_start(qmodel, cfg.init)
    net = QATModel(qmodel, cfg.gbc_init_top, tuple(cfg.depths)).to(device)
    groups = [{"params": list(net.fp.parameters()), "lr": cfg.lr, "base": cfg.lr},
              {"params": list(net.body.parameters()), "lr": cfg.step_lr, "base": cfg.step_lr}]
    controller = net.gbc if net.gbc is not None else net.selectors
    if controller is not None:
        groups.append({"params": list(controller.parameters()), "lr": cfg.gbc_lr, "base": cfg.gbc_lr})
    # The AT teacher is the loaded FP model itself (quantize() copied it), also under --init.
    teacher = fp.float().to(device).eval().requires_grad_(False) if cfg.at_weight else None
    opt = torch.optim.Adam(groups, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(cfg.seed)
    step, history = 0, {"train": [], "val": []}
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        net.load_state_dict(st["net"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["rng"])
        torch.set_rng_state(st["torch_rng"])
        if st["thresholds"]:
            net.policy.thresholds = tuple(st["thresholds"])
        step, history = int(st["step"]), st["history"]
        log(f"resumed {state_path} at step {step}")
    data = PairedPatches(list(cfg.data), qmodel.scale, cfg.lr_patch, progress=progress)

    def write_log():
        log_path.write_text(json.dumps({"config": asdict(cfg), "command": command or "", **history}, indent=1))

    def save_state():
        atomic_torch_save({"net": net.state_dict(), "opt": opt.state_dict(), "rng": gen.get_state(),
                           "torch_rng": torch.get_rng_state(), "step": step, "history": history,
                           "thresholds": list(getattr(net.policy, "thresholds", None) or [])}, state_path)

    net.train()
    bar = tqdm(total=cfg.iters, initial=step, desc=f"QAT {cfg.method} {list(cfg.bits)}", disable=not progress)
    t0, run_l1, run_bits, run_at, run_n = time.time(), 0.0, 0.0, 0.0, 0
    while step < cfg.iters:
        lr_img, hr_img = data.sample(cfg.batch, gen)
        lr_img, hr_img = lr_img.to(device), hr_img.to(device)
        if step < cfg.atc_iters and isinstance(net.policy, GranularDQ):
            net.policy.adapt_thresholds(lr_img)
        factor = _lr_factor(cfg, step)
        for group in opt.param_groups:
            group["lr"] = group["base"] * factor
        feats: list[torch.Tensor] | None = [] if teacher is not None else None
        depth = net.depths[int(torch.randint(len(net.depths), (1,), generator=gen))] if cfg.depths else None
        sr, bits = net(lr_img, training=True, features=feats, depth=depth)
        l1 = (sr - hr_img).abs().mean()
        loss = l1
        if cfg.bit_weight:
            ramp = min(1.0, (step + 1) / cfg.bit_ramp) if cfg.bit_ramp else 1.0
            loss = loss + ramp * cfg.bit_weight * bit_penalty(bits, cfg.fab_target, cfg.fab_exact)
        if teacher is not None:
            with torch.no_grad():
                target = block_features(teacher, lr_img, depth)
            at = attention_transfer(feats, target)
            loss = loss + cfg.at_weight * at
            run_at += float(at.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        run_l1, run_bits, run_n = run_l1 + float(l1.detach()), run_bits + float(bits.detach().mean()), run_n + 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.iters:
            record = {"step": step, "l1": run_l1 / run_n, "fab": run_bits / run_n, "lr_factor": factor,
                      "seconds": round(time.time() - t0, 1)}
            if teacher is not None:
                record["at"] = run_at / run_n
            history["train"].append(record)
            bar.set_postfix(l1=f"{run_l1 / run_n:.4f}", fab=f"{run_bits / run_n:.2f}")
            run_l1, run_bits, run_at, run_n = 0.0, 0.0, 0.0, 0
            write_log()
        if cfg.val and (step % cfg.val_every == 0 or step == cfg.iters):
            net.eval()
            exported = net.export()
            res = validate(exported, cfg.val)
            if cfg.depths:  # the shallower depth versions too
                res["psnr_by_depth"] = {str(d): validate(exported.set_depth(d), cfg.val)["psnr"]
                                        for d in net.depths[:-1]}
            net.train()
            history["val"].append({"step": step, **res})
            log(f"step {step}: val PSNR {res['psnr']:.3f} dB, FAB {res['fab']:.2f} ({time.time() - t0:.0f} s)")
            write_log()
        if step % cfg.save_every == 0 or step == cfg.iters or step == stop_at:
            save_state()
        if step == stop_at and step < cfg.iters:
            bar.close()
            log(f"stopped at step {step}; state in {state_path}")
            return None
    bar.close()
    net.eval()
    final = net.export()
    if cfg.gbc_fit:
        history["gbc_fit"] = _fit_controller(cfg, final, progress, log)
        if cfg.val:
            res = validate(final, cfg.val)
            history["val"].append({"step": step, "after": "gbc_fit", **res})
            log(f"after the GBC fit: val PSNR {res['psnr']:.3f} dB, FAB {res['fab']:.2f}")
    meta = {"train_config": asdict(cfg), "history": history, "steps": step, "device": str(device),
            "command": command or "", "source_model": cfg.model}
    save_quantized(final.cpu(), out, meta=meta)
    write_log()
    return out
