"""Which dtype the FP layers should take on this CPU: fp32 or bf16, measured in one run.

    python benchmarks/cpu_fp_dtype.py [--model edsr-baseline-x4] [--output 744x744] [--reps 7]

The same Engine rows in fp32 and in bf16, timed in interleaved rounds on the same frames
(:func:`gdq_engine.bench.bench_engines`): the FP network, and static a8 with and without the
integer tail, whose FP layers (head, upsampler without the tail, last conv) take the engine's dtype.
``latency.py``'s CPU rows run the quantized rows' FP layers in bf16 only where this says bf16 wins
(:func:`common.cpu_bf16_wins`: CPUs with AMX-BF16). Writes ``cpu-fp-dtype-<device>-<date>.json``
and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_flags, keep_freed_memory, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ROWS = (("FP", dict(policy="fp")), ("static a8", dict(policy="static", bits=8)),
        ("static a8 + int8 tail", dict(policy="static", bits=8, tail_bits=8)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="edsr-baseline-x4", help="shipped name or checkpoint of an FP model")
    p.add_argument("--output", default="744x744", help="HR frame size WxH (default: four 96x96 LR patches at x4)")
    p.add_argument("--frames", type=int, default=4, help="distinct frames the timed calls rotate over")
    p.add_argument("--reps", type=int, default=7, help="timed rounds, each calling every row once (median)")
    p.add_argument("--input", default=str(ROOT.parent / "shared" / "data" / "train"), help="images to crop")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)

    from gdq_engine import Engine
    from gdq_engine.bench import bench_engines, format_table, frame_paths, lr_frames, parse_size

    keep_freed_memory()  # as latency.py's CPU mode: torch's per-layer tensors otherwise page-fault
    engines = {}
    for name, kw in ROWS:
        for dtype in (torch.float32, torch.bfloat16):
            engines[f"{name}, {str(dtype).removeprefix('torch.')}"] = Engine(args.model, device="cpu", dtype=dtype,
                                                                             **kw)
    scale = next(iter(engines.values())).scale
    out_w, out_h = parse_size(args.output)
    frames = lr_frames(frame_paths(args.input, args.frames), out_h // scale, out_w // scale)
    rows = bench_engines(engines, frames, args.reps)
    flags = sorted(f for f in cpu_flags() if f.startswith(("amx", "avx512_bf16", "avx512_fp16")))
    ms = {r["method"]: r["ms"] for r in rows}
    verdict = {name: "bfloat16" if ms[f"{name}, bfloat16"] < ms[f"{name}, float32"] else "float32"
               for name, _ in ROWS}
    path = write_results("cpu-fp-dtype", {"workload": {"model": args.model, "output": args.output,
                                                       "frames": args.frames, "rounds": args.reps},
                                          "cpu_flags": flags, "rows": rows, "faster_dtype": verdict}, args.out)
    print(format_table(rows))
    print(f"CPU flags: {' '.join(flags) or '-'}; faster: {verdict}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
