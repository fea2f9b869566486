"""Compile the Triton kernels for a GPU architecture ahead of time, on any machine: no GPU needed.

Triton compiles for a named target without a device (its bundled ``ptxas`` makes the cubin), so a
CPU machine can check what a GPU session would compile. Kernel *variants* (the constexpr values of
each launch: channels, bit-widths, signedness, epilogue) are recorded from real engine runs in
Triton's CPU interpreter (:func:`engine_launches`); each is then compiled with the GPU tile configs
(:func:`gpu_configs`) and the result inspected (:func:`compile_launch`): registers, local memory
(spills), shared memory, the MMA instructions (``wgmma.mma_async`` on sm_90, ``mma.sync`` before)
and fused multiply-adds, which the numeric contract forbids (docs/numerics.md).

Command line (run without ``TRITON_INTERPRET=1``; it starts the interpreted recording itself)::

    python -m gdq_engine.kernels.aot --arch 90 80 [--all-configs] [--out report.json]
    python -m gdq_engine.kernels.aot --summary report.json

prints one row per compile and a summary (:func:`summarize`), and exits 1 when a variant breaks a
rule (:func:`problems`). Launches are compiled as a 96x96-patch
launch specialises them: every pointer and integer argument a multiple of 16.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from gdq_engine.ops.triton_ops import interpreting

# Largest shared memory one CTA may use (bytes), by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# int8 tensor-core MMAs in the PTX: warpgroup MMAs on sm_90, warp-level mma.sync before.
MMA_PATTERN = {90: r"\bwgmma\.mma_async[\w.]*\.s32\.[su]8\.[su]8",
               80: r"\bmma\.sync\.aligned\.m16n8k32[\w.]*\.s32\.[su]8\.[su]8"}
# fp16 tensor-core MMAs with fp32 accumulators (the FP last conv, fp_conv.py).
FP16_MMA_PATTERN = {90: r"\bwgmma\.mma_async[\w.]*\.f32\.f16\.f16",
                    80: r"\bmma\.sync\.aligned\.m16n8k16[\w.]*\.f32\.f16\.f16\.f32"}
# The epilogue's conversions in the PTX: int32 -> fp32, the floor, fp32 -> int32 (the conversion pipe).
CONVERSION_PATTERN = r"\bcvt\.(?:rn\.f32\.s32|rmi(?:\.ftz)?\.f32\.f32|rzi(?:\.ftz)?\.s32\.f32)\b"
_TYPES = {torch.uint8: "u8", torch.int8: "i8", torch.int32: "i32", torch.float32: "fp32", torch.float16: "fp16",
          torch.bfloat16: "bf16"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
# chosen per GPU config, not per variant
_TILE = ("BLOCK_M", "BLOCK_K", "PERSISTENT", "BLOCK_H", "BLOCK_W", "RES_EARLY")
CONV_KERNELS = ("_packed_conv3x3_kernel", "_padded_conv3x3_tma_kernel")  # the integer convs
FP_CONV = "_fp_conv3x3_kernel"  # the FP last conv (fp_conv.py)
STITCH = "_stitch_kernel"  # the engine's stitch of a batch's windows (stitch.py)
DENSE_CONV = "_dense_conv_kernel"  # RDN's dense-block convs, one launch over all segments (dense_conv.py)


@dataclass(frozen=True)
class Launch:
    """One kernel variant: ``kernel`` (a function of :mod:`gdq_engine.kernels.conv3x3` or
    :mod:`~gdq_engine.kernels.fp_conv`), the Triton types of its runtime arguments and the values
    of its constexprs (tile sizes excluded)."""

    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, int | bool], ...]

    def label(self) -> str:
        """Kernel, constexpr values and the fp16 / bf16 pointer arguments (e.g. ``res_ptr=fp16``)."""
        short = {"_packed_conv3x3_kernel": "conv", "_padded_conv3x3_tma_kernel": "padded conv",
                 "_quantize_pack_kernel": "quantize_pack", "_unpack_kernel": "unpack", FP_CONV: "fp conv",
                 STITCH: "stitch", DENSE_CONV: "dense conv"}
        halves = [f"{name}={kind[1:]}" for name, kind in self.signature if kind in ("*fp16", "*bf16")]
        return " ".join([short.get(self.kernel, self.kernel), *(f"{k}={int(v)}" for k, v in self.constexprs), *halves])

    @staticmethod
    def from_json(d: dict) -> Launch:
        return Launch(d["kernel"], tuple(map(tuple, d["signature"])), tuple(map(tuple, d["constexprs"])))


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, TensorDescriptor):  # its box follows the tile config: filled in at compile time
        return f"tensordesc<{_TYPES[value.base.dtype]}>"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def _python_function(kernel):
    """The Python function under a JITFunction, an interpreter wrapper or an Autotuner."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _launch_of(kernel, args: tuple, kwargs: dict) -> Launch:
    kernel = _python_function(kernel)
    names = list(inspect.signature(kernel).parameters)
    consts = {n: v for n, v in kwargs.items() if n not in _LAUNCH_OPTIONS and n not in _TILE}
    runtime = [n for n in names if n not in kwargs]
    if len(runtime) != len(args):
        raise ValueError(f"{kernel.__name__}: {len(args)} positional arguments for {runtime}")
    # Triton's launcher specialises an integer argument equal to 1 to a constant (the prepared
    # weight's unit stride, for one), so the variant has it as a constexpr too.
    consts.update({n: 1 for n, a in zip(runtime, args) if type(a) is int and a == 1})
    return Launch(kernel.__name__, tuple((n, _arg_type(a)) for n, a in zip(runtime, args) if n not in consts),
                  tuple((n, consts[n]) for n in names if n in consts))


