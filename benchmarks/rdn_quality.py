"""Quality of RDN's quantized dense blocks: a small RDN trained here, then FP against PTQ widths.

    python benchmarks/rdn_quality.py --model rdn_small_x2.pt

No trained RDN ships with the project, so this trains one first (when ``--model`` does not exist;
resumable, seeded) by ``python -m gdq_engine train --arch rdn --arch-config ...``:
4 blocks x 4 dense layers, 32 features and growth, x2, 4000 iterations of 16 LR crops of 32x32 (a
quarter of an hour on 2 CPU cores). It then evaluates it as ``python -m gdq_engine eval`` does
(MATLAB-bicubic LR, PSNR / SSIM on Y, border = scale) in FP and with post-training quantization
of the dense blocks (DOBI scales from ``--calib`` crops), and writes
``benchmarks/results/rdn-quality-*.json`` with the environment and every command.

``--qat 4 2`` also trains the dense blocks quantization-aware at those widths (static, 8-bit
weights, ``--qat-iters`` steps of 16 crops of 32x32 from the FP model and its DOBI scales, each
checkpoint written beside ``--model`` and reused when it exists) and adds them to the same table;
``--granular 4`` also trains Granular-DQ {2,4,8} the same way, with a bit budget of that FAB
(``--bit-weight 1e-2 --fab-target``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
from pathlib import Path

from common import write_results

from gdq_engine.cli import main as cli

ARCH_CONFIG = dict(n_feats=32, n_blocks=4, n_layers=4, growth=32)
POLICIES = ["fp", "static:8", "static:6", "static:4", "static:3", "static:2", "entropy:2,4,8"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="rdn_small_x2.pt", help="the trained RDN (trained here if it does not exist)")
    ap.add_argument("--iters", type=int, default=4000)
    ap.add_argument("--data", nargs="+", default=["../shared/data/val/Set5", "../shared/data/val/CSet14"])
    ap.add_argument("--train-data", default="../shared/data/train", help="HR images to train on")
    ap.add_argument("--val", default="../shared/data/val/Set5", help="HR folder of the training's PSNR ('' to skip)")
    ap.add_argument("--calib", default="../shared/data/train")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images per folder")
    ap.add_argument("--qat", type=int, nargs="*", default=[], help="activation widths to train with static QAT too")
    ap.add_argument("--qat-iters", type=int, default=2000)
    ap.add_argument("--granular", type=float, default=None, help="also train Granular-DQ {2,4,8} at this FAB budget")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    device = ["--device", args.device] if args.device else []
    train = ["train", "--arch", "rdn", "--arch-config", ",".join(f"{k}={v}" for k, v in ARCH_CONFIG.items()),
             "--scale", "2", "--iters", str(args.iters), "--batch", "16", "--patch", "32", "--val-every", "1000",
             "--seed", "0", "--data", args.train_data, "--val", args.val, "--out", args.model, *device]
    if not Path(args.model).exists() and cli(train) != 0:
        raise SystemExit("train failed")
    qat_commands, qat_models = [], []
    runs = [(f"a{bits}", ["--method", "static", "--bits", str(bits)]) for bits in args.qat]
    if args.granular is not None:
        runs.append(("granular", ["--method", "granular", "--bits", "2,4,8", "--bit-weight", "1e-2",
                                  "--fab-target", str(args.granular)]))
    for name, method in runs:
        out = str(Path(args.model).with_suffix("")) + f"-qat-{name}.pt"
        qat = ["train", *method, "--w-bits", "8", "--model", args.model,
               "--calib", args.calib, "--data", args.train_data, "--val", "", "--iters", str(args.qat_iters),
               "--batch", "16", "--patch", "32", "--seed", "0", "--out", out, *device]
        if not Path(out).exists() and cli(qat) != 0:
            raise SystemExit("QAT failed")
        qat_commands.append(shlex.join(["python", "-m", "gdq_engine", *qat]))
        qat_models.append(out)
    evaluate = ["eval", "--model", args.model, "--data", *args.data, "--policies", *POLICIES, *qat_models, "--calib",
                args.calib, "--bicubic", *device] + (["--limit", str(args.limit)] if args.limit else [])
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "eval.json"
        if cli([*evaluate, "--json", str(table)]) != 0:
            raise SystemExit("eval failed")
        rows = json.loads(table.read_text())
    payload = {"train_command": shlex.join(["python", "-m", "gdq_engine", *train]), "qat_commands": qat_commands,
               "eval_command": shlex.join(["python", "-m", "gdq_engine", *evaluate]),
               "model": {"arch": "rdn", "scale": 2, **ARCH_CONFIG, "iters": args.iters}, "rows": rows}
    path = write_results("rdn-quality", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
