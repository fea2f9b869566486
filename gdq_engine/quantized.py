"""Drop-in quantized models: ``gdq_engine.quantize(model, ...)`` and their checkpoints.

A :class:`QuantizedSR` has the FP model's forward signature ((N,3,H,W) in [0,1] ->
(N,3,sH,sW)); each input image is one patch for the policy (the :class:`~gdq_engine.Engine` adds
tiling on top). Its state is the FP model (the integer weight codes follow from it
deterministically, docs/numerics.md), the calibrated activation scales, and the policy's
parameters, all as tensors and extra state, so ``state_dict()`` / ``load_state_dict()``,
``.to()``, :func:`save_quantized` and :func:`load_quantized` round-trip exactly.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from .models.checkpoints import CheckpointError, atomic_torch_save, build_model
from .policy import BitPolicy, CADyQ, EntropyOnly, GranularDQ, Static
from .quant.quantizer import ActQuant
from .runtime.densebody import has_dense_body
from .runtime.intgraph import CONTAINERS, FLOAT_STREAM_DTYPES

QUANTIZED_FORMAT = "gdq_engine-quantized"
DEFAULT_CALIB_PATCH = 96  # the papers' inference patch side: entropy thresholds are fitted at it


def make_policy(policy: str | BitPolicy, bits=None) -> BitPolicy:
    """A policy object from a name (``"static"``, ``"entropy"``) and bit-width(s), or as given."""
    if isinstance(policy, BitPolicy):
        if bits is not None:
            raise ValueError("bits are part of the policy object; do not pass both")
        return policy
    if policy == "static":
        if bits is not None and not isinstance(bits, int):
            raise ValueError(f"policy='static' takes one integer bit-width, got {bits!r}")
        return Static(8 if bits is None else bits)
    if policy == "entropy":
        return EntropyOnly(tuple(bits) if bits is not None else (2, 4, 8))
    if policy == "granular":
        raise NotImplementedError("policy='granular' needs a GBC trained by quantization-aware training: shipped for "
                                  "the shipped models that have one (gdq_engine/weights/*.granular.pt); for others run "
                                  "`python -m gdq_engine train --method granular --model <model> --out q.pt` and use "
                                  "q.pt as the model")
    if policy == "cadyq":
        raise NotImplementedError("policy='cadyq' needs bit selectors trained by quantization-aware training: shipped "
                                  "for the shipped models that have one (gdq_engine/weights/*.cadyq.pt); for others "
                                  "run `python -m gdq_engine train --method cadyq --model <model> --out q.pt` and use "
                                  "q.pt as the model")
    raise ValueError(f"unknown quantized policy {policy!r}; choose 'static', 'entropy' or a BitPolicy")


def policy_from_state(state: dict) -> BitPolicy:
    """Inverse of ``BitPolicy.state()`` for the built-in policies."""
    name = state.get("name")
    if name == "static":
        return Static(state["bits"][0])
    if name == "entropy":
        return EntropyOnly(tuple(state["bits"]), tuple(state["quantiles"]),
                           tuple(state["thresholds"]) if state.get("thresholds") else None)
    if name == "granular":
        return GranularDQ.from_state(state)
    if name == "cadyq":
        return CADyQ.from_state(state)
    raise CheckpointError(f"unknown policy {name!r} in quantized checkpoint")


def calibration_patches(calib, scale: int, size: int = DEFAULT_CALIB_PATCH) -> torch.Tensor:
    """(N,3,h,w) LR patches in [0,1] from a folder of HR images (32 random ``size`` crops of their
    MATLAB-bicubic LR) or a tensor of patches (checked and returned as float32)."""
    if isinstance(calib, (str, os.PathLike)):
        from .train.data import random_lr_patches

        return random_lr_patches([calib], scale, size=size)
    if not torch.is_tensor(calib) or calib.dim() != 4 or calib.shape[1] != 3:
        raise ValueError("calib must be a folder of images or a (N,3,h,w) tensor of LR patches in [0,1]")
    return calib.float()


CALIBRATION_FORMAT = "gdq_engine-calibration"


def save_calibration_table(fp_model, lr_patches: torch.Tensor, path: str | os.PathLike, meta: dict | None = None,
                           quantiles: tuple[float, float] = (0.5, 0.9)) -> dict:
    """Write a calibration table for ``fp_model``: DOBI scales of every block quantizer at every code
    width 2..8, and the entropy quantiles of the patches (thresholds of EntropyOnly / Granular-DQ's
    E2B). It lets quantized policies run without calibration data. Returns the table."""
    from .policy.entropy import entropy_quantiles
    from .quant.quantizer import CODE_WIDTHS
    from .runtime.intgraph import calibrate

    fp_model = fp_model.eval().float()
    device = next(fp_model.parameters()).device
    patches = lr_patches.float().to(device)
    with torch.no_grad():
        quants = calibrate(fp_model, patches, CODE_WIDTHS)
    table = {"format": CALIBRATION_FORMAT, "version": 1, "arch": fp_model.arch, "config": dict(fp_model.config),
             "act_scales": {int(b): [[q.scale for q in qs] for qs in per_block]
                            for b, per_block in quants.items()},
             "tail_scales": _tail_scales_all_widths(fp_model, patches),
             "entropy": {"patch": list(patches.shape[-2:]), "quantiles": list(quantiles),
                         "thresholds": list(entropy_quantiles(patches, quantiles))},
             "meta": dict(meta or {})}
    atomic_torch_save(table, path)
    return table


def _tail_scales_all_widths(fp_model, patches: torch.Tensor) -> dict[int, list[float]]:
    """{code width: DOBI scale per integer-tail conv} (empty when the model has no such conv)."""
    from .quant.calibrate import dobi_scale
    from .quant.quantizer import CODE_WIDTHS
    from .runtime.inttail import collect_tail_inputs, tail_conv_names

    if not tail_conv_names(fp_model):
        return {}
    inputs = collect_tail_inputs(fp_model, lambda: fp_model(patches))
    return {int(b): [dobi_scale(x, b, True) for x in inputs] for b in CODE_WIDTHS}


def load_calibration_table(path: str | os.PathLike) -> dict:
    """Read a table written by :func:`save_calibration_table` (``weights_only``)."""
    from .models.checkpoints import read_checkpoint

    table = read_checkpoint(path)
    if table.get("format") != CALIBRATION_FORMAT:
        raise CheckpointError(f"{path}: not a gdq_engine calibration table")
    return table


def _shipped_beside(name, suffix: str) -> Path | None:
    """``weights/<stem of the shipped model's file><suffix>`` when ``name`` is a shipped model and
    the file exists, else None."""
    from .models.pretrained import SHIPPED, WEIGHTS_DIR

    if not isinstance(name, str) or name not in SHIPPED:
        return None
    path = WEIGHTS_DIR / (Path(SHIPPED[name]).stem + suffix)
    return path if path.is_file() else None


def shipped_calibration(name) -> Path | None:
    """The calibration table shipped beside a shipped model's weights (None if there is none)."""
    return _shipped_beside(name, ".calib.pt")