def record_launches(run: Callable[[], object]) -> list[Launch]:
    """Run ``run()`` with the Triton launchers of :mod:`gdq_engine.kernels.ops` recording each
    distinct kernel variant (the kernels still run, so results stay valid); first-seen order."""
    from . import ops

    seen: dict[Launch, None] = {}
    real = ops._launcher

    class _Recorder:
        def __init__(self, kernel, traceable):
            self.kernel, self.launcher = kernel, real(kernel, traceable)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.setdefault(_launch_of(self.kernel, args, kwargs))
                return self.launcher[grid](*args, **kwargs)

            return launch

    ops._launcher = _Recorder
    try:
        run()
    finally:
        ops._launcher = real
    return list(seen)


def _every_width_cadyq():
    from gdq_engine.policy import CADyQ

    class EveryWidthCADyQ(CADyQ):
        """CADyQ's layer-wise regrouping with patch i at ``bits[i % 3]`` in every conv, so every
        width meets every conv (trained or random selectors may leave one out)."""

        def select(self, layer, x, grads):
            return torch.tensor(self.bits, dtype=torch.int64)[torch.arange(x.shape[0]) % len(self.bits)]

    return EveryWidthCADyQ


def engine_launches(jobs: int = 1) -> list[Launch]:
    """The variants the engine launches on the Triton backend, recorded from small interpreted runs
    (needs ``TRITON_INTERPRET=1``): two 64-channel EDSR blocks (the first block's conv2 also writes
    the next block's codes) at static 2, 3, 4, 5, 6 and 8 bits, and at 2, 3 and 4 bits one code per
    byte (``containers="bytes"``, the GPU engine's default), at 4 and 8 bits in the padded layout
    (``containers="padded"``, also with residual scale 0.1), residual scale 0.1, integer tails of
    8 bits at x2/x3/x4 (and at x4 with bf16 FP layers) and of 4 and 6 bits at x4, and CADyQ's
    layer-wise regrouping with every width in every conv; plus the x4 tail's last upsampler conv
    storing fp16, the FP last conv (64 -> 3, fp16 in; plain and finishing the image) and the
    stitch of a batch's windows into the image, as a GPU engine runs them (fp16 engines
    do not run on CPU), and the blocks of 2, 4 and 8 bits one code per byte skipping padding
    patches (``items=``), as the group graphs of a dynamic policy replay them on a GPU (graphs do
    not run on CPU), on fp32 and fp16 residual streams; the 8-bit blocks on an fp16 stream,
    one code per byte and padded, as a static fp16 engine's graph runs them; and RDN-B's dense
    blocks (64-channel segments) at 2, 4 and 8 bits one code per byte, each conv one launch over
    its segments (kernels/dense_conv.py).

    The runs are independent tasks (:func:`_recording_tasks`); with ``jobs`` > 1 they are recorded
    in that many spawned processes, and the variants merged in task order, as one process would
    have seen them first."""
    if not interpreting():
        raise RuntimeError("recording runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    count = len(_recording_tasks())
    jobs = max(1, min(jobs, count))
    with contextlib.ExitStack() as stack:
        run = map
        if jobs > 1:
            spawn = multiprocessing.get_context("spawn")  # the workers inherit TRITON_INTERPRET
            pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=spawn, initializer=_one_thread_each,
                                                           initargs=(jobs,)))
            run = pool.map
        per_task = list(run(_record_task, range(count)))
    seen: dict[Launch, None] = {}
    for launches in per_task:
        for d in launches:
            seen.setdefault(Launch.from_json(d))
    return list(seen)


