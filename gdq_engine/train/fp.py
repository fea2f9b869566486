"""FP pretraining of SR models (the shipped EDSR-baseline defaults are made with this).

Recipe (EDSR paper, scaled to what a session can run): random 48x48 LR crops with flips and
rotations, LR by MATLAB bicubic, L1 loss, Adam (0.9, 0.999), cosine learning-rate decay, batch 16.
Runs channels_last; ``bf16=True`` adds bf16 autocast (a win on GPUs and AMX CPUs, a loss on CPUs
without AMX, where oneDNN's bf16 conv is slower than fp32).
Resumable: the state file next to the output holds model, optimizer, schedule, RNG and step.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..compute import resolve_device
from ..evaluate import evaluate_folder
from ..models.checkpoints import build_model, model_from_checkpoint, read_checkpoint, save_checkpoint
from .data import PairedPatches


@dataclass
class FPTrainConfig:
    """Hyperparameters of :func:`train_fp` (all plain values so they go into checkpoints)."""

    scale: int = 4
    arch: str = "edsr"
    model_config: dict = field(default_factory=lambda: dict(n_feats=64, n_blocks=16, res_scale=1.0))
    data: tuple[str, ...] = ("../shared/data/train",)
    val: str | None = "../shared/data/val/Set5"
    iters: int = 10000
    batch: int = 16
    lr_patch: int = 48
    lr: float = 2e-4
    min_lr_ratio: float = 0.01
    warmup: int = 100
    seed: int = 0
    val_every: int = 1000
    save_every: int = 200
    init: str | None = None  # checkpoint whose matching tensors (head/body) start the run
    bf16: bool = False


def _lr_at(cfg: FPTrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(step / max(cfg.iters, 1), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _init_from(model: torch.nn.Module, path: str) -> int:
    donor, _ = model_from_checkpoint(read_checkpoint(path), source=path)
    own = model.state_dict()
    shared = {k: v for k, v in donor.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    return len(shared)


def train_fp(cfg: FPTrainConfig, out: str | Path, device: str | None = None, progress: bool = True,
             log=print, command: str | None = None) -> Path:
    """Train (or resume) an FP model and write a gdq_engine checkpoint to ``out``.

    Returns the output path. ``out.state.pt`` beside it makes the run resumable; the history of
    losses and validation PSNR, the config and ``command`` (how the run was started) are stored in
    the checkpoint's ``meta``.
    """
    out = Path(out)
    state_path = out.with_suffix(".state.pt")
    device = resolve_device(device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, dict(cfg.model_config, scale=cfg.scale)).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(cfg.seed)
    step, history = 0, {"loss": [], "val_psnr": []}
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["rng"])
        step, history = int(st["step"]), st["history"]
        log(f"resumed {state_path} at step {step}")
    elif cfg.init:
        log(f"initialised {_init_from(model, cfg.init)} tensors from {cfg.init}")
    data = PairedPatches(list(cfg.data), cfg.scale, cfg.lr_patch, progress=progress)
    use_bf16 = cfg.bf16 and device.type in ("cpu", "cuda")

    def save_state():
        tmp = state_path.with_name(state_path.name + ".partial")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": gen.get_state(),
                    "step": step, "history": history, "config": asdict(cfg)}, tmp)
        tmp.replace(state_path)

    def validate() -> float:
        model.eval()
        res = evaluate_folder(lambda x: model(x.to(device)), cfg.val, cfg.scale, progress=False)
        model.train()
        return res.mean_psnr

    model.train()
    bar = tqdm(total=cfg.iters, initial=step, desc=f"train {cfg.arch} x{cfg.scale}", disable=not progress)
    t0, running = time.time(), 0.0
    while step < cfg.iters:
        lr_img, hr_img = data.sample(cfg.batch, gen)
        lr_img = lr_img.to(device).contiguous(memory_format=torch.channels_last)
        hr_img = hr_img.to(device)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            sr = model(lr_img)
        loss = (sr.float() - hr_img).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running += loss.item()
        bar.update(1)
        if step % 100 == 0:
            history["loss"].append([step, running / 100])
            bar.set_postfix(loss=f"{running / 100:.4f}", lr=f"{_lr_at(cfg, step):.2e}")
            running = 0.0
        if cfg.val and (step % cfg.val_every == 0 or step == cfg.iters):
            psnr = validate()
            history["val_psnr"].append([step, psnr])
            log(f"step {step}: val PSNR {psnr:.3f} dB ({time.time() - t0:.0f} s)")
        if step % cfg.save_every == 0 or step == cfg.iters:
            save_state()
    bar.close()
    model.eval()
    meta = {"train_config": asdict(cfg), "history": history, "steps": step, "device": str(device),
            "command": command or ""}
    save_checkpoint(model.to(memory_format=torch.contiguous_format), out, meta)
    return out
