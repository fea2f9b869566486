"""Per-conv speed of the packed Triton kernels vs torch fp16 channels_last cuDNN, and vs the floor.

    python benchmarks/kernels.py [--out DIR] [--scale 4] [--output 1920x1080]

Workload: the 3x3 convs of EDSR-baseline on the 96x96 LR patches (stride 90) that tile a 1080p
*output* frame (x4: 480x270 LR -> 18 patches), the papers' protocol. For each activation width
a in {8,4,2} and weight width w in {8,4,2}: conv1 (signed codes in, ReLU, re-quantize + pack out)
and conv2 (unsigned codes in, fp32 residual add, fp32 out); ``conv2+next`` (w8 only) is conv2 as
the body runs it: residual updated in place and the next block's packed codes written beside it.
``conv2 float16 stream`` / ``conv2+next float16 stream`` (a8 w8): the same on an fp16 residual,
as an fp16 engine's body keeps it on Triton/CUDA (``residual_stream="auto"``).
``conv1 bytes`` / ``conv2 bytes`` (a4, a2; w8): the same codes one per byte, as the engine runs
them on Triton/CUDA by default (``containers="bytes"``), through the 8-bit kernel.
Plus the 64->256 upsampler conv: fp32 out, and (``upsampler shuffled fp16``) stored pixel-shuffled
in fp16 as the x4 integer tail's last stage runs it. ``last conv fp16``: the network's FP last conv
(64 -> 3 on the HR map, fp16 in) on the Triton kernel (kernels/fp_conv.py) against cuDNN fp16 of
the same shape; its floor counts fp16 MACs at the measured fp16 peak. ``... N-major w``, ``... L1 A``,
``... cvt`` and ``... cvt sat`` (a8 w8 conv1, conv2, upsampler): A/B rows (``AB_ROWS``) on the tile
config of the row before them, with one thing changed (``cvt``: the epilogue's conversions by adds,
on a Gaussian layer's weight codes; ``cvt sat``: also its codes by one saturating conversion
each); so are ``conv2 res early`` / ``res late`` and ``conv2+next res ...``, with the residual
tile read before the K loop or after it, whichever the autotuner did not pick. ``upsampler
shuffled codes`` is the x4 tail's first stage (8-bit codes out, pixel-shuffled); both shuffled
rows have ``cvt`` and ``cvt sat`` twins.
``... padded`` (a8 conv1, conv2, conv2+next; conv2+next at a4, a2 one code per byte): the same
convs with every tensor in the padded layout, on the TMA kernel, as the body's
``containers="padded"`` runs them (8-bit unsigned codes between conv1 and conv2 as offset codes);
their floor counts the image's pixels' MACs and the padded tensors' bytes. Baseline: torch fp16 NHWC conv
(cudnn.benchmark) of the same shape, same run. The CUDA C++ kernels (csrc/cuda, mma.sync) are timed
on the same inputs when the extension was built with CUDA (column ``cuda_us``).
Every row runs the flat Triton kernel (``kernels/conv3x3.py``); ``--sm90`` times the Gluon body conv
(``kernels/body_conv_sm90.py``, the engine's default for the body on sm_90) against it instead: conv1,
conv2+next and conv2+next on the fp16 stream both ways, the Gluon one as the engine runs it
(``... sm90 s4 p2 rows ws g1 f1 tma res halo cvt sat``: ring stages, programs per SM, row-layout
epilogue, the warp-specialized twin with its stages released one at a time, one tap's MMAs left in
flight, conv1's codes stored by TMA, ``res``: the fp16 stream in and out by TMA (its rows only),
the input read as 3 halo boxes a tile, its ring counting boxes, the epilogue's conversions by adds,
``sat``: the 8-bit codes by one saturating conversion each (rows not writing an fp16 stream:
``ops.sm90_cvt_sat_applies``); ``halo`` where the Triton's Gluon can build it); then conv1 and
conv2+next on the fp16 stream at a4 and a2, one code per byte (``... bytes``), on the same
defaults; then signed codes into the MMAs the other way (``regs``: through registers,
``ops.SM90_A_REGS``) for conv1 at a8 and a4 and conv2+next on the fp16 stream at a4; then the
a8 conv2+next on the fp16 stream with its residual boxes the other way (``late``: each tile's
residual copied after its input boxes, ``ops.SM90_RES_LATE``; ``res2``: two residual boxes, the
ring one halo box shorter, ``ops.SM90_RES_BUFS``; both); then conv1 and the a8 conv2+next on
the fp16 stream with two pairs of a producer and an MMA warpgroup a program (``pairs2``:
``ops.SM90_PAIRS``, one program an SM sharing the weights), the latter also with two residual
boxes copied late, the ring kept. Those rows and the engine's a8 / a4 / a2 rows are timed again in
``--rounds`` interleaved rounds (JSON ``interleaved``: each row's us per round, and each pair's
ratios round by round and their median: a4 / a2 against a8, ``regs``, ``late``, ``res2`` and
``pairs2`` against the engine's row, with the variables that turn the switch on, ``env``;
``benchmarks/targets.py`` takes the a4 / a2 ratios from there, ``benchmarks/pick_switches.py`` the
winning switches): the engine's, a4 / a2 and ``regs`` rows right after them, the ``late`` /
``res2`` rows after those, the ``pairs2`` rows last. Then each default undone (without
``res halo cvt sat``: as up to the ninth run; without ``halo``: tap boxes, a ring of 6; without
``cvt``; without ``res``; ``sat`` the other way round) and two taps' MMAs in flight (``f2``, off).
The ``--sm90`` rows draw their weight codes from a rounded N(0, 32^2), as the per-channel codes of a
Gaussian layer (uniform codes would bound the sums above the ``cvt`` rows' 2**22,
``ops.fp32_sums_by_add``; the shipped EDSR weights stay below it). The ninth run's other knobs
(``g3``: stages released 3 at a time; without ``tma``: conv1's codes by stores; without ``ws``:
the first-built kernel) were slower, and are no longer rows.
Last, the upsampler's shuffled rows (codes, then fp16) on the flat kernel, then on the Gluon conv's
twin (``... sm90 ...``: 64 output channels a program, ``ops.SM90_UP``): on tap boxes with the
conversions by adds, then on the defaults without the adds, with them (the engine's fp16) and,
for the codes, with the saturating codes too (the engine's codes). The rows of the convs as the
engine runs them on sm_90 carry ``"engine": true`` (not conv2+next on the fp32 stream: the body
keeps an fp16 stream on GPUs); ``benchmarks/targets.py`` checks issue 4's targets on them.
Floor = max(int8 ops / measured int8 peak, bytes / measured HBM bandwidth); the peaks are measured
here (torch._int_mm 8192^3, a 1 GiB device copy). Medians of triton.testing.do_bench over
CUDA-graph replays of launches rotating across buffers larger than L2 (``--timing eager`` times
plain launches, host overhead included). Writes kernels-<device>-<date>.json after every row (a
run cut short keeps its rows; ``complete`` says whether all ran); prints a table last.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import autotune_choices, gaussian_weight_codes, measure_gpu_peaks, write_results  # noqa: E402
from targets import row_key  # noqa: E402  (the rounds' row names, as targets.py reads them)

# A/B rows of the a8 w8 conv1, conv2 and the upsampler, each on the autotuner's tile config for
# the row before it: "N-major w" has the weights N-contiguous, as prepared before 2026-11-26 (each
# tile then went through registers into shared memory every K step); "L1 A" loads the activation
# tiles by 8-byte cp.async.ca, through L1, instead of 16-byte cp.async.cg (docs/kernels.md).
# conv2 and conv2+next are also followed by "res early" or "res late": the autotuner's pick with the
# residual tile read before the K loop instead of after it, or the other way round (RES_EARLY).
# "cvt" has the epilogue's conversions by adds (ops.CVT_ADD), on weight codes of a Gaussian layer
# (rounded N(0, 32^2)), whose sums the int -> float adds cover (ops.fp32_sums_by_add); "cvt sat"
# also its codes by one saturating conversion each (ops.CVT_SAT).
AB_ROWS = ("N-major w", "L1 A", "cvt", "cvt sat")
# the shuffled upsampler's rows: plain, with the conversions by adds, and with the saturating codes too
CVT_ROWS = ("", "cvt", "cvt sat")


def cvt_switches(variant: str) -> tuple[bool, bool]:
    """(conversions by adds, saturating codes) of a row's variant: "cvt" the first, "cvt sat" both."""
    return variant.startswith("cvt"), variant == "cvt sat"



