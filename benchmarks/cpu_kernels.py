"""Per-conv speed of the C++ CPU kernels vs the reference backend and torch's own convs.

    python benchmarks/cpu_kernels.py [--out DIR] [--patches 4] [--reps 10]

Workload: EDSR-baseline's 64->64 3x3 conv on ``--patches`` 96x96 LR patches (NHWC). Rows: for
a in {8,4,2}: conv1 (signed codes in, ReLU, re-quantize + pack) and conv2 (unsigned codes in, fp32
residual add, fp32 out) on the C++ kernel's four paths (AMX-INT8 tiles, AVX512-VNNI and AVX2 where
the CPU has them, else the next one down; and the portable loop), called as the integer body calls
them (outputs into reused buffers; conv2 updates the residual in place and also writes the next
block's packed codes), and on the pure-torch reference;
quantize+pack of the fp32 block input; torch fp32 and bf16 channels_last convs of the same shape
(bf16 is oneDNN's AMX path on AMX CPUs). Also the x4 upsampler's second conv by what it writes
(codes, bf16, fp32) and torch's bf16 last conv that reads its output (:func:`upsampler_rows`).
Medians of host-timer repeats after one warm-up, all in one run. Writes cpu-kernels-<date>.json; prints a table last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import keep_freed_memory, median_ms, write_results  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--patches", type=int, default=4)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc as it is (by default it keeps freed memory, so torch's convs, "
                        "which allocate their outputs, do not pay page faults; see common.keep_freed_memory)")
    args = p.parse_args(argv)
    if not args.default_malloc:
        keep_freed_memory()

    from gdq_engine.ops import cpu_ops
    from gdq_engine.ops import reference as ref
    from gdq_engine.quant.packing import pack_codes
    from gdq_engine.quant.quantizer import ActQuant, code_range

    if not cpu_ops.available():
        print("the C++ extension is not built", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    n, hw, c = args.patches, 96, 64
    w = torch.randint(-127, 128, (c, c, 3, 3), generator=g).to(torch.int8)
    prep = cpu_ops.prepare_conv_weight(w)
    mult, bias = torch.rand(c, generator=g) * 1e-3, torch.randn(c, generator=g) * 0.01
    residual = torch.randn(n, hw, hw, c, generator=g)
    def conv_row(kind: str, a_bits: int) -> dict:
        signed = kind == "conv1"
        lo, hi = code_range(a_bits, signed)
        xp = pack_codes(torch.randint(lo, hi + 1, (n, hw, hw, c), generator=g), a_bits)
        kw = dict(relu=True, out_quant=ActQuant(a_bits, False, 0.02)) if signed else dict(residual=residual)
        # The body's buffers: conv1's packed output; conv2's residual (updated in place) and next codes.
        packed = torch.empty(n, hw, hw, c * a_bits // 8, dtype=torch.uint8)
        body = dict(out=packed) if signed else dict(out=residual, next_quant=ActQuant(a_bits, True, 0.05),
                                                     next_out=packed)
        few = max(2, args.reps // 5)
        def cpp(reps, **paths):
            return median_ms(lambda: cpu_ops.packed_conv3x3(xp, a_bits, signed, prep, mult, bias, **paths, **kw,
                                                            **body), reps)

        return {"op": kind, "a_bits": a_bits, "cpp_ms": cpp(args.reps),
                "cpp_vnni_ms": cpp(args.reps, allow_amx=False, allow_avx2=False),
                "cpp_avx2_ms": cpp(args.reps, allow_amx=False, allow_vnni=False),
                "cpp_portable_ms": cpp(few, allow_amx=False, allow_vnni=False, allow_avx2=False),
                "reference_ms": median_ms(lambda: ref.packed_conv3x3(xp, a_bits, signed, w, mult, bias, **kw), few)}

    rows = [conv_row(kind, a_bits) for a_bits in (8, 4, 2) for kind in ("conv1", "conv2")]
    x = torch.randn(n, hw, hw, c, generator=g)
    q = ActQuant(8, True, 0.05)
    rows.append({"op": "quantize_pack", "a_bits": 8, "cpp_ms": median_ms(lambda: cpu_ops.quantize_pack(x, q),
                                                                         args.reps),
                 "cpp_vnni_ms": None, "cpp_avx2_ms": None, "cpp_portable_ms": None,
                 "reference_ms": median_ms(lambda: ref.quantize_pack(x, q), args.reps)})
    conv = torch.nn.Conv2d(c, c, 3, padding=1).to(memory_format=torch.channels_last)
    xf = torch.randn(n, c, hw, hw, generator=g).to(memory_format=torch.channels_last)
    with torch.no_grad():
        fp32 = median_ms(lambda: conv(xf), args.reps)
        conv_b, xb = conv.to(torch.bfloat16), xf.to(torch.bfloat16)
        bf16 = median_ms(lambda: conv_b(xb), args.reps)
    upsampler, last_conv = upsampler_rows(args, g, n, 2 * hw, c)
    payload = {"workload": {"patches": n, "patch": hw, "channels": c}, "vnni": cpu_ops.has_vnni(),
               "amx": cpu_ops.has_amx(), "avx2": cpu_ops.has_avx2(), "torch_fp32_cl_ms": fp32,
               "torch_bf16_cl_ms": bf16, "rows": rows, "upsampler": upsampler,
               "torch_bf16_cl_last_conv_ms": last_conv}
    path = write_results("cpu-kernels", payload, args.out)
    print(f"{n} patches of {hw}x{hw}, 64->64 3x3; AMX: {cpu_ops.has_amx()}, VNNI: {cpu_ops.has_vnni()}, AVX2: "
          f"{cpu_ops.has_avx2()}; torch fp32 CL {fp32:.2f} ms, bf16 CL {bf16:.2f} ms")
    print(f"{'op':14} {'a':>2} {'C++ ms':>8} {'VNNI':>8} {'AVX2':>8} {'portable':>9} {'reference':>10} "
          f"{'x fp32 CL':>10} {'x bf16 CL':>10}")
    for r in rows:
        vnni = "-" if r["cpp_vnni_ms"] is None else f"{r['cpp_vnni_ms']:8.2f}"
        avx2 = "-" if r["cpp_avx2_ms"] is None else f"{r['cpp_avx2_ms']:8.2f}"
        port = "-" if r["cpp_portable_ms"] is None else f"{r['cpp_portable_ms']:9.2f}"
        print(f"{r['op']:14} {r['a_bits']:>2} {r['cpp_ms']:8.2f} {vnni:>8} {avx2:>8} {port:>9} "
              f"{r['reference_ms']:10.2f} {fp32 / r['cpp_ms']:10.2f} {bf16 / r['cpp_ms']:10.2f}")
    print(f"x4 upsampler's second conv, 64->256 on {n} x {2 * hw}x{2 * hw}, pixel-shuffle stored (C++):")
    for r in upsampler:
        print(f"  writes {r['writes']:5} {r['out_mb']:5.0f} MB  {r['cpp_ms']:6.2f} ms")
    print(f"torch bf16 CL last conv, 64->3 on {n} x {4 * hw}x{4 * hw}: {last_conv:.2f} ms")
    print(f"wrote {path}")
    return 0


def upsampler_rows(args, g: torch.Generator, n: int, hw: int, c: int) -> tuple[list[dict], float]:
    """The x4 upsampler's second conv (64 -> 256 on the 2x LR grid, stored pixel-shuffled into the
    4x grid) by what it writes: packed int8 codes (a next integer conv), bf16 (the last conv's
    input in a bf16 model) or fp32; and torch's bf16 channels_last last conv (64 -> 3) that reads
    the bf16 map. The HR feature map's size is what costs here."""
    from gdq_engine.ops import cpu_ops
    from gdq_engine.quant.packing import pack_codes
    from gdq_engine.quant.quantizer import ActQuant

    w = torch.randint(-127, 128, (4 * c, c, 3, 3), generator=g).to(torch.int8)
    prep = cpu_ops.prepare_conv_weight(w)
    mult, bias = torch.rand(4 * c, generator=g) * 1e-3, torch.randn(4 * c, generator=g) * 0.01
    xp = pack_codes(torch.randint(-128, 128, (n, hw, hw, c), generator=g), 8)
    rows = []
    for writes, dtype in (("codes", torch.uint8), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        out = torch.empty(n, 2 * hw, 2 * hw, c, dtype=dtype)
        kw = dict(out_quant=ActQuant(8, True, 0.05)) if writes == "codes" else dict(out_dtype=dtype)
        ms = median_ms(lambda out=out, kw=kw: cpu_ops.packed_conv3x3(xp, 8, True, prep, mult, bias, shuffle=2,
                                                                     out=out, **kw), args.reps)
        rows.append({"writes": writes, "cpp_ms": ms, "out_mb": out.numel() * out.element_size() / 1e6})
    last = torch.nn.Conv2d(c, 3, 3, padding=1).to(torch.bfloat16, memory_format=torch.channels_last)
    hr = torch.randn(n, c, 2 * hw, 2 * hw, generator=g).to(torch.bfloat16, memory_format=torch.channels_last)
    with torch.no_grad():
        last_ms = median_ms(lambda: last(hr), args.reps)
    return rows, last_ms


if __name__ == "__main__":
    raise SystemExit(main())
