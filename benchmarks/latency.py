"""End-to-end upscaling latency: torch FP baselines vs the quantized engine, same frames, same run.

    python benchmarks/latency.py --gpu [--out DIR] [--arch edsr-baseline] [--scale 4]
                                 [--output 1280x720,1920x1080,3840x2160] [--frames 4] [--compile max-autotune]
    python benchmarks/latency.py          # CPU mode (small frames)

The LR frames are crops of real photos: ``--frames`` K distinct images of the ``--calib``
folder (default ../shared/data/train; ``--image`` for one given file), each tiled by reflection
if smaller, and the timed call rotates over them, so dynamic policies meet K different patch
mixes. Every row upscales the same frames
with the papers' 96/90 tiling through ``Engine.upscale``:

* FP rows: fp32, and on GPU fp16/bf16 channels_last (cudnn.benchmark) and fp16 channels_last
  under ``torch.compile`` (``--compile`` mode, default max-autotune on GPU, none on CPU); on CPU
  bf16 channels_last (the AMX anchor).
* Quantized rows (residual-block bodies only: EDSR, MSRResNet): static a8/a4/a2, EntropyOnly
  {2,4,8}, and Granular-DQ {2,4,8} where a QAT-trained model ships for the model (EDSR-baseline
  x4); static a8 and Granular-DQ also with the integer tail (``tail_bits=8``: body-end and
  upsampler convs as int8 convs, gdq_engine/runtime/inttail.py; on GPU the fp16 last conv runs on
  the Triton FP kernel, runtime/lastconv.py, and one A/B row has cuDNN's instead; another, ``torch
  glue``, stitches and finishes the image in torch, :func:`torch_glue`, ``torch stitch`` only
  stitches in torch; and ``entropy {2,4,8}, group
  streams`` runs each batch's groups side by side, ``Engine(group_streams=True)``); on the ``auto`` backend
  (Triton on GPU, the C++ kernels on CPU; on GPU 2/4-bit codes one per byte, ``containers``,
  and one more Granular-DQ row with them packed); their FP layers run in the anchor's dtype (fp16 on
  GPU; on CPU bf16 with AMX-BF16, else fp32, :func:`cpu_fp_dtype`: column ``fp_dtype``) and one row
  shows static a8 with fp32 FP layers; on CPU
  one more static a8 row (fp32 FP layers) runs on the pure-torch reference backend.

``--arch edsr-baseline`` uses the shipped weights; ``msrresnet`` and ``rdn`` are built untrained
(their speed is what is measured; the PSNR column then only shows numerical agreement).

Columns: median ms per frame (``triton.testing.do_bench`` on GPU; on CPU host-timer medians of
``--reps`` rounds that call every row once, so drifting machine load hits all rows alike, with
glibc's malloc keeping freed memory: with its defaults torch's bf16 anchor paid page faults on
its per-layer tensors, 153-157 ms per frame against 106-110; ``--default-malloc`` leaves it),
speed-up vs the fp16 channels_last row (GPU) or the fp32 and bf16 channels_last rows (CPU), % of
the int8 roofline floor (GPU: max(2 x conv MACs of all patches / measured int8 peak, (LR in + HR
out bytes) / measured HBM bandwidth), peaks measured in the same run), ms per output megapixel
(linear scaling shows as a constant), FAB (mean over the patches of all frames), PSNR of the
output vs the fp32 output (mean
over frames). Writes latency-<device>-<date>.json (and ``--plot`` a PNG); prints a table last.
On GPU the JSON is also written after every row, ``"complete": false`` until the run ends, so a
run cut short keeps the rows it timed.
``--host-uint8`` hands every row its frames as uint8 tensors in host memory, so the times include
the copies in and the 8-bit results back (the whole ``upscale`` call a user with decoded frames
makes); ``--rows`` keeps only the named rows (and fp32, the PSNR reference).
``--profile METHOD`` (repeatable) also runs that row once per frame under torch.profiler and records
its top ops and its total self time per frame (where the time goes) under ``profiles``, on GPU with
the host's launch calls per frame and the places where one frame synchronises with the device.

On GPU, after do_bench has timed every row of a size, ``--reps`` rounds (default 30) call every
row once each, in turn, under the host timer (columns ``rounds`` and ``host``, keys ``ms_rounds``,
``host_ms``, ``wait_ms``, ``speedup_rounds_vs_fp16``): rows timed one after another can meet a
different machine (the first process of the fifth H100 run timed every row 0.2-0.5 ms above a
second process on the fourth), rows in rounds meet the same one. ``host`` is the call's time
outside its waits for device results (``UpscaleReport.wait_seconds``): where it nears the call's
time, the host's Python and launches, not the GPU, set the pace. The A/B pairs (``AB_PAIRS``,
key ``ab``) compare rows that differ in one thing by their rounds' medians.

A SIGTERM while rows are timed (a GPU session step's ``timeout``) stops the rows: those timed so
far get a few rounds and are written with ``"complete": false``, without profiles; exit status 3.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import re
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from gdq_engine.bench import frame_paths, interleaved_ms, lr_frames, place_frames
from gdq_engine.runtime.intgraph import has_integer_body, has_residual_body

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    autotune_choices,
    cpu_bf16_wins,
    keep_freed_memory,
    measure_gpu_peaks,
    write_results,
)

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("edsr-baseline", "msrresnet", "rdn")


def build_fp_model(arch: str, scale: int):
    """The FP model of a row set: shipped EDSR-baseline weights, or an untrained MSRResNet / RDN."""
    from gdq_engine import load_model
    from gdq_engine.models import RDN, MSRResNet

    if arch == "edsr-baseline":
        if scale not in (2, 4):
            raise ValueError("shipped EDSR-baseline weights exist for x2 and x4")
        return load_model(f"edsr-baseline-x{scale}")
    torch.manual_seed(0)
    return (MSRResNet if arch == "msrresnet" else RDN)(scale=scale).eval()


def cases_for(gpu: bool, model, granular: Path | None, compile_mode: str) -> list[tuple[str, dict]]:
    """(row name, Engine kwargs) of the compared methods; ``model`` / ``compile`` keys are the
    row's own model (a quantized checkpoint) and torch.compile mode."""
    half = torch.float16
    fp = [("fp32", dict(policy="fp"))]
    if gpu:
        fp += [("fp16 CL", dict(policy="fp", dtype=half)), ("bf16 CL", dict(policy="fp", dtype=torch.bfloat16))]
        if compile_mode != "none":
            fp.append((f"fp16 CL compile({compile_mode})", dict(policy="fp", dtype=half, compile=compile_mode)))
    else:  # the CPU anchor: bf16 channels_last (oneDNN; AMX where present)
        fp.append(("bf16 CL", dict(policy="fp", dtype=torch.bfloat16)))
        if compile_mode != "none":
            fp.append((f"fp32 CL compile({compile_mode})", dict(policy="fp", compile=compile_mode)))
    if not has_integer_body(model):
        return fp
    quant = [("static a8", dict(policy="static", bits=8)), ("static a4", dict(policy="static", bits=4)),
             ("static a2", dict(policy="static", bits=2)), ("entropy {2,4,8}", dict(policy="entropy", bits=(2, 4, 8)))]
    quant.append(("static a8 + int8 tail", dict(policy="static", bits=8, tail_bits=8)))
    if gpu:  # A/B: the last conv on cuDNN fp16 instead of the Triton FP kernel (runtime/lastconv.py)
        quant.append(("static a8 + int8 tail, cuDNN last conv", dict(policy="static", bits=8, tail_bits=8,
                                                                      last_conv="torch")))
    if gpu and not has_residual_body(model):  # A/B (RDN): each dense conv as one launch per segment, the
        # partial sums through memory, instead of one launch over all segments (DenseIntegerBody(fused=))
        quant.append(("static a8, segment chain", dict(policy="static", bits=8, dense="chain")))
    if gpu and has_residual_body(model):  # A/B: the body's residual stream in fp32 instead of fp16
        # (residual_stream="auto" on Triton/CUDA; RDN's dense blocks keep an fp32 stream)
        quant.append(("static a8 + int8 tail, fp32 stream", dict(policy="static", bits=8, tail_bits=8,
                                                                  residual_stream="float32")))
    if granular is not None:
        quant += [("granular {2,4,8}", dict(model=granular)),
                  ("granular {2,4,8} + int8 tail", dict(model=granular, tail_bits=8))]
        if gpu:  # the default stores 2/4-bit codes one per byte on Triton/CUDA: the packed kernels, same run
            quant.append(("granular {2,4,8} + int8 tail, packed", dict(model=granular, tail_bits=8,
                                                                       containers="packed")))
            # A/B: the policy's stage over the whole frame, one read, then the image graph of its widths
            quant.append(("granular {2,4,8} + int8 tail, image graph", dict(model=granular, tail_bits=8,
                                                                            image_graphs=True)))
    if gpu:  # A/B: the output glue in torch, as before the fifth H100 run (make_engine's glue="torch"), and
        # only the stitch in torch (glue="stitch"): which of the three parts costs the fused path wall time
        quant.append(("static a8 + int8 tail, torch glue", dict(policy="static", bits=8, tail_bits=8, glue="torch")))
        quant.append(("static a8 + int8 tail, torch stitch", dict(policy="static", bits=8, tail_bits=8,
                                                                   glue="stitch")))
        # A/B: each frame's whole work as one CUDA graph replay (Engine(image_graphs=True), the
        # default for static policies on CUDA since the 2026-11-27 run; every other row is tiled)
        quant.append(("static a8 + int8 tail, image graph", dict(policy="static", bits=8, tail_bits=8,
                                                                  image_graphs=True)))
        # A/B: a batch's groups side by side, one CUDA stream per width (Engine(group_streams=True))
        quant.append(("entropy {2,4,8}, group streams", dict(policy="entropy", bits=(2, 4, 8), group_streams=True)))
    if gpu and has_residual_body(model):  # last (a GPU step cut short loses it first): the body in the
        # padded layout, on the TMA kernel (residual-block bodies only)
        quant.append(("static a8 + int8 tail, padded", dict(policy="static", bits=8, tail_bits=8,
                                                             containers="padded")))
    # The quantized rows run their FP layers (head, upsampler unless the tail is integer, last
    # conv) in the anchor's half dtype (fp16 on GPU; on CPU bf16 where it beats fp32, with AMX-BF16,
    # else fp32: cpu_fp_dtype); one row shows static a8 with fp32 ones.
    half = half if gpu else cpu_fp_dtype()
    cases = fp + [("static a8 (fp32 FP layers)", dict(policy="static", bits=8))]
    cases += [(name, dict(kw, dtype=half)) for name, kw in quant]
    if not gpu:  # the C++ kernels against the pure-torch reference (fp32 FP layers, as the row above)
        cases.append(("static a8 (reference)", dict(policy="static", bits=8, backend="reference")))
    return cases