def _one_thread_each(jobs: int) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))


def _record_task(index: int) -> list[dict]:
    """The variants task ``index`` of :func:`_recording_tasks` launches, first-seen order, as JSON dicts."""
    with torch.no_grad():
        return [asdict(x) for x in record_launches(_recording_tasks()[index])]


def _recording_tasks() -> list[Callable[[], None]]:
    """The recording runs of :func:`engine_launches`, each a callable that builds what it needs
    (the same inputs in every process: one seeded generator, drawn in a fixed order)."""
    from gdq_engine import Engine
    from gdq_engine.models import EDSR

    g = torch.Generator().manual_seed(0)
    calib, lr = torch.rand(2, 3, 8, 8, generator=g), torch.rand(1, 3, 6, 18, generator=g)  # 3 patches of 6x6
    feat = torch.rand(2, 64, 6, 6, generator=g)
    dense_in = torch.rand(1, 64, 6, 6, generator=g)

    def model(scale=4, res_scale=1.0):
        torch.manual_seed(0)
        return EDSR(scale=scale, n_feats=64, n_blocks=2, res_scale=res_scale).eval()  # 2: conv2 writes codes

    runs = [dict(bits=b) for b in (2, 3, 4, 5, 6, 8)]
    runs += [dict(bits=b, containers="bytes") for b in (2, 3, 4)]
    runs += [dict(bits=b, containers="padded") for b in (4, 8)] + [dict(bits=8, containers="padded", res_scale=0.1)]
    runs += [dict(bits=8, tail_bits=t, scale=s) for s, t in ((2, 8), (3, 8), (4, 8), (4, 6), (4, 4))]
    runs += [dict(bits=8, tail_bits=8, scale=4, dtype=torch.bfloat16)]
    runs += [dict(bits=8, res_scale=0.1), dict(policy=_every_width_cadyq()((2, 4, 8), channels=64, n_layers=2))]

    def engine_run(kw: dict) -> Callable[[], None]:
        def run():
            kw_ = dict(kw)
            m = model(kw_.pop("scale", 4), kw_.pop("res_scale", 1.0))
            kw_.setdefault("policy", "static")
            image = lr if kw_["policy"] != "static" else lr[..., :6]  # one patch is enough for one width
            Engine(m, backend="triton", calib=calib, patch_size=6, stride=6, device="cpu", **kw_).upscale(image)
        return run

    def single_kernels():
        from gdq_engine.runtime.stitch import make_plan
        from gdq_engine.runtime.tiler import make_grid

        from . import ops

        w = ops.prepare_conv_weight(torch.zeros(256, 64, 3, 3, dtype=torch.int8), 8)
        ops.packed_conv3x3(torch.zeros(3, 6, 6, 64, dtype=torch.uint8), 8, True, w, torch.ones(256), torch.zeros(256),
                           shuffle=2, out_dtype=torch.float16)
        fp_w, fp_b = ops.prepare_fp_weight(torch.zeros(3, 64, 3, 3, dtype=torch.float16), None)
        ops.fp_conv3x3(torch.zeros(3, 12, 12, 64, dtype=torch.float16), fp_w, fp_b, 3)  # the x4 last conv
        ops.fp_conv3x3(torch.zeros(3, 12, 12, 64, dtype=torch.float16), fp_w, fp_b, 3, out_scale=1 / 255,
                       out_shift=torch.zeros(3))  # ... finishing the image (runtime/lastconv.py: KernelConv2d.image)
        tiles = make_grid(12, 14, 8, 6)  # the engine's stitch of a batch into an image (runtime/stitch.py)
        plan = make_plan(tiles, range(len(tiles)), 2, "cpu")
        ops.stitch_windows(torch.zeros(3, 24, 28), torch.zeros(len(tiles), 3, 16, 16), plan.boxes, plan.extent,
                           torch.zeros(1, dtype=torch.int32))

    def group_bodies():
        from gdq_engine.runtime.intgraph import IntegerBody, calibrate, prepare_blocks

        m = model()
        half = (torch.float32, torch.float16)  # an fp16 engine's residual stream on CUDA (residual_stream="auto")
        for b in (2, 4, 8):
            body = IntegerBody(prepare_blocks(m), calibrate(m, calib, (b,)), backend="triton", containers="bytes",
                               stream_dtypes=half)
            for f in (feat, feat.half()):
                body.run_eager(f, b, items=torch.ones(1, dtype=torch.int32))
        for containers in ("bytes", "padded"):  # the static fp16 engine's whole-network graph: no items
            body = IntegerBody(prepare_blocks(m), calibrate(m, calib, (8,)), backend="triton", containers=containers,
                               stream_dtypes=half)
            body.run_eager(feat.half(), 8)

    def dense_bodies():  # RDN-B's dense blocks (64-channel segments), codes one per byte as on a GPU
        from gdq_engine.models import RDN
        from gdq_engine.runtime.densebody import DenseIntegerBody, prepare_dense_blocks
        from gdq_engine.runtime.intgraph import calibrate

        torch.manual_seed(0)
        rdn = RDN(2, n_feats=64, n_blocks=2, n_layers=3, growth=64).eval()  # segments of RDN-B's width
        for b in (2, 4, 8):
            body = DenseIntegerBody(prepare_dense_blocks(rdn), calibrate(rdn, calib[..., :6, :6], (b,)),
                                    backend="triton", containers="bytes", fused=True)
            body(dense_in, b)

    return [engine_run(kw) for kw in runs] + [single_kernels, group_bodies, dense_bodies]


