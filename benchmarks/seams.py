"""Seams vs compute: tiled FP output against whole-image output for several context margins.

    python benchmarks/seams.py --model edsr-baseline-x4 --data ../shared/data/val/CSet14

For each margin M (LR pixels of extra context per 96x96 patch): the largest and mean absolute
difference to whole-image output (8-bit gray levels, after rounding both to 8 bit), PSNR-Y of the
tiled output against the HR image, the computed-pixel overhead (window pixels / image pixels) and
the measured time relative to whole-image inference. Writes benchmarks/results/seams-*.json and
prints a table last.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import write_results

from gdq_engine import Engine, load_model
from gdq_engine.io import load_image
from gdq_engine.metrics import psnr_y
from gdq_engine.runtime.tiler import make_grid
from gdq_engine.train.data import list_images, make_lr


def _timed(engine: Engine, lr: torch.Tensor) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = engine.upscale(lr)
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="edsr-baseline-x4")
    ap.add_argument("--data", default="../shared/data/val/CSet14")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--patch", type=int, default=96)
    ap.add_argument("--stride", type=int, default=90)
    ap.add_argument("--margins", default="0,2,4,8,16,receptive")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    model = load_model(args.model)
    radius = model.receptive_radius
    margins = [radius if m == "receptive" else int(m) for m in args.margins.split(",")]
    files = list_images(args.data)[: args.limit]
    whole_engine = Engine(model, device="cpu", patch_size=None)
    rows = {m: {"max_diff": 0.0, "sum_diff": 0.0, "pixels": 0, "psnr": [], "work": [], "time": 0.0} for m in margins}
    whole_time, whole_psnr = 0.0, []
    for path in files:
        lr, hr = make_lr(load_image(path), model.scale)
        lr = lr.unsqueeze(0)
        whole, t = _timed(whole_engine, lr)
        whole_time += t
        whole8 = (whole * 255).round()
        whole_psnr.append(float(psnr_y(whole8 / 255, hr.unsqueeze(0), model.scale)[0]))
        for m in margins:
            engine = Engine(model, device="cpu", patch_size=args.patch, stride=args.stride, margin=m)
            tiled, t = _timed(engine, lr)
            d = ((tiled * 255).round() - whole8).abs()
            r = rows[m]
            r["max_diff"] = max(r["max_diff"], float(d.max()))
            r["sum_diff"] += float(d.sum())
            r["pixels"] += d.numel()
            r["psnr"].append(float(psnr_y((tiled * 255).round() / 255, hr.unsqueeze(0), model.scale)[0]))
            grid = make_grid(lr.shape[-2], lr.shape[-1], args.patch, args.stride, m)
            r["work"].append(len(grid) * grid.window[0] * grid.window[1] / (lr.shape[-2] * lr.shape[-1]))
            r["time"] += t
    table = []
    for m, r in rows.items():
        table.append({"margin": m, "max_abs_diff_8bit": r["max_diff"],
                      "mean_abs_diff_8bit": r["sum_diff"] / r["pixels"], "psnr_y": sum(r["psnr"]) / len(r["psnr"]),
                      "computed_pixels_ratio": sum(r["work"]) / len(r["work"]),
                      "time_vs_whole": r["time"] / whole_time})
    payload = {"model": str(args.model), "receptive_radius": radius, "data": args.data, "images": len(files),
               "patch": args.patch, "stride": args.stride, "whole_image_psnr_y": sum(whole_psnr) / len(whole_psnr),
               "rows": table}
    path = write_results(f"seams-{args.model}", payload, args.out)
    print(f"wrote {path}")
    print(f"whole image: PSNR-Y {payload['whole_image_psnr_y']:.3f} dB; receptive radius {radius} LR px")
    print("| margin (LR px) | max |diff| (8-bit) | mean |diff| | PSNR-Y (dB) | computed pixels | time vs whole |")
    print("|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['margin']} | {row['max_abs_diff_8bit']:.0f} | {row['mean_abs_diff_8bit']:.4f} | "
              f"{row['psnr_y']:.3f} | {row['computed_pixels_ratio']:.2f}x | {row['time_vs_whole']:.2f}x |")


if __name__ == "__main__":
    main()
