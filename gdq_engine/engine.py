"""The user-facing engine: model + policy + tiling + scheduler + backend, ``upscale()``.

Data path (ARCHITECTURE.md §1): tile -> FP head -> policy assigns one bit-width per patch ->
patches grouped by bit-width, one batched run of the quantized body per group -> FP tail -> stitch.
``policy="fp"`` runs the FP network.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from tqdm import tqdm

from .compute import resolve_device, resolve_dtype
from .io import as_batch, input_dtype_of, restore_kind, returns_uint8, to_input_dtype
from .models import SRModel, load_model
from .policy import BitPolicy, Static
from .quantized import BACKENDS
from .runtime.cost import model_bytes
from .runtime.graphs import GraphCache
from .runtime.hostreads import copy_into, counting_waits, to_host
from .runtime.imagegraph import ImageGraphs, ImagePlan, make_image_plan
from .runtime.intgraph import _backend_module
from .runtime.lastconv import with_kernel_last_conv
from .runtime.scheduler import has_device_stage
from .runtime.stitch import Stitcher, finish_canvas
from .runtime.streams import GroupStreams
from .runtime.tiler import check_image_size, default_stride, make_grid, whole_image_grid
from .runtime.windows import WindowCutter

POLICIES_AVAILABLE = ("fp", "static", "entropy", "granular", "cadyq")


@dataclass
class UpscaleReport:
    """What one ``upscale`` call did.

    ``bits``: activation bit-width per patch (tile order, images in order; empty for FP; the
    mean over layers for layer-wise policies such as CADyQ); ``groups``: one entry per body
    launch: (bit-width, patches), or (layer, bit-width, patches) for layer-wise policies;
    ``bitops``: sum over patches of MAC x b_w x b_a (FP convs 32 x 32); ``fab``: mean activation
    bits over quantized layers and patches (32.0 for FP); ``seconds``: the call's wall time;
    ``wait_seconds``: the part of it the host spent waiting in reads of device results (each
    batch's bit-widths with a dynamic policy, the finiteness flag at the end;
    :mod:`~gdq_engine.runtime.hostreads`). On a GPU, ``seconds - wait_seconds`` is host work:
    where the waits are short, the call was host-bound (the GPU idled between launches).
    """

    patches: int = 0
    batches: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0
    device: str = ""
    dtype: str = ""
    bits: list[int] = field(default_factory=list)
    groups: list[tuple[int, int]] = field(default_factory=list)
    bitops: int = 0
    fallbacks: list[str] = field(default_factory=list)

    @property
    def fab(self) -> float:
        return sum(self.bits) / len(self.bits) if self.bits else 32.0


class PatchCost(NamedTuple):
    """Analytic cost of one LR window (:mod:`~gdq_engine.runtime.cost`): MACs in the quantized body
    convs (of the blocks the depth version runs), in the other FP convs and in the integer tail's
    convs, and the elements of the largest module output (what bounds the batch size)."""

    q_macs: int
    fp_macs: int
    tail_macs: int
    peak: int


class Engine:
    """Super-resolution engine.

    Args:
        model: a shipped/official name (see ``gdq_engine.known_models()``), a checkpoint path, an
            :class:`~gdq_engine.models.SRModel`, or a quantized model (a
            :class:`~gdq_engine.quantized.QuantizedSR` from :func:`gdq_engine.quantize`, or its
            checkpoint from :func:`gdq_engine.save_quantized`), which brings its own policy,
            calibration and weight bits.
        policy: ``None`` (default: ``"fp"``, or a quantized model's own policy); ``"fp"``;
            ``"static"`` (every patch at ``bits``, default 8); ``"entropy"`` (EntropyOnly over
            ``bits``, default (2, 4, 8)); or a :class:`~gdq_engine.policy.BitPolicy`.
        bits: bit-width (static) or three ascending bit-widths (entropy); code widths 2..8, run
            in the 2/4/8 containers.
        calib: calibration data for quantized policies: a folder of images (random LR crops of
            ``patch_size``, so entropy thresholds match the inference patches), (N,3,h,w) LR
            patches in [0,1], or a ``*.calib.pt`` table. DOBI activation scales (and entropy
            thresholds) are fitted on it. ``None``: the table shipped with a shipped model.
        w_bits: weight bit-width of the quantized body (8, 4 or 2).
        backend: integer-body backend of quantized policies: ``"reference"`` (exact pure-torch
            path, any device), ``"cpp"`` (C++ CPU kernels: AMX-INT8, AVX512-VNNI or AVX2),
            ``"triton"`` (packed int8 tensor-core kernels: CUDA, or CPU under
            ``TRITON_INTERPRET=1``), ``"cuda"`` (CUDA C++ mma.sync kernels, when the extension was
            built with CUDA), or ``"auto"`` (Triton on CUDA, C++ on CPUs with AVX512-VNNI or
            AVX2, else reference).
            All give bit-identical results.
        cuda_graphs: with the Triton / CUDA backends on CUDA, replay the network as CUDA graphs
            (:class:`~gdq_engine.runtime.graphs.GraphCache`), each captured on its shape's second
            use: no per-kernel launch overhead and no gaps between launches; results unchanged. A
            static policy's graph holds the whole network (head, integer body, tail), one per
            batch size. A patch-wise dynamic policy replays the head and its policy's device work
            as one graph and reads the bits (its groups are known only then), then each group's
            integer blocks as a graph per (bit-width, group size padded to 1, 2, 3, 4, 6, 8, 12,
            ...: the integer blocks give the same values for any batch), and the batch's body-end
            conv, upsampler and tail as one more graph; a batch whose patches all get one width
            replays that width's whole-network graph. Graphs holding FP convs are keyed on exact
            batch sizes, so the FP convs see the shapes they see without graphs. Layer-wise
            policies (CADyQ) replay nothing.
        containers: how the integer body stores codes narrower than 8 bits between its convs:
            ``"packed"`` (2 or 4 per byte), ``"bytes"`` (one per byte, run by the 8-bit kernels) or
            ``"auto"`` (bytes on the Triton backend on CUDA, where the 4/2-bit kernels measured
            slower than the 8-bit one; packed elsewhere: :func:`~gdq_engine.quantized.resolve_containers`).
            ``"padded"``: bytes in a zero-ringed layout whose conv taps are TMA box copies
            (Triton only; measured no faster than ``"bytes"`` on an H200, docs/kernels.md).
            Results are identical; the report's bits and BitOPs count code widths either way.
        residual_stream: the dtype of the integer body's residual stream between blocks:
            ``"float32"``, ``"dtype"`` (the FP layers' ``dtype``: fp16 or bf16 too; reference and
            Triton backends) or ``"auto"`` (fp16 when ``dtype`` is float16 on the Triton backend
            on CUDA, where it halves the residual convs' bytes; fp32 otherwise). A half stream
            rounds each block's result to it (docs/numerics.md, "Residual stream"):
            :func:`~gdq_engine.quantized.resolve_stream_dtypes`.
        device: ``None`` picks CUDA when available, else CPU; ``"cuda"`` on a torch without CUDA
            (or no visible GPU) is a ``ValueError`` that says so (:func:`~gdq_engine.compute.resolve_device`).
        patch_size: LR patch side in pixels (papers' protocol: 96); ``None`` = whole-image mode.
        stride: patch stride; ``None`` (default): :func:`~gdq_engine.runtime.tiler.default_stride`,
            the patch side less 6 pixels of overlap (the papers' 96 / 90), or less an eighth of
            the patch when that is fewer.
        margin: extra LR context per patch, cropped after the network (0 = papers' protocol; a
            margin >= ``model.receptive_radius`` makes tiled output equal whole-image output).
        batch_size: patches per forward pass; ``None`` (default) chooses: on CUDA as many patches as
            half the free device memory holds (:func:`auto_batch_size`: every patch of a 1080p
            frame in one pass on an 80 GB GPU), on CPU 16. Halved automatically on CUDA
            out-of-memory.
        dtype: compute dtype of the FP network, a torch dtype or its name (``"fp16"``,
            ``"bfloat16"`` ...; float32 default; float16/bfloat16 on GPU, with an
            automatic float32 re-run if the half-precision result is not finite). With quantized
            policies it is the dtype of the FP layers around the integer body (head, body-end
            conv, upsampler, tail); calibration and weight codes always come from the fp32 model.
        progress: show a progress bar over batches (not with ``image_graphs``: one replay per image).
        depth: the depth version of a quantized model trained with depth versions (QuantSR's DQA,
            ``train --depths``): the first ``depth`` residual blocks run; ``None``: the model's own.
        tail_bits: run the body-end conv and the upsampler convs as packed integer convs too
            (:mod:`gdq_engine.runtime.inttail`: signed activations at this width, 8-bit weights,
            one scale per conv for every patch); ``None``: as the model has it (FP unless it was
            quantized with a tail). Scales come from ``calib`` (also with an already quantized
            model) or the shipped calibration table.
        group_streams: with a patch-wise dynamic policy on CUDA, run a batch's groups of different
            widths at the same time, each on a CUDA stream of its width
            (:class:`~gdq_engine.runtime.streams.GroupStreams`), so a small group's kernels need
            not leave most of the GPU idle; results unchanged. Off by default until a GPU run
            measures a gain (``latency.py``'s ``entropy {2,4,8}, group streams`` row: x1.03 on the
            2026-11-27 H100 run, within the rounds' spread). Inside a dynamic policy's image graph
            the groups run one after another. Elsewhere (CPU, static and layer-wise policies) it
            changes nothing.
        image_graphs: with ``cuda_graphs`` on CUDA, run each image's whole work (the input's
            check, the window gather, the network for every batch, the Triton stitch, the clamp
            and uint8 rounding, the finiteness flag) as one CUDA graph replay per image, captured
            per image size on its second use (:mod:`~gdq_engine.runtime.imagegraph`), instead of
            the host queueing it piece by piece around the network's replays; results unchanged.
            A patch-wise dynamic policy with a device stage (Granular-DQ, EntropyOnly) takes two
            replays and one host read between them: its stage over the whole image, then the
            image graph of the widths it chose (one per width pattern). Each graph keeps its own
            fp32 output image in device memory (at most 4 image graphs). ``None`` (default): on
            for quantized policies unless ``progress``. The 2026-11-27 H100 runs measured a 1080p
            frame at 0.80-0.87x the tiled path's time for static a8 + int8 tail and 0.88-0.90x
            for Granular-DQ {2,4,8} + int8 tail (``latency.py``'s ``image graph`` rows against
            their tiled ones, four processes). An image whose widths form a new pattern runs
            eagerly (the tiled path's cost) and is captured on the pattern's second use; a
            pattern that two images in a row got runs ahead of the next image's read of its
            widths (:meth:`_image_graph_replays`).
            Elsewhere (CPU, layer-wise policies, FP) it changes nothing.
    """

    def __init__(self, model="edsr-baseline-x4", policy: str | BitPolicy | None = None, device=None,
                 patch_size: int | None = 96, stride: int | None = None, margin: int = 0,
                 batch_size: int | None = None, dtype: torch.dtype | str = torch.float32, progress: bool = False,
                 bits=None, calib=None, w_bits: int = 8, backend: str = "auto", cuda_graphs: bool = True,
                 depth: int | None = None, tail_bits: int | None = None, containers: str = "auto",
                 residual_stream: str = "auto", group_streams: bool = False, image_graphs: bool | None = None):
        if isinstance(policy, str) and policy not in POLICIES_AVAILABLE:
            raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES_AVAILABLE}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
        patch_size, stride, margin, batch_size = (
            _integer_or_none(name, value) for name, value in (("patch_size", patch_size), ("stride", stride),
                                                              ("margin", margin), ("batch_size", batch_size)))
        if patch_size is not None:
            if patch_size < 1:
                raise ValueError(f"patch_size must be >= 1 (or None: whole-image mode), got {patch_size}")
            stride = default_stride(patch_size) if stride is None else stride
            if not 1 <= stride <= patch_size:
                raise ValueError(f"need 1 <= stride <= patch_size, got stride={stride}, patch_size={patch_size}")
        if margin is None or margin < 0 or (batch_size is not None and batch_size < 1):
            raise ValueError(f"need margin >= 0 and batch_size >= 1, got margin={margin}, batch_size={batch_size}")
        dtype = resolve_dtype(dtype)
        self.device = resolve_device(device)
        if dtype == torch.float16 and self.device.type == "cpu":
            raise ValueError("float16 is not supported on CPU; use float32 or bfloat16")
        from .quantized import (
            CONTAINER_CHOICES,
            DEFAULT_CALIB_PATCH,
            RESIDUAL_STREAMS,
            QuantizedSR,
            quantize,
            resolve_backend,
        )

        if containers not in CONTAINER_CHOICES:
            raise ValueError(f"unknown containers {containers!r}; choose from {CONTAINER_CHOICES}")
        if residual_stream not in RESIDUAL_STREAMS:
            raise ValueError(f"unknown residual_stream {residual_stream!r}; choose from {RESIDUAL_STREAMS}")

        caller_module = isinstance(model, torch.nn.Module)
        if not caller_module:
            model = _read_model_file(model)
        qmodel = model if isinstance(model, QuantizedSR) else None
        if qmodel is not None:
            tail_calib = tail_bits is not None and qmodel.tail_bits != tail_bits  # calib then fits the tail only
            if policy not in (None, "fp") or bits is not None or (calib is not None and not tail_calib):
                raise ValueError("the model is already quantized (its policy, bits and calibration are fixed); "
                                 "pass policy='fp' to run its FP weights, or quantize the FP model instead")
            if policy == "fp":  # run the quantized model's FP weights
                model, qmodel = copy.deepcopy(qmodel.fp), None
            else:
                qmodel = copy.deepcopy(qmodel).to(self.device)
        policy = "fp" if policy is None else policy
        self.patch_size, self.stride, self.margin = patch_size, stride, margin
        self.batch_size, self.progress = batch_size, progress
        self.dtype = dtype
        self.w_bits, self.backend, self.cuda_graphs = w_bits, backend, bool(cuda_graphs)
        self.policy: BitPolicy | None = None
        self.depth: int | None = None  # residual blocks run by a quantized model (None: FP, all of them)
        self._patch_costs: dict[tuple[int, int], PatchCost] = {}  # per window size, see _patch_cost
        self.stitcher = Stitcher()  # one Triton launch per batch on CUDA (runtime/stitch.py)
        self.cutter = WindowCutter()  # one gather per batch (runtime/windows.py)
        self.int_body = None
        self.network_graphs = None  # CUDA graphs of the network (or, dynamic policies, of all after the head)
        self.policy_graphs = None  # CUDA graphs of the FP head and a dynamic policy's device stage
        self.group_streams: GroupStreams | None = None  # a dynamic policy's groups side by side (CUDA)
        self.image_graphs: ImageGraphs | None = None  # each image's whole work as graph replays (CUDA)
        self.containers: str | None = None  # resolved: "packed", "bytes" or "padded" (None: FP)
        if qmodel is None and policy != "fp":  # calibrate (a copy of) the fp32 model at the inference patch size
            qmodel = quantize(model, policy, bits, calib, w_bits, backend,
                              calib_patch=patch_size or DEFAULT_CALIB_PATCH, device=self.device, tail_bits=tail_bits)
        elif qmodel is None and caller_module:
            model = copy.deepcopy(model)  # the engine changes device, dtype and layout: never the caller's module
        self.tail_bits: int | None = None  # activation bits of the integer tail (None: FP tail)
        if qmodel is not None:
            if depth is not None:
                qmodel.set_depth(depth)  # a copy (deepcopy above or quantize()): never the caller's model
            if tail_bits is not None and qmodel.tail_bits != tail_bits:
                if calib is None:
                    raise ValueError(f"this quantized model has no {tail_bits}-bit integer tail; pass calib=<folder or "
                                     "LR patches> to fit one")
                qmodel.quantize_tail(calib, tail_bits)
            self.policy, self.w_bits, self.depth = qmodel.policy, qmodel.w_bits, qmodel.depth
            self.tail_bits = qmodel.tail_bits
            body_backend = resolve_backend(backend, qmodel.act_scales.device)
            graphs = self.cuda_graphs and body_backend in ("triton", "cuda") and self.device.type == "cuda"
            if graphs and not getattr(self.policy, "layerwise", False):  # patch-wise: graphs of the network
                # lent outputs: _run_tiles stitches each batch's result before the next batch replays
                self.network_graphs = GraphCache(what="the network", lend=True)
                if has_device_stage(self.policy):
                    self.policy_graphs = GraphCache(what="the bit policy")
            # A dynamic policy's groups replay the body's own graphs (padded buckets: the integer
            # blocks are exact for any batch); a static policy's body runs inside the network's.
            static = isinstance(self.policy, Static)
            if group_streams and self.device.type == "cuda" and not static and not getattr(self.policy, "layerwise",
                                                                                            False):
                self.group_streams = GroupStreams(self.device)
            if image_graphs is None:
                image_graphs = not progress
            staged = static or self.policy_graphs is not None  # bits known before the network runs
            if image_graphs and staged and self.network_graphs is not None and self._triton_stitch_runs():
                self.image_graphs = ImageGraphs()
            self.int_body = qmodel.integer_body(body_backend, cuda_graphs=graphs and not static, containers=containers,
                                                residual_stream=residual_stream)
            self.containers = self.int_body.containers
            # The integer body (and tail) are prepared from fp32 weights; the FP layers may change dtype.
            # The engine's own copy (qmodel is): its upsampler output is consumed at once, and its
            # last conv may run on the backend's FP kernel (fp16 on CUDA: runtime/lastconv.py).
            model = with_kernel_last_conv(qmodel.runtime_model(body_backend), _backend_module(body_backend),
                                          in_place=True)
            for m in model.modules():
                if hasattr(m, "reuse_output"):
                    m.reuse_output = True
        elif tail_bits is not None:
            raise ValueError("tail_bits only apply to quantized policies")
        elif containers != "auto" or residual_stream != "auto":
            raise ValueError("containers and residual_stream only apply to quantized policies")
        elif bits is not None:
            raise ValueError("bits only apply to quantized policies (policy='static' or 'entropy')")
        elif depth is not None:
            raise ValueError("depth selects a depth version of a quantized model; this engine runs FP")
        fp_model = load_model(model).eval()
        # what the model takes stored, in bytes (runtime/cost.py: model_bytes; the quantized body packed)
        self.storage_bytes: dict[str, int] = qmodel.storage_bytes() if qmodel is not None else model_bytes(fp_model)
        # A non-finite half-precision FP result is recomputed with the fp32 weights (not the half
        # weights cast back), kept here; the FP models are small (EDSR-baseline: 6 MB in fp32).
        self._fp32_model = None
        if self.policy is None and dtype != torch.float32:
            self._fp32_model = copy.deepcopy(fp_model).float().to(self.device, memory_format=torch.channels_last)
        self.model: SRModel = fp_model.to(self.device, dtype)
        self.model.to(memory_format=torch.channels_last)  # oneDNN / cuDNN run NHWC convs faster

    @classmethod
    def from_pretrained(cls, name: str = "edsr-baseline-x4", download: bool = True, **kwargs) -> Engine:
        """Engine on a named model (see :func:`gdq_engine.from_pretrained`); kwargs go to ``Engine``."""
        from .models import from_pretrained

        return cls(from_pretrained(name, download=download), **kwargs)

    @property
    def scale(self) -> int:
        """Upscaling factor of the loaded model."""
        return self.model.scale

    def __repr__(self) -> str:
        tiling = "whole-image" if self.patch_size is None else f"patch {self.patch_size}/{self.stride}+{self.margin}"
        policy = "fp" if self.policy is None else f"{self.policy.name}{list(self.policy.bits)}, depth={self.depth}"
        return (f"Engine({self.model.arch} x{self.scale}, policy={policy}, device={self.device}, "
                f"dtype={self.dtype}, {tiling})")

    def upscale(self, x, return_report: bool = False):
        """Upscale images by ``self.scale``.

        Args:
            x: (N,3,H,W) or (3,H,W) float tensor in [0,1], uint8 (0..255) or uint16 (0..65535)
                tensor; HWC numpy array (uint8, uint16 or float in [0,1]); PIL image; or a file path.
        Returns:
            The HR image(s) in the input's form and dtype (float in [0,1] for float input, computed
            in fp32 and cast; uint8 / uint16 for those, rounded; PIL for PIL; paths give a
            (1,3,sH,sW) fp32 tensor), on the input's device; with ``return_report`` a tuple
            (hr, UpscaleReport).
        """
        start = time.perf_counter()
        input_dtype = input_dtype_of(x)
        batch, kind = as_batch(x)
        plan = None
        if self.image_graphs is not None:
            self._validate(batch, values=False)  # the shape, before a plan is made for it
            plan = self._image_plan(*batch.shape[-2:])
        bounds = self._validate(batch) if plan is None else None  # an image graph checks its image's values
        report = UpscaleReport(device=str(self.device), dtype=str(self.dtype).replace("torch.", ""))
        # uint8 results (uint8 tensors and arrays, PIL images) are rounded where they were computed
        # and cross to the input's device as bytes, a quarter of the fp32 image.
        out_dtype = torch.uint8 if returns_uint8(kind, input_dtype) else torch.float32
        out = torch.empty(batch.shape[0], 3, batch.shape[2] * self.scale, batch.shape[3] * self.scale,
                          dtype=out_dtype, device=batch.device)
        with counting_waits() as waits:
            for n in range(batch.shape[0]):
                target = out[n]  # one view: finish_image skips the copy when the canvas is this very tensor
                if plan is not None:
                    if self._upscale_image_graph(batch[n].float(), target, plan, report):
                        continue
                    # out of memory: the tiled path from here on, with the remaining images' values checked
                    plan, bounds = None, self._validate(batch[n:])
                canvas = self._canvas_for(target)
                self._upscale_one(batch[n].float(), canvas, report, bounds)
                bounds = None  # read with the first image's flag
                finish_image(canvas, target)
        report.seconds, report.wait_seconds = time.perf_counter() - start, waits[0]
        result = restore_kind(to_input_dtype(out, input_dtype), kind)
        return (result, report) if return_report else result

    __call__ = upscale

    def _validate(self, batch: torch.Tensor, values: bool = True) -> torch.Tensor | None:
        """Check the (N,C,H,W) input: its shape now; its values (finite, in [0, 1]) now too, or,
        where reading them would be a host sync the frame does not otherwise make
        (:meth:`_defers_value_check`), later: then the returned (2,) device tensor (min, max) is read
        with the first image's finiteness flag, in its one transfer at the end. ``values=False``:
        the shape only (image graphs check each image's values in their own read)."""
        n, c, h, w = batch.shape
        if c != 3:
            hint = " (RGBA: use gdq_engine.upscale_file, which keeps alpha)" if c == 4 else ""
            raise ValueError(f"expected 3 colour channels, got {c}{hint}")
        if n == 0 or h == 0 or w == 0:
            raise ValueError(f"empty image batch of shape {tuple(batch.shape)}")
        check_image_size(h, w)
        if not values:
            return None
        # One pass for the three checks (min and max are NaN or infinite exactly when some value is).
        bounds = torch.stack(torch.aminmax(batch.float()))
        if self._defers_value_check(batch):
            return bounds
        check_input_values(*bounds.tolist())
        return None

    def _canvas_for(self, target: torch.Tensor) -> torch.Tensor:
        """The (3,sH,sW) image the patches of one output image ``target`` are stitched into: on the
        compute device (an input on the host then gets its output over PCIe once, finished, not
        patch batch by patch batch with the overlaps) unless it would take more than an eighth of
        the GPU's free memory, then on ``target``'s device. There it is ``target`` itself when
        ``target`` is fp32, or uint8 where the torch copies stitch (the CPU, or a host image too
        large for the GPU): the windows are then rounded into it as they are stitched, so a large
        8-bit output never has an fp32 copy, 4 bytes a value, beside it. Else a fresh fp32 one."""
        device = self.device
        if device.type == "cuda" and target.device != device and not self._canvas_fits_device(target.numel()):
            device = target.device
        if target.device == device and (target.dtype == torch.float32 or (
                target.dtype == torch.uint8 and not self.stitcher.runs_on(device))):
            return target
        return torch.empty(target.shape, dtype=torch.float32, device=device)

    def _canvas_fits_device(self, numel: int) -> bool:
        """Whether an fp32 output image of ``numel`` values takes at most 1/``CANVAS_FREE_FRACTION``
        of the free memory of the (CUDA) compute device."""
        return numel * 4 * CANVAS_FREE_FRACTION <= torch.cuda.mem_get_info(self.device)[0]

    def _triton_stitch_runs(self) -> bool:
        from .ops.triton_ops import unavailable_reason

        return unavailable_reason(self.device) is None

    def _image_plan(self, height: int, width: int) -> ImagePlan | None:
        """The image graphs' plan of an LR image of ``height`` x ``width`` pixels (cached per size
        and tiling settings); None when its output image does not fit on the device
        (:meth:`_canvas_for` would put it in host memory), so it takes the tiled path."""
        def make() -> ImagePlan | None:
            grid = self.grid(height, width)
            if self.device.type == "cuda" and not self._canvas_fits_device(3 * height * width * self.scale ** 2):
                return None
            return make_image_plan(grid, self.batch_size_for(grid), self.scale, self.device, self.cutter,
                                   self.stitcher)

        return self.image_graphs.plan((height, width, self.batch_size, self.patch_size, self.stride, self.margin), make)

    def _upscale_image_graph(self, img: torch.Tensor, target: torch.Tensor, plan: ImagePlan,
                             report: UpscaleReport) -> bool:
        """Upscale one (3,H,W) fp32 image into ``target`` as image graph replays
        (:mod:`~gdq_engine.runtime.imagegraph`; a dynamic policy's stage graph, then the image
        graph of the widths it chose), then read its flag: the input's values and the output's
        finiteness are checked. False (nothing written, image graphs now off) when the device ran
        out of memory."""
        img = img.to(self.device, non_blocking=True)
        try:
            bits, groups, result, flag = self._image_graph_replays(img, plan, target.dtype == torch.uint8)
        except torch.cuda.OutOfMemoryError:
            self.image_graphs = None
            torch.cuda.empty_cache()
            report.fallbacks.append("out of memory: image graphs off")
            return False
        # the host's bookkeeping while the GPU works
        report.patches += len(plan.grid)
        report.batches += len(plan.batches)
        self._count(report, plan.grid.window, list(bits), groups)
        copy_into(target, result)
        ok, lo, hi = to_host(flag).tolist()
        check_input_values(lo, hi)
        if not ok:
            raise self._non_finite_error()
        return True

    def _image_graph_replays(self, img: torch.Tensor, plan: ImagePlan, uint8: bool):
        """The replays of :meth:`_upscale_image_graph` on the (3,H,W) fp32 image ``img`` on the
        device: (the width of every patch, in tile order; the body launches [(bits, patches)] of
        every batch; the image graph's (3,sH,sW) result and (3,) flag). A dynamic policy's widths
        come from its stage graph and one host read, then :meth:`_replay_widths` runs them.

        Where the last images of this plan got one pattern of widths twice in a row
        (:meth:`~gdq_engine.runtime.imagegraph.ImageGraphs.guess`: video frames, or the shipped
        Granular-DQ model, which puts every patch of the latency frames at 4 bits), the image
        graph of that pattern is queued right after the stage graph, before the read: the read
        then overlaps it instead of leaving the GPU idle for its round trip. If the widths read
        differ, that result is dropped and the right graph runs after it (one frame's work
        wasted, and no more guesses until a pattern repeats again)."""
        from .runtime.hostreads import PendingRead
        from .runtime.scheduler import policy_stage

        policy, graphs = self.policy, self.image_graphs
        if isinstance(policy, Static):
            return self._replay_widths(img, plan, (policy.bits[0],) * len(plan.grid), uint8)
        # Where the image graph runs eagerly (a key's first use), the network's and the policy's
        # own graphs replay, as on the tiled path; while it is captured they run inside it.
        stage = graphs.stage(img, plan, lambda w: policy_stage(self.model, policy, w, self.dtype, self.policy_graphs),
                             id(policy))
        guess = graphs.guess(plan, id(policy))
        ahead = None
        if guess is not None:
            read = PendingRead(stage)  # queued before the guessed image's work, waited on after it
            ahead = self._replay_widths(img, plan, guess, uint8)
            staged = read.wait()
        else:
            staged = to_host(stage)
        bits = tuple(int(b) for b in policy.assign_staged(None, staged).tolist())
        graphs.note(plan, id(policy), bits, guessed=guess)
        if ahead is not None and bits == guess:
            return ahead
        return self._replay_widths(img, plan, bits, uint8)

    def _replay_widths(self, img: torch.Tensor, plan: ImagePlan, bits: tuple[int, ...], uint8: bool):
        """The image graph of the patches' widths ``bits`` (one per tile, in tile order) on the
        (3,H,W) image ``img``: (bits, the body launches [(bits, patches)], result, flag) as
        :meth:`_image_graph_replays` returns them. An image at one width replays that width's
        static image graph, mixed widths the graph of their pattern, on the groups' index tables
        made here (once per pattern)."""
        from .runtime.scheduler import forward_assigned, static_network

        body = self.int_body
        if len(set(bits)) == 1:
            b = bits[0]

            def network(windows: torch.Tensor, k: int) -> torch.Tensor:
                return static_network(self.model, body, b, windows, self.dtype, self.network_graphs)

            result, flag = self.image_graphs.run(img, plan, network, b, uint8)
            return bits, [(b, len(batch.tiles)) for batch in plan.batches], result, flag
        tables = self.image_graphs.groups(plan, bits, self.device)

        def network(windows: torch.Tensor, k: int) -> torch.Tensor:
            assigned = torch.tensor([bits[t] for t in plan.batches[k].tiles])
            return forward_assigned(self.model, body, windows, assigned, self.dtype, self.network_graphs,
                                    groups=tables[k])[0]

        result, flag = self.image_graphs.run(img, plan, network, ("bits", bits), uint8, keep=tables)
        return bits, [(b, int(idx.numel())) for batch_groups in tables for b, idx in batch_groups], result, flag

    def _non_finite_error(self) -> FloatingPointError:
        """The error of a quantized policy's non-finite output."""
        hint = "use float32"
        if self.int_body is not None and self.int_body.stream_dtype(self.dtype) != torch.float32:
            hint += " (or residual_stream='float32', if the integer body's half-precision stream overflowed)"
        return FloatingPointError(f"the network produced NaN/Inf values in {self.dtype}; {hint}")

    def _defers_value_check(self, batch: torch.Tensor) -> bool:
        """Whether the input's value checks wait for the image's last host read: on CUDA, for every
        policy. A dynamic policy reads each batch's bit-widths to the host before that, but a
        check read at the start would be one more round trip with the GPU idle; its code takes
        NaNs without failing (GBC's argmax and entropy's comparisons still pick valid widths), and
        the image's result is refused once the check is read."""
        return batch.is_cuda

    def grid(self, height: int, width: int):
        """The :class:`~gdq_engine.runtime.tiler.TileGrid` this engine cuts an LR image of
        ``height`` x ``width`` pixels into (report bits are in its tile order)."""
        if self.patch_size is None:
            return whole_image_grid(height, width)
        return make_grid(height, width, self.patch_size, self.stride, self.margin)

    def batch_size_for(self, grid) -> int:
        """Patches per forward pass for an image cut into ``grid``: ``batch_size`` when given, else
        :func:`auto_batch_size` (CUDA) or 16 (CPU)."""
        if self.batch_size is not None:
            return self.batch_size
        if self.device.type != "cuda":
            return CPU_BATCH_SIZE
        free, _ = torch.cuda.mem_get_info(self.device)
        return batch_size_fitting(self._patch_cost(grid.window).peak, len(grid), free)

    def _patch_cost(self, window: tuple[int, int]) -> PatchCost:
        """MACs and largest activation of one LR window of ``window`` (height, width) pixels, looked
        up once per window size: :mod:`~gdq_engine.runtime.cost`'s own cache key walks the model's
        modules on every call, host time spent before each frame's first kernel on a GPU."""
        from .runtime.cost import conv_macs, integer_tail_macs, largest_activation

        if window not in self._patch_costs:
            q_macs, fp_macs = conv_macs(self.model, *window)
            if self.depth is not None:  # a depth version runs the first blocks (all alike)
                q_macs = q_macs * self.depth // len(self.model.body)
            self._patch_costs[window] = PatchCost(q_macs, fp_macs, integer_tail_macs(self.model, *window),
                                                  largest_activation(self.model, *window))
        return self._patch_costs[window]

    def _upscale_one(self, img: torch.Tensor, canvas: torch.Tensor, report: UpscaleReport,
                     bounds: torch.Tensor | None = None) -> None:
        """Upscale one (3,H,W) image into ``canvas``. On CUDA its last host read is at the end (with
        an FP or static policy its only one; dynamic policies also read each batch's bit-widths):
        the finiteness flag of the output (a non-finite half-precision FP result is
        recomputed in fp32), read together with the input's deferred ``bounds`` (min, max; see
        :meth:`_validate`), which are checked first."""
        grid = self.grid(*img.shape[-2:])
        finite = self._run_tiles(img, canvas, grid, report)
        if bounds is None:
            ok = bool(to_host(finite))
        else:
            ok, lo, hi = to_host(torch.cat([finite.view(1).to(bounds.dtype), bounds.to(finite.device)])).tolist()
            check_input_values(lo, hi)
        if ok:
            return
        if self.policy is not None:
            raise self._non_finite_error()
        if self.dtype == torch.float32:
            raise FloatingPointError("the network produced NaN/Inf values (check the checkpoint)")
        warnings.warn(f"{self.dtype} produced non-finite values; re-running this image in float32", stacklevel=3)
        report.fallbacks.append("non-finite half-precision output: image re-run in float32")
        half, self.model, self.dtype = (self.model, self.dtype), self._fp32_model, torch.float32
        try:
            if not bool(to_host(self._run_tiles(img, canvas, grid, report, count=False))):
                raise FloatingPointError("the network produced NaN/Inf values in float32 too (check the checkpoint)")
        finally:
            self.model, self.dtype = half

    def _run_tiles(self, img: torch.Tensor, canvas: torch.Tensor, grid, report: UpscaleReport,
                   count: bool = True) -> torch.Tensor:
        """Every patch of ``grid`` through the network in batches, stitched into ``canvas``;
        returns a 0-dim bool tensor on the compute device: whether every output value is finite."""
        bs = self.batch_size_for(grid)
        todo = list(range(len(grid)))
        finite = None  # the torch path's check of its batches (made by the first one that takes it)
        bad = None  # the Triton stitch's flag (made by the first batch it stitches)
        # no bar object at all without progress: a disabled tqdm still does work per frame
        bar = tqdm(total=len(todo), desc="upscale", unit="patch", leave=False) if self.progress else None
        while todo:
            idx = todo[:bs]
            try:
                sr = self._forward(self.cutter.cut(img, grid, idx), report if count else None)
            except torch.cuda.OutOfMemoryError:
                if bs == 1:
                    raise
                bs = max(1, bs // 2)
                torch.cuda.empty_cache()
                report.fallbacks.append(f"out of memory: batch size lowered to {bs}")
                continue
            if bad is None and self.stitcher.fused(canvas, sr):
                bad = torch.zeros(1, dtype=torch.int32, device=canvas.device)
            if not self.stitcher.stitch(canvas, sr, grid, idx, self.scale, bad):
                ok = all_finite(sr)  # the torch copies do not check what they copy
                finite = ok if finite is None else finite & ok
            if count:
                report.patches += len(idx)
                report.batches += 1
            todo = todo[len(idx):]
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        stitched_ok = None if bad is None else bad[0] == 0
        if finite is None:
            return stitched_ok
        return finite if stitched_ok is None else finite & stitched_ok

    def _forward(self, windows: torch.Tensor, report: UpscaleReport | None) -> torch.Tensor:
        """(P,3,h,w) LR windows -> (P,3,sh,sw) float32 SR windows on the compute device."""
        x = windows.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if self.policy is not None:
            return self._forward_quantized(x, report)
        with torch.inference_mode():
            return self.model(x.to(self.dtype)).float()

    def _forward_quantized(self, x: torch.Tensor, report: UpscaleReport | None) -> torch.Tensor:
        from .runtime.scheduler import forward_quantized

        with torch.inference_mode():
            y, bits, groups = forward_quantized(self.model, self.int_body, self.policy, x, self.dtype,
                                                graphs=self.network_graphs, policy_graphs=self.policy_graphs,
                                                group_streams=self.group_streams)
        if report is not None:
            self._count(report, (x.shape[-2], x.shape[-1]),
                        [int(b) if float(b).is_integer() else float(b) for b in bits.tolist()], groups)
        return y

    def _count(self, report: UpscaleReport, window: tuple[int, int], per_patch: list, groups: list) -> None:
        """Add patches of ``window`` (LR height, width) at the bit-widths ``per_patch``, run as body
        launches ``groups``, to ``report``'s bits, groups and BitOPs."""
        from .runtime.cost import bitops

        cost = self._patch_cost(window)
        report.bits.extend(per_patch)
        report.groups.extend(groups)
        report.bitops += int(sum(bitops(cost.q_macs, cost.fp_macs, b, self.w_bits, cost.tail_macs, self.tail_bits)
                                  for b in per_patch))


CPU_BATCH_SIZE = 16
CANVAS_FREE_FRACTION = 8  # an output image is stitched on the GPU when it takes at most 1/8 of its free memory
AUTO_BATCH_MAX = 256
PATCH_BYTES_PER_PEAK_ELEMENT = 16  # fp32, and about four tensors of the largest activation's size live at once


def finish_image(canvas: torch.Tensor, target: torch.Tensor) -> None:
    """Clamp the fp32 (3,sH,sW) ``canvas`` to [0, 1] in place and write it into ``target`` (the
    same tensor, or fp32 or uint8 on any device): uint8 as ``round(255 x)``, computed on the
    canvas' device before the copy (the values :func:`~gdq_engine.io.to_uint8` gives). A uint8
    canvas is finished already (:func:`~gdq_engine.runtime.tiler.stitch_windows` rounds into it)."""
    if canvas.dtype == torch.uint8:
        return
    result = finish_canvas(canvas, target.dtype == torch.uint8)
    if result is not target:
        copy_into(target, result)


def _integer_or_none(name: str, value):
    """An integer setting ``value`` (Python or numpy integer) as an ``int``, None as None;
    ``ValueError`` naming ``name`` for anything else (a float, a bool, a string)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def check_input_values(lo: float, hi: float) -> None:
    """Raise ``ValueError`` unless an input's smallest and largest values ``lo``, ``hi`` are finite
    and in [0, 1] (1e-3 of slack for rounding)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("input contains NaN or Inf values")
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"float input must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
                         "(divide 0..255 data by 255, or pass a uint8 tensor)")


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor on ``t``'s device: whether every value of float tensor ``t`` is finite.

    One reduction pass (``aminmax``: the min or max is NaN or infinite exactly when some value
    is), where ``isfinite(t).all()`` makes four, each with a fresh tensor of ``t``'s size; over
    the values in memory order (a channels_last tensor reduced as it lies is 3-4x slower on CPU)."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        t = t.permute(0, 2, 3, 1)
    return torch.isfinite(torch.stack(torch.aminmax(t.reshape(-1)))).all()


def auto_batch_size(model: SRModel, window: tuple[int, int], patches: int, free_bytes: int) -> int:
    """Patches per forward pass that fit half of ``free_bytes`` of device memory: each patch of
    ``window`` (LR height, width) is budgeted 16 bytes per element of the model's largest activation
    (:func:`~gdq_engine.runtime.cost.largest_activation`; 151 MB for EDSR x4 on 96x96). At least 1,
    at most ``patches`` and 256."""
    from .runtime.cost import largest_activation

    return batch_size_fitting(largest_activation(model, *window), patches, free_bytes)


def batch_size_fitting(peak_elements: int, patches: int, free_bytes: int) -> int:
    """:func:`auto_batch_size` for patches whose largest activation has ``peak_elements`` elements."""
    per_patch = PATCH_BYTES_PER_PEAK_ELEMENT * peak_elements
    return max(1, min(patches, AUTO_BATCH_MAX, int(free_bytes // 2 // per_patch)))


def _read_model_file(model):
    """A checkpoint path, read once: a :class:`~gdq_engine.quantized.QuantizedSR` for quantized
    checkpoints, an SR model otherwise. Names of shipped/official models and non-files pass through."""
    from .models import known_models
    from .models.checkpoints import model_from_checkpoint, read_checkpoint
    from .quantized import is_quantized_checkpoint, quantized_from_payload

    if isinstance(model, (str, os.PathLike)) and str(model) not in known_models() and os.path.isfile(model):
        payload = read_checkpoint(model)
        if is_quantized_checkpoint(payload):
            return quantized_from_payload(payload, source=str(model))
        return model_from_checkpoint(payload, source=str(model))[0]
    return model


def upscale_file(engine: Engine, src, dst, compare: str | None = None, bitmap: str | None = None) -> tuple[int, int]:
    """Upscale an image file to ``dst``; alpha is upscaled with bicubic and kept.

    ``compare``: optional path of a side-by-side PNG (bicubic | engine). ``bitmap``: optional path
    of the LR input with each patch tinted by its bits (:func:`gdq_engine.bitmap.bit_map`; needs a
    quantized policy). Returns the output size (height, width). Output paths are checked first
    (:func:`~gdq_engine.io.check_output_path`), outputs are written atomically, and nothing is
    written if upscaling fails. The file is upscaled as 8-bit values (a 16-bit grey file is
    rounded to them), as :func:`~gdq_engine.io.load_image_rgba` orients it. A grey file gives a
    grey file (the result's luma).
    """
    from .bitmap import bit_map
    from .io import check_output_path, is_grey_file, load_image_rgba, save_image
    from .metrics import imresize

    if bitmap is not None and engine.policy is None:
        raise ValueError("--bitmap shows per-patch bits: it needs a quantized policy (e.g. --policy entropy:2,4,8)")
    for path in (dst, compare, bitmap):
        if path is not None:
            check_output_path(path)
    rgb, alpha = load_image_rgba(src)
    # The file's own bytes (rgb is k / 255): the engine hands back 8-bit values rounded where it
    # computed them, the bytes save_image would write from its float result.
    hr, report = engine.upscale((rgb * 255).round().to(torch.uint8).unsqueeze(0), return_report=True)
    hr = hr[0]
    if bitmap is not None:
        save_image(bit_map(rgb, report.bits, engine.grid(*rgb.shape[-2:])), bitmap)
    alpha_hr = imresize(alpha, engine.scale).clamp(0, 1) if alpha is not None else None
    if compare is not None:
        bic = imresize(rgb, engine.scale).clamp(0, 1)
        save_image(torch.cat([bic, torch.ones(3, hr.shape[1], 8), hr.float() / 255], dim=2), compare)
    save_image(hr, dst, alpha=alpha_hr, grey=is_grey_file(src))
    return int(hr.shape[1]), int(hr.shape[2])

