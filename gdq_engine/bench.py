"""Measured upscaling speed on this machine: what ``python -m gdq_engine bench`` runs.

Every row is an :class:`~gdq_engine.engine.Engine` (one policy) upscaling the same LR frames,
crops of real photos. The rows are timed in interleaved rounds (:func:`interleaved_ms`): each
round calls every row once, so load that drifts over the run hits every row alike. A row's time
is the median of its rounds of the whole ``upscale`` call (tiling, policy, network, stitching; on
a GPU the device synchronised before and after), its quality the PSNR on Y of its output against
the first row's (normally the FP network), so a speed never stands without the quality it costs.
``benchmarks/latency.py`` is the full benchmark behind the README's numbers (torch baselines,
cuDNN, torch.compile, roofline floors); it shares this module's frames and rounds.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def parse_size(text: str) -> tuple[int, int]:
    """'1920x1080' -> (1920, 1080) (width, height; positive integers), ``ValueError`` otherwise."""
    w, sep, h = text.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
        raise ValueError(f"bad size {text!r}; write WIDTHxHEIGHT, e.g. 1920x1080")
    return int(w), int(h)


def frame_paths(source, count: int) -> list[Path]:
    """The images frames are cropped from: ``source`` itself when it is an image file, else the
    first ``count`` images under the folder ``source`` (cycled where it holds fewer)."""
    from .train.data import list_images

    source = Path(source)
    if source.is_file():
        return [source]
    found = list_images([source])
    return [found[i % len(found)] for i in range(count)]


def lr_frames(paths: list[Path], height: int, width: int) -> list[torch.Tensor]:
    """One (1,3,height,width) fp32 crop in [0,1] per image: its top-left corner, the image first
    mirrored (tiled by reflection) where it is smaller than the crop."""
    from .io import load_image

    frames = []
    for path in paths:
        img = load_image(path)
        while img.shape[1] < height or img.shape[2] < width:
            img = torch.cat([img, img.flip(1)], 1) if img.shape[1] < height else torch.cat([img, img.flip(2)], 2)
        frames.append(img[:, :height, :width].unsqueeze(0).contiguous())
    return frames


def place_frames(frames: list[torch.Tensor], device, host_uint8: bool = False) -> list[torch.Tensor]:
    """Float [0,1] frames (:func:`lr_frames`) as an ``upscale`` call gets them: float32 on
    ``device``, or with ``host_uint8`` uint8 (0..255) in host memory, the bytes of the 8-bit
    images the crops came from, as a user's decoded frames are."""
    return [(f * 255).round().to(torch.uint8) if host_uint8 else f.to(device) for f in frames]


def interleaved_ms(engines: list, frames: list[torch.Tensor], rounds: int, gpu: bool = False,
                   progress: bool = False) -> list[dict]:
    """Per engine, medians over ``rounds`` rounds, each round calling every engine once (frames
    rotating), after one warm-up round, so load drifting over the run hits every row alike (a
    row-after-row timing moved the bf16 anchor between 110 and 150 ms on a shared 2-core machine;
    on the fifth H100 run the first process timed rows 0.2-0.5 ms slower than a second one had on
    the fourth): ``ms``, the host timer around the whole call (on GPU the device synchronised
    before and after, so the call's queued tail is its own), ``wait_ms``, its waits in reads of
    device results (``UpscaleReport.wait_seconds``), and ``host_ms`` = ms - wait_ms, the host's
    own work (on GPU, where it nears ``ms`` the call is host-bound). ``progress``: a bar over the
    rounds."""
    from tqdm import tqdm

    samples = [[] for _ in engines]
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    with torch.inference_mode():
        for r in tqdm(range(rounds + 1), desc="rounds", disable=not progress):
            for i, engine in enumerate(engines):
                sync()
                t = time.perf_counter()
                _, report = engine.upscale(frames[(r + i) % len(frames)], return_report=True)
                sync()
                if r:  # round 0 warms up
                    samples[i].append(((time.perf_counter() - t) * 1e3, report.wait_seconds * 1e3))
    out = []
    for s in samples:
        ms = statistics.median(t for t, _ in s)
        wait = statistics.median(w for _, w in s)
        out.append({"ms": ms, "wait_ms": wait, "host_ms": statistics.median(t - w for t, w in s)})
    return out