def gpu_configs(launch: Launch, all_configs: bool = False) -> list[triton.Config]:
    """The tile configs a GPU run compiles ``launch`` with, the fixed one first: the conv's
    ``GDQ_TRITON_AUTOTUNE=0`` config (:func:`~gdq_engine.kernels.ops.fixed_config`) and, with
    ``all_configs``, every autotuning candidate; one ``ROWS_PER_PROGRAM`` config for quantize/unpack."""
    from . import ops

    if launch.kernel == "_packed_conv3x3_kernel":
        fixed = ops.fixed_config(dict(launch.constexprs)["BLOCK_N"])
        extra = [c for c in ops.tune_configs(dict(launch.constexprs)["HAS_RES"])
                 if all_configs and _config_label(c) != _config_label(fixed)]
        return [fixed, *extra]
    if launch.kernel == "_padded_conv3x3_tma_kernel":
        cin = dict(launch.constexprs)["C"]
        fixed = ops.fixed_padded_config(cin)
        extra = [c for c in ops.padded_tune_configs(cin) if all_configs and _config_label(c) != _config_label(fixed)]
        return [fixed, *extra]
    if launch.kernel == FP_CONV:
        fixed = ops.FIXED_FP_CONFIG
        return [fixed, *[c for c in ops.FP_TUNE_CONFIGS if all_configs and c is not fixed]]
    if launch.kernel == DENSE_CONV:
        consts = dict(launch.constexprs)
        return [ops.dense_config(consts["C0"], consts["CG"])]
    if launch.kernel == STITCH:  # its block is a constexpr of the launch
        return [triton.Config({}, num_warps=4, num_stages=3)]
    return [triton.Config({"BLOCK_M": ops.ROWS_PER_PROGRAM}, num_warps=4, num_stages=3)]


