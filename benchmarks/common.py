"""Shared helpers for benchmark scripts: environment record and result files."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """Device, versions, date and the exact command: what a results file must carry."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        env["cpu"] = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags")).split()
        env["cpu_int8_bf16_flags"] = sorted(f for f in flags if f.startswith(("amx", "avx512_vnni", "avx512_bf16")))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


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
