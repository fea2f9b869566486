"""Command line: ``python -m gdq_engine upscale|eval|bench|calibrate|train|info``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from pathlib import Path

import torch

SAMPLES = ("astronaut", "chelsea", "coffee", "rocket")  # scikit-image sample photos


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="edsr-baseline-x4", help="shipped name, official name or checkpoint path")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the FP network (of the FP layers around a quantized body); float16 on GPUs only")
    p.add_argument("--patch-size", type=int, default=96, help="LR patch side (papers: 96)")
    p.add_argument("--stride", type=int, default=None,
                   help="patch stride (default: the patch size less 6 pixels of overlap, the papers' 96/90; less an "
                        "eighth of the patch when that is fewer)")
    p.add_argument("--margin", type=int, default=0, help="extra LR context per patch, removes seams")
    p.add_argument("--whole-image", action="store_true", help="run the network on the whole image")
    p.add_argument("--batch-size", type=int, default=None,
                   help="patches per forward pass (default: as many as half the free GPU memory holds; 16 on CPU)")
    p.add_argument("--calib", default=None,
                   help="folder of images (or a .calib.pt table) for calibrating quantized policies; default: "
                        "the table shipped with the shipped models")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cpp", "triton", "cuda"],
                   help="integer-body backend of quantized policies (auto: Triton on CUDA, C++ on CPU)")
    p.add_argument("--containers", default="auto", choices=["auto", "packed", "bytes", "padded"],
                   help="how the integer body stores 2/4-bit codes: packed, or one per byte so the 8-bit kernels run "
                        "them (same results; auto: bytes on Triton/CUDA, where that is faster); padded: bytes in a "
                        "zero-ringed layout read by TMA copies (Triton, 32k channels; measured no faster on an H200)")
    p.add_argument("--residual-stream", default="auto", choices=["auto", "float32", "dtype"],
                   help="dtype of the integer body's residual stream: float32, the FP layers' --dtype (reference "
                        "and Triton backends), or auto: fp16 with --dtype float16 on Triton/CUDA, else float32")
    p.add_argument("--depth", type=int, default=None,
                   help="depth version of a quantized model trained with --depths (first D residual blocks)")
    p.add_argument("--tail-bits", type=int, default=None,
                   help="quantized policies: also run the body-end conv and upsampler convs as integer convs with "
                        "activations at this width (8 recommended); scales from --calib or the shipped table")
    p.add_argument("--group-streams", action="store_true",
                   help="dynamic policies on CUDA: run a batch's groups of different widths at the same time, one "
                        "CUDA stream per width (same results)")
    p.add_argument("--image-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA: run each image's whole work as CUDA graph replays, captured per image size on its "
                        "second use (same results; for many images of one size, e.g. video frames); default: "
                        "the engine's (on for quantized policies unless a progress bar over patches is shown, as "
                        "upscale's is for one image; a folder's bar counts images)")


def parse_policy(spec: str | None) -> tuple[str | None, int | tuple[int, ...] | None]:
    """'fp' | 'static:8' | 'entropy:2,4,8' | 'granular' | 'cadyq' -> (policy name, bits); None or
    'model' -> (None, None), the model's own policy (a quantized checkpoint's, else fp). 'granular'
    and 'cadyq' are the QAT-trained models shipped with a shipped model."""
    if spec is None or spec == "model":
        return None, None
    name, _, bits = spec.partition(":")
    if name not in ("fp", "static", "entropy", "granular", "cadyq"):
        raise ValueError(f"unknown policy spec {spec!r}; use fp, static:B, entropy:B1,B2,B3, granular or cadyq")
    if not bits:
        return name, None
    try:
        values = tuple(int(b) for b in bits.split(","))
    except ValueError as exc:
        raise ValueError(f"bad bit-widths in {spec!r}") from exc
    return name, values[0] if name == "static" and len(values) == 1 else values


def _engine(args, progress: bool = False, policy: str = "fp", calib=None):
    """Engine from the shared CLI options; ``calib`` (LR patches) overrides the ``--calib`` folder."""
    from .engine import Engine

    name, bits = parse_policy(policy)
    quantized = name not in (None, "fp")
    tail_bits = None if name == "fp" else args.tail_bits  # the model's own policy (None) may be a quantized one
    calib = (args.calib if calib is None else calib) if quantized or tail_bits is not None else None
    return Engine(args.model, policy=name, bits=bits, calib=calib, device=args.device,
                  patch_size=None if args.whole_image else args.patch_size, stride=args.stride, margin=args.margin,
                  batch_size=args.batch_size, dtype=getattr(torch, args.dtype), progress=progress,
                  backend=args.backend, depth=None if name == "fp" else args.depth, tail_bits=tail_bits,
                  containers="auto" if name == "fp" else args.containers,
                  residual_stream="auto" if name == "fp" else args.residual_stream,
                  group_streams=args.group_streams, image_graphs=args.image_graphs)


def parse_checkpoint_spec(spec: str) -> tuple[str, int | None] | None:
    """'q.pt' -> ('q.pt', None); 'q.pt@8' -> ('q.pt', 8) (depth version 8); other specs -> None."""
    path, at, depth = spec.rpartition("@")
    if at and path.endswith(".pt"):
        if not depth.isdigit():
            raise ValueError(f"bad depth in {spec!r}; write e.g. q.pt@8")
        return path, int(depth)
    return (spec, None) if spec.endswith(".pt") else None


def _command(args) -> str:
    """The command line that made an artefact (stored in checkpoints and tables)."""
    return "python -m gdq_engine " + shlex.join(args.argv)


def _sample_image(name: str, folder: Path) -> Path:
    try:
        from skimage import data
    except ImportError as exc:
        raise SystemExit("--sample needs scikit-image: pip install scikit-image") from exc
    from PIL import Image

    path = folder / f"{name}_lr.png"
    Image.fromarray(getattr(data, name)()).convert("RGB").save(path)
    return path


def output_name(src: Path, files: list[Path], scale: int) -> str:
    """The PNG name an image ``src`` of a folder's ``files`` is written as: ``<stem>_x<scale>.png``,
    or ``<stem>_<format>_x<scale>.png`` when another file has the same stem (a.png and a.jpg), so
    none overwrites another."""
    if sum(f.stem == src.stem for f in files) > 1:
        return f"{src.stem}_{src.suffix[1:].lower()}_x{scale}.png"
    return f"{src.stem}_x{scale}.png"


def cmd_upscale(args) -> int:
    from tqdm import tqdm

    from .engine import upscale_file
    from .io import IMAGE_SUFFIXES, check_output_path

    if not args.sample and args.input is not None and not Path(args.input).exists():
        raise ValueError(f"no such image file or folder: {args.input}")
    one_file = args.sample or (args.input is not None and not Path(args.input).is_dir())
    # one image into an existing folder: written there as <name>_x<scale>.png (the scale is known
    # once the model loads); a folder of images into an image file name is an error, not a folder
    # named out.png
    into_folder = one_file and not args.sample and Path(args.output).is_dir()
    if not one_file and args.input is not None and Path(args.output).suffix.lower() in IMAGE_SUFFIXES \
            and not Path(args.output).is_dir():
        raise ValueError(f"{args.input} is a folder of images: give an output folder, not the image file name "
                         f"{args.output}")
    # outputs are checked (and their folders made) before the model loads: a typo costs no run
    for path in (args.output if one_file and not into_folder else None, args.compare, args.bitmap):
        if path is not None:
            check_output_path(path, make_folder=True)
    # one image: a bar over its patches; a folder: the bar over images, and the engine free to replay
    # each image as CUDA graphs (image graphs: one replay per image, no batches to count)
    engine = _engine(args, progress=one_file, policy=args.policy)
    print(f"{engine}", file=sys.stderr)
    if args.sample:
        out = Path(args.output)
        src = _sample_image(args.sample, out.parent)
        print(f"input: scikit-image sample '{args.sample}' saved as {src}", file=sys.stderr)
        jobs = [(src, out)]
    else:
        if args.input is None:
            raise SystemExit("upscale: give an input image/folder or --sample NAME")
        src, out = Path(args.input), Path(args.output)
        if src.is_dir():
            out.mkdir(parents=True, exist_ok=True)
            files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise SystemExit(f"no images in {src}")
            jobs = [(f, out / output_name(f, files, engine.scale)) for f in files]
        else:
            jobs = [(src, out / output_name(src, [src], engine.scale) if into_folder else out)]
    for option, value in (("--bitmap", args.bitmap), ("--compare", args.compare)):
        if value and len(jobs) > 1:
            raise ValueError(f"{option} takes one input image")
    failed = []
    for s, d in tqdm(jobs, desc="images", disable=len(jobs) < 2):
        try:
            h, w = upscale_file(engine, s, d, compare=args.compare, bitmap=args.bitmap)
        except ValueError as exc:
            if len(jobs) == 1:
                raise
            # a folder's unreadable or unusable image is reported and skipped, not the rest with it
            failed.append(s)
            print(f"skipped {s}: {exc}", file=sys.stderr)
            continue
        print(f"wrote {d} ({w}x{h})", file=sys.stderr)
    if failed:
        raise ValueError(f"{len(failed)} of {len(jobs)} images were skipped (reasons above); the others were written")
    if args.bitmap:
        from .bitmap import legend

        print(f"wrote {args.bitmap} (patches tinted by bits: {legend(engine.policy.bits)})", file=sys.stderr)
    if args.compare:
        print(f"wrote {args.compare} (bicubic | {engine.model.arch})", file=sys.stderr)
    return 0


def _policy_engines(args):
    """``--policies`` -> (a function making each spec's Engine, the specs that name quantized
    checkpoints -> (path, depth)): a checkpoint's Engine runs its own policy and depth, the others
    the shared options' model, with the ``--calib`` folder read and downscaled once for all of
    them, in crops of the inference patch size (entropy thresholds depend on the patch size).
    Checks the checkpoint paths and every spec up front."""
    from .models import load_model
    from .quantized import DEFAULT_CALIB_PATCH, calibration_patches

    checkpoints = {spec: parsed for spec in args.policies if (parsed := parse_checkpoint_spec(spec))}
    for path, _ in checkpoints.values():
        if not Path(path).is_file():
            raise ValueError(f"--policies {path}: no such quantized checkpoint")
    names = [parse_policy(spec)[0] for spec in args.policies if spec not in checkpoints]
    calib = None
    if args.calib is not None and not str(args.calib).endswith(".calib.pt") and any(
            name not in (None, "fp") for name in names):
        size = DEFAULT_CALIB_PATCH if args.whole_image else args.patch_size
        calib = calibration_patches(args.calib, load_model(args.model).scale, size)

    def make(spec: str):
        if spec in checkpoints:  # a quantized checkpoint, run with its own policy (and a depth version)
            path, depth = checkpoints[spec]
            return _engine(argparse.Namespace(**{**vars(args), "model": path, "depth": depth or args.depth}),
                           policy="model")
        return _engine(args, policy=spec, calib=calib)

    return make, checkpoints


def cmd_eval(args) -> int:
    from .evaluate import bicubic_upscaler, evaluate_folder

    make_engine, checkpoints = _policy_engines(args)
    rows = []
    for spec in args.policies:
        engine = make_engine(spec)
        reports = []

        def upscale(x, engine=engine, reports=reports):
            y, report = engine.upscale(x, return_report=True)
            reports.append(report)
            return y

        for folder in args.data:
            reports.clear()
            if args.bicubic and spec == args.policies[0]:
                res = evaluate_folder(bicubic_upscaler(engine.scale), folder, engine.scale, name="bicubic",
                                      limit=args.limit)
                rows.append((Path(folder).name, res, None, None, None))
            name = Path(spec).name if spec in checkpoints else spec  # keeps an @depth suffix
            res = evaluate_folder(upscale, folder, engine.scale, name=name, limit=args.limit)
            bits = [b for r in reports for b in r.bits]
            fab = sum(bits) / len(bits) if bits else 32.0
            bitops = sum(r.bitops for r in reports) / len(reports) if bits else None
            rows.append((Path(folder).name, res, fab, bitops, engine.storage_bytes))
    print(f"model: {args.model}")
    lines = ["| dataset | method | scale | FAB | BitOPs/image (G) | size (KB) | PSNR (dB) | SSIM |",
             "|---|---|---|---|---|---|---|---|"]
    for ds, r, fab, bitops, size in rows:
        fab_s = "-" if fab is None else f"{fab:.2f}"
        ops_s = "-" if bitops is None else f"{bitops / 1e9:.1f}"
        size_s = "-" if size is None else f"{size['total'] / 1024:.0f}"
        lines.append(f"| {ds} | {r.name} | x{r.scale} | {fab_s} | {ops_s} | {size_s} | {r.mean_psnr:.2f} | "
                     f"{r.mean_ssim:.4f} |")
    print("\n".join(lines))
    print("size: the model stored with its quantized convs' codes packed to their weight bits, plus fp32 scales, "
          "biases and every other parameter (Engine.storage_bytes)")
    if args.json:
        payload = [{"dataset": ds, "method": r.name, "scale": r.scale, "fab": fab, "bitops_per_image": bitops,
                    "model_bytes": size, "psnr": r.mean_psnr, "ssim": r.mean_ssim, "per_image_psnr": r.psnr,
                    "per_image_ssim": r.ssim}
                   for ds, r, fab, bitops, size in rows]
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


def _bits_list(text: str | None, what: str = "bit-widths") -> tuple[int, ...] | None:
    """'2,4,8' -> (2, 4, 8); None -> None; ValueError naming ``what`` otherwise."""
    if text is None:
        return None
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError as exc:
        raise ValueError(f"bad {what} {text!r}; write e.g. 2,4,8") from exc


def _default(value, default):
    """``value`` unless it was not given (0 is a value: ``--iters 0``)."""
    return default if value is None else value


def _arch_config(arch: str, text: str | None) -> dict:
    """``--arch-config`` 'n_feats=32,n_blocks=4' -> constructor arguments of ``arch`` (ints, floats);
    None: EDSR-baseline for ``edsr``, the architecture's own defaults otherwise. ``ValueError`` on
    an argument the architecture does not take or a value that is not a number."""
    import inspect

    from .models.checkpoints import ARCHS

    if text is None:
        return dict(n_feats=64, n_blocks=16, res_scale=1.0) if arch == "edsr" else {}
    known = set(inspect.signature(ARCHS[arch]).parameters) - {"scale", "mean"}
    config = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ValueError(f"bad --arch-config item {item!r}: write KEY=VALUE with KEY one of {sorted(known)}")
        try:
            number = float(value)
        except ValueError as exc:
            raise ValueError(f"bad --arch-config value {value!r} for {key}: a number") from exc
        config[key] = int(number) if number.is_integer() and key != "res_scale" else number
    return config


def cmd_train(args) -> int:
    command = _command(args)
    if args.method != "fp" and (args.arch != "edsr" or args.arch_config is not None):
        raise ValueError("--arch and --arch-config choose the model FP training builds; QAT takes the FP model "
                         "as --model")
    if args.method == "fp":
        from .train.fp import FPTrainConfig, train_fp

        cfg = FPTrainConfig(scale=args.scale, arch=args.arch, model_config=_arch_config(args.arch, args.arch_config),
                            data=tuple(args.data), val=args.val, iters=_default(args.iters, 10000),
                            batch=args.batch or 16, lr_patch=args.patch, lr=args.lr or 2e-4, warmup=args.warmup,
                            seed=args.seed, val_every=args.val_every or 1000, init=args.init, bf16=args.bf16)
        out = train_fp(cfg, args.out, device=args.device, command=command)
    else:
        from .train.qat import QATConfig, train_qat

        bits = _bits_list(args.bits) or {"granular": (2, 4, 8), "cadyq": (4, 6, 8)}.get(args.method, (8,))
        cfg = QATConfig(model=args.model, method=args.method, bits=bits, e2b_bits=_bits_list(args.e2b_bits),
                        w_bits=args.w_bits, calib=args.calib, calib_patch=args.calib_patch, data=tuple(args.data),
                        val=args.val, iters=_default(args.iters, 1000), batch=args.batch or 8, lr_patch=args.patch,
                        lr=args.lr or 1e-5, step_lr=args.step_lr, gbc_lr=args.gbc_lr, bit_weight=args.bit_weight,
                        fab_target=args.fab_target, fab_exact=args.fab_exact, bit_ramp=args.bit_ramp,
                        at_weight=args.at_weight,
                        atc_iters=args.atc_iters, seed=args.seed, val_every=args.val_every or 250,
                        depths=_bits_list(args.depths, "depths") or (), init=args.init, gbc_fit=args.gbc_fit,
                        gbc_fit_patch=args.gbc_fit_patch)
        out = train_qat(cfg, args.out, device=args.device, command=command)
    print(f"wrote {out}")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    if args.frames < 1 or (args.reps is not None and args.reps < 1):
        raise ValueError("--frames and --reps must be at least 1")
    size = None if args.output is None else bench.parse_size(args.output)
    twice = sorted({spec for spec in args.policies if args.policies.count(spec) > 1})
    if twice:
        raise ValueError(f"--policies names {twice[0]} twice")
    # a missing input folder or an unwritable JSON path fails before the models load
    paths = bench.frame_paths(args.input, args.frames)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    make_engine, _ = _policy_engines(args)
    engines = {spec: make_engine(spec) for spec in args.policies}
    first = next(iter(engines.values()))
    devices = {str(e.device) for e in engines.values()}
    scales = {e.scale for e in engines.values()}
    if len(devices) > 1:
        raise ValueError(f"the engines run on different devices {sorted(devices)}")
    if len(scales) > 1:
        raise ValueError(f"--policies mix models of scales {sorted(scales)}: compare models of one scale")
    gpu = first.device.type == "cuda"
    out_w, out_h = size or ((1920, 1080) if gpu else (744, 744))
    scale = first.scale
    if out_w % scale or out_h % scale:
        raise ValueError(f"--output {out_w}x{out_h} is not a multiple of the model's scale {scale}")
    reps = args.reps or (20 if gpu else 5)
    frames = bench.place_frames(bench.lr_frames(paths, out_h // scale, out_w // scale), first.device, args.host_uint8)
    where = f"{first.device} ({torch.cuda.get_device_name(first.device)})" if gpu else "cpu"
    if not gpu:
        from .ops import cpu_ops

        core = f", C++ int8 conv: {cpu_ops.conv_path(64, 64)}" if cpu_ops.available() else ""
        where += f" ({torch.get_num_threads()} threads{core}; CUDA available: {torch.cuda.is_available()})"
    print(f"device: {where}; model {args.model} ({first.model.arch} x{scale}), FP dtype {args.dtype}; "
          f"{len(frames)} {'uint8 host' if args.host_uint8 else 'float'} frame(s) of {out_w // scale}x{out_h // scale} "
          f"-> {out_w}x{out_h}; {reps} rounds",
          file=sys.stderr)
    rows = bench.bench_engines(engines, frames, reps, progress=True)
    print(bench.format_table(rows))
    if args.json:
        payload = {"environment": bench.environment(_command(args)), "device": where,
                   "workload": {"model": str(args.model), "scale": scale, "output": f"{out_w}x{out_h}",
                                "frames": [str(p) for p in paths], "rounds": reps, "dtype": args.dtype,
                                "frame_memory": "host uint8" if args.host_uint8 else f"{first.device} float32",
                                "patch_size": None if args.whole_image else args.patch_size},
                   "rows": rows}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def cmd_calibrate(args) -> int:
    from .quantized import quantize, save_quantized

    torch.manual_seed(args.seed)
    if args.table:
        from .models import load_model
        from .quantized import calibration_patches, save_calibration_table

        fp = load_model(args.model)
        table = save_calibration_table(fp, calibration_patches(args.calib, fp.scale, args.calib_patch), args.out,
                                       meta={"command": _command(args)})
        print(f"wrote calibration table {args.out}: widths {sorted(table['act_scales'])}, entropy thresholds "
              f"{[round(t, 4) for t in table['entropy']['thresholds']]}")
        return 0
    name, bits = parse_policy(args.policy)
    if name in (None, "fp"):
        raise ValueError("calibrate needs a quantized policy (static:B or entropy:B1,B2,B3) or --table")
    q = quantize(args.model, name, bits, calib=args.calib, w_bits=args.w_bits, calib_patch=args.calib_patch)
    meta = {"command": _command(args), "source_model": str(args.model)}
    if args.dqc_iters > 0:
        from .train.data import random_lr_patches
        from .train.dqc import dqc_calibrate

        patches = random_lr_patches([args.calib], q.scale, count=256, size=args.dqc_patch, seed=args.seed)
        q, history = dqc_calibrate(q, patches, iters=args.dqc_iters, seed=args.seed)
        meta["dqc_loss"] = {str(b): [round(v, 5) for v in losses] for b, losses in history.items()}
    save_quantized(q, args.out, meta=meta)
    thresholds = getattr(q.policy, "thresholds", None)
    print(f"wrote {args.out}: {q.policy.name} {list(q.policy.bits)}, w{q.w_bits}"
          + (f", entropy thresholds {[round(t, 4) for t in thresholds]}" if thresholds else ""))
    return 0


def cmd_info(args) -> int:
    from . import __version__, ops
    from .models import known_models

    print(f"gdq_engine {__version__}")
    print(f"torch {torch.__version__} (cuda {torch.version.cuda}); CUDA available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"C++ extension: {'built' if ops.HAS_CPP else 'missing'}")
    from .ops import cpu_ops

    if cpu_ops.available():  # which integer core the CPU backend runs for EDSR's 64 -> 64 convs
        print(f"CPU integer conv: {cpu_ops.conv_path(64, 64)} (AMX-INT8: {cpu_ops.has_amx()}, "
              f"AVX512-VNNI: {cpu_ops.has_vnni()}, AVX2: {cpu_ops.has_avx2()})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print("models: " + ", ".join(known_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gdq_engine",
                                     description="Mixed-precision super-resolution engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("upscale", help="upscale an image file or a folder of images")
    p.add_argument("input", nargs="?", help="image file or folder")
    p.add_argument("output", help="output file (folder when input is a folder)")
    p.add_argument("--sample", choices=SAMPLES, help="use a scikit-image sample photo as input")
    p.add_argument("--compare", help="also write a side-by-side PNG: bicubic | model")
    p.add_argument("--bitmap", help="also write the LR input with each patch tinted by its bits (quantized policies)")
    p.add_argument("--policy", default=None,
                   help="fp | static:B | entropy:B1,B2,B3 | granular | cadyq (default: the model's own: fp, or a "
                        "quantized checkpoint's)")
    _add_engine_args(p)
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser("eval", help="PSNR/SSIM (Y, border = scale) on folders of HR images")
    p.add_argument("--data", nargs="+", default=["../shared/data/val/Set5", "../shared/data/val/CSet14"],
                   help="folders of HR images (a folder's HR/ sub-folder when it has one); LR inputs are made by "
                        "MATLAB bicubic (default: Set5 and CSet14 under ../shared/data/val)")
    p.add_argument("--policies", nargs="+", default=["fp"],
                   help="policy specs to compare: fp, static:8, static:4, entropy:2,4,8, granular, cadyq ...; "
                        "'model' = a quantized --model's own policy; a path ending in .pt = that quantized "
                        "checkpoint with its own policy (one table for several trained models); q.pt@D = its "
                        "depth version D")
    p.add_argument("--bicubic", action="store_true", help="add the MATLAB-bicubic baseline rows")
    p.add_argument("--limit", type=int, default=None, help="only the first N images per folder")
    p.add_argument("--json", help="also write the results (per image too) to this JSON file")
    _add_engine_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="measure upscale speed on this machine: policies against FP on the same frames, "
                       "with the PSNR each costs")
    p.add_argument("--policies", nargs="+", default=["fp", "static:8", "entropy:2,4,8"],
                   help="policy specs (as eval's; a .pt path: that quantized checkpoint) timed side by side; the "
                        "first is the reference of the speed-up and PSNR columns")
    p.add_argument("--input", default="../shared/data/train",
                   help="image file or folder the LR frames are cropped from (default: ../shared/data/train)")
    p.add_argument("--output", default=None,
                   help="HR frame size WxH (default: 1920x1080 on a GPU, 744x744 on a CPU); the LR frames are "
                        "crops of this size / scale")
    p.add_argument("--frames", type=int, default=4, help="distinct frames the timed calls rotate over")
    p.add_argument("--reps", type=int, default=None,
                   help="timed rounds, each calling every policy once (median; default 20 on a GPU, 5 on a CPU)")
    p.add_argument("--host-uint8", action="store_true",
                   help="frames as uint8 tensors in host memory, as decoded images are: the times then include the "
                        "copies in and the 8-bit results back (default: float frames on the compute device)")
    p.add_argument("--json", help="also write the rows, the workload and the environment to this JSON file")
    _add_engine_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("calibrate", help="post-training quantization: write a quantized checkpoint")
    p.add_argument("--model", default="edsr-baseline-x4", help="FP model: shipped name or checkpoint path")
    p.add_argument("--policy", default=None, help="static:B | entropy:B1,B2,B3 (writes a quantized checkpoint)")
    p.add_argument("--table", action="store_true",
                   help="write a calibration table instead (DOBI scales at every width 2..8 + entropy thresholds)")
    p.add_argument("--calib", default="../shared/data/train", help="folder of HR images for calibration")
    p.add_argument("--calib-patch", type=int, default=96, help="LR crop side of the calibration patches")
    p.add_argument("--w-bits", type=int, default=8, choices=[2, 4, 8], help="weight bit-width of the quantized body")
    p.add_argument("--dqc-iters", type=int, default=0,
                   help="then train the activation scales (2DQuant DQC: L1 to the FP output + feature loss)")
    p.add_argument("--dqc-patch", type=int, default=48, help="LR crop side of the DQC training patches")
    p.add_argument("--seed", type=int, default=0, help="random seed (crops, initialisation)")
    p.add_argument("--out", required=True, help="quantized checkpoint to write (use it as --model anywhere)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("train", help="train an FP model, or quantization-aware training (resumable)")
    p.add_argument("--method", default="fp", choices=["fp", "granular", "cadyq", "static"],
                   help="fp: an FP model (--arch, default EDSR-baseline); granular: Granular-DQ QAT (GBC + E2B + "
                        "ATC); cadyq: CADyQ QAT (per-layer selectors); static: LSQ QAT at one activation width "
                        "(QuantSR-style WxAx with --w-bits)")
    p.add_argument("--scale", type=int, default=4, choices=[2, 3, 4], help="fp: the model's scale")
    p.add_argument("--arch", default="edsr", choices=["edsr", "msrresnet", "rdn"], help="fp: the architecture")
    p.add_argument("--arch-config", default=None,
                   help="fp: its constructor arguments, e.g. n_feats=32,n_blocks=4,n_layers=4,growth=32 for a "
                        "small RDN (default: EDSR-baseline for edsr, the architecture's defaults otherwise)")
    p.add_argument("--out", required=True, help="output checkpoint (a .state.pt beside it makes runs resumable)")
    p.add_argument("--data", nargs="+", default=["../shared/data/train"],
                   help="folders of HR training images (default: ../shared/data/train)")
    p.add_argument("--val", default="../shared/data/val/Set5", help="HR folder for periodic PSNR ('' to skip)")
    p.add_argument("--iters", type=int, default=None, help="default: fp 10000, QAT 1000")
    p.add_argument("--batch", type=int, default=None, help="default: fp 16, QAT 8")
    p.add_argument("--patch", type=int, default=48, help="LR crop side")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of the weights, cosine decay to 1%% (default: fp 2e-4, QAT 1e-5)")
    p.add_argument("--warmup", type=int, default=100, help="fp: linear warm-up iterations")
    p.add_argument("--seed", type=int, default=0, help="random seed (crops, initialisation)")
    p.add_argument("--val-every", type=int, default=None, help="default: fp 1000, QAT 250")
    p.add_argument("--init", default=None, help="fp: start from the matching tensors of this checkpoint; QAT: from "
                   "this quantized checkpoint of the same model (its weights and the steps of the widths it shares)")
    p.add_argument("--bf16", action="store_true", help="fp: bf16 autocast (GPU / AMX CPUs)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--model", default="edsr-baseline-x4", help="QAT: the FP model (shipped name or checkpoint)")
    p.add_argument("--bits", default=None, help="QAT: GBC widths (granular, default 2,4,8), selector widths "
                   "(cadyq, default 4,6,8) or one width (static, default 8)")
    p.add_argument("--e2b-bits", default=None, help="granular: E2B widths (default: --bits; paper 4,5,8)")
    p.add_argument("--w-bits", type=int, default=8, choices=[2, 4, 8], help="QAT: weight bit-width")
    p.add_argument("--calib", default=None,
                   help="QAT: starting DOBI scales: a .calib.pt table or image folder (default: the shipped table)")
    p.add_argument("--calib-patch", type=int, default=96, help="QAT: LR crop side of --calib image crops")
    p.add_argument("--step-lr", type=float, default=1e-3, help="QAT: learning rate of the LSQ steps")
    p.add_argument("--gbc-lr", type=float, default=1e-3, help="granular / cadyq: learning rate of GBC / the selectors")
    p.add_argument("--bit-weight", type=float, default=0.0,
                   help="granular / cadyq: loss weight of the mean bits (0 = L1 only, Granular-DQ's loss)")
    p.add_argument("--fab-target", type=float, default=None,
                   help="with --bit-weight, penalise only the batch FAB above this (a bit budget)")
    p.add_argument("--fab-exact", action="store_true",
                   help="with --fab-target, penalise the batch FAB's distance to it on both sides (spend the budget)")
    p.add_argument("--bit-ramp", type=int, default=0,
                   help="the bit weight grows linearly over this many steps (CADyQ's growing penalty; 0: constant)")
    p.add_argument("--at-weight", type=float, default=0.0,
                   help="attention-transfer distillation from the starting FP model (CADyQ; 0: off)")
    p.add_argument("--atc-iters", type=int, default=0, help="granular: iterations of ATC threshold adaptation")
    p.add_argument("--gbc-fit", type=int, default=0,
                   help="granular: after QAT, refit GBC on the measured per-width PSNR of this many training crops "
                        "to meet --fab-target (with --init q.pt --iters 0: refit a trained model's GBC only)")
    p.add_argument("--gbc-fit-patch", type=int, default=96, help="LR side of the --gbc-fit crops (inference patch)")
    p.add_argument("--depths", default=None,
                   help="QAT: depth versions trained together (QuantSR's DQA), e.g. 16,12,8: each step runs the "
                        "first D blocks for a random D of them, with trained per-block residual weights; pick one "
                        "at inference with --depth")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="versions, devices, backends and known models")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status. User errors print one line and exit 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in checkpoints as the command that made them
    if getattr(args, "val", None) == "":
        args.val = None
    format_warning = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line, as errors are
    try:
        return args.func(args)
    except (ValueError, NotImplementedError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = format_warning