def cpu_fp_dtype() -> torch.dtype:
    """The CPU rows' dtype for the quantized rows' FP layers: bf16 on CPUs where it beats fp32
    (:func:`common.cpu_bf16_wins`: AMX-BF16), else fp32."""
    return torch.bfloat16 if cpu_bf16_wins() else torch.float32


def make_engine(model, kw: dict, device: str, calib):
    from gdq_engine import Engine

    kw = dict(kw)
    kw.setdefault("image_graphs", False)  # the tiled path, as every run before 2026-11-27 timed it
    compile_mode = kw.pop("compile", None)
    own = kw.pop("model", None)
    last_conv = kw.pop("last_conv", "kernel")
    glue = kw.pop("glue", "fused")
    dense = kw.pop("dense", "fused")
    if own is not None:  # a shipped quantized checkpoint brings its policy and calibration (the tail's: calib)
        engine = Engine(str(own), device=device, **kw, **(dict(calib=calib) if "tail_bits" in kw else {}))
    else:
        extra = dict(calib=calib) if kw["policy"] != "fp" else {}
        engine = Engine(model, device=device, **kw, **extra)
    if dense == "chain":  # before any call: graphs are captured on use
        engine.int_body.fused = False
    if last_conv == "torch":
        from gdq_engine.runtime.lastconv import use_kernel_last_conv

        use_kernel_last_conv(engine.model, False)
    if glue != "fused":
        torch_glue(engine, parts=TORCH_GLUE_PARTS if glue == "torch" else (glue,))
    if compile_mode is not None:
        engine.model = torch.compile(engine.model, mode=None if compile_mode == "default" else compile_mode)
    return engine


