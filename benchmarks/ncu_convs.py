"""The body's a8 convs, the tail's last upsampler conv and the FP last conv, launched for Nsight Compute.

Where the Triton conv's time goes (it runs at 46-60% of its floor on an H200, 2026-11-26) is a
question for the hardware counters: issue stalls, tensor-core and memory pipe utilisation. This
script launches, at the 1080p x4 shapes of ``benchmarks/kernels.py`` (18 patches of 96x96, C = 64):

1. conv1: signed 8-bit codes in, ReLU, unsigned 8-bit codes out;
2. conv2 as the body runs it: unsigned 8-bit codes in, the fp32 residual updated in place, the
   next block's signed codes out;
3. the 64 -> 256 upsampler conv storing pixel-shuffled fp16 (the integer tail's last stage);
4. the FP last conv (``kernels/fp_conv.py``: fp16 64 -> 3 on the x4 map, fp32 out);
5. conv2 on an fp16 residual stream (an fp16 engine's body on Triton/CUDA), otherwise as 2.;

each first once to compile, then, after a sync, ``--reps`` times on fresh random inputs. The
integer convs run on the tile config the autotuner picked on the H200 (``autotune_choices`` in
``kernels-nvidia-h200-2026-11-26-run2.json``) unless ``--config`` says otherwise, the last conv
on its fixed config (``ops.FIXED_FP_CONFIG``, the one ``GDQ_TRITON_AUTOTUNE=0`` runs). Under ncu,
skip the five warm-up launches and profile the next five:

    ncu --clock-control none --kernel-name regex:"_packed_conv3x3|_fp_conv3x3" --launch-skip 5 --launch-count 5 \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \\
        --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \\
        --csv --page details python benchmarks/ncu_convs.py > $OUT/ncu-convs.csv

``--smoke`` runs the same launches on one 8x8 patch on the CPU (``TRITON_INTERPRET=1``), so the
script is checked in CI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gaussian_weight_codes  # noqa: E402

# (BLOCK_M, BLOCK_K, num_warps, num_stages) the autotuner chose on the H200 on 2026-11-26
TUNED = {"conv1": (128, 64, 4, 3), "conv2": (128, 64, 4, 4), "upsampler": (128, 64, 4, 4),
         "conv2_fp16": (128, 64, 4, 4)}


def parse_config(text: str) -> tuple[int, int, int, int]:
    """"BLOCK_M,BLOCK_K,warps,stages" -> a 4-tuple of ints."""
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected BLOCK_M,BLOCK_K,warps,stages (4 integers), got {text!r}")
    return tuple(int(p) for p in parts)


def parse_sm90(text: str) -> tuple[int, int, bool, bool, bool, bool, bool | None]:
    """"STAGES,PER_SM,ROWS[,WS[,HALO[,CVT[,SAT]]]]" -> (ring stages, programs per SM, row-layout
    epilogue, warp-specialized, halo boxes: the stages then count boxes, the epilogue's conversions
    by adds, the 8-bit codes by one saturating conversion each: None, SAT not given, the engine's
    default, ``ops.SM90_CVT_SAT``)."""
    parts = text.split(",")
    if len(parts) not in (3, 4, 5, 6, 7) or not all(q.strip().isdigit() for q in parts):
        raise argparse.ArgumentTypeError(f"expected STAGES,PER_SM,ROWS[,WS[,HALO[,CVT[,SAT]]]] (3 to 7 integers), "
                                         f"got {text!r}")
    stages, per_sm, rows, ws, halo, cvt = (int(q) for q in (parts + ["0"] * (6 - len(parts)))[:6])
    sat = bool(int(parts[6])) if len(parts) == 7 else None
    return stages, per_sm, bool(rows), bool(ws), bool(halo), bool(cvt), sat


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--output", default="1920x1080", help="HR output frame WxH whose LR patches are convolved")
    p.add_argument("--reps", type=int, default=1, help="profiled launches per conv after its warm-up launch")
    p.add_argument("--config", type=parse_config, default=None, metavar="BM,BK,WARPS,STAGES",
                   help="one tile config for the three integer convs (default: the H200's autotuned picks)")
    p.add_argument("--sm90", type=parse_sm90, default=None, metavar="STAGES,PER_SM,ROWS[,WS[,HALO[,CVT[,SAT]]]]",
                   help="also conv1 and conv2 on the fp16 stream on the Gluon body conv (kernels/body_conv_sm90.py) "
                        "with these knobs (WS 1: its warp-specialized twin; HALO 1: the twin reading halo boxes; "
                        "CVT 1: its epilogue's conversions by adds, the 64-channel weights then drawn as a Gaussian "
                        "layer's codes, whose sums they cover; SAT 1: the 8-bit codes by one saturating conversion "
                        "each, 0 not; not given: the engine's default, on for conv1, off on the fp16 stream; the fp16 "
                        "stream by TMA as the engine's default, ops.SM90_TMA_RES), as conv1_sm90 and conv2_fp16_sm90")
    p.add_argument("--smoke", action="store_true", help="one 8x8 patch on the CPU in Triton's interpreter")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be >= 1")
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/ncu_convs.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    from gdq_engine.kernels import ops as tk

    from gdq_engine.quant.quantizer import ActQuant
    from gdq_engine.runtime.tiler import make_grid

    dev = "cpu" if args.smoke else "cuda"
    out_w, out_h = map(int, args.output.lower().split("x"))
    n, hw, c = (1, 8, 64) if args.smoke else (len(make_grid(out_h // args.scale, out_w // args.scale, 96, 90)), 96, 64)
    g = torch.Generator(device=dev).manual_seed(0)

    def codes(lo: int, hi: int) -> torch.Tensor:  # 8-bit codes, one per byte, stored as uint8
        return torch.randint(lo, hi + 1, (n, hw, hw, c), device=dev, generator=g).to(torch.uint8)

    def weights(cout: int, gaussian: bool = False):
        w = torch.randint(-127, 128, (cout, c, 3, 3), device=dev, generator=g).to(torch.int8)
        if gaussian:  # sums below 2**22 (ops.fp32_sums_by_add), as the shipped EDSR's
            w = gaussian_weight_codes((cout, c, 3, 3), dev, g)
        return tk.prepare_conv_weight(w, 8), torch.rand(cout, device=dev, generator=g) * 1e-4

    w64, mult64 = weights(64, gaussian=bool(args.sm90 and args.sm90[5]))
    w256, mult256 = weights(256)
    bias64, bias256 = torch.zeros(64, device=dev), torch.zeros(256, device=dev)
    res = torch.randn(n, hw, hw, c, device=dev, generator=g)
    out_codes = torch.empty(n, hw, hw, c, dtype=torch.uint8, device=dev)
    out16 = torch.empty(n, 2 * hw, 2 * hw, 64, dtype=torch.float16, device=dev)

    launches = {
        "conv1": lambda x: tk.packed_conv3x3(x, 8, True, w64, mult64, bias64, relu=True,
                                             out_quant=ActQuant(8, False, 0.02), out=out_codes),
        "conv2": lambda x: tk.packed_conv3x3(x, 8, False, w64, mult64, bias64, residual=res, out=res,
                                             next_quant=ActQuant(8, True, 0.05), next_out=out_codes),
        "upsampler": lambda x: tk.packed_conv3x3(x, 8, True, w256, mult256, bias256, shuffle=2,
                                                 out_dtype=torch.float16, out=out16),
    }
    inputs = {"conv1": (-128, 127), "conv2": (0, 255), "upsampler": (-128, 127)}
    side = args.scale * hw
    fp_w, fp_b = tk.prepare_fp_weight((torch.randn(3, c, 3, 3, device=dev, generator=g) * 0.05).half(), None)
    launches["last_conv"] = lambda x: tk.fp_conv3x3(x.permute(0, 2, 3, 1), fp_w, fp_b, 3)
    res16 = res.half()
    launches["conv2_fp16"] = lambda x: tk.packed_conv3x3(x, 8, False, w64, mult64, bias64, residual=res16, out=res16,
                                                         out_dtype=torch.float16, next_quant=ActQuant(8, True, 0.05),
                                                         next_out=out_codes)
    inputs["conv2_fp16"] = inputs["conv2"]
    if args.sm90:
        launches["conv1_sm90"], launches["conv2_fp16_sm90"] = launches["conv1"], launches["conv2_fp16"]
        inputs["conv1_sm90"], inputs["conv2_fp16_sm90"] = inputs["conv1"], inputs["conv2_fp16"]

    def run(name: str) -> None:
        if name == "last_conv":
            config = tk.FIXED_FP_CONFIG
            x = torch.randn(n, c, side, side, device=dev, generator=g).half().contiguous(
                memory_format=torch.channels_last)
        else:
            bm, bk, warps, stages = args.config or TUNED[name.removesuffix("_sm90")]
            config = tk.flat_config(bm, bk, warps, stages)
            x = codes(*inputs[name])
        sm90 = dict(sm90=True, sm90_stages=args.sm90[0], sm90_per_sm=args.sm90[1], sm90_epi_rows=args.sm90[2],
                    sm90_ws=args.sm90[3], sm90_halo=args.sm90[4], sm90_cvt_add=args.sm90[5]) \
            if name.endswith("_sm90") else dict(sm90=False)
        if name.endswith("_sm90") and args.sm90[6] is not None:
            sm90["sm90_cvt_sat"] = args.sm90[6]
        with tk.launch_options(config=config, **sm90):
            launches[name](x)

    for name in launches:  # compile (not profiled: --launch-skip 5)
        run(name)
    if not args.smoke:
        torch.cuda.synchronize()
    for name in launches:
        for _ in range(args.reps):
            run(name)
    if not args.smoke:
        torch.cuda.synchronize()
    print(f"launched {', '.join(launches)}: {n} patches of {hw}x{hw}, C = {c}, {args.reps} profiled launch(es) each "
          f"after one warm-up, configs {args.config or TUNED}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
