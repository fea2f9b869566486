"""Where a quantized model spends its bits: patches per activation width, and per quantized conv for
layer-wise policies (CADyQ).

    python benchmarks/bit_allocation.py --model edsr-baseline-x4 --policy cadyq
    python benchmarks/bit_allocation.py --model granular4568.pt

96/90 tiling, MATLAB-bicubic LR of each HR image in ``--data``. Writes
benchmarks/results/bit-allocation-*.json and prints, per folder, the patch count at each width
(patch-wise policies) or each conv's (bits: patches) split and how many convs use one width only.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

from common import write_results

from gdq_engine import Engine
from gdq_engine.evaluate import hr_folder
from gdq_engine.io import load_image
from gdq_engine.train.data import list_images, make_lr


def allocation(engine: Engine, folder: str) -> dict:
    """Bit histogram of every patch of the images in ``folder`` (``HR/`` inside it if present):
    {"patches": {bits: count}} and, for layer-wise policies, {"layers": {layer: {bits: count}}}."""
    patches: Counter = Counter()
    layers: defaultdict[int, Counter] = defaultdict(Counter)
    for path in list_images(hr_folder(folder)):
        lr, _ = make_lr(load_image(path), engine.scale)
        _, report = engine.upscale(lr, return_report=True)
        patches.update(round(float(b), 2) for b in report.bits)
        for group in report.groups:
            if len(group) == 3:  # (layer, bits, patches): layer-wise policy
                layer, bits, count = group
                layers[layer][bits] += count
    out = {"patches": {str(b): n for b, n in sorted(patches.items())}}
    if layers:
        out["layers"] = {str(k): {str(b): n for b, n in sorted(v.items())} for k, v in sorted(layers.items())}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="edsr-baseline-x4", help="shipped name or quantized checkpoint")
    p.add_argument("--policy", default=None, help="e.g. granular, cadyq (default: the checkpoint's own)")
    p.add_argument("--data", nargs="+", default=["../shared/data/val/Set5", "../shared/data/val/CSet14"])
    args = p.parse_args()
    engine = Engine(args.model, policy=args.policy, device="cpu")
    results = {Path(folder).name: allocation(engine, folder) for folder in args.data}
    tag = f"{Path(args.model).stem}-{args.policy or 'own'}"
    path = write_results(f"bit-allocation-{tag}", {"model": args.model, "policy": args.policy,
                                                   "command": "python benchmarks/bit_allocation.py " +
                                                   " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                            if v is not None and k != "data"),
                                                   "results": results})
    for name, res in results.items():
        print(f"{name}: patches per mean width {res['patches']}")
        if "layers" in res:
            single = sum(1 for v in res["layers"].values() if len(v) == 1)
            print(f"  {single} of {len(res['layers'])} convs put every patch at one width")
            for layer, split in res["layers"].items():
                print(f"  conv {layer}: {split}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