def _tool(name: str) -> str | None:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else None


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / LOCAL / STACK / SHARED of the cubin's function, from ``cuobjdump -res-usage``."""
    tool = _tool("cuobjdump")
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL|STACK|SHARED):(\d+)", text)}


def compile_launch(launch: Launch, config: triton.Config, arch: int) -> dict:
    """Compile one variant for ``sm_<arch>`` and inspect it.

    Returns a dict: ``kernel``, ``variant``, ``config``, ``arch``, ``registers`` (per thread),
    ``local_bytes`` (spills and stack frame: cuobjdump's LOCAL + STACK; None without cuobjdump),
    ``shared_bytes`` (Triton's allocation), ``mma`` (MMA instructions in the PTX),
    ``mma_a_shared`` (sm_90: wgmmas reading A from shared memory by descriptor, not from
    registers), ``byte_stores_shared`` (single-byte stores to shared memory: a tile staged through
    registers one byte at a time), ``copies_l1`` (``cp.async.ca``: asynchronous copies cached in
    L1; ``.cg`` ones bypass it), ``copies_async`` (every ``cp.async.ca``/``.cg``: per-thread
    copies), ``copies_tma`` (``cp.async.bulk.tensor``: TMA box copies), ``fma_f32`` (fused fp32
    multiply-adds in the PTX), ``conversions`` (the epilogue's int32 -> fp32, floor and fp32 ->
    int32 ``cvt``s in the PTX, which run on the conversion pipe), ``round_adds`` (adds rounding
    toward minus infinity that make codes without them: ``conv3x3._requantize``'s ``BY_ADD``),
    ``sat_cvts`` (saturating floor conversions to 8 bits: its ``SAT``) and ``seconds`` (compile time).
    """
    if interpreting():
        raise RuntimeError("TRITON_INTERPRET=1 replaces the kernels by the interpreter: compile in a process "
                           "without it")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import conv3x3, dense_conv, fp_conv, ops, stitch

    kernel = getattr({FP_CONV: fp_conv, STITCH: stitch, DENSE_CONV: dense_conv}.get(launch.kernel, conv3x3),
                     launch.kernel)
    consts = {**dict(launch.constexprs), **config.kwargs}
    types = dict(launch.signature)
    for name, box in ops.tma_boxes(consts).items() if launch.kernel in CONV_KERNELS else ():
        if name in types:  # "tensordesc<i8>" -> "tensordesc<i8[128, 64]>": the box of this config
            types[name] = types[name][:-1] + str(box) + ">"
    signature = {n: types.get(n, "constexpr") for n in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if signature[n].startswith("*") or signature[n] in ("i32", "i64")}
    src = ASTSource(kernel, signature, constexprs=consts, attrs=attrs)
    start = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages,
                                           enable_fp_fusion=False))
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    usage = _resource_usage(compiled.asm["cubin"])
    pattern = (FP16_MMA_PATTERN if launch.kernel == FP_CONV else MMA_PATTERN)[90 if arch >= 90 else 80]
    return dict(kernel=launch.kernel, variant=launch.label(), config=_config_label(config), arch=arch,
                registers=usage.get("REG"),
                local_bytes=usage["LOCAL"] + usage["STACK"] if usage else None,
                shared_bytes=int(compiled.metadata.shared), mma=len(re.findall(pattern, ptx)),
                mma_a_shared=len(re.findall(pattern + r"\s*\{[^}]*\},\s*%rd", ptx)) if arch >= 90 else 0,
                byte_stores_shared=len(re.findall(r"\bst\.shared\.[bsu]8\b", ptx)),
                copies_l1=len(re.findall(r"\bcp\.async\.ca\.shared\.global", ptx)),
                copies_tma=len(re.findall(r"\bcp\.async\.bulk\.tensor\.", ptx)),
                copies_async=len(re.findall(r"\bcp\.async\.c[ag]\.shared\.global", ptx)),
                fma_f32=len(re.findall(r"\bfma\.rn\.f32", ptx)),
                conversions=len(re.findall(CONVERSION_PATTERN, ptx)),
                round_adds=len(re.findall(conv3x3.ROUND_DOWN_ADD_PTX, ptx)),
                sat_cvts=len(re.findall(conv3x3.FLOOR_SAT_PTX, ptx)), seconds=round(seconds, 2))