def shipped_quantized(name, policy) -> Path | None:
    """The quantized checkpoint shipped for a shipped model and a trained policy name
    (``weights/<model>.<policy>.pt``, e.g. ``edsr_baseline_x4.granular.pt``), or None."""
    return _shipped_beside(name, f".{policy}.pt") if isinstance(policy, str) else None


def _from_table(fp, policy: BitPolicy, table: dict) -> dict:
    """Activation quantizers for ``policy.bits`` from a calibration table; fits the policy's
    entropy thresholds from it when they use the table's quantiles."""
    if table["arch"] != fp.arch or dict(table["config"]) != dict(fp.config):
        raise ValueError(f"the calibration table is for {table['arch']} {table['config']}, not this model")
    quants = act_quants_from_scales(policy.bits, [table["act_scales"][int(b)] for b in policy.bits])
    if not policy.is_fitted:
        if tuple(getattr(policy, "quantiles", ())) != tuple(table["entropy"]["quantiles"]):
            raise ValueError("the calibration table's entropy quantiles differ from the policy's; pass calib data")
        policy.thresholds = tuple(table["entropy"]["thresholds"])
    return quants


def act_quants_from_scales(bits, scales) -> dict[int, list[tuple[ActQuant, ...]]]:
    """{bits: per block (signed input, unsigned mid, ...) quantizers} from ``bits`` and per-width
    lists of per-block ``[input scale, mid scale, ...]`` (the stored form in buffers, checkpoints,
    tables): two per residual block, 1 + C per dense block of C layers."""
    return {int(b): [tuple(ActQuant(int(b), k == 0, s) for k, s in enumerate(per_scales)) for per_scales in per_block]
            for b, per_block in zip(bits, scales)}