TORCH_GLUE_PARTS = ("stitch", "lend", "output")


def torch_glue(engine, parts: tuple[str, ...] = TORCH_GLUE_PARTS) -> None:
    """``engine`` with the work around its network as torch did it before 2026-11-26's fifth H100
    run: one copy per window to stitch and a reduction over each batch for the finiteness check
    (not the Triton stitch, runtime/stitch.py), each batch's graph output copied out (not lent,
    GraphCache(lend=)), and the output glue as two passes over the HR image (not the last conv's
    epilogue, KernelConv2d.image). The integer tail's half-precision input reads stay as they are.
    ``parts``: which of the three (``TORCH_GLUE_PARTS``: "stitch", "lend", "output")."""
    from gdq_engine.runtime.lastconv import KernelConv2d

    unknown = set(parts) - set(TORCH_GLUE_PARTS)
    if unknown:
        raise ValueError(f"unknown glue parts {sorted(unknown)}; parts: {TORCH_GLUE_PARTS}")
    if "stitch" in parts:
        engine.stitcher.fused = lambda canvas, sr: False
    if "lend" in parts and engine.network_graphs is not None:
        engine.network_graphs.lend = False
    for m in engine.model.modules() if "output" in parts else ():
        if isinstance(m, KernelConv2d):
            m.fuse_output = False


ALLOCATOR_COUNTS = ("num_device_alloc", "num_device_free", "num_alloc_retries")


