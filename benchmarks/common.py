"""Shared helpers for benchmark scripts: environment record, result files and drawn inputs."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from gdq_engine.bench import cpu_flags

RESULTS = Path(__file__).resolve().parent / "results"


def gaussian_weight_codes(shape: tuple, device, generator: torch.Generator, hi: int = 127) -> torch.Tensor:
    """int8 weight codes of ``shape`` as a Gaussian layer's, quantized per channel: rounded
    N(0, (hi / 4)^2) in -hi..hi. Their conv sums stay below 2**22 (``ops.fp32_sums_by_add``), as the
    shipped EDSR weights' do, where uniform codes would not: the rows of the conversions by adds."""
    w = torch.randn(shape, device=device, generator=generator) * (hi / 4)
    return w.round().clamp(-hi, hi).to(torch.int8)


def autotune_choices() -> dict[str, str]:
    """The Triton autotuner's picks so far in this process (flat conv, padded conv, FP conv), as
    ``{"<kernel> <tuning key>": "<config>"}``; empty where the kernels were never imported."""
    ops = sys.modules.get("gdq_engine.kernels.ops")
    if ops is None:
        return {}
    tuners = (("conv", ops._tuned_conv), ("padded", ops._tuned_padded_conv), ("fp", ops._tuned_fp_conv))
    return {f"{name} {key}": str(cfg) for name, tuner in tuners for key, cfg in tuner.cache.items()}


def cpu_bf16_wins() -> bool:
    """Whether oneDNN's bf16 convs beat fp32 on this CPU: where it has AMX-BF16 (tile multiplies).
    Without it they lose:
    * emulated bf16, on a 2-core AVX2 EPYC: 11.5 s for a 744x744 bf16 frame of EDSR-baseline x4,
      1.2 s in fp32 (``latency-cpu-2026-11-27-avx2.json``);
    * AVX512-BF16 without AMX, on a 2-core Xeon: 986 ms against 579 for the FP network, 213
      against 196 for static a8 + int8 tail (``python benchmarks/cpu_fp_dtype.py``,
      ``cpu-fp-dtype-cpu-2026-11-28-vnni.json``)."""
    return "amx_bf16" in cpu_flags()


def environment() -> dict:
    """Device, versions, date and the exact command (:func:`gdq_engine.bench.environment`), the
    malloc settings of :func:`keep_freed_memory` and, on CUDA, the Gluon body conv's settings: what
    a results file must carry."""
    from gdq_engine.bench import environment as base_environment

    env = base_environment()
    if MALLOC_SETTINGS is not None:
        env["glibc_malloc"] = MALLOC_SETTINGS
    if torch.cuda.is_available():
        try:  # the Gluon body conv's settings as a launch now gets them (GDQ_SM90_* included)
            from gdq_engine.kernels import ops as tk

            env["sm90_body"] = dict(enabled=tk.SM90_BODY, **tk.sm90_settings())
        except ImportError:
            pass
    return env


# glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD.
_MALLOPT = {"trim_threshold": (-1, 16 << 30), "top_pad": (-2, 256 << 20), "mmap_threshold": (-3, (1 << 31) - 1)}
MALLOC_SETTINGS: dict | None = None  # what keep_freed_memory() set, recorded by environment()


def keep_freed_memory() -> dict | None:
    """CPU timing: make glibc's malloc keep freed memory for reuse instead of returning it to the
    OS (large blocks from the heap, never trimmed); returns the settings, or None without glibc.

    With the defaults, multi-megabyte tensors are mmap-ed and unmapped per call once glibc's
    dynamic threshold says so, and every first touch then costs a page fault per 4 KiB: torch's
    bf16 channels_last network, which allocates per layer, took 153-157 ms per 744x744 frame in
    three latency.py runs with the defaults against 106-110 ms with this setting, while the
    engine's rows (reused workspaces) moved by a few ms. Applied to every row of a run alike; call
    before any large allocation."""
    global MALLOC_SETTINGS
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(name)
    if not all(libc.mallopt(param, value) == 1 for param, value in _MALLOPT.values()):
        return None
    MALLOC_SETTINGS = {key: value for key, (_, value) in _MALLOPT.items()}
    return MALLOC_SETTINGS


def device_tag() -> str:
    """Short device name for result file names (cpu or the GPU's model)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-").lower()
    return "cpu"


def write_results(name: str, payload: dict, out_dir: str | Path | None = None) -> Path:
    """Write ``payload`` + environment to ``<out_dir>/<name>-<device>-<date>.json``; return the path."""
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    path = out / f"{name}-{device_tag()}-{env['date'][:10]}.json"
    path.write_text(json.dumps({"environment": env, **payload}, indent=1) + "\n")
    return path


def median_ms(fn, reps: int) -> float:
    """Median host-timer milliseconds of ``reps`` calls of ``fn`` after one warm-up call (CPU)."""
    fn()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def measure_gpu_peaks(rep_ms: int = 200) -> dict:
    """Measured int8 tensor-core peak (``torch._int_mm`` 8192^3, TOPS), fp16 matmul peak (TFLOP/s)
    and HBM bandwidth (a 1 GiB device copy, GB/s read + write) of the current CUDA device: the
    roofline the benchmarks compare against (medians of ``triton.testing.do_bench``)."""
    from triton.testing import do_bench

    def bench(fn) -> float:
        return do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")

    a = torch.randint(-128, 127, (8192, 8192), dtype=torch.int8, device="cuda")
    b = torch.randint(-128, 127, (8192, 8192), dtype=torch.int8, device="cuda").t().contiguous().t()
    t_mm = bench(lambda: torch._int_mm(a, b))
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t_cp = bench(lambda: y.copy_(x))
    h = torch.randn(8192, 8192, dtype=torch.float16, device="cuda")
    t_h = bench(lambda: h @ h)
    return {"int8_tops": 2 * 8192**3 / t_mm / 1e9, "fp16_tflops": 2 * 8192**3 / t_h / 1e9,
            "hbm_gbs": 2 * x.numel() / t_cp / 1e6}