class QuantizedSR(nn.Module):
    """An SR model whose residual body (EDSR, MSRResNet: residual blocks; RDN: residual dense
    blocks) runs on the integer path at one bit-width per image.

    Build with :func:`quantize` or :func:`load_quantized`. ``backend``: integer-body backend
    (``"auto"``: Triton on CUDA, the C++ kernels on CPUs with AVX512-VNNI, else the reference;
    ``"reference"``; ``"cpp"``; ``"triton"``; ``"cuda"``: the CUDA C++ kernels).

    ``depths``: the depth versions the model was trained for (QuantSR's DQA: the first ``d``
    residual blocks, weights shared; default: only the full depth). :meth:`set_depth` picks the one
    that runs (default: the deepest); the FP layers around the body are the same for every depth.

    ``tail_quants``: quantizers of the integer tail (:mod:`gdq_engine.runtime.inttail`: body-end
    conv and upsampler convs as packed integer convs at ``tail_bits``); ``None``: the tail runs FP.
    Add one later with :meth:`quantize_tail`.
    """

    def __init__(self, fp_model: nn.Module, policy: BitPolicy, act_quants: dict[int, list[tuple[ActQuant, ActQuant]]],
                 w_bits: int = 8, backend: str = "auto", depths: tuple[int, ...] | None = None,
                 tail_quants: list[ActQuant] | None = None):
        super().__init__()
        self.fp = fp_model
        self.policy, self.w_bits, self.backend = policy, int(w_bits), backend
        self.depths = check_depths(depths, len(fp_model.body))
        if has_dense_body(fp_model) and self.depths != (len(fp_model.body),):
            raise ValueError(f"RDN's global fusion reads every dense block: it runs at full depth only, got depths "
                             f"{list(self.depths)}")
        self.depth = self.depths[-1]
        bits = sorted(act_quants)
        if tuple(bits) != tuple(sorted(policy.bits)):
            raise ValueError(f"quantizers calibrated for {bits} but the policy uses {sorted(policy.bits)}")
        # (bits, block, [input, mid...]) fp32 scales; signedness is fixed (input signed, the rest unsigned):
        # [input, mid] for a residual block, [input, layer 1 .. C] for a dense block.
        scales = [[[q.scale for q in qs] for qs in act_quants[b]] for b in bits]
        # On the FP model's device: integer_body() and runtime_model() resolve the backend from it.
        device = next(fp_model.parameters(), torch.empty(0)).device
        self.register_buffer("act_bits", torch.tensor(bits, dtype=torch.int64, device=device))
        self.register_buffer("act_scales", torch.tensor(scales, dtype=torch.float32, device=device))
        self._bodies: dict = {}
        self._runtime: dict = {}
        self.tail_bits: int | None = None
        self.register_buffer("tail_scales", None)
        if tail_quants:
            self._set_tail(tail_quants)

    @property
    def scale(self) -> int:
        return self.fp.scale

    def act_quants(self) -> dict[int, list[tuple[ActQuant, ...]]]:
        """The calibrated quantizers: bit-width -> per block (input, mid) for residual blocks, (input,
        layer 1, .., layer C) for dense blocks."""
        return act_quants_from_scales(self.act_bits.tolist(), self.act_scales.detach().cpu().tolist())

    def set_depth(self, depth: int) -> QuantizedSR:
        """Run the depth version ``depth`` (one of :attr:`depths`) from now on; returns ``self``."""
        if depth not in self.depths:
            raise ValueError(f"this model was trained for depths {list(self.depths)}, not {depth!r}; "
                             "train depth versions with `python -m gdq_engine train --depths ...`")
        self.depth = int(depth)
        self._drop_caches()
        return self

    def storage_bytes(self) -> dict[str, int]:
        """What this model holds to run at its current depth, in bytes
        (:func:`~gdq_engine.runtime.cost.model_bytes`).

        It counts:

        * the body's convs as ``w_bits`` codes, for the blocks the current depth runs;
        * the integer tail's convs as ``TAIL_W_BITS`` codes;
        * their fp32 scales and biases;
        * every other parameter in fp32;
        * the fp32 activation scales of every width;
        * the policy's float parameters (thresholds, a controller's weights).

        Blocks beyond the depth are left out. The engine keeps the codes one per byte, so
        ``packed_weights`` is what a packed file of them takes, not the memory the engine uses."""
        from .runtime.cost import model_bytes
        from .runtime.inttail import TAIL_W_BITS, tail_conv_names

        blocks = list(self.fp.body)[: self.depth]
        packed = {m: self.w_bits for block in blocks for m in block.modules() if isinstance(m, nn.Conv2d)}
        if self.tail_bits is not None:
            modules = dict(self.fp.named_modules())
            packed.update({modules[name]: TAIL_W_BITS for name in tail_conv_names(self.fp)})
        policy = _float_values(self.policy.state())
        extra = self.act_scales.numel() + (0 if self.tail_scales is None else self.tail_scales.numel()) + policy
        return model_bytes(self.fp, packed, extra_fp32=extra, leave_out=tuple(self.fp.body)[self.depth:])

    def set_res_scales(self, res_scales) -> None:
        """Set every residual block's ``res_scale`` (DQA's trained beta), one float per block."""
        if has_dense_body(self.fp):
            raise ValueError("RDN's dense blocks have no residual scale")
        if len(res_scales) != len(self.fp.body):
            raise ValueError(f"{len(res_scales)} residual scales for {len(self.fp.body)} blocks")
        for block, beta in zip(self.fp.body, res_scales):
            block.res_scale = float(beta)
        self._drop_caches()

    def integer_body(self, backend: str | None = None, cuda_graphs: bool = False, containers: str = "auto",
                     residual_stream: str = "auto"):
        """The :class:`~gdq_engine.runtime.intgraph.IntegerBody` (the first :attr:`depth` blocks; RDN:
        a :class:`~gdq_engine.runtime.densebody.DenseIntegerBody`) on the model's current device;
        ``containers``: see :func:`resolve_containers`; ``residual_stream``: see
        :func:`resolve_stream_dtypes`."""
        from .runtime.densebody import DenseIntegerBody, prepare_dense_blocks
        from .runtime.intgraph import IntegerBody, prepare_blocks

        device = self.act_scales.device
        key = (str(device), backend or self.backend, cuda_graphs, self.depth, containers, residual_stream)
        if key not in self._bodies:  # resolved once per key, not on every forward
            resolved = resolve_backend(backend or self.backend, device)
            stream_dtypes = resolve_stream_dtypes(residual_stream, resolved, device)
            if has_dense_body(self.fp):  # RDN: full depth, fp32 stream, packed or byte containers
                if residual_stream == "dtype":
                    raise ValueError("RDN's dense blocks keep their residual stream in float32; "
                                     "use residual_stream='auto' or 'float32'")
                body = DenseIntegerBody(prepare_dense_blocks(self.fp, self.w_bits), self.act_quants(),
                                        backend=resolved, cuda_graphs=cuda_graphs,
                                        containers=resolve_containers(containers, resolved, device))
            else:
                blocks = prepare_blocks(self.fp, self.w_bits)[: self.depth]
                quants = {b: pairs[: self.depth] for b, pairs in self.act_quants().items()}
                body = IntegerBody(blocks, quants, backend=resolved, cuda_graphs=cuda_graphs,
                                   containers=resolve_containers(containers, resolved, device),
                                   stream_dtypes=stream_dtypes)
            self._bodies = {key: body}
        return self._bodies[key]

    def runtime_model(self, backend: str | None = None) -> nn.Module:
        """The model whose head, body-end conv, upsampler and tail run around the integer body:
        :attr:`fp` itself, or with an integer tail a copy of it whose tail convs are
        :class:`~gdq_engine.runtime.inttail.IntegerConv` s on ``backend`` (cached like
        :meth:`integer_body`)."""
        if self.tail_scales is None:
            return self.fp
        from .runtime.intgraph import _backend_module
        from .runtime.inttail import with_integer_tail

        device = self.act_scales.device
        key = (str(device), backend or self.backend)
        if key not in self._runtime:
            ops = _backend_module(resolve_backend(backend or self.backend, device))
            self._runtime = {key: with_integer_tail(self.fp, self.tail_quants(), ops)}
        return self._runtime[key]

    def tail_quants(self) -> list[ActQuant] | None:
        """The integer tail's quantizers (signed, :attr:`tail_bits`), one per tail conv; None if FP."""
        if self.tail_scales is None:
            return None
        return [ActQuant(self.tail_bits, True, s) for s in self.tail_scales.detach().cpu().tolist()]

    def _set_tail(self, quants: list[ActQuant]) -> None:
        from .runtime.inttail import tail_conv_names

        names = tail_conv_names(self.fp)
        if len(quants) != len(names) or len({q.bits for q in quants}) != 1 or not all(q.signed for q in quants):
            raise ValueError(f"need one signed quantizer of one bit-width per tail conv {names}, got {quants}")
        self.tail_bits = int(quants[0].bits)
        self.tail_scales = torch.tensor([q.scale for q in quants], dtype=torch.float32, device=self.act_scales.device)
        self._drop_caches()

    @torch.no_grad()
    def quantize_tail(self, calib, bits: int = 8) -> QuantizedSR:
        """Run the body-end conv and upsampler convs on the integer path from now on, at ``bits``
        (per-tensor signed activations, DOBI scales fitted on the FP model's activations for
        ``calib``: a folder of images or (N,3,h,w) LR patches in [0,1]; 8-bit weights). Returns
        ``self``."""
        from .runtime.inttail import calibrate_tail

        patches = calibration_patches(calib, self.fp.scale).to(self.act_scales.device)
        fp = self.fp if next(self.fp.parameters()).dtype == torch.float32 else copy.deepcopy(self.fp).float()
        self._set_tail(calibrate_tail(fp, lambda: fp(patches), bits))
        return self

    def _drop_caches(self) -> None:
        self._bodies, self._runtime = {}, {}

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half(): prepared integer weights go stale
        self._drop_caches()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict:  # copies (Engine deep-copies its model) rebuild the caches, never copy them
        return {**super().__getstate__(), "_bodies": {}, "_runtime": {}}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._drop_caches()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def get_extra_state(self) -> dict:
        return {"policy": self.policy.state(), "w_bits": self.w_bits, "depths": list(self.depths),
                "depth": self.depth,
                "res_scales": None if has_dense_body(self.fp) else [float(getattr(b, "res_scale", 1.0))
                                                                    for b in self.fp.body],
                "tail_bits": self.tail_bits}

    def set_extra_state(self, state: dict) -> None:
        self.policy = policy_from_state(state["policy"])
        self.w_bits = int(state["w_bits"])
        self.depths = check_depths(state.get("depths"), len(self.fp.body))  # absent before depth versions
        self.set_depth(int(state.get("depth", self.depths[-1])))
        if state.get("res_scales") is not None:  # absent before trained residual weights
            self.set_res_scales(state["res_scales"])
        if state.get("tail_bits") != self.tail_bits:  # absent before the integer tail
            raise ValueError(f"the state's tail_bits {state.get('tail_bits')} do not match this model's "
                             f"{self.tail_bits}; load it with load_quantized")

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, return_bits: bool = False):
        """(N,3,H,W) float in [0,1] -> (N,3,sH,sW) float32; with ``return_bits`` also the (N,)
        bit-width each image ran at (mean over layers for layer-wise policies)."""
        from .runtime.scheduler import forward_quantized

        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (N,3,H,W) images, got {tuple(x.shape)}")
        if not x.is_floating_point():  # uint8 codes would run as 0..255 values, quietly wrong
            raise ValueError(f"expected float images in [0,1], got dtype {x.dtype} (divide 0..255 data by 255)")
        dtype = next(self.fp.parameters()).dtype
        y, bits, _ = forward_quantized(self.runtime_model(), self.integer_body(), self.policy, x.float(), dtype)
        if not getattr(self.policy, "layerwise", False):
            bits = bits.to(torch.int64)
        return (y, bits.to(y.device)) if return_bits else y