def sm90_label(opts: dict, res: bool, sat: bool, regs: bool = False) -> str:
    """A row's name for the Gluon conv's launch options: ``s6 p2 rows ws g1 f1 tma`` (ring stages,
    programs per SM, row epilogue; the warp-specialized twin's release group, taps' MMAs in flight,
    conv1's codes by TMA, ``res``: the fp16 stream by TMA, ``halo``: the input as halo boxes, the
    stages then counting boxes, ``cvt``: the epilogue's conversions by adds, ``sat``: its 8-bit codes
    by one saturating conversion each, ``regs``: signed codes into the MMAs through registers;
    ``res2``: ``res`` with 2 residual boxes, the ring shorter but with 2 pairs, ``late``: the
    residual copied after each tile's input boxes; ``pairs2``: 2 pairs of a producer and an MMA
    warpgroup a program, sharing the weights). ``res``, ``sat`` and ``regs``: whether the row's conv gets those
    (``opts`` asks for them; the conv writes an fp16 stream, codes; reads signed codes)."""
    from gdq_engine.kernels.ops import sm90_ring_stages

    bufs = opts["sm90_res_bufs"] if res and opts["sm90_ws"] else 1
    stages = sm90_ring_stages(opts, bufs) if opts["sm90_ws"] else opts["sm90_stages"]
    label = f"s{stages} p{opts['sm90_per_sm']}{' rows' if opts['sm90_epi_rows'] else ''}"
    if opts["sm90_ws"]:
        res_label = f" res{bufs if bufs > 1 else ''}{' late' if opts['sm90_res_late'] else ''}" if res else ""
        label += (f" ws g{opts['sm90_group']} f{opts['sm90_in_flight']}{' tma' if opts['sm90_tma_out'] else ''}"
                  f"{res_label}{' halo' if opts['sm90_halo'] else ''}"
                  f"{' cvt' if opts['sm90_cvt_add'] else ''}{' sat' if sat else ''}{' regs' if regs else ''}"
                  f"{' pairs2' if opts['sm90_pairs'] == 2 else ''}")
    return label