def _config_label(config: triton.Config) -> str:
    tiles = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles} warps={config.num_warps} stages={config.num_stages}"


def problems(report: dict, fixed: bool = True) -> list[str]:
    """What breaks the rules in one :func:`compile_launch` report: a compile error, no MMA in a
    conv, a fused multiply-add, and for a ``fixed`` config (which no autotuner can pass over)
    local memory (spills) or more shared memory than the architecture gives one CTA. Autotuning
    candidates may spill or not fit: the autotuner times them or skips them."""
    if report.get("error"):
        return [f"compile error: {report['error']}"]
    out = []
    if report["kernel"] in (*CONV_KERNELS, FP_CONV, DENSE_CONV) and report["mma"] == 0:
        out.append("no tensor-core MMA")
    if report["fma_f32"]:
        out.append(f"{report['fma_f32']} fused multiply-adds")
    if fixed and report["local_bytes"] is None:
        out.append("no cuobjdump: registers and spills unknown")
    elif fixed and report["local_bytes"]:
        out.append(f"{report['local_bytes']} bytes of local memory (spills)")
    if fixed and report["shared_bytes"] > SHARED_LIMIT.get(report["arch"], SHARED_LIMIT[80]):
        out.append(f"{report['shared_bytes']} bytes of shared memory")
    return out


def _row(r: dict) -> str:
    if r.get("error"):
        return f"{r['arch']:>4} {'-':>4} {'-':>7} {'-':>4} {'-':>5}  {r['variant']} / {r['config']}  {r['problems'][0]}"
    local = "?" if r["local_bytes"] is None else r["local_bytes"]
    return (f"{r['arch']:>4} {r['registers'] or '?':>4} {r['shared_bytes'] / 1024:7.1f} {r['mma']:>4} {local:>5}  "
            f"{r['variant']} / {r['config']}{' *' if r['fixed'] else ''}  {'; '.join(r['problems'])}")


def _record_in_interpreter(path: Path) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-m", "gdq_engine.kernels.aot", "--record", str(path)], env=env, check=True)


def compile_all(launches: list[Launch], archs: list[int], all_configs: bool = False,
                on_report: Callable[[dict], None] | None = None, jobs: int = 1) -> list[dict]:
    """:func:`compile_launch` of every launch x arch x :func:`gpu_configs`, in a fresh kernel
    cache (so ``seconds`` are compile times, not cache hits) unless ``TRITON_CACHE_DIR`` is set,
    in ``jobs`` worker processes (spawned; reports in the same order either way). A compile error
    becomes the report's ``error``; each report gets ``fixed`` and ``problems``."""
    tasks = [(launch, cfg, arch, i == 0) for arch in archs for launch in launches
             for i, cfg in enumerate(gpu_configs(launch, all_configs))]
    reports = []
    with tempfile.TemporaryDirectory(prefix="gdq-aot-cache-") as cache:
        own_cache = "TRITON_CACHE_DIR" not in os.environ
        if own_cache:
            os.environ["TRITON_CACHE_DIR"] = cache  # the workers inherit it
        try:
            with contextlib.ExitStack() as stack:
                run = map
                if jobs > 1 and len(tasks) > 1:
                    spawn = multiprocessing.get_context("spawn")
                    run = stack.enter_context(ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=spawn)).map
                for r in run(_compile_task, tasks):
                    reports.append(r)
                    if on_report is not None:
                        on_report(r)
        finally:
            if own_cache:
                del os.environ["TRITON_CACHE_DIR"]
    return reports