def outputs_digest(outs: list[torch.Tensor]) -> str:
    """The first 16 hex digits of the SHA-256 of ``outs``' bytes (any dtype, on any device), in
    order: rows of the same method in other processes show whether they computed the same bits."""
    h = hashlib.sha256()
    for out in outs:
        h.update(out.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def gpu_ms(fn) -> tuple[float, dict]:
    """Median ms of ``fn`` on the GPU (``triton.testing.do_bench``, after warm-up), and what
    happened around the timed calls that could slow some runs and not others: the CUDA caching
    allocator's device allocations, frees and retries (``cudaMalloc``/``cudaFree`` synchronise)
    and Python's garbage collections, as counts over all calls (warm-up included) with the
    number of calls. The fourth H100 run of 2026-11-26 timed the quantized rows 0.1-1.0 ms slower
    in its first process than in a second one minutes later, the cuDNN rows alike."""
    import gc

    from triton.testing import do_bench

    calls = 0

    def counted():
        nonlocal calls
        calls += 1
        return fn()

    def counts() -> dict:
        stats = torch.cuda.memory_stats()
        return {**{k: stats.get(k, 0) for k in ALLOCATOR_COUNTS},
                "gc_collections": sum(s["collections"] for s in gc.get_stats())}

    before = counts()
    ms = do_bench(counted, warmup=200, rep=1000, return_mode="median")
    after = counts()
    return ms, {"calls": calls, **{k: after[k] - before[k] for k in after}}


class RowsCut(BaseException):
    """Raised by SIGTERM while rows are timed (a GPU session step's ``timeout``): the rows stop,
    and the rows timed so far get their rounds and are written before the step's kill (10 s later).
    A BaseException, so a row's ``except Exception`` does not take it for the row's failure."""


def _cut_rows(state: dict):
    """A SIGTERM handler: sets ``state["cut"]``, and raises :class:`RowsCut` while
    ``state["in_rows"]`` (elsewhere, e.g. in the rounds, the work goes on to its end)."""
    def handler(signum, frame):
        state["cut"] = True
        if state["in_rows"]:
            raise RowsCut

    return handler


# Rows compared in pairs (the first is the reference): each pair's ratio from the interleaved
# rounds, where both rows meet the same machine state.
AB_PAIRS = (
    ("static a8 + int8 tail", "static a8 + int8 tail, torch glue"),
    ("static a8 + int8 tail", "static a8 + int8 tail, torch stitch"),
    ("static a8 + int8 tail", "static a8 + int8 tail, image graph"),
    ("static a8 + int8 tail", "static a8 + int8 tail, cuDNN last conv"),
    ("static a8 + int8 tail", "static a8 + int8 tail, fp32 stream"),
    ("static a8 + int8 tail", "static a8 + int8 tail, padded"),
    ("static a8 + int8 tail", "granular {2,4,8} + int8 tail"),
    ("granular {2,4,8} + int8 tail", "granular {2,4,8} + int8 tail, packed"),
    ("granular {2,4,8} + int8 tail", "granular {2,4,8} + int8 tail, image graph"),
    ("entropy {2,4,8}", "entropy {2,4,8}, group streams"),
    ("static a8", "static a8, segment chain"),
)


def ab_pairs(rows: list[dict], key: str = "ms") -> list[dict]:
    """Each :data:`AB_PAIRS` pair present in ``rows`` (one output size) with both rows' ``key``
    (ms) and ``ratio`` = reference / other (above 1: the other row is faster)."""
    by_name = {r["method"]: r for r in rows if key in r}
    return [{"output": by_name[a]["output"], "reference": a, "other": b, "reference_ms": by_name[a][key],
             "other_ms": by_name[b][key], "ratio": by_name[a][key] / by_name[b][key]}
            for a, b in AB_PAIRS if a in by_name and b in by_name]


def sync_sites(engine, frame: torch.Tensor) -> dict:
    """The host syncs of one warm ``engine.upscale(frame)`` on CUDA, from
    ``torch.cuda.set_sync_debug_mode("warn")``: :func:`recorded_syncs`' ``{"count", "sites",
    "stacks", "gc_collections"}`` and ``"captures"``, the CUDA graphs captured in the call (torch
    warns once per synchronising call: ``.item()``, ``.cpu()``, a copy into pageable memory,
    ``torch.cuda.synchronize``, ...). An FP or static engine should show one (its final read), a
    dynamic policy one more per batch (one per image with image graphs). A capture
    (``torch.cuda.graph`` synchronises) or a collection (a finaliser) says why a warm call
    synchronised where the ones before it did not.

    ``"mode_switch"``: warnings raised by the switch to "warn" itself (before the call starts; not
    counted). The sixth and seventh H100 runs saw one now and then, in FP and tiled static frames,
    at torch's ``set_sync_debug_mode`` (``__init__.py:1270``) called from here: not the engine's."""
    with torch.inference_mode():
        engine.upscale(frame)
        torch.cuda.synchronize()
        with recorded_syncs() as syncs:
            captures_before = graph_captures(engine)
            torch.cuda.set_sync_debug_mode("warn")
            try:
                engine.upscale(frame)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    return {**drop_mode_switch(syncs), "captures": graph_captures(engine) - captures_before}


def drop_mode_switch(syncs: dict) -> dict:
    """:func:`recorded_syncs`' result without the sites whose first stack ends in torch's
    ``set_sync_debug_mode`` (the switch into "warn" mode), their count moved to ``"mode_switch"``."""
    sites, stacks = dict(syncs["sites"]), dict(syncs["stacks"])
    switch = [site for site, stack in stacks.items() if stack and stack[-1].endswith(" set_sync_debug_mode")]
    for site in switch:
        del stacks[site]
    moved = sum(sites.pop(site) for site in switch)
    return {**syncs, "count": syncs["count"] - moved, "sites": sites, "stacks": stacks, "mode_switch": moved}


STACK_FRAMES = 10  # the innermost frames recorded_syncs keeps per site


@contextmanager
def recorded_syncs() -> Iterator[dict]:
    """Record the sync warnings (a message with "synchroniz" in it) issued inside the block, and
    the Python garbage collections. Yields a dict, filled when the block ends: ``{"count": n,
    "sites": {"file:line": n}, "stacks": {"file:line": the innermost Python frames at its first
    warning, "file:line function", outermost first}, "gc_collections": n}``. The stacks name the
    code behind a site inside torch (the 2026-11-27 H100 run's ``__init__.py:1270``)."""
    import gc
    import warnings

    result = {"count": 0, "sites": {}, "stacks": {}, "gc_collections": 0}

    def on_gc(phase: str, info: dict) -> None:
        result["gc_collections"] += phase == "start"

    def on_warning(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message).lower():
            return
        where = f"{Path(filename).name}:{lineno}"
        result["sites"][where] = result["sites"].get(where, 0) + 1
        frames = [f for f in traceback.extract_stack()[:-1] if Path(f.filename).name != "warnings.py"]
        result["stacks"].setdefault(where, [f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                            for f in frames[-STACK_FRAMES:]])

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = on_warning
        gc.callbacks.append(on_gc)
        try:
            yield result
        finally:
            gc.callbacks.remove(on_gc)
            result["count"] = sum(result["sites"].values())


def graph_captures(engine) -> int:
    """CUDA graphs ``engine``'s graph caches have captured so far (network, bit policy, the integer
    body's own, image and image stage)."""
    from gdq_engine.runtime.graphs import GraphCache

    caches = [engine.network_graphs, engine.policy_graphs, getattr(engine.int_body, "graphs", None),
              getattr(engine.image_graphs, "graphs", None), getattr(engine.image_graphs, "stages", None)]
    return sum(c.captures for c in caches if isinstance(c, GraphCache))


def profile_ops(engine, frames: list[torch.Tensor], gpu: bool, top: int = 15, trace: Path | None = None) -> dict:
    """``engine.upscale`` of every frame once under torch.profiler (after the timed runs, so
    warm). Returns ``{"total_ms_per_frame": self time of all ops per frame (CUDA time on GPU, so
    the frame's time minus this is launch gaps and host work), "ops": the ``top`` ops by self time,
    grouped by input shapes, per frame}``; on GPU also ``"launches_per_frame"``: the CUDA
    runtime/driver launch calls the host made per frame by name (kernels, graph replays, copies),
    and ``"syncs"``: :func:`sync_sites` of the first frame. With ``trace``, one more frame (the
    first) under the profiler is written there as a Chrome trace (chrome://tracing, Perfetto): the
    host's calls and the device's kernels on one time line, so the device's idle stretches show
    what the host was doing."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with torch.inference_mode(), profile(activities=activities, record_shapes=True) as prof:
        for f in frames:
            engine.upscale(f)
        if gpu:
            torch.cuda.synchronize()
    events = prof.key_averages(group_by_input_shape=True)
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    total = sum(getattr(e, key, 0.0) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:top]
    ops = [{"op": e.key, "shapes": str(e.input_shapes)[:120], "share": getattr(e, key, 0.0) / total,
            "self_ms_per_frame": getattr(e, key, 0.0) / 1e3 / len(frames), "calls_per_frame": e.count / len(frames)}
           for e in ranked]
    result = {"total_ms_per_frame": total / 1e3 / len(frames), "ops": ops}
    if trace is not None:
        with torch.inference_mode(), profile(activities=activities) as one:
            engine.upscale(frames[0])
            if gpu:
                torch.cuda.synchronize()
        trace.parent.mkdir(parents=True, exist_ok=True)
        one.export_chrome_trace(str(trace))
        result["trace"] = trace.name
    if gpu:
        launches = {e.key: e.count / len(frames) for e in events if LAUNCH_CALL.match(e.key)}
        result["launches_per_frame"] = dict(sorted(launches.items()))
        result["syncs"] = sync_sites(engine, frames[0])
    return result


# Host calls that queue device work (torch.profiler's names for CUDA runtime and driver calls).
LAUNCH_CALL = re.compile(r"^(cudaLaunch\w*|cuLaunch\w*|cudaGraphLaunch|cudaMemcpy\w*|cudaMemset\w*)$")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def frame_macs(model, engine, frame: torch.Tensor) -> int:
    """Conv MACs of one frame as the engine tiles it (every patch, overlaps included)."""
    from gdq_engine.runtime.cost import conv_macs

    grid = engine.grid(*frame.shape[-2:])
    return sum(conv_macs(model, *grid.window)) * len(grid)


def floor_ms(macs: int, nbytes: int, peaks: dict) -> float:
    """Roofline floor: max(int8 ops / measured int8 peak, bytes / measured HBM bandwidth), ms."""
    return max(2 * macs / (peaks["int8_tops"] * 1e12), nbytes / (peaks["hbm_gbs"] * 1e9)) * 1e3


def slug(name: str) -> str:
    """A row name as a file name part: "static a8 + int8 tail, torch glue" -> "static-a8-int8-tail-torch-glue"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def split_row_names(text: str) -> list[str]:
    """``--rows``' names: separated by semicolons where the text has any ("static a8 + int8 tail;
    static a8 + int8 tail, image graph"), else by commas outside braces ("static a8,entropy
    {2,4,8}" -> ["static a8", "entropy {2,4,8}"])."""
    parts = text.split(";") if ";" in text else re.split(r",(?![^{]*})", text)
    return [name.strip() for name in parts if name.strip()]


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
    p.add_argument("--arch", default="edsr-baseline", choices=ARCHS)
    p.add_argument("--scale", type=int, default=4, choices=[2, 4])
    p.add_argument("--output", default=None,
                   help="HR frame sizes WxH, comma-separated (default 1920x1080 on GPU, 744x744 on CPU: four "
                        "96x96 LR patches at x4); e.g. 1280x720,1920x1080,3840x2160")
    p.add_argument("--image", type=Path, default=None, help="one image to crop the frame from (default: --frames "
                                                             "images of the --calib folder)")
    p.add_argument("--frames", type=int, default=4, help="distinct frames the timed call rotates over")
    p.add_argument("--calib", default=str(ROOT.parent / "shared" / "data" / "train"))
    p.add_argument("--calib-count", type=int, default=32, help="96x96 calibration crops")
    p.add_argument("--reps", type=int, default=None,
                   help="timed rounds over all rows, each calling every row once (median; default 5 on CPU, "
                        "where they give the ms column, and 30 on GPU, where they give the rounds and host columns "
                        "and the A/B pairs)")
    p.add_argument("--compile", default=None, choices=["none", "default", "max-autotune"],
                   help="torch.compile row's mode (default: max-autotune on GPU, none on CPU)")
    p.add_argument("--plot", default=None, help="also write a PNG of latency vs FAB here")
    p.add_argument("--profile", action="append", default=[], metavar="METHOD",
                   help="also run this row once per frame of the last size under torch.profiler: its top ops "
                        "(self time per frame) are printed and written to the JSON (repeat for more rows)")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="with --profile: also write one frame of each profiled row as a Chrome trace "
                        "(trace-<row>.json) into DIR")
    p.add_argument("--rows", default=None, metavar="NAMES",
                   help="only these rows and fp32, the PSNR reference: names separated by commas (commas "
                        "inside braces belong to the name) or, for names with a comma, by semicolons")
    p.add_argument("--host-uint8", action="store_true",
                   help="frames as uint8 tensors in host memory (a decoded video frame or image file): each "
                        "row's time then includes the copies in and the uint8 result back (default: float "
                        "frames already on the compute device)")
    p.add_argument("--default-malloc", action="store_true",
                   help="CPU mode: leave glibc's malloc as it is (by default it keeps freed memory; see "
                        "common.keep_freed_memory)")
    args = p.parse_args(argv)

    from gdq_engine.quantized import shipped_quantized
    from gdq_engine.train.data import random_lr_patches

    if args.gpu and not torch.cuda.is_available():
        print("--gpu given but no CUDA device", file=sys.stderr)
        return 2
    if args.frames < 1:
        p.error("--frames must be >= 1")
    reps = args.reps if args.reps is not None else (30 if args.gpu else 5)
    if reps < 1:
        p.error("--reps must be >= 1")
    dev = "cuda" if args.gpu else "cpu"
    if not args.gpu and not args.default_malloc:
        keep_freed_memory()
    compile_mode = args.compile or ("max-autotune" if args.gpu else "none")
    torch.backends.cudnn.benchmark = True
    sizes = [tuple(map(int, s.lower().split("x"))) for s in (args.output or (
        "1920x1080" if args.gpu else "744x744")).split(",")]
    model = build_fp_model(args.arch, args.scale)
    model_name = f"{args.arch}-x{args.scale}"
    granular = shipped_quantized(f"edsr-baseline-x{args.scale}", "granular") if args.arch == "edsr-baseline" else None
    cases = cases_for(args.gpu, model, granular, compile_mode)
    if args.rows is not None:
        wanted = set(split_row_names(args.rows))
        missing = wanted - dict(cases).keys()
        if missing:
            p.error(f"--rows: no row {sorted(missing)[0]!r}; rows: {', '.join(name for name, _ in cases)}")
        cases = [(name, kw) for name, kw in cases if name in wanted or name == "fp32"]
    unknown = [name for name in args.profile if name not in dict(cases)]
    if unknown:  # before minutes of timing, not after
        p.error(f"--profile: no row {unknown[0]!r}; rows: {', '.join(name for name, _ in cases)}")
    calib = (random_lr_patches([args.calib], args.scale, count=args.calib_count, size=96)
             if has_integer_body(model) else None)
    peaks = measure_gpu_peaks() if args.gpu else None
    paths = frame_paths(args.image or args.calib, args.frames)
    engines = {}
    rows, failures = [], []  # a row that raises is recorded and skipped: the other rows' numbers are kept
    bases = ["fp16 CL"] if args.gpu else ["fp32", "bf16 CL"]  # speed-ups are against these rows
    workload = {"model": model_name, "weights": "shipped" if args.arch == "edsr-baseline" else "untrained",
                "outputs": [f"{w}x{h}" for w, h in sizes], "tiling": "96/90", "frames": [str(p) for p in paths],
                "compile": compile_mode, "frame_memory": "host uint8" if args.host_uint8 else f"{dev} float32"}

    ab = []

    def payload(done_rows: list[dict], complete: bool) -> dict:
        # the tile configs behind the rows (a first and a second process can then be compared)
        return {"workload": workload, "peaks": peaks, "rows": done_rows, "failures": failures, "complete": complete,
                "ab": ab, "autotune_choices": autotune_choices()}

    def add_speedups(size_rows: list[dict]) -> None:
        for name in bases:
            base = next((r["ms"] for r in size_rows if r["method"] == name), None)
            for r in size_rows if base is not None else ():
                r[f"speedup_vs_{name.split()[0]}"] = base / r["ms"]
            base = next((r["ms_rounds"] for r in size_rows if r["method"] == name and "ms_rounds" in r), None)
            for r in size_rows if base is not None else ():
                r[f"speedup_rounds_vs_{name.split()[0]}"] = base / r["ms_rounds"]
    cut = {"cut": False, "in_rows": False}
    previous = signal.signal(signal.SIGTERM, _cut_rows(cut))
    try:
        for out_w, out_h in sizes:
            frames = lr_frames(paths, out_h // args.scale, out_w // args.scale)
            frames = place_frames(frames, dev, args.host_uint8)
            ref_outs, size_rows = None, []
            for name, kw in cases:
                if cut["cut"]:
                    break
                if engines.get(name, True) is None:  # failed at an earlier size
                    continue
                try:
                    cut["in_rows"] = True  # a SIGTERM now stops the row (make_engine, upscale, do_bench)
                    if name not in engines:
                        engines[name] = make_engine(model, kw, dev, calib)
                    engine = engines[name]
                    with torch.inference_mode():
                        results = [engine.upscale(f, return_report=True) for f in frames]
                        turn = itertools.cycle(frames)
                        # GPU: do_bench per row; CPU: timed below in interleaved rounds over all rows.
                        ms, around = (gpu_ms(lambda engine=engine, turn=turn: engine.upscale(next(turn))) if args.gpu
                                      else (0.0, None))
                        # GPU: the same frames once more after the timing (graphs replayed, caches
                        # warm): a kernel that races shows as other bits
                        again = [engine.upscale(f) for f in frames] if args.gpu else None
                except RowsCut:
                    break
                except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON, exit status 1
                    if cut["cut"]:  # the cut broke the row (e.g. a CUDA graph capture): not the row's fault
                        break
                    engines[name] = None
                    failures.append({"output": f"{out_w}x{out_h}", "method": name,
                                     "error": f"{type(exc).__name__}: {exc}"})
                    traceback.print_exc()
                    print(f"{out_w}x{out_h} {name}: FAILED ({failures[-1]['error']})", flush=True)
                    continue
                finally:
                    cut["in_rows"] = False
                outs = [out.float() / 255 if out.dtype == torch.uint8 else out for out, _ in results]
                ref_outs = outs if ref_outs is None else ref_outs
                bits = [b for _, report in results for b in report.bits]
                macs = sum(frame_macs(model, engine, f) for f in frames) / len(frames)
                row = {"output": f"{out_w}x{out_h}", "method": name, "ms": ms,
                       "ms_per_mpix": ms / (out_w * out_h / 1e6),
                       "fab": sum(bits) / len(bits) if bits else 32.0,
                       "patches": results[0][1].patches, "backend": getattr(engine.int_body, "backend", "fp"),
                       "containers": engine.containers,
                       "residual_stream": (None if engine.int_body is None else
                                           str(engine.int_body.stream_dtype(engine.dtype)).removeprefix("torch.")),
                       "fp_dtype": str(engine.dtype).removeprefix("torch."),
                       "psnr_vs_fp32": sum(psnr(o, r) for o, r in zip(outs, ref_outs)) / len(outs),
                       "groups": [report.groups for _, report in results], "gmacs": macs / 1e9,
                       "output_sha256": outputs_digest([out for out, _ in results])}
                if again is not None:
                    row["repeat_equal"] = all(torch.equal(a, out) for a, (out, _) in zip(again, results))
                if around is not None:
                    row["timing_events"] = around
                row["loadavg_1min"] = os.getloadavg()[0]  # other work on the host while the row ran
                if peaks is not None:
                    nbytes = frames[0].numel() * 4 * (1 + args.scale**2)  # fp32 LR in, HR out
                    row["floor_ms"] = floor_ms(int(macs), nbytes, peaks)
                    row["pct_of_floor"] = 100 * row["floor_ms"] / ms
                size_rows.append(row)
                if args.gpu:
                    print(f"{out_w}x{out_h} {name}: {ms:.2f} ms", flush=True)
                    # Rows so far, in case the run is cut short (a GPU session's step limit): the final
                    # write below replaces this one with "complete": true.
                    add_speedups(size_rows)
                    write_results("latency", payload(rows + size_rows, complete=False), args.out)
            timed = [engines[r["method"]] for r in size_rows]
            # cut: a few quick rounds over the rows timed so far, before the step's kill
            for row, engine, t in zip(size_rows, timed, interleaved_ms(timed, frames, min(reps, 5) if cut["cut"]
                                                                        else reps, gpu=args.gpu)):
                row["host_ms"], row["wait_ms"] = t["host_ms"], t["wait_ms"]
                if getattr(engine, "image_graphs", None) is not None:  # a dynamic policy's run-ahead, so far
                    row["width_guesses"] = dict(engine.image_graphs.guesses)
                if args.gpu:  # beside do_bench's ms: the rounds' host-timer ms
                    row["ms_rounds"] = t["ms"]
                else:
                    row["ms"], row["ms_per_mpix"] = t["ms"], t["ms"] / (out_w * out_h / 1e6)
                    print(f"{out_w}x{out_h} {row['method']}: {t['ms']:.2f} ms", flush=True)
            add_speedups(size_rows)
            ab += ab_pairs(size_rows, "ms_rounds" if args.gpu else "ms")
            rows += size_rows
            if cut["cut"]:
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
    if cut["cut"]:  # cut short: the rows timed so far, with their rounds; no profiles
        write_results("latency", payload(rows, complete=False), args.out)
        print(f"cut short after {len(rows)} rows (SIGTERM); rounds over those, no profiles", flush=True)
        return 3
    last_size = f"{sizes[-1][0]}x{sizes[-1][1]}"
    profiles = [{"method": name, "output": last_size,
                 **profile_ops(engines[name], frames, args.gpu,
                               trace=None if args.trace is None else Path(args.trace) / f"trace-{slug(name)}.json")}
                for name in args.profile if engines.get(name) is not None]  # a failed row has no engine
    results = payload(rows, complete=True)
    if profiles:
        results["profiles"] = profiles
    path = write_results("latency", results, args.out)
    if args.plot:
        plot(rows, args.plot)
    keys = [f"speedup_vs_{name.split()[0]}" for name in bases]
    print(f"{model_name} ({workload['weights']} weights), device {dev}, {len(paths)} frame(s)")
    if peaks is not None:
        print(f"peaks: int8 {peaks['int8_tops']:.0f} TOPS, HBM {peaks['hbm_gbs']:.0f} GB/s")
    ratios = "".join(f"{'x ' + name:>10}" for name in bases)
    rounds = f" {'rounds':>7} {'host':>7}" if args.gpu else f" {'host':>7}"
    print(f"{'output':10} {'method':46} {'patches':>7} {'ms':>9}{ratios}{rounds} {'% floor':>7} {'ms/MPix':>8} "
          f"{'FAB':>5} {'PSNR vs fp32':>12} backend")
    for r in rows:
        floor = f"{r['pct_of_floor']:7.1f}" if "pct_of_floor" in r else f"{'-':>7}"
        ratios = "".join(f"{r[k]:10.2f}" if k in r else f"{'-':>10}" for k in keys)
        rounds = "".join(f" {r[k]:7.2f}" if k in r else f" {'-':>7}"
                         for k in (("ms_rounds", "host_ms") if args.gpu else ("host_ms",)))
        print(f"{r['output']:10} {r['method']:46} {r['patches']:7d} {r['ms']:9.2f}{ratios}{rounds} {floor} "
              f"{r['ms_per_mpix']:8.2f} {r['fab']:5.1f} {r['psnr_vs_fp32']:12.2f} {r['backend']}")
    for pair in ab:
        print(f"A/B {pair['output']}: {pair['other']} {pair['other_ms']:.2f} ms vs {pair['reference']} "
              f"{pair['reference_ms']:.2f} ms: x{pair['ratio']:.3f}")
    for prof in profiles:
        print(f"profile of {prof['method']} at {last_size}: {prof['total_ms_per_frame']:.2f} ms of "
              f"{'GPU' if args.gpu else 'CPU'} self time per frame; top ops:")
        for op in prof["ops"]:
            print(f"  {op['self_ms_per_frame']:8.2f} ms {op['share'] * 100:5.1f}% {op['calls_per_frame']:6.1f} calls  "
                  f"{op['op']} {op['shapes']}")
        if "syncs" in prof:
            syncs = prof["syncs"]
            print(f"  host launch calls per frame: {prof['launches_per_frame']}; host syncs in one frame: "
                  f"{syncs['count']} at {syncs['sites']} ({syncs['captures']} graph captures, "
                  f"{syncs['gc_collections']} garbage collections in it; "
                  f"{syncs.get('mode_switch', 0)} more at the switch into warn mode, not counted)")
            for site, stack in syncs["stacks"].items():
                print(f"    {site} from: {' <- '.join(reversed(stack))}")
    for f in failures:
        print(f"FAILED {f['output']} {f['method']}: {f['error']}")
    print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