def sm90_row_switches(opts: dict, kind: str, stream: torch.dtype, signed: bool) -> tuple[bool, bool, bool]:
    """(fp16 stream by TMA, saturating codes, signed codes through registers) as the Gluon conv's
    ``opts`` give them to a body conv row: ``kind`` "conv1" (8-bit codes out) or a conv2 (its
    ``stream`` out, maybe with next codes), reading ``signed`` codes or not."""
    from gdq_engine.kernels.ops import sm90_cvt_sat_applies, sm90_tma_res_applies

    o_bits, residual, out_dtype = (8, None, torch.uint8) if kind == "conv1" else (0, stream, stream)
    return (sm90_tma_res_applies(opts["sm90_tma_res"], o_bits, residual, out_dtype),
            sm90_cvt_sat_applies(opts["sm90_cvt_sat"], o_bits, out_dtype), bool(opts["sm90_a_regs"]) and signed)


def bench(fn, rep_ms: int = 200, smoke: bool = False) -> float:
    """Median ms of ``fn()`` (``triton.testing.do_bench``); ``smoke``: one timed call on the CPU."""
    if smoke:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def rotating(make, nbytes: int, l2_bytes: int = 50 << 20):
    """Enough independent buffers that cycling through them defeats the L2 cache."""
    count = max(2, math.ceil(3 * l2_bytes / max(nbytes, 1)))
    return [make() for _ in range(min(count, 16))]