def _compile_task(task: tuple[Launch, triton.Config, int, bool]) -> dict:
    """One (launch, config, arch, fixed) of :func:`compile_all`: its report, problems included."""
    launch, cfg, arch, fixed = task
    try:
        r = compile_launch(launch, cfg, arch)
    except Exception as exc:  # noqa: BLE001 - reported as the variant's problem
        r = dict(kernel=launch.kernel, variant=launch.label(), config=_config_label(cfg), arch=arch,
                 error=f"{type(exc).__name__}: {str(exc)[:300]}")
    r["fixed"] = fixed
    r["problems"] = problems(r, fixed=fixed)
    return r


def summarize(reports: list[dict]) -> list[str]:
    """Per architecture: compile errors, the integer convs' MMA counts, FMA counts, the fixed configs'
    largest register, local and shared use, the autotuning candidates that spill (integer and FP
    convs), and the total compile time."""
    lines = []
    for arch in sorted({r["arch"] for r in reports}, reverse=True):
        rs = [r for r in reports if r["arch"] == arch]
        ok = [r for r in rs if not r.get("error")]
        convs = [r for r in ok if r["kernel"] in (*CONV_KERNELS, FP_CONV, DENSE_CONV)]
        fixed = [r for r in ok if r["fixed"]]
        spilling = [r for r in convs if not r["fixed"] and r["local_bytes"]]
        mmas = [r["mma"] for r in convs if r["kernel"] in (*CONV_KERNELS, DENSE_CONV)] or [0]
        lines.append(
            f"sm_{arch}: {len(rs)} compiles ({len(rs) - len(ok)} errors) in {sum(r['seconds'] for r in ok):.0f} s; "
            f"conv MMAs per kernel {min(mmas)}-{max(mmas)}"
            f", fp32 FMAs {sum(r['fma_f32'] for r in ok)}; fixed configs: up to "
            f"{max((r['registers'] or 0 for r in fixed), default=0)} registers, "
            f"{sum(bool(r['local_bytes']) for r in fixed)} spilling, up to "
            f"{max((r['shared_bytes'] for r in fixed), default=0) // 1024} KB shared; "
            f"autotuning candidates spilling: {len(spilling)} of {sum(not r['fixed'] for r in convs)}")
        lines += [f"  spills {r['local_bytes']} B: {r['variant']} / {r['config']}" for r in spilling]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gdq_engine.kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (default 90 80)")
    ap.add_argument("--all-configs", action="store_true", help="also every autotuning candidate of the conv")
    ap.add_argument("--launches", type=Path, help="recorded variants (JSON) instead of recording them now")
    ap.add_argument("--record", type=Path, help="only record the engine's variants to this JSON (interpreter)")
    ap.add_argument("--out", type=Path, help="write the report here (JSON)")
    ap.add_argument("--summary", type=Path, help="only print the summary of a report written by --out")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="record and compile in this many processes (default: one per CPU)")
    args = ap.parse_args(argv)
    if args.summary:
        print("\n".join(summarize(json.loads(args.summary.read_text())["reports"])))
        return 0
    if args.record:
        args.record.write_text(json.dumps([asdict(x) for x in engine_launches(max(1, args.jobs))], indent=1))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = args.launches
        if path is None:
            path = Path(tmp) / "launches.json"
            _record_in_interpreter(path)
        launches = [Launch.from_json(d) for d in json.loads(path.read_text())]
    print(f"{len(launches)} variants; triton {triton.__version__}")
    print(f"{'arch':>4} {'regs':>4} {'smem KB':>7} {'mma':>4} {'local':>5}  variant / config (* fixed)  problems")
    reports = compile_all(launches, args.arch, args.all_configs, on_report=lambda r: print(_row(r), flush=True),
                          jobs=max(1, args.jobs))
    failures = sum(bool(r["problems"]) for r in reports)
    if args.out:
        meta = dict(triton=triton.__version__, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                    command="python -m gdq_engine.kernels.aot " + " ".join(argv if argv is not None else sys.argv[1:]))
        args.out.write_text(json.dumps(dict(meta=meta, reports=reports), indent=1))
    print("\n".join(summarize(reports)))
    print(f"{failures} of {len(reports)} compiled variants break a rule")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
