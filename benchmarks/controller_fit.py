"""How well a GBC fitted on measured per-width PSNR (``train --gbc-fit``) generalises: fit on some
training crops, score on held-out ones, against all-lowest-code and the per-crop oracle.

    python benchmarks/controller_fit.py --model granular4568.pt --crops 2000 --heldout 400 --fab-target 4.4

Seeded 96x96 LR crops of ``--data`` (the inference patch size) run through the integer engine at
every width of the model (``gdq_engine.train.controller.width_psnr``); GBC's linear layer is fitted
(``fit_gbc_to_budget``) on the first ``--fit-sizes`` crops and its argmax allocation scored on the
last ``--heldout``. Writes benchmarks/results/controller-fit-*.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import write_results

from gdq_engine import load_quantized
from gdq_engine.train.controller import allocation, fit_gbc_to_budget, gbc_descriptors, option_table, width_psnr
from gdq_engine.train.data import PairedPatches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a Granular-DQ quantized checkpoint")
    p.add_argument("--crops", type=int, default=2000, help="crops to fit on (the largest fit size)")
    p.add_argument("--heldout", type=int, default=400, help="held-out crops scored")
    p.add_argument("--fit-sizes", default="500,1000,2000", help="fit on the first N crops, for each N")
    p.add_argument("--fab-target", type=float, default=4.4)
    p.add_argument("--patch", type=int, default=96)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--data", nargs="+", default=["../shared/data/train"])
    args = p.parse_args()
    sizes = [int(n) for n in args.fit_sizes.split(",")]
    if max(sizes) > args.crops:
        raise SystemExit(f"--fit-sizes up to {max(sizes)} need --crops >= that")
    q = load_quantized(args.model)
    crops = PairedPatches(args.data, q.scale, args.patch)
    lr, hr = crops.sample(args.crops + args.heldout, torch.Generator().manual_seed(args.seed))
    psnr = width_psnr(q, lr, hr)
    desc = gbc_descriptors(q, lr)
    bits, option_psnr = option_table(q.policy, lr, psnr, q.act_bits.tolist())
    held = slice(args.crops, None)
    lowest = float(option_psnr[held, 0].mean())
    rows = []
    for n in sizes:
        fc, record = fit_gbc_to_budget(desc[:n], bits[:n], option_psnr[:n], args.fab_target, seed=args.seed)
        scored = allocation(fc, desc[held], bits[held], option_psnr[held])
        rows.append({"fit_crops": n, "fit": record, "heldout": {
            "fab": scored["fab"], "gain_db": scored["psnr"] - lowest,
            "codes": torch.bincount(scored["code"], minlength=3).tolist()}})
        oracle = record["oracle_at_price"]["psnr"] - record["lowest_code"]["psnr"]
        print(f"fit on {n}: fitted crops gain {record['psnr'] - record['lowest_code']['psnr']:+.4f} dB at FAB "
              f"{record['fab']:.2f} (oracle at its price {oracle:+.4f}); held-out {args.heldout}: "
              f"{scored['psnr'] - lowest:+.4f} dB at FAB {scored['fab']:.2f}")
    gain = psnr[:, 1:] - psnr[:, :1]
    widths = q.act_bits.tolist()
    spread = {f"{b}_vs_{widths[0]}": {"mean": float(gain[:, k].mean()), "std": float(gain[:, k].std())}
              for k, b in enumerate(widths[1:])}
    path = write_results(f"controller-fit-{Path(args.model).stem}",
                         {"model": args.model, "args": vars(args), "heldout_lowest_code_psnr": lowest,
                          "per_crop_gain": spread, "width_psnr_mean": {str(b): float(psnr[:, k].mean())
                                                                       for k, b in enumerate(widths)},
                          "fits": rows})
    print(f"per-crop gain over {widths[0]} bits: " + ", ".join(
        f"{k}: mean {v['mean']:+.3f} dB, std {v['std']:.3f}" for k, v in spread.items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
