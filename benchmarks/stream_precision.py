"""What an fp16 or bf16 residual stream costs in quality: the integer body with its stream in
fp32, fp16 and bf16, everything else equal, on the evaluation protocol.

    python benchmarks/stream_precision.py [--model edsr-baseline-x4] [--bits 8 4] [--data DIR ...]

For each static width in ``--bits`` and each HR image of ``--data`` (MATLAB-bicubic LR, whole
image, the shipped calibration): the quantized network with fp32 FP layers and the reference
backend, its residual stream in each dtype (``IntegerBody(stream_dtypes=...)``: each block's result
rounded to it, the next block's codes quantizing the rounded values; docs/numerics.md). Reports
PSNR / SSIM on Y against HR, and the 8-bit SR image against the fp32 stream's: PSNR and the share
of pixel values that differ. Runs on the CPU. Writes benchmarks/results/stream-precision-*.json.
"""

from __future__ import annotations

import argparse

import torch
from common import write_results

from gdq_engine import load_model, quantize
from gdq_engine.evaluate import evaluate_folder
from gdq_engine.runtime.scheduler import forward_static

STREAMS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def upscaler(qmodel, bits: int, stream: torch.dtype, outputs: list):
    """(1,3,h,w) LR -> SR through ``qmodel``'s integer body on a ``stream`` residual stream, FP
    layers in fp32; each 8-bit SR image is appended to ``outputs``."""
    model = qmodel.runtime_model("reference")
    body = qmodel.integer_body("reference", residual_stream="dtype")  # the stream follows the features' dtype

    def run(lr: torch.Tensor) -> torch.Tensor:
        # the static network with fp32 FP layers; only the blocks' input enters in the stream's dtype
        sr = forward_static(model, lambda g, b: body(g.to(stream), b), bits, lr)
        outputs.append((sr.clamp(0, 1) * 255).round())
        return sr

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="edsr-baseline-x4")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--data", nargs="+", default=["../shared/data/val/Set5", "../shared/data/val/CSet14"])
    p.add_argument("--limit", type=int, default=None, help="images per folder")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    fp = load_model(args.model)
    rows = []
    for bits in args.bits:
        qmodel = quantize(args.model, "static", bits=bits)  # the shipped calibration table
        for folder in args.data:
            sr: dict[str, list] = {}
            for name, dtype in STREAMS.items():
                sr[name] = []
                res = evaluate_folder(upscaler(qmodel, bits, dtype, sr[name]), folder, fp.scale,
                                      name=f"a{bits} {name} stream", limit=args.limit)
                rows.append({"bits": bits, "folder": folder, "stream": name, "psnr": res.mean_psnr,
                             "ssim": res.mean_ssim, "psnr_per_image": res.psnr})
            for row in rows[-len(STREAMS):]:
                pairs = list(zip(sr[row["stream"]], sr["float32"]))
                mse = [float(((a - b) ** 2).mean()) for a, b in pairs]
                row["psnr_vs_fp32_stream"] = (sum(10 * torch.log10(torch.tensor(255.0**2 / m)).item()
                                                  if m else float("inf") for m in mse) / len(mse))
                row["values_differing"] = sum(int((a != b).sum()) for a, b in pairs) / sum(a.numel() for a, _ in pairs)
                row["max_abs_diff_8bit"] = max(int((a - b).abs().max()) for a, b in pairs)
                print(f"a{bits} {folder}: {row['stream']:8} stream PSNR {row['psnr']:.3f} dB  SSIM {row['ssim']:.4f}  "
                      f"vs fp32 stream: {row['psnr_vs_fp32_stream']:.1f} dB, {100 * row['values_differing']:.3f}% "
                      f"of values differ (max {row['max_abs_diff_8bit']}/255)", flush=True)
    path = write_results("stream-precision", {"model": args.model, "rows": rows}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
