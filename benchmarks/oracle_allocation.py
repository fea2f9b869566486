"""What per-patch bit allocation could buy: every patch at every width, the model's own allocation,
and the best allocation found with the ground truth at a FAB budget (an oracle).

    python benchmarks/oracle_allocation.py --model granular4568.pt --budget 4.5

For a patch-wise quantized model (a checkpoint), 96/90 tiling of the MATLAB-bicubic LR of each HR
image in ``--data``: each image runs once with the model's own policy and once at each of its
widths. Stitched patches own disjoint output regions, so an image's squared error on Y (``scale``
border cropped, SR rounded to 8 bit) is the sum of its patches' errors, and any allocation's PSNR
follows exactly from the per-width runs. The oracle starts from every patch at the lowest width
and greedily gives the upgrade with the most set-mean PSNR per bit while the per-patch FAB stays
<= ``--budget``. Writes benchmarks/results/oracle-allocation-*.json.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from common import write_results

from gdq_engine import Engine, load_quantized
from gdq_engine.evaluate import hr_folder
from gdq_engine.io import load_image
from gdq_engine.metrics import rgb_to_y
from gdq_engine.policy import Static
from gdq_engine.train.data import list_images, make_lr


def patch_errors(engine: Engine, lr: torch.Tensor, hr: torch.Tensor) -> list[float]:
    """Squared error on Y (8-bit SR, ``scale`` border cropped) in the output region of each patch."""
    s = engine.scale
    sr = (engine.upscale(lr).clamp(0, 1) * 255).round() / 255
    err = (rgb_to_y(sr) - rgb_to_y(hr))[0, 0] ** 2  # float64, as psnr_y
    err[:s], err[-s:], err[:, :s], err[:, -s:] = 0, 0, 0, 0
    return [float(err[y0 * s:y1 * s, x0 * s:x1 * s].sum())
            for (y0, y1), (x0, x1) in ((t.keep_y, t.keep_x) for t in engine.grid(*lr.shape[-2:]).tiles)]


def set_psnr(images: list[dict], alloc: list[list[int]]) -> float:
    """Mean over images of PSNR (dB) with patch ``p`` of image ``i`` at width ``alloc[i][p]``."""
    total = 0.0
    for im, widths in zip(images, alloc):
        sse = sum(im["sse"][str(b)][p] for p, b in enumerate(widths))
        total += 10 * math.log10(255 ** 2 * im["pixels"] / sse)
    return total / len(images)


def fab(alloc: list[list[int]]) -> float:
    """Mean width over every patch of the set (the eval table's FAB)."""
    flat = [b for widths in alloc for b in widths]
    return sum(flat) / len(flat)


def greedy_oracle(images: list[dict], widths: list[int], budget: float) -> list[list[int]]:
    """Best-per-bit upgrades from all-lowest while the set's per-patch FAB stays <= ``budget``."""
    alloc = [[widths[0]] * len(im["own"]) for im in images]
    while True:
        base, best = set_psnr(images, alloc), None
        for i, im in enumerate(images):
            for p in range(len(im["own"])):
                for b in (w for w in widths if w > alloc[i][p]):
                    trial = [row[:] for row in alloc]
                    trial[i][p] = b
                    if fab(trial) > budget + 1e-9:
                        continue
                    gain = (set_psnr(images, trial) - base) / (b - alloc[i][p])
                    if best is None or gain > best[0]:
                        best = (gain, i, p, b)
        if best is None or best[0] <= 0:
            return alloc
        alloc[best[1]][best[2]] = best[3]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a patch-wise quantized checkpoint")
    p.add_argument("--budget", type=float, default=4.5, help="FAB budget of the oracle (mean bits per patch)")
    p.add_argument("--data", nargs="+", default=["../shared/data/val/Set5", "../shared/data/val/CSet14"])
    args = p.parse_args()
    q = load_quantized(args.model)
    if getattr(q.policy, "layerwise", False):
        raise SystemExit("the oracle is per patch: give a patch-wise model (not CADyQ)")
    widths = q.act_bits.tolist()
    own = Engine(q, device="cpu")
    forced = {}
    for b in widths:
        q.policy = Static(b)  # the integer body has every width: run the same model at one width
        forced[b] = Engine(q, device="cpu")
    results = {}
    for folder in args.data:
        images = []
        for path in list_images(hr_folder(folder)):
            lr, hr = make_lr(load_image(path), own.scale)
            _, report = own.upscale(lr, return_report=True)
            s = own.scale
            pixels = (hr.shape[-2] - 2 * s) * (hr.shape[-1] - 2 * s)
            images.append({"name": path.name, "pixels": pixels, "own": [int(b) for b in report.bits],
                           "sse": {str(b): patch_errors(forced[b], lr, hr) for b in widths}})
        oracle = greedy_oracle(images, widths, args.budget)
        own_alloc = [im["own"] for im in images]
        results[Path(folder).name] = {
            "own": {"fab": fab(own_alloc), "psnr": set_psnr(images, own_alloc)},
            "oracle": {"budget": args.budget, "fab": fab(oracle), "psnr": set_psnr(images, oracle),
                       "patches_per_width": {str(b): sum(row.count(b) for row in oracle) for b in widths},
                       "allocation": {im["name"]: row for im, row in zip(images, oracle)}},
            "all_at": {str(b): set_psnr(images, [[b] * len(im["own"]) for im in images]) for b in widths},
            "images": images}
    path = write_results(f"oracle-allocation-{Path(args.model).stem}",
                         {"model": args.model, "command": f"python benchmarks/oracle_allocation.py --model "
                          f"{args.model} --budget {args.budget}", "results": results})
    for name, res in results.items():
        all_at = ", ".join(f"{b}: {v:.3f}" for b, v in res["all_at"].items())
        print(f"{name}: own FAB {res['own']['fab']:.2f} PSNR {res['own']['psnr']:.3f} | oracle FAB "
              f"{res['oracle']['fab']:.2f} PSNR {res['oracle']['psnr']:.3f} {res['oracle']['patches_per_width']} | "
              f"all patches at {all_at}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