def patch_batch(scale: int, out_w: int, out_h: int) -> int:
    from gdq_engine.runtime.tiler import make_grid

    lr_h, lr_w = out_h // scale, out_w // scale
    return len(make_grid(lr_h, lr_w, 96, 90))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--output", default="1920x1080", help="HR output frame WxH whose LR patches are convolved")
    p.add_argument("--timing", choices=["graph", "eager"], default="graph",
                   help="time CUDA-graph replays of the launches (default) or eager launches (includes host overhead)")
    p.add_argument("--sm90", action="store_true",
                   help="only the Gluon body conv (kernels/body_conv_sm90.py) against the flat kernel: the a8 body "
                        "convs both ways in one run, and its ring depths x programs per SM (kernels-sm90-*.json)")
    p.add_argument("--rounds", type=int, default=5,
                   help="--sm90: interleaved rounds over the rows issue 4's ratios compare (default 5; --smoke: 2)")
    p.add_argument("--smoke", action="store_true",
                   help="check the script itself: every row once on one 8x8 patch on the CPU (TRITON_INTERPRET=1); "
                        "the numbers mean nothing")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    import triton
    from gdq_engine.kernels import ops as tk

    from gdq_engine.ops import cuda_ops
    from gdq_engine.quant.packing import pack_codes
    from gdq_engine.quant.quantizer import ActQuant, code_range, container_bits
    from gdq_engine.runtime.intgraph import reads_signed

    torch.backends.cudnn.benchmark = True
    out_w, out_h = map(int, args.output.lower().split("x"))
    dev = "cpu" if args.smoke else "cuda"
    n, hw, c = (1, 8, 64) if args.smoke else (patch_batch(args.scale, out_w, out_h), 96, 64)
    m = n * hw * hw
    peaks = {"int8_tops": 1.0, "fp16_tflops": 1.0, "hbm_gbs": 1.0} if args.smoke else measure_gpu_peaks()
    g = torch.Generator(device=dev).manual_seed(0)

    def floor_us(macs: int, nbytes: int, peak: str = "int8_tops") -> float:
        return max(2 * macs / (peaks[peak] * 1e12), nbytes / (peaks["hbm_gbs"] * 1e9)) * 1e6

    def cudnn_us(cout: int) -> float:
        half = torch.float32 if args.smoke else torch.float16  # CPUs lack fast fp16 convs
        conv = torch.nn.Conv2d(c, cout, 3, padding=1).to(dev, half).to(memory_format=torch.channels_last)
        xs = rotating(lambda: torch.randn(n, c, hw, hw, device=dev, dtype=half).to(
            memory_format=torch.channels_last), m * c * 2)
        with torch.inference_mode():
            return time_rotating(conv, xs) * 1e3

    last_timer = {}  # "timer": the last time_rotating's measurement, to be taken again (interleaved rounds)

    def time_rotating(fn, inputs) -> float:
        """Median ms of one ``fn(x)``, x rotating over ``inputs`` (past the L2 cache).

        ``graph`` timing: one eager call per input (compiles, autotunes), then all of them captured
        in one CUDA graph whose replays are timed, so host launch overhead is excluded (eager
        per-call timing measured 46-96 us for the same a8 kernel in two runs: host-bound).
        ``last_timer["timer"]`` then takes the same measurement again (``rep_ms``: do_bench's
        time), holding the graph and inputs while someone holds it.
        """
        if args.timing == "eager" or args.smoke:
            counter = iter(range(1 << 62))

            def timer(rep_ms: int = 200) -> float:
                return bench(lambda: fn(inputs[next(counter) % len(inputs)]), rep_ms, smoke=args.smoke)

            last_timer["timer"] = timer
            return timer()
        for x in inputs:
            fn(x)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for x in inputs:
                fn(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for x in inputs:
                fn(x)

        def replays(rep_ms: int = 200) -> float:
            return bench(graph.replay, rep_ms) / len(inputs)

        last_timer["timer"] = replays
        return replays()

    def timed_row(conv: str, cout: int, a_bits: int, w_bits: int, us: float, macs: int, nbytes: int,
                  cuda: float | None, container: int | None = None, cudnn: float | None = None,
                  peak: str = "int8_tops") -> dict:
        """One row: our ``us`` against cuDNN fp16 (``cudnn``, by default the 64-channel conv of the
        same Cout) and against the floor (MACs at the ``peak`` rate)."""
        floor, cudnn = floor_us(macs, nbytes, peak), base[cout] if cudnn is None else cudnn
        return {"conv": conv, "cin": c, "cout": cout, "a_bits": a_bits, "w_bits": w_bits,
                "container": container or container_bits(a_bits), "us": us,
                "cudnn_fp16_us": cudnn, "speedup_vs_fp16": cudnn / us, "floor_us": floor,
                "pct_of_floor": 100 * floor / us, "cuda_us": cuda}

    def conv_case(kind: str, a_bits: int, w_bits: int, one_per_byte: bool = False, variant: str = "",
                  padded: bool = False, stream: torch.dtype = torch.float32, sm90: dict | None = None) -> dict:
        """One conv row; ``variant`` ("N-major w", "L1 A", "cvt" or "cvt sat") is an A/B row of the a8 conv (AB_ROWS);
        ``padded``: every tensor in the padded layout, the TMA kernel (``containers="padded"``);
        ``stream``: the residual's dtype (conv2: fp16 as an fp16 engine's body keeps it on Triton);
        ``sm90``: the Gluon body conv's launch options (``ops.LaunchOptions``' ``sm90_*`` fields,
        all of them: ``ops.sm90_settings()``' keys), which then runs it."""
        signed = kind == "conv1"
        # the CUDA op has no fused next-codes output and an fp32 stream only; the A/B rows time Triton only
        cuda_run = (kind != "conv2+next" and not one_per_byte and not variant and not padded
                    and stream == torch.float32)
        cont = 8 if one_per_byte or padded else container_bits(a_bits)  # bits per stored code
        hp = hw + 2 if padded else hw  # stored side: the padded layout adds a one-pixel zero ring
        # as the body passes them: narrow unsigned codes one per byte go in as signed bytes (same values)
        read_signed = reads_signed(tk, ActQuant(a_bits, signed, 1.0, container=cont))
        # ... and in the padded layout 8-bit unsigned codes as code ^ 0x80 (conv1 writes them, conv2 reads them)
        offset = padded and a_bits == 8 and not read_signed
        layout = dict(padded=True, offset_in=offset, offset_out=kind == "conv1" and a_bits == 8) if padded else {}
        hi_w = (1 << (w_bits - 1)) - 1
        if args.sm90 or cvt_switches(variant)[0]:  # codes of a Gaussian layer (docstring): sums within the cvt adds
            w = gaussian_weight_codes((64, c, 3, 3), dev, g, hi_w)
        else:
            w = torch.randint(-hi_w, hi_w + 1, (64, c, 3, 3), device=dev, generator=g).to(torch.int8)
        mult = torch.rand(64, device=dev, generator=g) * 1e-3
        bias = torch.randn(64, device=dev, generator=g) * 0.01
        lo, hi = code_range(a_bits, signed)
        prep = tk.prepare_conv_weight(w, cont)
        if variant == "N-major w":
            prep = replace(prep, w=prep.w.contiguous())
        in_bytes = n * hp * hp * c * cont // 8

        def codes():
            x = pack_codes(torch.randint(lo, hi + 1, (n, hw, hw, c), device=dev, generator=g), cont)
            x = torch.nn.functional.pad(x, (0, 0, 1, 1, 1, 1)) if padded else x
            return x ^ 0x80 if offset else x

        xs = rotating(codes, in_bytes)
        if kind == "conv1":
            out = torch.empty(n, hp, hp, c * cont // 8, dtype=torch.uint8, device=dev)
            kw = dict(relu=True, out_quant=ActQuant(a_bits, False, 0.02, container=cont), out=out)
            nbytes = in_bytes + out.numel()
        elif kind == "conv2":
            res = torch.randn(n, hp, hp, c, device=dev, generator=g).to(stream)
            kw = dict(residual=res, out=torch.empty_like(res), out_dtype=stream)
            nbytes = in_bytes + 2 * res.numel() * res.element_size()
        else:  # conv2+next: in place, plus the next block's signed codes
            res = torch.randn(n, hp, hp, c, device=dev, generator=g).to(stream)
            nxt = torch.empty(n, hp, hp, c * cont // 8, dtype=torch.uint8, device=dev)
            kw = dict(residual=res, out=res, out_dtype=stream, next_quant=ActQuant(a_bits, True, 0.05, container=cont),
                      next_out=nxt)
            nbytes = in_bytes + 2 * res.numel() * res.element_size() + nxt.numel()
        # the flat kernel unless the row names the Gluon one (on sm_90 the engine's default for the body)
        gluon = dict(sm90=True, **sm90) if sm90 else dict(sm90=False)
        with tk.launch_options(**gluon):
            t = time_rotating(lambda x: tk.packed_conv3x3(x, cont, read_signed, prep, mult, bias, **kw, **layout),
                              xs) * 1e3
        triton_timer = last_timer["timer"]

        def timer(rep_ms: int = 200) -> float:
            with tk.launch_options(**gluon):  # eager timing launches again: under the row's options
                return triton_timer(rep_ms)

        cuda_kw = {k: v for k, v in kw.items() if k not in ("out", "out_dtype")}  # the CUDA op allocates its output
        cuda_time = (cuda_us(w, xs, lambda x, wp: cuda_ops.packed_conv3x3(x, a_bits, signed, wp, mult, bias, **cuda_kw))
                     if cuda_run else None)
        last_timer["timer"] = timer  # the row's Triton launches again (the CUDA op's timing replaced them)
        name = f"{kind} {variant}" if variant else kind
        name = f"{kind} padded" if padded else f"{kind} bytes" if one_per_byte else name
        name = name if stream == torch.float32 else f"{name} {str(stream).removeprefix('torch.')} stream"
        name = f"{name} sm90 {sm90_label(sm90, *sm90_row_switches(sm90, kind, stream, read_signed))}" if sm90 else name
        # MACs of the image's pixels only: the ring's are waste the floor does not count
        return timed_row(name, 64, a_bits, w_bits, t, m * 9 * c * 64, nbytes, cuda_time, cont)

    def cuda_us(w, xs, run) -> float | None:
        """Median us of the CUDA C++ kernel (csrc/cuda) on the same inputs; None when not built."""
        if cuda_ops.unavailable_reason(torch.device("cuda")) is not None:
            return None
        wp = cuda_ops.prepare_conv_weight(w)
        return time_rotating(lambda x: run(x, wp), xs) * 1e3

    base = {64: cudnn_us(64), 256: cudnn_us(256)}
    # Upsampler conv 64 -> 256, 8-bit codes in.
    w_up = torch.randint(-127, 128, (256, c, 3, 3), device=dev, generator=g).to(torch.int8)
    prep_up = tk.prepare_conv_weight(w_up, 8)
    xs_up = rotating(lambda: torch.randint(0, 256, (n, hw, hw, c), device=dev, generator=g, dtype=torch.uint8),
                     m * c)
    ones, zeros = torch.ones(256, device=dev), torch.zeros(256, device=dev)
    macs_up = m * 9 * c * 256

    prep_up_gauss = tk.prepare_conv_weight(gaussian_weight_codes((256, c, 3, 3), dev, g), 8)  # for the cvt rows

    def upsampler(variant: str = "") -> dict:
        """fp32 out; ``variant``: an A/B row (AB_ROWS)."""
        prep = replace(prep_up, w=prep_up.w.contiguous()) if variant == "N-major w" else prep_up
        prep = prep_up_gauss if cvt_switches(variant)[0] else prep
        out = torch.empty(n, hw, hw, 256, device=dev)
        with tk.launch_options(sm90=False):  # the flat kernel (on sm_90 the engine runs the twin: ops.SM90_UP)
            t = time_rotating(lambda x: tk.packed_conv3x3(x, 8, True, prep, ones, zeros, out=out), xs_up) * 1e3
        cuda = None if variant else cuda_us(w_up, xs_up, lambda x, wp: cuda_ops.packed_conv3x3(x, 8, True, wp, ones,
                                                                                                zeros))
        return timed_row(f"upsampler {variant}" if variant else "upsampler", 256, 8, 8, t, macs_up,
                         m * c + out.numel() * 4, cuda)

    def upsampler_shuffled(codes: bool = False, cvt: str = "", sm90: dict | None = None) -> dict:
        """The x4 tail's last stage: the same conv storing pixel-shuffled fp16 (N, 2h, 2w, 64); with
        ``codes`` its first stage, storing pixel-shuffled 8-bit codes; ``cvt``: "cvt", the
        epilogue's conversions by adds, "cvt sat" also its codes by one saturating conversion each,
        on a Gaussian layer's weights; ``sm90``: the Gluon conv's settings (``ops.sm90_settings()``'
        keys; ``cvt`` sets the adds and the saturating codes), its twin then running the conv in
        groups of 64 output channels (``sm90_up``); None: the flat kernel."""
        if codes:
            out = torch.empty(n, 2 * hw, 2 * hw, 64, dtype=torch.uint8, device=dev)
            kw = dict(out_quant=ActQuant(8, True, 0.05), out=out)
        else:
            out = torch.empty(n, 2 * hw, 2 * hw, 64, dtype=torch.float16, device=dev)
            kw = dict(out_dtype=torch.float16, out=out)
        small = torch.full((256,), 1e-4, device=dev)  # sums reach 2^24: keep them inside fp16's range
        adds, sat = cvt_switches(cvt)
        opts = None if sm90 is None else dict(sm90, sm90_up=True, sm90_cvt_add=adds, sm90_cvt_sat=sat)
        up = dict(sm90=False) if opts is None else dict(sm90=True, **opts)
        with tk.launch_options(cvt_add=adds, cvt_sat=sat, **up):
            t = time_rotating(lambda x: tk.packed_conv3x3(x, 8, True, prep_up_gauss if adds else prep_up, small, zeros,
                                                          shuffle=2, **kw), xs_up) * 1e3
        name = f"upsampler shuffled {'codes' if codes else 'fp16'}"
        labelled = None if opts is None else sm90_label(opts, False, sat and codes, bool(opts["sm90_a_regs"]))
        name = f"{name} {cvt}".rstrip() if opts is None else f"{name} sm90 {labelled}"
        return timed_row(name, 256, 8, 8, t, macs_up, m * c + out.numel() * out.element_size(), None)

    def last_conv() -> dict:
        """The network's last conv, FP: fp16 (N, 64, sH, sW) channels_last -> 3 channels on the HR map,
        the Triton kernel (kernels/fp_conv.py, fp32 NCHW out) against cuDNN fp16 (fp16 out) of the
        same shape, same inputs; the floor is max(2 MACs / fp16 peak, bytes / HBM bandwidth)."""
        side = args.scale * hw
        half = torch.float16
        xs = rotating(lambda: torch.randn(n, c, side, side, device=dev, generator=g).to(half).to(
            memory_format=torch.channels_last), n * c * side * side * 2)
        conv = torch.nn.Conv2d(c, 3, 3, padding=1).to(dev)
        w, b = tk.prepare_fp_weight(conv.weight.detach().to(half), conv.bias.detach().to(half))
        t = time_rotating(lambda x: tk.fp_conv3x3(x.permute(0, 2, 3, 1), w, b, 3), xs) * 1e3
        if args.smoke:  # CPUs lack fp16 convs: the baseline's fp32 twin, only to run the script
            cudnn = time_rotating(lambda x: conv(x.float()), xs) * 1e3
        else:
            conv16 = conv.to(half).to(memory_format=torch.channels_last)
            with torch.inference_mode():
                cudnn = time_rotating(conv16, xs) * 1e3
        macs, nbytes = n * side * side * 9 * c * 3, n * side * side * (c * 2 + 3 * 4)
        return timed_row("last conv fp16", 3, 16, 16, t, macs, nbytes, None, container=16, cudnn=cudnn,
                         peak="fp16_tflops")

    def rerun_row(kind: str, variant: str, config: triton.Config | None, a_l1: bool = False) -> dict:
        """The a8 w8 ``kind`` conv (or the upsampler) again as the A/B row ``variant``, launched with
        ``config`` (None: the default launch) and ``a_l1``; the row records the config."""
        adds, sat = cvt_switches(variant)
        with tk.launch_options(config=config, a_l1=a_l1, cvt_add=adds, cvt_sat=sat):
            row = upsampler(variant) if kind == "upsampler" else conv_case(kind, 8, 8, variant=variant)
        row["config"] = None if config is None else str(config)
        return row

    def ab_row(base: dict, variant: str) -> dict:
        """``base``'s conv again with one thing changed (AB_ROWS), on the tile config the autotuner
        picked for ``base`` (the last launch's), so only that thing differs."""
        # None: the interpreter (--smoke), or GDQ_TRITON_AUTOTUNE=0, where every row runs the fixed config
        config = tk._tuned_conv.best_config if tk.AUTOTUNE and not args.smoke else None
        return rerun_row(base["conv"], variant, config, a_l1=variant == "L1 A")

    def res_ab_row(kind: str) -> dict:
        """``kind`` (conv2 or conv2+next, just timed) again on the autotuner's pick with the residual
        read moved: before the K loop when the pick reads it after, and the other way round
        (RES_EARLY, an autotuning option of residual convs: ops.TUNE_CONFIGS)."""
        best = tk._tuned_conv.best_config if tk.AUTOTUNE and not args.smoke else tk.fixed_config(64)
        early = not best.kwargs.get("RES_EARLY", False)
        config = tk.flat_config(best.kwargs["BLOCK_M"], best.kwargs["BLOCK_K"], best.num_warps, best.num_stages,
                                res_early=early)
        return rerun_row(kind, "res early" if early else "res late", config)

    def with_ab_rows(run_base) -> list[dict]:
        base = run_base()
        return [base] + [ab_row(base, variant) for variant in AB_ROWS]

    kept, pairs, interleaved = {}, [], {}  # row key -> its timer; (row, against) keys; the rounds' results

    def keep(row: dict, against: dict | None = None, env: dict | None = None) -> dict:
        """Hold ``row``'s measurement (the last :func:`time_rotating`'s) for :func:`interleave`, to be
        compared with the kept row ``against`` (None: with none); ``env``: the ``GDQ_SM90_*``
        variables that make the engine launch ``row``'s conv as ``row`` (an A/B row against the
        engine's: ``benchmarks/pick_switches.py`` reads them)."""
        kept[row_key(row)] = last_timer["timer"]
        if against is not None:
            pairs.append((row_key(row), row_key(against), env or {}))
        return row

    def interleave(rounds: int, still_kept: tuple[str, ...] = ()) -> list[dict]:
        """Every kept row timed once a round (``do_bench`` over 100 ms; the order reversed every other
        round), ``rounds`` rounds: the ratios of each pair kept since the last call, round by round,
        and their median, so a ratio compares rows timed seconds apart, on the same clocks. Adds to
        the JSON's ``interleaved`` (each row's times, the pairs with the times they compare); frees
        the kept graphs but those of the rows ``still_kept`` names (keys), for later pairs; no rows
        of its own."""
        us = {key: [] for key in kept}
        for r in range(rounds):
            for key in list(kept)[::1 if r % 2 == 0 else -1]:
                us[key].append(kept[key](100) * 1e3)

        def pair(row: str, against: str, env: dict) -> dict:
            ratios = [a / b for a, b in zip(us[row], us[against])]
            return {"row": row, "against": against, "row_us": us[row], "against_us": us[against], "ratios": ratios,
                    "median_ratio": statistics.median(ratios), **({"env": env} if env else {})}

        done = interleaved.setdefault("interleaved", {"rounds": rounds, "rep_ms": 100, "us": {}, "pairs": []})
        for key, times in us.items():
            done["us"].setdefault(key, []).extend(times)
        done["pairs"] += [pair(*p) for p in pairs]
        pairs.clear()
        for key in set(kept) - set(still_kept):
            del kept[key]
        return []

    # Most telling rows first (the JSON is rewritten after every row, so a step cut short by its time
    # limit keeps what it timed): the 8-bit convs as the engine runs them, each followed by its A/B
    # rows, the padded layout's TMA kernel (containers="padded"), the upsampler, the padded a4/a2
    # conv2, one code per byte (the GPU default for a4/a2), then every bit pair packed.
    runs = [lambda: with_ab_rows(lambda: conv_case("conv1", 8, 8)),  # each returns its rows
            lambda: with_ab_rows(lambda: conv_case("conv2", 8, 8)) + [res_ab_row("conv2")],
            lambda: [conv_case("conv2+next", 8, 8), res_ab_row("conv2+next")],
            lambda: [conv_case(k, 8, 8, stream=torch.float16) for k in ("conv2", "conv2+next")],
            lambda: [conv_case(k, 8, 8, padded=True) for k in ("conv1", "conv2", "conv2+next")],
            lambda: with_ab_rows(upsampler), lambda: [upsampler_shuffled(cvt=c) for c in CVT_ROWS],
            lambda: [upsampler_shuffled(codes=True, cvt=c) for c in CVT_ROWS], lambda: [last_conv()]]
    runs += [lambda a=a: [conv_case("conv2+next", a, 8, padded=True)] for a in (4, 2)]
    runs += [lambda a=a, k=k: [conv_case(k, a, 8, one_per_byte=True)] for a in (4, 2) for k in ("conv1", "conv2")]
    runs += [lambda a=a: [conv_case("conv2+next", a, 8)] for a in (4, 2)]
    runs += [lambda a=a, w=w, k=k: [conv_case(k, a, w)] for a in (8, 4, 2) for w in (8, 4, 2)
             for k in ("conv1", "conv2") if (a, w) != (8, 8)]
    if args.sm90:  # the Gluon body conv and the flat kernel, same inputs, same run; then its knobs
        f32, f16 = torch.float32, torch.float16
        both = (("conv1", f32), ("conv2+next", f32), ("conv2+next", f16))
        # as the engine runs it on sm_90: halo boxes, the conversions by adds, the fp16 stream by TMA,
        # the saturating codes where they were faster ("auto")
        default = tk.sm90_settings()
        with tk.launch_options(sm90_halo=False):
            taps = tk.sm90_settings()  # tap boxes, at their own ring depth
        # "engine": the row's conv as the engine runs it on sm_90 (its settings, the fp16 stream: the
        # body's residual_stream="auto" on GPUs), which benchmarks/targets.py checks issue 4's targets on
        engine_rows = {}  # (kind, a_bits) -> the engine's row, kept for the interleaved rounds

        def engine_row(kind: str, a_bits: int, stream: torch.dtype) -> dict:
            row = dict(conv_case(kind, a_bits, 8, one_per_byte=a_bits < 8, stream=stream, sm90=default), engine=True)
            engine_rows[kind, a_bits] = keep(row, engine_rows.get((kind, 8)))
            return row

        runs = [lambda k=k, st=st: [conv_case(k, 8, 8, stream=st),
                                    engine_row(k, 8, st) if k == "conv1" or st == f16
                                    else conv_case(k, 8, 8, stream=st, sm90=default)]
                for k, st in both]
        # a4 and a2 codes one per byte (the engine's containers on GPUs) on the same defaults: the
        # same kernel with narrower clamps (and signed reading, conv2), against the a8 rows above
        runs += [lambda a=a: [engine_row(k, a, st) for k, st in (("conv1", f32), ("conv2+next", f16))] for a in (4, 2)]
        # signed codes into the MMAs the other way (registers / shared memory: sm90_a_regs): conv1 at a8
        # and a4, conv2 + next codes on the fp16 stream at a4 (at a8 it reads unsigned codes, always
        # through registers), each against its engine row
        regs = dict(default, sm90_a_regs=not default["sm90_a_regs"])
        regs_env = {"GDQ_SM90_A_REGS": str(int(regs["sm90_a_regs"]))}
        runs += [lambda: [keep(conv_case(k, a, 8, one_per_byte=a < 8, stream=st, sm90=regs), engine_rows[k, a],
                               regs_env)
                          for k, a, st in (("conv1", 8, f32), ("conv1", 4, f32), ("conv2+next", 4, f16))]]
        # the rows so far in interleaved rounds (issue 4's ratios and the regs pairs), before any row of
        # the residual boxes' switches, whose kernels no GPU has run yet, can cost the step its time
        rounds = args.rounds if not args.smoke else 2

        def a8_keys() -> tuple[str, ...]:
            """The engine's a8 rows, kept for the later batches' pairs."""
            return tuple(row_key(engine_rows[k, 8]) for k in ("conv1", "conv2+next"))

        runs += [lambda: interleave(rounds, a8_keys())]
        # the fp16 stream's residual boxes the other way (sm90_res_bufs: 1 or 2, the ring then shorter;
        # sm90_res_late: each tile's residual copied after its input boxes or after the first), each
        # against the engine's conv2 + next codes on the fp16 stream; then those rows and the engine's
        # in interleaved rounds
        other_bufs, other_late = 3 - default["sm90_res_bufs"], not default["sm90_res_late"]
        stream_knobs = (dict(default, sm90_res_late=other_late), dict(default, sm90_res_bufs=other_bufs),
                        dict(default, sm90_res_bufs=other_bufs, sm90_res_late=other_late))
        runs += [lambda: [keep(conv_case("conv2+next", 8, 8, stream=f16, sm90=sp), engine_rows["conv2+next", 8],
                               {"GDQ_SM90_RES_BUFS": str(sp["sm90_res_bufs"]),
                                "GDQ_SM90_RES_LATE": str(int(sp["sm90_res_late"]))})
                          for sp in stream_knobs],
                 lambda: interleave(rounds, a8_keys())]
        # two pairs of a producer and an MMA warpgroup a program (sm90_pairs), sharing the weights:
        # conv1 and conv2 + next codes on the fp16 stream at a8, the latter also with two residual
        # boxes copied late (the ring kept), each against its engine row; then in interleaved rounds
        two = dict(default, sm90_pairs=3 - default["sm90_pairs"])
        two_res = dict(two, sm90_res_bufs=2, sm90_res_late=True)
        two_env = {"GDQ_SM90_PAIRS": str(two["sm90_pairs"])}
        runs += [lambda: [keep(conv_case(k, 8, 8, stream=st, sm90=two), engine_rows[k, 8], two_env)
                          for k, st in (("conv1", f32), ("conv2+next", f16))]
                 + [keep(conv_case("conv2+next", 8, 8, stream=f16, sm90=two_res), engine_rows["conv2+next", 8],
                         dict(two_env, GDQ_SM90_RES_BUFS="2", GDQ_SM90_RES_LATE="1"))],
                 lambda: interleave(rounds)]
        # each of the defaults' switches undone (all of them: the ninth run's settings; tap boxes; no
        # adds; the fp16 stream by stores, its rows only; the saturating codes the other way round),
        # then two taps' MMAs in flight (off)
        ninth = dict(taps, sm90_cvt_add=False, sm90_tma_res=False, sm90_cvt_sat=False)
        knobs = (ninth, taps, dict(default, sm90_cvt_add=False), dict(default, sm90_tma_res=False),
                 dict(default, sm90_cvt_sat=True), dict(default, sm90_cvt_sat=False), dict(default, sm90_in_flight=2))

        def effective(sp: dict, kind: str, stream: torch.dtype) -> tuple:
            """What a row's conv gets of ``sp``: a knob that changes nothing for it is no row."""
            return (sp["sm90_stages"], sp["sm90_halo"], sp["sm90_cvt_add"], sp["sm90_in_flight"],
                    *sm90_row_switches(sp, kind, stream, kind == "conv1"), sp["sm90_res_bufs"], sp["sm90_res_late"])

        runs += [lambda k=k, st=st, sp=sp: [conv_case(k, 8, 8, stream=st, sm90=sp)] for k, st in both for sp in knobs
                 if effective(sp, k, st) != effective(default, k, st)]
        # the upsampler's shuffled convs, codes and fp16: the flat kernel, the twin (sm90_up) on tap
        # boxes with the conversions by adds (the tenth run's), then on the defaults without the adds,
        # with them, and with the saturating codes too; the engine's row has the defaults' adds and,
        # where the stage writes codes, their saturating codes (now: "cvt sat" for codes, "cvt" for fp16)
        up_adds, up_sat = default["sm90_cvt_add"], tk.sm90_cvt_sat_applies(default["sm90_cvt_sat"], 8, torch.uint8)
        runs += [lambda codes=codes: [upsampler_shuffled(codes), upsampler_shuffled(codes, "cvt", taps)]
                 + [dict(upsampler_shuffled(codes, cvt, default),
                         engine=cvt_switches(cvt) == (up_adds, codes and up_sat))
                    for cvt in (CVT_ROWS if codes else CVT_ROWS[:2])]
                 for codes in (True, False)]
    rows = []
    for done, run in enumerate(runs, 1):
        rows.extend(run())
        best = autotune_choices()
        payload = {"workload": {"scale": args.scale, "output": args.output, "patches": n, "patch": hw, "pixels": m},
                   "timing": "smoke" if args.smoke else args.timing, "peaks": peaks, "rows": rows,
                   "complete": done == len(runs), "autotune_choices": best, **interleaved}
        path = write_results("kernels-sm90" if args.sm90 else "kernels", payload, args.out)
    print(f"peaks: int8 {peaks['int8_tops']:.0f} TOPS, fp16 {peaks['fp16_tflops']:.0f} TFLOP/s, "
          f"HBM {peaks['hbm_gbs']:.0f} GB/s; {n} patches of {hw}x{hw} ({args.output} x{args.scale} output)")
    print(f"{'conv':23} {'a':>2} {'w':>2} {'us':>8} {'fp16 us':>8} {'x fp16':>7} {'floor us':>8} {'% floor':>7} "
          f"{'cuda us':>8}")
    for r in rows:
        cuda = "-" if r["cuda_us"] is None else f"{r['cuda_us']:.1f}"
        print(f"{r['conv']:23} {r['a_bits']:>2} {r['w_bits']:>2} {r['us']:8.1f} {r['cudnn_fp16_us']:8.1f} "
              f"{r['speedup_vs_fp16']:7.2f} {r['floor_us']:8.1f} {r['pct_of_floor']:7.1f} {cuda:>8}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