def bench_engines(engines: dict[str, object], frames: list[torch.Tensor], rounds: int,
                  progress: bool = False) -> list[dict]:
    """Time and check every engine on the same frames; one row per engine, in order.

    Args:
        engines: row name -> Engine; the first is the reference of the speed-up and PSNR columns.
        frames: (1,3,h,w) frames of one size: float in [0,1] on the engines' device, or uint8
            (0..255) in host memory, as decoded images are (the times then include the copies in and
            the 8-bit results back).
        rounds: timed rounds (>= 1), each calling every engine once.
    Returns:
        Per row: ``method``, ``ms`` (median ms per frame), ``host_ms`` / ``wait_ms``
        (:func:`interleaved_ms`), ``mpix_per_s`` (output megapixels per second), ``speedup`` (the
        first row's ms / this row's), ``fab`` (mean activation bits over the frames' patches, 32.0
        for FP), ``patches`` per frame, ``psnr_y`` (dB on Y, border = scale, of this row's outputs
        against the first row's: :func:`mean_psnr`), ``identical_frames`` (frames whose output is
        the first row's, bit for bit) and ``backend``.
    """
    from .metrics import psnr_y

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not engines or not frames:
        raise ValueError("bench needs at least one engine and one frame")
    gpu = next(iter(engines.values())).device.type == "cuda"
    rows, reference = [], None
    with torch.inference_mode():
        for name, engine in engines.items():
            results = [engine.upscale(f, return_report=True) for f in frames]  # also compiles / captures
            outs = [out.float().cpu() / (255 if out.dtype == torch.uint8 else 1) for out, _ in results]
            reference = outs if reference is None else reference
            scores = [float(psnr_y(o, r, engine.scale)) for o, r in zip(outs, reference)]
            bits = [b for _, report in results for b in report.bits]
            body = getattr(engine, "int_body", None)
            rows.append({"method": name, "fab": sum(bits) / len(bits) if bits else 32.0,
                         "patches": results[0][1].patches,
                         "psnr_y": mean_psnr(scores), "identical_frames": sum(map(math.isinf, scores)),
                         "backend": getattr(body, "backend", "fp") if body is not None else "fp",
                         "output": f"{outs[0].shape[-1]}x{outs[0].shape[-2]}"})
    times = interleaved_ms(list(engines.values()), frames, rounds, gpu=gpu, progress=progress)
    h, w = frames[0].shape[-2:]
    out_mpix = h * w * next(iter(engines.values())).scale ** 2 / 1e6
    for row, t in zip(rows, times):
        row.update(t, mpix_per_s=out_mpix / (t["ms"] / 1e3), speedup=times[0]["ms"] / t["ms"])
    return rows


def mean_psnr(scores: list[float]) -> float | None:
    """The mean of per-frame PSNRs (dB) over the frames whose outputs differ (an identical frame's
    PSNR is infinite); None where every frame is identical."""
    finite = [s for s in scores if not math.isinf(s)]
    return statistics.fmean(finite) if finite else None


def format_table(rows: list[dict]) -> str:
    """The rows of :func:`bench_engines` as a Markdown table."""
    lines = ["| method | backend | ms / frame | output MPix/s | speed-up vs first row | FAB "
             "| PSNR-Y vs first row (dB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        psnr = "identical" if r["psnr_y"] is None else f"{r['psnr_y']:.2f}"
        if r["psnr_y"] is not None and r["identical_frames"]:
            psnr += f" ({r['identical_frames']} frames identical)"
        lines.append(f"| {r['method']} | {r['backend']} | {r['ms']:.1f} | {r['mpix_per_s']:.2f} | "
                     f"x{r['speedup']:.2f} | {r['fab']:.2f} | {psnr} |")
    return "\n".join(lines)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; an empty set elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration, IndexError):
        return set()


def environment(command: str | None = None) -> dict:
    """What a results record must carry: date (UTC), the command (default: this process's
    ``sys.argv``), Python, torch and Triton versions, the CPU (its model name, threads and int8 /
    bf16 feature flags on Linux) and, where CUDA is available, the GPU, CUDA and cuDNN versions."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command or "python " + " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = cpu_flags()
    if flags:
        env["cpu_int8_bf16_flags"] = sorted(f for f in flags if f.startswith(("amx", "avx512_vnni", "avx512_bf16")))
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
