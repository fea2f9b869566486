"""End-to-end upscaling latency: torch FP baselines vs the quantized engine, same frame, same run.

    python benchmarks/latency.py --gpu [--out DIR] [--scale 4] [--output 1920x1080] [--image PATH]
    python benchmarks/latency.py          # CPU mode (small frame)

The LR frame is a crop of a real photo (``--image``, default the first image of
../shared/data/train, tiled periodically if smaller). Every row upscales the same frame with the
papers' 96/90 tiling through ``Engine.upscale``: FP rows (fp32, and fp16/bf16 channels_last with
cudnn.benchmark on GPU) and quantized rows (static a8/a4/a2 and EntropyOnly {2,4,8} on the
``auto`` backend: Triton on GPU, the C++ kernels on CPU; on GPU their FP layers run in fp16 and
one row shows static a8 with fp32 FP layers; on CPU a bf16 channels_last row and a static a8 row
on the pure-torch reference backend). Columns: median ms (do_bench on GPU, host
timer medians on CPU), speed-up vs the fp16 (GPU) or fp32 (CPU) row, FAB, PSNR of the output vs
the fp32 output. Writes latency-<device>-<date>.json; prints a table last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_ms, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def lr_frame(path: Path | None, height: int, width: int) -> torch.Tensor:
    """(1,3,height,width) crop of a real image in [0,1] (tiled by reflection if it is smaller)."""
    from gdq_engine.io import load_image
    from gdq_engine.train.data import list_images

    if path is None:
        path = list_images([ROOT.parent / "shared" / "data" / "train"])[0]
    img = load_image(path)
    while img.shape[1] < height or img.shape[2] < width:
        img = torch.cat([img, img.flip(1)], 1) if img.shape[1] < height else torch.cat([img, img.flip(2)], 2)
    return img[:, :height, :width].unsqueeze(0).contiguous()


def time_ms(fn, gpu: bool, reps: int) -> float:
    if gpu:
        from triton.testing import do_bench

        return do_bench(fn, warmup=200, rep=1000, return_mode="median")
    return median_ms(fn, reps)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def cases_for(gpu: bool) -> list[tuple[str, dict]]:
    """(row name, Engine kwargs) of the compared methods."""
    cases = [("fp32", dict(policy="fp")), ("static a8", dict(policy="static", bits=8)),
             ("static a4", dict(policy="static", bits=4)), ("static a2", dict(policy="static", bits=2)),
             ("entropy {2,4,8}", dict(policy="entropy", bits=(2, 4, 8)))]
    if not gpu:  # the CPU anchors: bf16 channels_last, and the exact reference backend
        return cases[:1] + [("bf16 CL", dict(policy="fp", dtype=torch.bfloat16))] + cases[1:] + [
            ("static a8 (reference)", dict(policy="static", bits=8, backend="reference"))]
    half = torch.float16  # quantized rows run their FP layers (head, upsampler, tail) in fp16 too
    return [cases[0], ("fp16 CL", dict(policy="fp", dtype=half)), ("bf16 CL", dict(policy="fp", dtype=torch.bfloat16)),
            ("static a8 (fp32 FP layers)", dict(policy="static", bits=8))] + [
                (name, dict(kw, dtype=half)) for name, kw in cases[1:]]


def plot(rows: list[dict], path: str) -> None:
    """Latency vs FAB per output size (needs matplotlib; skipped with a message otherwise)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for size in dict.fromkeys(r["output"] for r in rows):
        pts = [r for r in rows if r["output"] == size]
        ax.scatter([r["fab"] for r in pts], [r["ms"] for r in pts], label=size)
        for r in pts:
            ax.annotate(r["method"], (r["fab"], r["ms"]), fontsize=6)
    ax.set_xlabel("FAB (mean activation bits)")
    ax.set_ylabel("ms per frame")
    ax.set_xscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="run on CUDA (else CPU mode)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--scale", type=int, default=4, choices=[2, 4])
    p.add_argument("--output", default=None,
                   help="HR frame sizes WxH, comma-separated (default 1920x1080 on GPU, 744x744 on CPU: four "
                        "96x96 LR patches at x4); e.g. 1280x720,1920x1080,3840x2160")
    p.add_argument("--image", type=Path, default=None)
    p.add_argument("--calib", default=str(ROOT.parent / "shared" / "data" / "train"))
    p.add_argument("--reps", type=int, default=3, help="CPU-mode repeats")
    p.add_argument("--plot", default=None, help="also write a PNG of latency vs FAB here")
    args = p.parse_args(argv)

    from gdq_engine import Engine, load_model
    from gdq_engine.train.data import random_lr_patches

    if args.gpu and not torch.cuda.is_available():
        print("--gpu given but no CUDA device", file=sys.stderr)
        return 2
    dev = "cuda" if args.gpu else "cpu"
    torch.backends.cudnn.benchmark = True
    sizes = [tuple(map(int, s.lower().split("x"))) for s in (args.output or (
        "1920x1080" if args.gpu else "744x744")).split(",")]
    model = load_model(f"edsr-baseline-x{args.scale}")
    calib = random_lr_patches([args.calib], args.scale, count=32, size=96)
    engines = {}
    rows = []
    base_name = "fp16 CL" if args.gpu else "fp32"
    for out_w, out_h in sizes:
        lr = lr_frame(args.image, out_h // args.scale, out_w // args.scale).to(dev)
        ref_out, size_rows = None, []
        for name, kw in cases_for(args.gpu):
            if name not in engines:
                extra = dict(calib=calib) if kw["policy"] != "fp" else {}
                engines[name] = Engine(model, device=dev, **kw, **extra)
            engine = engines[name]
            with torch.inference_mode():
                out, report = engine.upscale(lr, return_report=True)
                ms = time_ms(lambda engine=engine, lr=lr: engine.upscale(lr), args.gpu, args.reps)
            ref_out = out if ref_out is None else ref_out
            size_rows.append({"output": f"{out_w}x{out_h}", "method": name, "ms": ms, "fab": report.fab,
                              "patches": report.patches, "backend": getattr(engine.int_body, "backend", "fp"),
                              "psnr_vs_fp32": psnr(out, ref_out), "groups": report.groups})
            print(f"{out_w}x{out_h} {name}: {ms:.2f} ms", flush=True)
        base = next(r["ms"] for r in size_rows if r["method"] == base_name)
        for r in size_rows:
            r[f"speedup_vs_{base_name.split()[0]}"] = base / r["ms"]
        rows += size_rows
    payload = {"workload": {"model": f"edsr-baseline-x{args.scale}", "outputs": [f"{w}x{h}" for w, h in sizes],
                            "tiling": "96/90"}, "rows": rows}
    path = write_results("latency", payload, args.out)
    if args.plot:
        plot(rows, args.plot)
    key = f"speedup_vs_{base_name.split()[0]}"
    print(f"EDSR-baseline x{args.scale}, device {dev}")
    print(f"{'output':10} {'method':27} {'patches':>7} {'ms':>9} {'x ' + base_name:>10} {'FAB':>5} "
          f"{'PSNR vs fp32':>12} backend")
    for r in rows:
        print(f"{r['output']:10} {r['method']:27} {r['patches']:7d} {r['ms']:9.2f} {r[key]:10.2f} {r['fab']:5.1f} "
              f"{r['psnr_vs_fp32']:12.2f} {r['backend']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