def check_depths(depths, n_blocks: int) -> tuple[int, ...]:
    """Depth versions as an ascending tuple of distinct block counts in 1..``n_blocks``
    (None or empty: ``(n_blocks,)``); ``ValueError`` otherwise."""
    if not depths:
        return (int(n_blocks),)
    out = tuple(sorted({int(d) for d in depths}))
    if out[0] < 1 or out[-1] > n_blocks or any(int(d) != d for d in depths):
        raise ValueError(f"depth versions must be block counts in 1..{n_blocks}, got {list(depths)}")
    return out


BACKENDS = ("auto", "reference", "cpp", "triton", "cuda")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA when Triton is usable, ``cpp`` on CPUs with AVX512-VNNI or
    AVX2 when the C++ kernels are built, else ``reference``; explicit picks are checked against
    the device."""
    from .ops import cpu_ops
    from .ops.triton_ops import unavailable_reason

    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend == "reference":
        return backend
    if backend == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpp' runs on CPU tensors, not {device}")
        if not cpu_ops.available():
            raise RuntimeError("backend='cpp' needs the compiled extension gdq_engine._C")
        return backend
    if backend == "cuda":
        from .ops import cuda_ops

        reason = cuda_ops.unavailable_reason(device)
        if reason:
            raise RuntimeError(f"backend='cuda' cannot run: {reason}")
        return backend
    reason = unavailable_reason(device)
    if backend == "triton":
        if reason:
            raise RuntimeError(f"backend='triton' cannot run: {reason}")
        return backend
    if device.type == "cuda" and reason is None:
        return "triton"
    # The portable C++ loop (neither VNNI nor AVX2) is slower than the reference's float
    # convolution: only the AMX / VNNI / AVX2 kernels are picked automatically (benchmarks/cpu_kernels.py).
    return "cpp" if device.type == "cpu" and (cpu_ops.has_vnni() or cpu_ops.has_avx2()) else "reference"


CONTAINER_CHOICES = ("auto", *CONTAINERS)


def resolve_containers(containers: str, backend: str, device: torch.device) -> str:
    """How the integer body stores codes narrower than 8 bits between its convs (the values are the
    same either way, :func:`~gdq_engine.runtime.intgraph.in_containers`): ``"packed"`` (2 or 4
    per byte), ``"bytes"`` (one per byte: the 8-bit kernels run them), ``"padded"`` (bytes in the
    padded layout, Triton only: :class:`~gdq_engine.runtime.intgraph.IntegerBody`) or ``"auto"``:
    ``"bytes"`` for the ``triton`` backend on CUDA, ``"packed"`` elsewhere.

    Why: Hopper has no int4 MMA, so Triton's 4/2-bit convs unpack to int8 and multiply at the int8
    rate; at these sizes they are not bound by bytes, and the unpacking made them slower than the
    8-bit kernel (H100/H200, 2026-11-26: conv1 40-41 us at a8, 59-61 us at a4, 68-70 us at a2,
    ``benchmarks/results/kernels-*-2026-11-26.json``). The C++ CPU and CUDA C++ kernels run 4/2-bit
    codes faster than 8-bit ones (``cpu-kernels-*.json``, ``cuda_us``) and keep them packed."""
    if containers not in CONTAINER_CHOICES:
        raise ValueError(f"unknown containers {containers!r}; choose from {CONTAINER_CHOICES}")
    if containers != "auto":
        return containers
    return "bytes" if backend == "triton" and torch.device(device).type == "cuda" else "packed"


RESIDUAL_STREAMS = ("auto", "float32", "dtype")


def resolve_stream_dtypes(residual_stream: str, backend: str, device: torch.device) -> tuple[torch.dtype, ...]:
    """The dtypes the integer body may keep its residual stream in (``IntegerBody(stream_dtypes=)``):
    the stream runs in the FP layers' dtype when it is one of them, else in fp32.

    ``"float32"``: always fp32 (docs/numerics.md's default stream). ``"dtype"``: the FP layers'
    dtype, fp16 or bf16 too (backends with ``STREAM_DTYPES``: reference, triton). ``"auto"``: fp16
    too on the ``triton`` backend on CUDA, fp32 otherwise.

    Why: the floor of the body's residual convs is set by their residual bytes (read and written
    once per block), not by their MACs; an fp16 stream halves them, and an fp16 engine rounds the
    body's output to fp16 anyway. fp16 keeps 11 significant bits, far finer than the 8-bit codes
    that quantize the stream; bf16 (8 bits) is not chosen automatically."""
    if residual_stream not in RESIDUAL_STREAMS:
        raise ValueError(f"unknown residual_stream {residual_stream!r}; choose from {RESIDUAL_STREAMS}")
    if residual_stream == "float32":
        return (torch.float32,)
    if residual_stream == "dtype":
        return FLOAT_STREAM_DTYPES
    if backend == "triton" and torch.device(device).type == "cuda":
        return (torch.float32, torch.float16)
    return (torch.float32,)


@torch.no_grad()
def quantize(model, policy: str | BitPolicy = "static", bits=None, calib=None, w_bits: int = 8,
             backend: str = "auto", calib_patch: int = DEFAULT_CALIB_PATCH, device=None,
             tail_bits: int | None = None) -> QuantizedSR:
    """Post-training quantization of an FP SR model into a drop-in :class:`QuantizedSR`.

    Args:
        model: an SR model (module, checkpoint path or shipped name); it is copied, never changed.
        policy: ``"static"`` (every image at ``bits``, default 8), ``"entropy"`` (EntropyOnly over
            ``bits``, default (2, 4, 8)), ``"granular"`` (the QAT-trained Granular-DQ model shipped for
            a shipped model: its weights, scales and GBC; ``calib`` must be None) or a
            :class:`~gdq_engine.policy.BitPolicy`.
        calib: folder of HR images (``calib_patch``-sized LR crops are drawn), (N,3,h,w) LR
            patches in [0,1], or a calibration table (``*.calib.pt``, :func:`save_calibration_table`):
            DOBI activation scales and the policy's thresholds come from it. ``None`` uses the
            table shipped with a shipped model (named by string).
        w_bits: weight bit-width (8, 4 or 2), per output channel.
        device: where to calibrate and put the result (default: the model's device).
        tail_bits: also run the body-end conv and the upsampler convs on the integer path, with
            activations at this width (8 recommended; :meth:`QuantizedSR.quantize_tail`); ``None``
            keeps them FP (Granular-DQ's placement). Their scales come from ``calib`` (a table
            needs tail scales, written by :func:`save_calibration_table` since 2026-11-25; a shipped
            QAT model takes them from its FP model's shipped table).
    Returns:
        A :class:`QuantizedSR` in eval mode.
    """
    from .models import load_model
    from .runtime.intgraph import calibrate

    shipped = shipped_quantized(model, policy) if calib is None else None
    if shipped is not None:  # a QAT-trained model ships for this (model, policy): weights, scales, controller
        q = load_quantized(shipped, backend=backend)
        own = tuple(getattr(q.policy, "gbc_bits", q.policy.bits))
        if bits is not None and tuple(bits if not isinstance(bits, int) else (bits,)) != own:
            raise ValueError(f"the shipped {policy} model for {model} uses bits {own}, not {bits}; "
                             f"train your own with `python -m gdq_engine train --method {policy} --bits ...`")
        if w_bits != q.w_bits:
            raise ValueError(f"the shipped {policy} model for {model} has {q.w_bits}-bit weights, not {w_bits}")
        if tail_bits is not None:  # the shipped table's tail scales (fitted on the FP model the QAT started from)
            table_path = shipped_calibration(model)
            if table_path is None:
                raise ValueError(f"no calibration table ships for {model}; call .quantize_tail(<images>, {tail_bits}) "
                                 "on the quantized model")
            q._set_tail(_tail_from_table(load_calibration_table(table_path), tail_bits, table_path))
        return q.to(device) if device is not None else q
    policy = make_policy(policy, bits)
    if w_bits not in (2, 4, 8):
        raise ValueError(f"w_bits must be 8, 4 or 2, got {w_bits!r}")
    fp = copy.deepcopy(model) if isinstance(model, nn.Module) else load_model(model)
    fp = fp.eval().float()
    if device is not None:
        fp = fp.to(device)
    if calib is None:
        calib = shipped_calibration(model)
    if calib is None:
        raise ValueError(f"policy {policy.name!r} needs calibration data: calib=<folder of images>, "
                         "<(N,3,h,w) LR patches in [0,1]> or <a .calib.pt table>")
    tail = None
    if isinstance(calib, (str, os.PathLike)) and str(calib).endswith(".calib.pt"):
        table = load_calibration_table(calib)
        act_quants = _from_table(fp, policy, table)
        if tail_bits is not None:
            tail = _tail_from_table(table, tail_bits, calib)
    else:
        device = next(fp.parameters()).device
        patches = calibration_patches(calib, fp.scale, calib_patch).to(device)
        act_quants = calibrate(fp, patches, policy.bits)
        if not policy.is_fitted:
            policy.fit(patches)
        if tail_bits is not None:
            from .runtime.inttail import calibrate_tail

            tail = calibrate_tail(fp, lambda: fp(patches), tail_bits)
    return QuantizedSR(fp, policy, act_quants, w_bits=w_bits, backend=backend, tail_quants=tail).eval()


def _tail_from_table(table: dict, bits: int, source) -> list[ActQuant]:
    scales = table.get("tail_scales", {}).get(int(bits))
    if scales is None:
        raise ValueError(f"the calibration table {source} has no integer-tail scales at {bits} bits; regenerate it "
                         "with `python -m gdq_engine calibrate --table` or pass calibration images")
    return [ActQuant(int(bits), True, s) for s in scales]


def save_quantized(qmodel: QuantizedSR, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write a quantized checkpoint (FP weights, activation scales, policy, w_bits), atomically."""
    state = {k: v.detach().cpu() for k, v in qmodel.state_dict().items() if torch.is_tensor(v)}
    atomic_torch_save({"format": QUANTIZED_FORMAT, "version": 1, "arch": qmodel.fp.arch,
                       "config": dict(qmodel.fp.config), "state_dict": state, "quant": qmodel.get_extra_state(),
                       "meta": dict(meta or {})}, path)


def _float_values(state) -> int:
    """How many float values a policy's plain-data state holds: tensor elements and float numbers
    (bit-widths and other integers are configuration)."""
    if torch.is_tensor(state):
        return state.numel() if state.is_floating_point() else 0
    if isinstance(state, dict):
        return sum(_float_values(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_float_values(v) for v in state)
    return int(isinstance(state, float))


def is_quantized_checkpoint(payload) -> bool:
    return isinstance(payload, dict) and payload.get("format") == QUANTIZED_FORMAT


def quantized_from_payload(payload: dict, source: str = "checkpoint", backend: str = "auto") -> QuantizedSR:
    """Rebuild a :class:`QuantizedSR` from a loaded quantized-checkpoint dict."""
    try:
        fp = build_model(payload["arch"], payload["config"])
        state = payload["state_dict"]
        quant = payload["quant"]
        act_quants = act_quants_from_scales(state["act_bits"].tolist(), state["act_scales"].tolist())
        tail = None
        if quant.get("tail_bits") is not None:
            tail = [ActQuant(int(quant["tail_bits"]), True, s) for s in state["tail_scales"].tolist()]
        q = QuantizedSR(fp, policy_from_state(quant["policy"]), act_quants, w_bits=quant["w_bits"], backend=backend,
                        depths=quant.get("depths"), tail_quants=tail)
        q.load_state_dict(state, strict=False)
        missing = set(q.state_dict()) - set(state) - {"_extra_state"}
        if missing:
            raise CheckpointError(f"{source}: quantized checkpoint lacks {sorted(missing)[:5]}")
        q.set_extra_state(quant)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{source}: malformed quantized checkpoint ({type(exc).__name__}: {exc})") from exc
    return q.eval()


def load_quantized(path: str | os.PathLike, backend: str = "auto") -> QuantizedSR:
    """Load a checkpoint written by :func:`save_quantized` (``torch.load(weights_only=True)``), on CPU;
    move it with ``.to(device)``."""
    from .models.checkpoints import read_checkpoint

    payload = read_checkpoint(path)
    if not is_quantized_checkpoint(payload):
        raise CheckpointError(f"{path}: not a gdq_engine quantized checkpoint (write one with save_quantized)")
    return quantized_from_payload(payload, source=str(path), backend=backend)
