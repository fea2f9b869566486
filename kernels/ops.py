"""Python launchers of the Triton kernels: the ``triton`` backend of the packed-conv ops.

Same arguments and results as :mod:`gdq_engine.ops.reference` (the oracle), except that conv
weights are prepared once per (layer, activation container) by :func:`prepare_conv_weight`.
Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow; for tests).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import triton
from torch.library import wrap_triton
from triton.tools.tensor_descriptor import TensorDescriptor

from gdq_engine.ops.reference import check_weight_codes
from gdq_engine.ops.triton_ops import interpreting
from gdq_engine.quant.quantizer import ActQuant, container_bits, requant_args

from .conv3x3 import _packed_conv3x3_kernel, _padded_conv3x3_tma_kernel, _quantize_pack_kernel, _unpack_kernel
from .dense_conv import _dense_conv_kernel
from .fp_conv import KY, _fp_conv3x3_kernel
from .policy_stage import MOMENTS, _entropy_kernel, _patch_histogram_kernel, _pooled_moments_kernel
from .stitch import BOX_FIELDS, _stitch_kernel

INTERPRET = interpreting()  # Triton decides at import time too: kernels run in its CPU interpreter
_COMPILE = dict(enable_fp_fusion=False)  # the contract forbids fused multiply-add (docs/numerics.md)
# GDQ_TRITON_AUTOTUNE=0: one fixed config (tests on a GPU compile far fewer variants).
AUTOTUNE = os.environ.get("GDQ_TRITON_AUTOTUNE", "1") != "0"
# The body's 64 -> 64 convs on Hopper (sm_90) run the Gluon kernel (body_conv_sm90.py): on the
# eighth H100 run (2026-11-27) x1.02 (conv1) and x1.09 (conv2 with the next codes, fp32 and fp16
# streams) against the flat kernel in the same process, bit-exact (docs/kernels.md). GDQ_SM90_BODY=0:
# the flat kernel everywhere. Its knobs, as measured best there:
SM90_BODY = os.environ.get("GDQ_SM90_BODY", "1") != "0"
SM90_STAGES = 6  # the ring of tap copies (8 KB each): 6 or 8 measured alike, 3-4 slower
SM90_PER_SM = 2  # persistent programs per SM (1: 14-28% slower; 3 do not fit the registers of conv2)
SM90_EPI_ROWS = True  # the epilogue in a row layout: conv2 on the fp16 stream 38 us against 64 in the MMA's
# Its warp-specialized twin (a producer warp issues the copies, the MMA warpgroup waits only on
# them): on the ninth H100 run (2026-11-27) x1.14 (conv1), x1.03 (conv2 with the next codes) and
# x1.15 (the same on the fp16 stream) against the twin above, bit-exact. Its 8 warps (the MMA
# warpgroup and the producer's) at 128 registers each fit 2 programs per SM. GDQ_SM90_WS=0: the
# twin above.
SM90_WS = os.environ.get("GDQ_SM90_WS", "1") != "0"
SM90_WS_MAXNREG = 128
SM90_WS_LOADER_REGS = 40
# The twin stores 8-bit codes without a residual (conv1) by TMA from the MMA layout (no layout
# conversion, no masked stores): 24.7 us against 26.2 in the ninth run's second call, bit-exact.
# It may release its ring stages 3 at a time (one MMA-warpgroup barrier per release: 3 a tile
# instead of 9; SM90_STAGES a multiple of it, two groups at least): measured slower there (conv2
# with the next codes 53.7 us against 51.1, 34.9 against 33.8 on the fp16 stream; conv1 alike).
SM90_WS_GROUP = 1
SM90_TMA_OUT = True
# Taps' MMAs the twin leaves in flight after each issue: 1 as measured. 2 (each stage released two
# taps later; release groups of 1, 4 stages at least): on the tenth H100 run (2026-11-27) no faster
# with tap boxes (conv1 24.7 us alike) and slower with halo boxes (conv2 + next codes 52.2 against
# 49.3, on the fp16 stream 33.3 against 32.7).
SM90_IN_FLIGHT = 1
# The twin's conv2 on an fp16 stream with the residual and results through shared memory by TMA
# (the producer loads the residual box; the epilogue reads it in the MMA layout, writes the new
# stream over it and the next codes beside it, and stores both boxes by TMA). Tenth H100 run
# (2026-11-27): bit-exact, 28.2 us against 30.9 with halo boxes and the adds (kernels.py --sm90),
# but one of two e2e processes computed other bits (PSNR 50.3878 dB against 50.3850 in 11
# others). Eleventh run (same day, docs/kernels.md): test_gluon_body_conv_persistent_programs_give_the_same_bits
# (several tiles a program, each refilling the residual box) passed, the 814 GPU tests of the Gluon
# conv, the integer tail, the image graphs and the Triton kernels passed with it on, and 1080p
# static a8 + int8 tail, image graph gave the same output digest in all 14 processes (8 with it, 6
# without), repeat_equal in each; conv2 + next codes on the fp16 stream 28.3 us against 31.0 (75%
# of its floor against 68.5%), twice. Its box hand-back reads sound in the PTX. On by default;
# GDQ_SM90_TMA_RES=0 turns it off.
SM90_TMA_RES = os.environ.get("GDQ_SM90_TMA_RES", "1") != "0"
# The twin reading each tile's input as 3 halo boxes (one per column offset: the tile's 8 rows and
# one above and below, 10 KB) instead of 9 tap boxes (8 KB each): 30 KB a tile through L2, TMA and
# shared memory instead of 72, each box's 3 taps being views 0, 1 and 2 rows into it. conv1 moved
# 56% of the L2's peak on the ninth run; each box is also one barrier wait and one release instead
# of three. SM90_HALO_STAGES boxes in the ring (12 taps' inputs, against SM90_STAGES' 6). The views
# need Triton 3.6's Gluon (body_conv_sm90.HALO_VIEWS). Tenth H100 run (2026-11-27, kernels.py
# --sm90, same process, call 1): bit-exact; conv1 20.7 us against 24.7 on tap boxes, conv2 with the
# next codes 49.3 against 51.1, the same on the fp16 stream 32.7 against 33.7; 1080p static a8 +
# int8 tail, image graph 1.656 ms against 1.759 / 1.767 (two processes each). With the adds and the
# upsampler below, the defaults (call 3): conv1 18.3 us (72% of its floor), conv2 + next codes 50.8
# / 30.9 us (fp32 / fp16 stream), that frame 1.576 / 1.735 ms against 1.903 (docs/kernels.md). On
# by default where the Triton can build it (elsewhere the twin keeps its tap boxes; asked for by
# launch_options, it raises) and stages are released one at a time. GDQ_SM90_HALO=0: tap boxes.
SM90_HALO = os.environ.get("GDQ_SM90_HALO", "1") != "0"
SM90_HALO_STAGES = 4
# The Gluon conv's epilogue without Hopper's conversion pipe (16 lanes a cycle per SM, an eighth of
# the fp32 pipe's; three of its instructions per value, about 1,500 of an SM's cycles a tile):
# codes by a clamp and a round-down add, sums to fp32 by an integer add and a subtraction where
# the weights bound every sum below 2**22 (fp32_sums_by_add). The same bits by construction
# (body_conv_sm90._requantize, _to_float). Tenth H100 run: bit-exact; with halo boxes conv1 18.6 us
# against 20.7, conv2 with the next codes on the fp16 stream 31.0 against 32.7 (on the fp32 stream
# 50.7 against 49.3: slower, but the engine's stream is fp16), the x4 upsampler's first stage on
# the twin 73.8 against 80.5 (its fp16 last stage 73.2 against 72.2). On by default;
# GDQ_SM90_CVT_ADD=0 turns it off.
SM90_CVT_ADD = os.environ.get("GDQ_SM90_CVT_ADD", "1") != "0"
# The twin also computes the upsampler's 64 -> 64 r^2 convs (x2/x4: 64 -> 256, x3: 64 -> 576), as
# r^2 groups of 64 output channels (the grid's second axis; each program keeps its group's 36 KB of
# weights resident) stored pixel-shuffled by masked stores (group g is sub-pixel divmod(g, r) of
# every output pixel), and other convs of 64 input channels and a multiple of 64 output channels.
# The flat kernel's shuffled fp16 upsampler ran at 51-59% of its floor (kernels.py, the H100's
# third to fifth runs), the twin's body convs at 51-69% (ninth run). Tenth H100 run (kernels.py
# --sm90, same process): bit-exact; the x4 upsampler's shuffled codes 80.5 us against the flat
# kernel's 96.4, its shuffled fp16 72.2 against 96.7 (71% of the floor). On by default;
# GDQ_SM90_UP=0: the flat kernel.
SM90_UP = os.environ.get("GDQ_SM90_UP", "1") != "0"
# The twin's 8-bit codes by one saturating floor conversion each (cvt.rmi.sat.u8.f32 / .s8.f32,
# SASS F2I.U8.FLOOR / F2I.S8.FLOOR; signed codes after a max that takes NaN to the range's start as
# the clamp does) instead of a floor, a clamp and a conversion (or SM90_CVT_ADD's clamp and
# round-down add), with conv1's ReLU folded into its codes from 0: the same codes
# (body_conv_sm90._requantize, conv3x3.relu_kept). Compiled for sm_90 (Triton 3.9), conv1's SASS falls
# from 2,072 to 1,816 instructions (1,880 with SM90_CVT_ADD's floats by adds), conv2 + next codes
# on the fp16 stream from 2,624 to 2,504; one conversion-pipe instruction per code instead of
# three. Tenth H100 run: bit-exact but no faster than the conversions by adds (conv1 22.7 us against
# 22.5, conv2 + next codes on the fp16 stream 32.9 against 32.3, the upsampler's codes 74.2 against
# 73.8): the conversion pipe no longer bounds those epilogues. Eleventh run, with halo boxes and the
# adds, three processes (kernels.py --sm90, runs 10-11): faster in each on the convs that write no
# fp16 stream (conv1 18.0-18.1 us against 18.3-18.6, 71-73% of its floor against 69-72%; conv2 +
# next codes on the fp32 stream 47.5-47.7 against 50.8-50.9; the x4 upsampler's codes 65.0-66.6
# against 65.2-67.2, faster in two), slower on the fp16 stream (conv2 + next codes 29.0 against
# 28.2-28.3 with the stream by TMA). So "auto" (the default): on for every conv but those writing
# an fp16 stream (sm90_cvt_sat_applies). GDQ_SM90_CVT_SAT=1: on for all; 0: off.
SM90_CVT_SAT: bool | str = {"1": True, "0": False}.get(os.environ.get("GDQ_SM90_CVT_SAT", "auto"), "auto")
# The twin's signed codes into its MMAs through registers, as unsigned codes always go (loaded during
# the previous tap's MMA), instead of from shared memory as they landed (body_conv_sm90._tap_mma):
# the same bits. Twelfth run (H200, kernels.py --sm90, one process): conv2 + next codes on the fp16
# stream 25.5 us with signed codes (a4 one per byte: static a4 / a2 and Granular-DQ's narrow
# groups) against 24.2 with unsigned ones (a8); conv1 (signed in at every width) 17.8 us, 71.6% of
# its floor. Not measured yet: off until a GPU run times it (kernels.py --sm90's "regs" rows).
# GDQ_SM90_A_REGS=1 turns it on.
SM90_A_REGS = os.environ.get("GDQ_SM90_A_REGS", "0") == "1"
# The twin's fp16 stream by TMA (SM90_TMA_RES) with 2 residual boxes, used in turn, instead of 1, and
# the producer's copy of a tile's residual after all its input boxes instead of after its first
# (body_conv_sm90._load_residual). With one box the producer waits, after a tile's first input box,
# until that tile's first MMA has handed the box back, so its other boxes wait too; with two it
# copies a tile's residual while the previous tile's box is still in use, and the MMA warpgroup
# hands a box back at the next tile's epilogue, no longer waiting for the stores' reads between a
# tile's first two MMAs (body_conv_sm90._hand_back_residual). The second box takes the
# ring's room of one halo box or two tap boxes (SM90_RES2_FEWER, sm90_ring_stages): compiled with
# Triton 3.6 (python -m gdq_engine.kernels.body_conv_sm90 --res-bufs), 4 halo boxes and 2 residual
# boxes need 119,036 bytes of shared memory a program, 2 of which exceed an SM's 232,448; with 3
# boxes 108,796. Twelfth run (H200): conv2 + next codes on the fp16 stream at 62.2% of its floor,
# the one body conv below 70%. Not measured yet: kernels.py --sm90's "res2" / "late" rows.
# GDQ_SM90_RES_BUFS=2 / GDQ_SM90_RES_LATE=1.
SM90_RES_BUFS = {"1": 1, "2": 2}.get(os.environ.get("GDQ_SM90_RES_BUFS", "1"), 0)  # other values: 0, refused
SM90_RES_LATE = os.environ.get("GDQ_SM90_RES_LATE", "0") == "1"
SM90_RES2_FEWER = {True: 1, False: 2}  # ring stages a second residual box takes: halo boxes, tap boxes
# The twin as pairs of a producer warp and an MMA warpgroup, 2 in one program sharing one copy of
# the weights (body_conv_sm90's PAIRS), each pair with its own ring and boxes and every other tile of
# the program's, instead of 2 programs per SM each with its own weights: SM90_PER_SM // 2 programs
# per SM, the same tiles in flight, 36,864 bytes of shared memory an SM saved (room for a second
# residual box without shortening the ring: sm90_ring_stages). Registers: Triton splits a program's
# by setmaxnreg (the PTX of python -m gdq_engine.kernels.body_conv_sm90 --pairs, Triton 3.6 and
# 3.9 alike). One pair's program (8 warps at SM90_WS_MAXNREG, 128) gives its MMA warpgroup 216
# registers a thread and its producer's warpgroup 40 (216 + 40 = 2 x 128). Two pairs' (12 warps at
# SM90_PAIRS_MAXNREG, 168: 64,512 of an SM's 65,536) give each MMA warpgroup 232 (the second, a
# worker partition, asks for SM90_PAIRS_MMA_REGS) and the producers' warpgroup 40 (232 + 232 + 40 =
# 3 x 168). Asking 128 or 168 for the second, it spilled up to 120 bytes (Triton 3.6); at 232 none.
# Not measured yet: kernels.py --sm90's "pairs2" rows. GDQ_SM90_PAIRS=2 turns it on.
SM90_PAIRS = {"1": 1, "2": 2}.get(os.environ.get("GDQ_SM90_PAIRS", "1"), 0)  # other values: 0, refused
SM90_PAIRS_MAXNREG = 168
SM90_PAIRS_MMA_REGS = 232
# The same for the flat and padded Triton convs (conv3x3._requantize, _to_float), on a GPU only
# (inline PTX: Triton's interpreter cannot run it): the upsampler's epilogue spends more cycles of
# the conversion pipe than of MMA per tile. Tenth H100 run: bit-exact; the shuffled upsampler's
# codes 88.8 us against 96.4, its fp16 97.8 against 96.7. Off: on sm_90 the twin runs those convs
# (SM90_UP), and no other GPU has timed it. GDQ_CVT_ADD=1 turns it on.
CVT_ADD = os.environ.get("GDQ_CVT_ADD", "0") == "1"
# The flat and padded convs' 8-bit codes by one saturating conversion each, as the twin's
# SM90_CVT_SAT (conv3x3._requantize's SAT), on a GPU only (inline PTX). Tenth H100 run: bit-exact,
# the upsampler's codes 90.2 us against 88.8 with the adds alone. Off; GDQ_CVT_SAT=1 turns it on.
CVT_SAT = os.environ.get("GDQ_CVT_SAT", "0") == "1"


def flat_config(block_m: int, block_k: int, warps: int, stages: int, res_early: bool = False) -> triton.Config:
    """A tile config of the flat conv (``_packed_conv3x3_kernel``). It names every tile constexpr,
    RES_EARLY included: torch.compile's tracing of a launch (wrap_triton) counts the kernel's
    arguments without their defaults, so a launch must pass them all."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_K": block_k, "RES_EARLY": res_early}, num_warps=warps,
                         num_stages=stages)


TUNE_CONFIGS = [flat_config(bm, bk, w, s) for bm, bk, w, s in [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3),
                                                                 (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
                                                                 (256, 64, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4)]]
# Residual convs (conv2) also try the configs the autotuner picked for them on the H100 and H200 with
# the residual tile loaded before the K loop (RES_EARLY): Nsight Compute found them latency-bound at
# 2 CTAs per SM, and the early load overlaps the tile's fp32 residual read with the MMAs at no cost
# in registers (182 against 188 for 128 x 64, 4 stages, sm_90: kernels.aot). Pruned for the others.
TUNE_CONFIGS += [flat_config(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages, res_early=True)
                 for c in TUNE_CONFIGS if (c.kwargs["BLOCK_M"], c.num_warps) == (128, 4)]


def tune_configs(has_res: bool) -> list[triton.Config]:
    """The flat conv's autotuning candidates: the RES_EARLY ones only for residual convs."""
    return [c for c in TUNE_CONFIGS if has_res or not c.kwargs.get("RES_EARLY")]


def _prune_flat(configs: list, named_args: dict, **kwargs) -> list:
    """The autotuner's early prune: :func:`tune_configs` of the launch's HAS_RES."""
    keep = {id(c) for c in tune_configs(bool(kwargs["HAS_RES"]))}
    return [c for c in configs if id(c) in keep]
ROWS_PER_PROGRAM = 64  # the quantize/unpack kernels' rows per program on a GPU


def fixed_config(block_n: int) -> triton.Config:
    """The conv's one config under ``GDQ_TRITON_AUTOTUNE=0``: 64 x 64 tiles, and 8 warps for output
    tiles of 128 or 256 channels (the upsampler convs). With 4 warps those hold 128-256 int32
    accumulators per thread and spill on sm_80, or reach 254 of 255 registers on sm_90 (Triton 3.9)
    (``python -m gdq_engine.kernels.aot``, docs/kernels.md)."""
    return flat_config(64, 64, 8 if block_n >= 128 else 4, 3)


def tma_boxes(meta: dict) -> dict[str, list[int]]:
    """The padded conv's TMA box shapes for its tile sizes (``meta``: BLOCK_M, BLOCK_N, BLOCK_K)."""
    return {"x_desc": [meta["BLOCK_M"], meta["BLOCK_K"]], "w_desc": [1, meta["BLOCK_N"], meta["BLOCK_K"]]}


def _set_tma_boxes(nargs: dict) -> None:
    """Autotuning pre-hook of the padded conv: its TMA boxes follow the config's tile sizes."""
    for name, box in tma_boxes(nargs).items():
        nargs[name].block_shape = box


def _padded_k_step(cin: int) -> int:
    """The padded conv's BLOCK_K for ``cin`` input bytes per pixel: K steps inside one tap (BLOCK_K
    divides C), 64 bytes wide where C allows (fewer, longer steps), else 32."""
    return 64 if cin % 64 == 0 else 32


def fixed_padded_config(cin: int) -> triton.Config:
    """The padded conv's config under ``GDQ_TRITON_AUTOTUNE=0``: 128-row tiles, K steps of
    :func:`_padded_k_step`, 4 warps, 4 stages, one tile per program."""
    return triton.Config({"BLOCK_M": 128, "BLOCK_K": _padded_k_step(cin), "PERSISTENT": 0}, num_warps=4,
                         num_stages=4)


# The padded TMA conv's candidates (BLOCK_M, BLOCK_K, PERSISTENT: programs per SM, 0 = one tile per
# program; warps, stages). Few: configs with a pre-hook are not cached on disk, so every GPU process
# tunes them again.
PADDED_TUNE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "PERSISTENT": p}, num_warps=w, num_stages=s,
                  pre_hook=_set_tma_boxes)
    for bm, bk, p, w, s in [(128, 64, 0, 4, 4), (64, 64, 0, 4, 4), (128, 64, 0, 8, 4), (256, 64, 0, 8, 3),
                            (128, 64, 2, 4, 4), (256, 64, 1, 8, 3), (128, 32, 0, 4, 4)]
]


def padded_tune_configs(cin: int) -> list[triton.Config]:
    """The padded conv's autotuning candidates for ``cin`` input bytes per pixel: those whose K
    steps are :func:`_padded_k_step`."""
    return [c for c in PADDED_TUNE_CONFIGS if c.kwargs["BLOCK_K"] == _padded_k_step(cin)]


def _prune_padded(configs: list, named_args: dict, **kwargs) -> list:
    """The autotuner's early prune: :func:`padded_tune_configs` of the launch's C."""
    keep = {id(c) for c in padded_tune_configs(kwargs["C"])}
    return [c for c in configs if id(c) in keep]


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (2 for the interpreter: persistent programs then
    walk several tiles each in the tests)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _padded_grid(m: int, cout: int, block_n: int, meta: dict, device: torch.device) -> tuple[int, int]:
    """Programs of the padded conv: one per row tile, or with ``PERSISTENT = p`` at most p per SM."""
    tiles = triton.cdiv(m, meta["BLOCK_M"])
    if meta["PERSISTENT"]:
        tiles = min(tiles, meta["PERSISTENT"] * _sm_count(device))
    return tiles, triton.cdiv(cout, block_n)


_tuned_padded_conv = triton.autotune(PADDED_TUNE_CONFIGS, key=["C", "COUT", "A_SIGNED", "A_OFFSET", "O_BITS",
                                                               "O_OFFSET", "HAS_RES", "NEXT_BITS", "BLOCK_N"],
                                     prune_configs_by={"early_config_prune": _prune_padded})(
    _padded_conv3x3_tma_kernel)

# stride_wk: the prepared K-contiguous weights (1) and benchmarks/kernels.py's N-contiguous A/B rows
# are different specialisations, each tuned for itself.
_tuned_conv = triton.autotune(TUNE_CONFIGS, key=["C", "COUT", "A_BITS", "A_SIGNED", "O_BITS", "HAS_RES", "NEXT_BITS",
                                                  "SHUFFLE", "BLOCK_N", "stride_wk", "A_L1"],
                              prune_configs_by={"early_config_prune": _prune_flat})(_packed_conv3x3_kernel)


@dataclass
class LaunchOptions:
    """How :func:`packed_conv3x3` launches the conv (benchmarks' A/B rows; the engine never sets them):
    ``config``, a fixed tile config instead of autotuning (on CUDA; for ``padded=True`` also in the
    interpreter, where tests use it, and its RES_EARLY in the flat kernel's interpreter launches; a
    config of BLOCK_H and BLOCK_W is :func:`fp_conv3x3`'s instead); ``a_l1``, activation tiles
    through L1 (``_packed_conv3x3_kernel``'s ``A_L1``); ``cvt_add``, the flat and padded convs'
    epilogue conversions by adds on a GPU (None: ``CVT_ADD``); ``cvt_sat``, their 8-bit codes by
    one saturating conversion each on a GPU (None: ``CVT_SAT``)."""

    config: triton.Config | None = None
    a_l1: bool = False
    cvt_add: bool | None = None
    cvt_sat: bool | None = None
    sm90: bool | None = None
    sm90_stages: int | None = None
    sm90_per_sm: int | None = None
    sm90_epi_rows: bool | None = None
    sm90_ws: bool | None = None
    sm90_group: int | None = None
    sm90_tma_out: bool | None = None
    sm90_tma_res: bool | None = None
    sm90_in_flight: int | None = None
    sm90_halo: bool | None = None
    sm90_cvt_add: bool | None = None
    sm90_up: bool | None = None
    sm90_cvt_sat: bool | str | None = None
    sm90_a_regs: bool | None = None
    sm90_res_bufs: int | None = None
    sm90_res_late: bool | None = None
    sm90_pairs: int | None = None


_options = LaunchOptions()


@contextmanager
def launch_options(**changes):
    """Within the block, convs launch with the enclosing :class:`LaunchOptions` changed by
    ``changes`` (its field names; not thread-safe: for single-threaded benchmarks). ``sm90``: the
    Gluon body conv where it applies (None: ``SM90_BODY``), with ``sm90_stages`` / ``sm90_per_sm``
    / ``sm90_epi_rows`` / ``sm90_ws`` (its warp-specialized twin) / ``sm90_group`` (the twin's stages
    released together) / ``sm90_tma_out`` (the twin's conv1 codes stored by TMA) / ``sm90_tma_res``
    (the twin's fp16 stream in and out by TMA) / ``sm90_in_flight`` (the twin's taps' MMAs in
    flight) / ``sm90_halo`` (the twin's input as halo boxes; ``sm90_stages`` then counts boxes) /
    ``sm90_cvt_add`` (the twin's epilogue conversions by adds) / ``sm90_up`` (the twin also for
    64 -> 64 k convs: the upsampler's) / ``sm90_cvt_sat`` (the twin's 8-bit codes by one
    saturating conversion each; "auto": :func:`sm90_cvt_sat_applies`) / ``sm90_a_regs`` (the twin's
    signed codes into its MMAs through registers) / ``sm90_res_bufs`` / ``sm90_res_late`` (the
    twin's residual boxes for the fp16 stream by TMA, and their copies after each tile's input
    boxes) / ``sm90_pairs`` (the twin's pairs of a producer and an MMA warpgroup in a program)
    instead of the defaults."""
    global _options
    before, _options = _options, replace(_options, **changes)
    try:
        yield
    finally:
        _options = before

# Capabilities the runtime looks for (as on the C++ CPU backend, gdq_engine/ops/cpu_ops.py):
# packed_conv3x3 and quantize_pack take out= buffers (the conv's may be its residual, updated in
# place), and the conv writes the next block's packed codes beside its fp32 result (next_quant=);
# runtime.intgraph then runs one quantize_pack per body call instead of one per block.
OUT_BUFFERS = True
# packed_conv3x3 stores pixel-shuffled (shuffle=r) in these dtypes (out_dtype=, or uint8 8-bit
# codes): runtime.inttail's upsampler then needs no shuffle copy and no cast of the HR map.
FP_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHUFFLE_DTYPES = (torch.uint8, *FP_OUT_DTYPES)
# The integer body's residual stream may be kept in these dtypes (runtime.intgraph's stream_dtypes):
# packed_conv3x3 takes such a residual and out=, and quantize_pack such activations.
STREAM_DTYPES = FP_OUT_DTYPES
# quantize_pack reads these as they are (their exact fp32 values): runtime.inttail then hands a
# half-precision tail input over without an fp32 copy.
QUANTIZE_INPUT_DTYPES = STREAM_DTYPES
# Signed 8-bit codes are the MMA operand as loaded; unsigned ones need `^ 0x80`, registers and a
# correction. runtime.intgraph.reads_signed then passes unsigned codes that fit int8 (one per byte,
# at most 7 bits: the GPU engine's byte containers) as signed: the same bytes, the same values.
SIGNED_BYTES_FASTER = True
# packed_conv3x3(padded=True): 8-bit codes in the padded layout, each tap one TMA box
# (runtime.intgraph's containers="padded").
PADDED_LAYOUT = True
# packed_conv3x3(items=): a (1,) int32 count of leading images that need results; the row tiles
# past them return at once (runtime.intgraph: a group's graph padded to its bucket skips the padding).
SKIPS_PADDING = True


def _launcher(kernel, traceable: bool):
    """``wrap_triton(kernel)`` inside the registered torch ops (so torch.compile and fake tensors
    can trace them), the plain kernel on the eager path: ``wrap_triton``'s eager dispatch measured
    about 1 ms per launch on the H100, far more than the kernel."""
    return wrap_triton(kernel) if traceable else kernel


@dataclass(frozen=True)
class PreparedWeight:
    """Conv weight codes laid out for the kernel's packed-byte K loop.

    ``w``: (groups, 9 * C * a_bits / 8, Cout) int8 with ``groups = 8 // a_bits``; row
    ``tap * CP + j`` of group ``i`` holds input channel ``j + i * CP`` of tap ``ky * 3 + kx``.
    K-contiguous in memory (a transposed view of (groups, Cout, 9 * CP)): the kernel's weight
    tiles are then wgmma's K-major B operands as they are (``_packed_conv3x3_kernel``).
    ``wsum``: (Cout,) int32, the sum of each output channel's codes (for 8-bit unsigned inputs).
    ``sum_bounds``: the largest magnitude a conv sum ``sum(code * w)`` of one output channel can
    reach over 8-bit codes, signed (-128..127) and unsigned (0..255); None: not known.
    """

    w: torch.Tensor
    wsum: torch.Tensor
    a_bits: int
    cin: int
    cout: int
    sum_bounds: tuple[int, int] | None = None


def check_channels(channels: int, what: str = "input", power_of_two: bool = False) -> None:
    """Channel counts the kernels take: multiples of 16 (int8 MMA tiles), and powers of two where
    one tile holds every packed group of a pixel (quantize/unpack, re-quantized conv outputs)."""
    if channels % 16 or channels <= 0:
        raise ValueError(f"the Triton kernels need {what} channels that are a multiple of 16, got {channels}")
    if power_of_two and channels & (channels - 1):
        raise ValueError(f"packing {what} channels in Triton needs a power of two, got {channels}")


def prepare_conv_weight(w_codes: torch.Tensor, a_bits: int) -> PreparedWeight:
    """(Cout, C, 3, 3) int8 weight codes -> :class:`PreparedWeight` for activations of ``a_bits``."""
    check_weight_codes(w_codes)
    cout, cin = w_codes.shape[:2]
    check_channels(cin)
    check_channels(cout, "output")
    bits = container_bits(a_bits)
    groups = 8 // bits
    cp = cin // groups
    w = w_codes.permute(0, 2, 3, 1).reshape(cout, 9, groups, cp).permute(2, 0, 1, 3).reshape(groups, cout, 9 * cp)
    return PreparedWeight(w.contiguous().transpose(1, 2), w_codes.sum((1, 2, 3), dtype=torch.int32).contiguous(),
                          bits, cin, cout, _sum_bounds(w_codes))


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (where a host read would fail)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _sum_bounds(w_codes: torch.Tensor) -> tuple[int, int] | None:
    """:class:`PreparedWeight`'s ``sum_bounds`` of (Cout, C, 3, 3) weight codes: with ``P``, ``N`` a
    channel's sums of its positive codes and of its negative codes' magnitudes, signed codes reach
    ``max(127 P + 128 N, 128 P + 127 N)`` and unsigned ones ``255 max(P, N)``. None while a CUDA
    graph is being captured (the bounds need a host read; the engine prepares its weights before)."""
    if _capturing():
        return None
    w = w_codes.flatten(1).to(torch.int64)
    pos, neg = w.clamp(min=0).sum(1), (-w).clamp(min=0).sum(1)
    signed = torch.maximum(127 * pos + 128 * neg, 128 * pos + 127 * neg).max()
    unsigned = 255 * torch.maximum(pos, neg).max()
    return tuple(int(v) for v in torch.stack([signed, unsigned]).tolist())


def fp32_sums_by_add(weight: PreparedWeight, a_signed: bool) -> bool:
    """Whether every sum of this conv over 8-bit codes (``a_signed``: -128..127, else 0..255; the
    narrower codes lie within them) is below ``2**22`` in magnitude (``weight.sum_bounds``; False
    where unknown): then the epilogues may turn the sums into fp32 by adds, exactly
    (``conv3x3._to_float``, ``body_conv_sm90._to_float``)."""
    return weight.sum_bounds is not None and weight.sum_bounds[0 if a_signed else 1] < 2**22


def _output(out: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device: torch.device,
            name: str = "out") -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} {tuple(shape)} tensor on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def packed_conv3x3(x_packed: torch.Tensor, a_bits: int, a_signed: bool, weight: PreparedWeight | torch.Tensor,
                   mult: torch.Tensor, bias: torch.Tensor, relu: bool = False, residual: torch.Tensor | None = None,
                   res_scale: float = 1.0, out_quant: ActQuant | None = None, out: torch.Tensor | None = None,
                   shuffle: int = 1, out_dtype: torch.dtype = torch.float32, next_quant: ActQuant | None = None,
                   next_out: torch.Tensor | None = None, padded: bool = False, offset_in: bool = False,
                   offset_out: bool = False, items: torch.Tensor | None = None) -> torch.Tensor:
    """Fused unpack -> int8 MMA 3x3 conv -> epilogue -> (re-quantize + pack | fp), NHWC.

    Args:
        x_packed: (N, H, W, C * bits / 8) uint8 packed codes (container of ``a_bits``).
        weight: a :class:`PreparedWeight` (or raw (Cout, C, 3, 3) int8 codes, prepared here).
        mult, bias: (Cout,) fp32 epilogue multiplier (``s_in * s_w``) and bias.
        residual: (N, H, W, Cout) residual stream (fp32, fp16 or bf16; added in fp32 after
            ``res_scale``).
        out_quant: re-quantize to this quantizer's codes and pack (needs Cout <= 256).
        out: optional preallocated result tensor (shape and dtype as returned); it may be
            ``residual`` itself (every value is read before its result is written).
        shuffle: ``r > 1`` stores pixel-shuffled: output channels are read sub-pixel major (block
            i*r + j of Cout / r^2 channels) and the result is (N, rH, rW, Cout / r^2); fp outputs
            or 8-bit-container codes, no residual.
        out_dtype: fp32, or fp16 / bf16 (the fp32 values rounded to nearest even, as ``.to``).
        next_quant, next_out: (fp results of Cout <= 128, a power of two) also write the result's
            packed codes of ``next_quant`` into ``next_out`` (N, H, W, Cout * container / 8),
            exactly ``quantize_pack(result, next_quant)`` of the result as stored (fp16 / bf16:
            the rounded values) without another pass.
        padded: every NHWC tensor (input, residual, result, next codes) is in the padded layout,
            (N, H + 2, W + 2, .) for an H x W image whose one-pixel ring holds zeros (code 0); the
            result's ring is written as zeros, so it is again such an input. 8-bit containers,
            C a multiple of 32, no shuffle; TMA copies on the GPU (``_padded_conv3x3_tma_kernel``).
        offset_in, offset_out: (padded only) the unsigned 8-bit input codes / the re-quantized
            unsigned output codes are stored as ``code ^ 0x80``, code - 128 in a signed byte (a
            ring then holds 0x80): the MMA takes such bytes from shared memory as they are.
        items: a (1,) int32 tensor on the device holding k <= N: only the first k images need
            results; the programs of row tiles past them return at once and leave their rows
            unwritten (those of the tile holding the boundary are computed, exactly). A CUDA graph
            captured for a padded batch reads k when it replays (``GraphCache(items=True)``), so
            the padding costs no MMAs. Not with ``padded``.
    Returns:
        packed uint8 (N, H, W, Cout * out_bits / 8) when ``out_quant``, else (N, H, W, Cout) in
        ``out_dtype`` (shuffled shapes as above).
    """
    bits = container_bits(a_bits)
    if not isinstance(weight, PreparedWeight):
        weight = prepare_conv_weight(weight, bits)
    if weight.a_bits != bits:
        raise ValueError(f"weights were prepared for {weight.a_bits}-bit activations, got {bits}-bit")
    if x_packed.dtype != torch.uint8 or x_packed.dim() != 4:
        raise ValueError(f"expected packed uint8 NHWC activations, got {x_packed.dtype} {tuple(x_packed.shape)}")
    n, h, w_, cp = x_packed.shape
    if cp * 8 // bits != weight.cin:
        raise ValueError(f"activations hold {cp * 8 // bits} channels at {bits} bits, weights expect {weight.cin}")
    if padded:
        _check_padded(x_packed, bits, weight.cin, shuffle, out_quant, next_quant, a_signed, offset_in, offset_out)
        if items is not None:
            raise ValueError("items (skipping padding images) is not supported in the padded layout")
    elif offset_in or offset_out:
        raise ValueError("offset codes (offset_in, offset_out) go with the padded layout (padded=True)")
    cout, dev = weight.cout, x_packed.device
    if items is not None and (items.dtype != torch.int32 or items.numel() != 1 or items.device != dev):
        raise ValueError(f"items must be a one-element int32 tensor on {dev}, got {items.dtype} "
                         f"{tuple(items.shape)} on {items.device}")
    x_packed = x_packed.contiguous()
    if residual is not None:
        if residual.shape != (n, h, w_, cout) or residual.dtype not in STREAM_DTYPES:
            raise ValueError(f"residual must be a {(n, h, w_, cout)} tensor of one of {STREAM_DTYPES}, got "
                             f"{residual.dtype} {tuple(residual.shape)}")
        residual = residual.contiguous()
    if out_quant is not None:
        check_channels(cout, "output", power_of_two=True)
        if cout > 256:
            raise ValueError(f"re-quantized outputs need Cout <= 256 (one tile holds all packed groups), got {cout}")
    if out_dtype not in FP_OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {FP_OUT_DTYPES}, got {out_dtype}")
    r = int(shuffle)
    if r != shuffle or r < 1:
        raise ValueError(f"shuffle must be a positive integer, got {shuffle!r}")
    if r > 1:
        if residual is not None or next_quant is not None:
            raise ValueError("a pixel-shuffled store takes no residual and no next_quant")
        if cout % (r * r):
            raise ValueError(f"shuffle={r} needs Cout divisible by {r * r}, got {cout}")
        if out_quant is not None and out_quant.container != 8:
            raise ValueError("a pixel-shuffled store of codes needs 8-bit containers (packed bytes would hold "
                             f"channels the shuffle separates), got {out_quant.bits}-bit codes")
    o_bits, lo, hi, inv_s = requant_args(out_quant)
    next_args = requant_args(next_quant)
    if next_quant is not None:
        if out_quant is not None:
            raise ValueError("next_quant goes with fp results (out_quant=None)")
        if cout > 128 or cout & (cout - 1):
            raise ValueError(f"next_quant needs Cout <= 128, a power of two (one tile per pixel), got {cout}")
        next_shape = (n, h, w_, cout * next_args[0] // 8)
        if next_out is None:
            raise ValueError(f"next_quant needs next_out, a contiguous uint8 {next_shape} tensor on {dev}")
        _output(next_out, next_shape, torch.uint8, dev, "next_out")
    elif next_out is not None:
        raise ValueError("next_out given without next_quant")
    if r > 1:
        shape = (n, h * r, w_ * r, cout // (r * r))
    else:
        shape = (n, h, w_, cout * o_bits // 8) if o_bits else (n, h, w_, cout)
    out = _output(out, shape, torch.uint8 if o_bits else out_dtype, dev)
    if out.numel() >= 2**31:
        raise ValueError(f"the result has {out.numel()} values, more than 32-bit offsets reach; split the batch")
    _conv_into(out, x_packed, weight.w.to(dev), weight.wsum.to(dev), mult.to(dev, torch.float32).contiguous(),
               bias.to(dev, torch.float32).contiguous(), residual, bits, bool(a_signed), bool(relu), float(res_scale),
               o_bits, lo, hi, inv_s, next_out=next_out, next_args=next_args, shuffle=r,
               padded=(bool(offset_in), bool(offset_out)) if padded else None, items=items,
               sums_by_add=fp32_sums_by_add(weight, bool(a_signed)))
    return out


def _check_padded(x: torch.Tensor, bits: int, cin: int, shuffle: int, out_quant: ActQuant | None,
                  next_quant: ActQuant | None, a_signed: bool, offset_in: bool, offset_out: bool) -> None:
    """What ``packed_conv3x3(padded=True)`` supports."""
    if bits != 8 or any(q is not None and q.container != 8 for q in (out_quant, next_quant)):
        raise ValueError("the padded layout takes 8-bit containers only (in, out and next codes); use "
                         "containers='bytes' for narrower codes")
    if cin % 32:
        raise ValueError(f"the padded layout needs input channels that are a multiple of 32, got {cin}")
    if shuffle != 1:
        raise ValueError("the padded layout has no pixel-shuffled store")
    if x.shape[1] < 3 or x.shape[2] < 3:
        raise ValueError(f"a padded (N, H + 2, W + 2, C) input is at least 3 x 3, got {tuple(x.shape)}")
    if offset_in and a_signed:
        raise ValueError("offset_in stores unsigned codes as code ^ 0x80; these codes are signed")
    if offset_out and (out_quant is None or out_quant.signed):
        raise ValueError("offset_out stores re-quantized unsigned codes (out_quant unsigned)")


def _padded_descriptors(x: torch.Tensor, w: torch.Tensor, as_int8: bool) -> tuple:
    """TMA descriptors of the padded conv's operands (boxes set at launch): the codes as an (M, C)
    matrix (int8 for signed or offset codes: the MMA operand as loaded), the prepared weights as
    (1, Cout, 9 * C)."""
    m, cin = x.numel() // x.shape[-1], x.shape[-1]
    codes = (x.view(torch.int8) if as_int8 else x).view(m, cin)
    if codes.data_ptr() % 16:  # TMA needs 16-byte aligned bases (a view into a bigger buffer may not be)
        codes = codes.clone()
    groups, kk, cout = w.shape
    w_ck = w.transpose(1, 2)  # the K-contiguous storage, (1, Cout, 9 * C)
    if w_ck.stride(-1) != 1 or w_ck.data_ptr() % 16:  # another layout (benchmarks' A/B rows): TMA needs this one
        w_ck = w_ck.clone(memory_format=torch.contiguous_format)
    return (TensorDescriptor(codes, [m, cin], [cin, 1], [1, 1]),
            TensorDescriptor(w_ck, [groups, cout, kk], list(w_ck.stride()), [1, 1, 1]))


def _conv_into(out, x_packed, w, wsum, mult, bias, residual, a_bits: int, a_signed: bool, relu: bool,
               res_scale: float, o_bits: int, lo: int, hi: int, inv_s: float, traceable: bool = False,
               next_out: torch.Tensor | None = None, next_args: tuple = (0, 0, 0, 1.0), shuffle: int = 1,
               padded: tuple[bool, bool] | None = None, items: torch.Tensor | None = None,
               sums_by_add: bool = False) -> None:
    """Launch the conv kernel writing ``out`` (inputs already checked, contiguous, on one device);
    ``padded``: the padded layout's kernel, with (offset_in, offset_out); ``items``: the count
    of images that need results (``SKIP_PAD``); ``sums_by_add``: :func:`fp32_sums_by_add` holds."""
    n, h, w_, _ = x_packed.shape
    # the flat and padded convs' conversions by adds and saturating codes (inline PTX: compiled kernels only)
    compiled = not INTERPRET and out.device.type == "cuda"
    cvt = (CVT_ADD if _options.cvt_add is None else _options.cvt_add) and compiled
    sat = (CVT_SAT if _options.cvt_sat is None else _options.cvt_sat) and compiled
    by_add = dict(ROUND_ADD=cvt, I2F_ADD=cvt and sums_by_add, ROUND_SAT=sat)
    m, cin, cout = n * h * w_, w.shape[1] * (8 // a_bits) // 9, w.shape[2]
    block_n = cout if o_bits else min(triton.next_power_of_2(cout), 128)
    if padded is not None:
        _padded_conv_into(out, x_packed, w, wsum, mult, bias, residual, a_signed, relu, res_scale, o_bits, lo, hi,
                          inv_s, next_out, next_args, block_n, *padded, by_add)
        return
    if not traceable and sm90_body_applies(out, a_bits, cin, cout, shuffle, o_bits, next_args[0]):
        _sm90_body_into(out, x_packed, w, wsum, mult, bias, residual, a_signed, relu, res_scale, o_bits, lo, hi,
                        inv_s, next_out, next_args, items, sums_by_add, shuffle)
        return
    next_bits, next_lo, next_hi, next_inv_s = next_args
    args = (x_packed, w, wsum, mult, bias, residual if residual is not None else out, out,
            next_out if next_out is not None else out, items if items is not None else wsum, m, h, w_, cout,
            *w.stride(), res_scale, inv_s, next_inv_s)
    meta = dict(C=cin, A_BITS=a_bits, A_SIGNED=a_signed, RELU=relu, HAS_RES=residual is not None,
                SCALE_RES=residual is not None and res_scale != 1.0, O_BITS=o_bits, O_LO=lo, O_HI=hi,
                NEXT_BITS=next_bits, NEXT_LO=next_lo, NEXT_HI=next_hi, SHUFFLE=shuffle, A_L1=_options.a_l1,
                SKIP_PAD=items is not None, BLOCK_N=block_n, **by_add)
    if INTERPRET or out.device.type != "cuda":  # small tiles; a test's config may set RES_EARLY
        early = bool(_options.config is not None and _options.config.kwargs.get("RES_EARLY"))
        grid = (triton.cdiv(m, 32), triton.cdiv(cout, block_n))
        _launcher(_packed_conv3x3_kernel, traceable)[grid](*args, **meta, BLOCK_M=32, BLOCK_K=32, RES_EARLY=early,
                                                           **_COMPILE)
    elif not AUTOTUNE or _options.config is not None:
        cfg = _options.config or fixed_config(block_n)
        grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]), triton.cdiv(cout, block_n))
        _launcher(_packed_conv3x3_kernel, traceable)[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps,
                                                           num_stages=cfg.num_stages, **_COMPILE)
    else:
        grid = lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(cout, block_n))
        _launch_tuned(_tuned_conv, "conv", grid, args, meta, traceable)


def sm90_body_applies(out: torch.Tensor, a_bits: int, cin: int, cout: int, shuffle: int, o_bits: int,
                      next_bits: int) -> bool:
    """Whether a conv launch goes to the Gluon body conv (``body_conv_sm90.py``): it is enabled
    (:func:`launch_options`' ``sm90``, else ``SM90_BODY`` unless they fix a flat-kernel config or
    L1 copies), the GPU is sm_90, and the conv takes 8-bit codes, 64 -> 64 channels, no pixel
    shuffle, and writes 8-bit codes or an fp32 / fp16 result (with 8-bit next codes or none). With
    the twin's ``sm90_up`` (:func:`sm90_settings`) also 64 -> 64 k channels, unshuffled or, as the
    upsampler stores, shuffled by r with Cout = 64 r^2."""
    # unasked, a flat-kernel tile config or L1 copies (tests', benchmarks' A/B rows) mean the flat kernel
    flat_asked = _options.config is not None or _options.a_l1
    enabled = SM90_BODY and not flat_asked if _options.sm90 is None else _options.sm90
    if not enabled or INTERPRET or out.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(out.device) != (9, 0):
        return False
    fp_out = o_bits == 0 and out.dtype in (torch.float32, torch.float16)
    if not (a_bits == 8 and cin == 64 and (o_bits == 8 or fp_out) and next_bits in (0, 8)):
        return False
    if cout == 64 and shuffle == 1:
        return True
    opts = sm90_settings()
    return (opts["sm90_up"] and opts["sm90_ws"] and cout % 64 == 0
            and (shuffle == 1 or cout == 64 * shuffle * shuffle))


def sm90_cvt_sat_applies(setting: bool | str, o_bits: int, out_dtype: torch.dtype) -> bool:
    """Whether the twin writes its 8-bit codes by one saturating conversion each (``ROUND_SAT``) in
    a conv that writes ``o_bits``-bit codes (0: floats of ``out_dtype``, maybe with next codes):
    ``setting`` (``sm90_settings()["sm90_cvt_sat"]``) True or False as it says; "auto" on every conv
    but those writing an fp16 stream, where the eleventh H100 run measured it slower
    (``SM90_CVT_SAT``)."""
    if isinstance(setting, str):
        if setting != "auto":
            raise ValueError(f"sm90_cvt_sat is True, False or 'auto', got {setting!r}")
        return not (o_bits == 0 and out_dtype == torch.float16)
    return bool(setting)


# The dtypes as body_conv_sm90's variants (and its torch-free compile report) name them.
SM90_DTYPE_NAMES = {torch.uint8: "u8", torch.float16: "fp16", torch.float32: "fp32"}


def sm90_tma_res_applies(setting: bool, o_bits: int, residual_dtype: torch.dtype | None, out_dtype: torch.dtype,
                         groups: int = 1) -> bool:
    """Whether the twin moves a conv's stream in and out by TMA (``TMA_RES``), ``setting``
    (``sm90_settings()["sm90_tma_res"]``) permitting: ``body_conv_sm90.tma_res_applies`` (a conv2
    writing floats, ``o_bits`` 0, over an fp16 residual, ``residual_dtype``, None: no residual, into
    fp16, in one group of 64 output channels) on torch dtypes. The launch also needs its tensors'
    boxes aligned for TMA."""
    from .body_conv_sm90 import tma_res_applies

    return tma_res_applies(setting, o_bits, SM90_DTYPE_NAMES.get(residual_dtype), SM90_DTYPE_NAMES.get(out_dtype),
                           groups)


def sm90_settings() -> dict:
    """The Gluon body conv's settings a launch gets now, as :class:`LaunchOptions`' ``sm90_*``
    fields (``sm90`` aside): each the enclosing :func:`launch_options`' value, else the module's
    ``SM90_*`` default (``sm90_group``: ``SM90_WS_GROUP``; ``sm90_halo``: ``SM90_HALO`` where this
    Triton's Gluon can build halo boxes and stages are released one at a time; ``sm90_stages`` of
    the twin reading them: ``SM90_HALO_STAGES``)."""
    defaults = dict(sm90_stages=SM90_STAGES, sm90_per_sm=SM90_PER_SM, sm90_epi_rows=SM90_EPI_ROWS, sm90_ws=SM90_WS,
                    sm90_group=SM90_WS_GROUP, sm90_in_flight=SM90_IN_FLIGHT, sm90_tma_out=SM90_TMA_OUT,
                    sm90_tma_res=SM90_TMA_RES, sm90_halo=SM90_HALO, sm90_cvt_add=SM90_CVT_ADD, sm90_up=SM90_UP,
                    sm90_cvt_sat=SM90_CVT_SAT, sm90_a_regs=SM90_A_REGS, sm90_res_bufs=SM90_RES_BUFS,
                    sm90_res_late=SM90_RES_LATE, sm90_pairs=SM90_PAIRS)
    got = {k: default if getattr(_options, k) is None else getattr(_options, k) for k, default in defaults.items()}
    if got["sm90_halo"] and _options.sm90_halo is None:
        from . import body_conv_sm90

        # the default only where it can be built, and not with stages released 3 at a time (asked
        # for: halo boxes are released one at a time)
        got["sm90_halo"] = body_conv_sm90.HALO_VIEWS and got["sm90_group"] == 1
    if got["sm90_ws"] and got["sm90_halo"] and _options.sm90_stages is None:
        got["sm90_stages"] = SM90_HALO_STAGES
    return got


def sm90_ring_stages(opts: dict, res_bufs: int = 1) -> int:
    """The twin's ring depth for a launch with ``res_bufs`` residual boxes (2: ``sm90_res_bufs`` where
    the fp16 stream goes by TMA) under the settings ``opts`` (:func:`sm90_settings`): their
    ``sm90_stages``, less the room a second 16 KB residual box takes (``SM90_RES2_FEWER``: one 10 KB
    halo box, two 8 KB tap boxes), so that 2 programs still fit on an SM; in full with 2 pairs a
    program (``sm90_pairs``), whose shared weights leave room for it."""
    fewer = res_bufs == 2 and opts["sm90_pairs"] == 1
    return opts["sm90_stages"] - (SM90_RES2_FEWER[bool(opts["sm90_halo"])] if fewer else 0)


def _tma_box_ok(t: torch.Tensor) -> bool:
    """Whether TMA can copy boxes of ``t`` in place: contiguous, its base 16-byte aligned."""
    return t.is_contiguous() and t.data_ptr() % 16 == 0


def _box_descriptor(t: torch.Tensor, box: list[int], layout):
    """A Gluon TMA descriptor of the whole of ``t`` (its shape and strides) with boxes ``box``."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    return GluonDescriptor(t, list(t.shape), list(t.stride()), box, layout)


def _sm90_body_into(out, x_packed, w, wsum, mult, bias, residual, a_signed: bool, relu: bool, res_scale: float,
                    o_bits: int, lo: int, hi: int, inv_s: float, next_out, next_args: tuple, items,
                    sums_by_add: bool = False, shuffle: int = 1) -> None:
    """:func:`_conv_into` on the Gluon body conv (:func:`sm90_body_applies` holds): TMA descriptors
    of the codes (their bytes as int8, boxes of 8 x 16 pixels), of the prepared weights and, for
    the warp-specialized twin's TMA copies, of the output codes or of the fp16 stream and the next
    codes; ``SM90_PER_SM`` persistent programs per SM (fewer when there are fewer tiles);
    ``sm90_cvt_add``: the twin's epilogue with its codes by adds, and its floats too where
    ``sums_by_add`` (:func:`fp32_sums_by_add`); ``sm90_cvt_sat``: its 8-bit codes by one saturating
    conversion each (:func:`sm90_cvt_sat_applies`). More than 64 output channels (the twin only):
    one group of 64 a program, ``SM90_PER_SM`` programs per SM in all, stored ``shuffle``d. Raises
    ValueError for a twin's ring that its release groups do not divide, MMAs in flight it cannot
    hold, halo boxes this Triton's Gluon cannot view, or more than 64 output channels on the
    first-built kernel."""
    from triton.experimental.gluon import language as gl

    from .body_conv_sm90 import (
        _BOX_LAYOUT,
        HALO_VIEWS,
        TILE_H,
        TILE_W,
        _body_conv_sm90_kernel,
        _body_conv_sm90_ws_kernel,
        tma_out_applies,
    )

    n, h, w_, _ = x_packed.shape
    codes = x_packed.view(torch.int8)
    if codes.data_ptr() % 16:  # TMA needs 16-byte aligned bases
        codes = codes.clone()
    box4 = _BOX_LAYOUT.value  # the kernel's views of these boxes (halo) assume the same layout
    box2 = gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=8, rank=2)
    box = [1, TILE_H, TILE_W, 64]
    x_desc = _box_descriptor(codes, box, box4)
    w_ck = w[0].t()  # (64, 9 * 64), K contiguous: the prepared storage
    if w_ck.stride(-1) != 1 or w_ck.data_ptr() % 16:
        w_ck = w_ck.contiguous()
    w_desc = _box_descriptor(w_ck, [64, 64], box2)  # (Cout, 9 * 64): a group's boxes start at row 64 g
    opts = sm90_settings()
    groups = w_ck.shape[0] // 64  # output channels in groups of 64, one a program (the grid's second axis)
    tiles = n * triton.cdiv(h, TILE_H) * triton.cdiv(w_, TILE_W)
    pairs = opts["sm90_pairs"] if opts["sm90_ws"] else 1  # producer + MMA warpgroup pairs a program: the twin's
    if pairs not in (1, 2):
        raise ValueError(f"the warp-specialized body conv runs 1 or 2 pairs of a producer and an MMA warpgroup "
                         f"a program (sm90_pairs; GDQ_SM90_PAIRS=1 or 2): got {pairs}")
    # as many tiles in flight per SM as SM90_PER_SM programs of one pair
    programs = max(1, min(triton.cdiv(tiles, pairs), opts["sm90_per_sm"] * _sm_count(out.device) // (groups * pairs)))
    grid = (programs, groups) if groups > 1 else (programs,)
    next_bits, next_lo, next_hi, next_inv_s = next_args
    stages = opts["sm90_stages"]
    kernel, descs, extra = _body_conv_sm90_kernel, (x_desc, w_desc), {}
    if groups > 1 and not opts["sm90_ws"]:
        raise ValueError(f"only the warp-specialized body conv (sm90_ws) computes more than 64 output channels, "
                         f"got {w_ck.shape[0]}")
    if opts["sm90_ws"]:
        group, in_flight, halo = opts["sm90_group"], opts["sm90_in_flight"], opts["sm90_halo"]
        if opts["sm90_res_bufs"] not in (1, 2):
            raise ValueError(f"the warp-specialized body conv keeps 1 or 2 residual boxes (sm90_res_bufs; "
                             f"GDQ_SM90_RES_BUFS=1 or 2): got {opts['sm90_res_bufs']}")
        tma_out = tma_out_applies(opts["sm90_tma_out"], o_bits, residual is not None, groups) and _tma_box_ok(out)
        tma_res = (sm90_tma_res_applies(opts["sm90_tma_res"], o_bits, None if residual is None else residual.dtype,
                                        out.dtype, groups)
                   and all(_tma_box_ok(t) for t in (residual, out, next_out) if t is not None))
        res_bufs = opts["sm90_res_bufs"] if tma_res else 1
        stages = sm90_ring_stages(opts, res_bufs)
        if group not in (1, 3) or stages % group or stages // group < 2:
            raise ValueError(f"the warp-specialized body conv releases 1 or 3 stages at a time, with a ring of two "
                             f"such groups at least: got {group} of {stages} stages")
        if in_flight not in (1, 2) or (in_flight == 2 and (group != 1 or (stages < 4 and not halo))):
            raise ValueError(f"the warp-specialized body conv leaves 1 or 2 taps' MMAs in flight, 2 only with stages "
                             f"released one at a time from a ring of 4 at least: got {in_flight} ({group} of {stages})")
        if halo and group != 1:
            raise ValueError(f"the warp-specialized body conv releases halo boxes one at a time: got groups of {group}")
        if halo and not HALO_VIEWS:
            raise ValueError(f"halo boxes (sm90_halo) need a Gluon that views shared memory past a view's extent "
                             f"(Triton 3.6's _reinterpret); Triton {triton.__version__}'s refuses")
        box16 = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)
        out_desc = res_desc = next_desc = x_desc  # not read unless TMA_OUT / TMA_RES
        if tma_out:
            out_desc = _box_descriptor(out.view(torch.int8).view(n, h, w_, 64), box, box4)
        if tma_res:
            res_desc = _box_descriptor(residual.view(n, h, w_, 64), box, box16)
            out_desc = _box_descriptor(out.view(n, h, w_, 64), box, box16)
            if next_out is not None:
                next_desc = _box_descriptor(next_out.view(torch.int8).view(n, h, w_, 64), box, box4)
        # each halo box's last 2 rows (x_desc's 8 are its first; any descriptor when unused)
        x2_desc = _box_descriptor(codes, [1, 2, TILE_W, 64], box4) if halo else x_desc
        kernel, descs = _body_conv_sm90_ws_kernel, (x_desc, x2_desc, w_desc, out_desc, res_desc, next_desc)
        extra = dict(GROUP=group, TMA_OUT=tma_out, TMA_RES=tma_res, IN_FLIGHT=in_flight, HALO=halo,
                     ROUND_ADD=opts["sm90_cvt_add"], I2F_ADD=opts["sm90_cvt_add"] and sums_by_add,
                     ROUND_SAT=sm90_cvt_sat_applies(opts["sm90_cvt_sat"], o_bits, out.dtype),
                     A_REGS=bool(opts["sm90_a_regs"]) and a_signed, RES_BUFS=res_bufs,
                     RES_LATE=bool(opts["sm90_res_late"]) and tma_res, LOADER_REGS=SM90_WS_LOADER_REGS,
                     maxnreg=SM90_WS_MAXNREG)
        if pairs > 1:  # the kernel's defaults otherwise (one pair's launches unchanged)
            extra.update(PAIRS=pairs, MMA_REGS=SM90_PAIRS_MMA_REGS, maxnreg=SM90_PAIRS_MAXNREG)
        if groups > 1:  # the kernel's defaults otherwise (the default variants' launches unchanged)
            extra.update(OUT_GROUPS=groups, SHUFFLE=shuffle)
    kernel[grid](
        *descs, wsum, mult, bias, residual if residual is not None else out, out,
        next_out if next_out is not None else out, items if items is not None else wsum, n, h, w_, res_scale, inv_s,
        next_inv_s, A_SIGNED=a_signed, RELU=relu, HAS_RES=residual is not None,
        SCALE_RES=residual is not None and res_scale != 1.0, O_BITS=o_bits, O_LO=lo, O_HI=hi, NEXT_BITS=next_bits,
        NEXT_LO=next_lo, NEXT_HI=next_hi, SKIP_PAD=items is not None, STAGES=stages,
        EPI_ROWS=opts["sm90_epi_rows"], num_warps=4, **extra, **_COMPILE)


# Variants (tuner name, out dtype, constexprs) whose in-place launches the autotuner has tuned.
_TUNED_IN_PLACE: set[tuple] = set()


def _launch_tuned(tuner, name: str, grid, args: tuple, meta: dict, traceable: bool = False) -> None:
    """Launch an autotuned conv (``args``: the kernel's runtime arguments, residual 6th, out 7th).

    Autotuning runs the kernel many times, once per benchmark repetition of every config, so a
    launch that updates its residual in place (``out`` is the residual: the body's conv2) would add
    its sums to the stream that many times. The first in-place launch of each variant therefore
    writes a scratch result, which is then copied into place; later launches (tuned) run in place."""
    res, out = args[5], args[6]
    in_place = meta["HAS_RES"] and res.data_ptr() == out.data_ptr()
    # SKIP_PAD is not in the autotuner's key: a variant tuned without it is tuned with it too
    key = (name, out.dtype, *sorted((k, v) for k, v in meta.items() if k != "SKIP_PAD")) if in_place else None
    if not in_place or key in _TUNED_IN_PLACE:
        _launcher(tuner, traceable)[grid](*args, **meta, **_COMPILE)
        return
    scratch = torch.empty_like(out)
    _launcher(tuner, traceable)[grid](*args[:6], scratch, *args[7:], **meta, **_COMPILE)
    out.copy_(scratch)
    _TUNED_IN_PLACE.add(key)


def _padded_conv_into(out, x_packed, w, wsum, mult, bias, residual, a_signed: bool, relu: bool, res_scale: float,
                      o_bits: int, lo: int, hi: int, inv_s: float, next_out, next_args: tuple, block_n: int,
                      offset_in: bool, offset_out: bool, by_add: dict) -> None:
    """:func:`_conv_into` for the padded layout: the TMA kernel, (N, H + 2, W + 2, C) tensors;
    ``by_add``: the conversions' constexprs (``ROUND_ADD``, ``I2F_ADD``, ``ROUND_SAT``)."""
    n, hp, wp, cin = x_packed.shape
    m, cout = n * hp * wp, w.shape[2]
    next_bits, next_lo, next_hi, next_inv_s = next_args
    x_desc, w_desc = _padded_descriptors(x_packed, w, a_signed or offset_in)
    args = (x_desc, w_desc, wsum, mult, bias, residual if residual is not None else out, out,
            next_out if next_out is not None else out, m, hp - 2, wp - 2, cout, res_scale, inv_s, next_inv_s)
    meta = dict(C=cin, A_SIGNED=a_signed, A_OFFSET=offset_in, RELU=relu, HAS_RES=residual is not None,
                SCALE_RES=residual is not None and res_scale != 1.0, O_BITS=o_bits, O_LO=lo, O_HI=hi,
                O_OFFSET=offset_out, NEXT_BITS=next_bits, NEXT_LO=next_lo, NEXT_HI=next_hi, BLOCK_N=block_n,
                **by_add)
    interpreted = INTERPRET or out.device.type != "cuda"
    if AUTOTUNE and not interpreted and _options.config is None:
        grid = lambda cfg: _padded_grid(m, cout, block_n, cfg, out.device)
        _launch_tuned(_tuned_padded_conv, "padded conv", grid, args, meta)
        return
    # a benchmark's or test's config (in the interpreter too), else the interpreter's small tiles or the fixed one
    cfg = _options.config or (triton.Config({"BLOCK_M": 32, "BLOCK_K": 32, "PERSISTENT": 0}) if interpreted
                              else fixed_padded_config(cin))
    tiles = {"PERSISTENT": 0, **cfg.kwargs}  # a flat-kernel config: one tile per program
    _set_tma_boxes({"x_desc": x_desc, "w_desc": w_desc, "BLOCK_N": block_n, **tiles})
    grid = _padded_grid(m, cout, block_n, tiles, out.device)
    _launcher(_padded_conv3x3_tma_kernel, False)[grid](*args, **meta, **tiles, num_warps=cfg.num_warps,
                                                       num_stages=cfg.num_stages, **_COMPILE)


@torch.library.triton_op("gdq_engine::triton_packed_conv3x3", mutates_args=())
def _triton_packed_conv3x3(x_packed: torch.Tensor, w: torch.Tensor, wsum: torch.Tensor, mult: torch.Tensor,
                           bias: torch.Tensor, residual: torch.Tensor | None, a_bits: int, a_signed: bool, relu: bool,
                           res_scale: float, o_bits: int, o_lo: int, o_hi: int, inv_s: float) -> torch.Tensor:
    """The conv as a torch op (``torch.ops.gdq_engine.triton_packed_conv3x3``), visible to
    torch.compile. ``w``/``wsum`` come from :func:`prepare_conv_weight`; ``o_bits`` 0 = fp32 out."""
    n, h, w_, _ = x_packed.shape
    cout = w.shape[2]
    if o_bits:
        out = torch.empty((n, h, w_, cout * o_bits // 8), dtype=torch.uint8, device=x_packed.device)
    else:
        out = torch.empty((n, h, w_, cout), dtype=torch.float32, device=x_packed.device)
    _conv_into(out, x_packed, w, wsum, mult, bias, residual, a_bits, a_signed, relu, res_scale, o_bits, o_lo, o_hi,
               inv_s, traceable=True)
    return out


def quantize_pack(x: torch.Tensor, q: ActQuant, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 (or fp16 / bf16, converted exactly) NHWC (..., C) -> packed uint8 (..., C * container / 8)
    codes of ``q`` (into ``out`` if given: a contiguous uint8 tensor of that shape)."""
    if x.dtype not in STREAM_DTYPES:
        raise ValueError(f"quantize_pack expects activations of one of {STREAM_DTYPES}, got {x.dtype}")
    check_channels(x.shape[-1], power_of_two=True)
    bits, lo, hi, inv_s = requant_args(q)
    if out is not None:
        out = _output(out, (*x.shape[:-1], x.shape[-1] * bits // 8), torch.uint8, x.device)
    return _quantize_pack(x.contiguous(), bits, lo, hi, inv_s, out=out)


def _quantize_pack(x: torch.Tensor, bits: int, lo: int, hi: int, inv_s: float, traceable: bool = False,
                   out: torch.Tensor | None = None):
    c = x.shape[-1]
    m = x.numel() // c
    if out is None:
        out = torch.empty((*x.shape[:-1], c * bits // 8), dtype=torch.uint8, device=x.device)
    block_m = 32 if INTERPRET else ROWS_PER_PROGRAM
    _launcher(_quantize_pack_kernel, traceable)[(triton.cdiv(m, block_m),)](
        x, out, m, inv_s, C=c, BITS=bits, LO=lo, HI=hi, BLOCK_M=block_m, **_COMPILE)
    return out


@torch.library.triton_op("gdq_engine::triton_quantize_pack", mutates_args=())
def _triton_quantize_pack(x: torch.Tensor, bits: int, lo: int, hi: int, inv_s: float) -> torch.Tensor:
    """``torch.ops.gdq_engine.triton_quantize_pack``: contiguous fp32 (..., C) -> packed uint8."""
    return _quantize_pack(x, bits, lo, hi, inv_s, traceable=True)


def unpack_codes(packed: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Packed uint8 (..., C * bits / 8) -> codes (..., C): int8 if ``signed`` else uint8."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_codes expects uint8, got {packed.dtype}")
    if bits not in (2, 4, 8):
        raise ValueError(f"unsupported container {bits}; use 2, 4 or 8")
    c = packed.shape[-1] * 8 // bits
    check_channels(c, power_of_two=True)
    packed = packed.contiguous()
    m = packed.numel() // packed.shape[-1]
    out = torch.empty(*packed.shape[:-1], c, dtype=torch.int8 if signed else torch.uint8, device=packed.device)
    block_m = 32 if INTERPRET else ROWS_PER_PROGRAM
    _unpack_kernel[(triton.cdiv(m, block_m),)](packed, out, m, C=c, BITS=bits, SIGNED=bool(signed), BLOCK_M=block_m)
    return out


@dataclass(frozen=True)
class DenseWeight:
    """A dense-block conv's weight codes over all its segments, laid out for :func:`dense_conv`.

    ``w``: (KTOT, Cout) int8, a K-contiguous view (strides (1, KTOT)); row ``taps * off_j + tap *
    C_j + c`` holds segment ``j``'s input channel ``c`` of tap ``tap`` (``off_0 = 0``, ``off_j =
    c0 + (j - 1) * cg``). ``wsum``: (segments, Cout) int32, each segment's code sums over its taps
    (for 8-bit unsigned inputs). ``taps``: 9 (3x3) or 1 (the 1x1 fusion conv)."""

    w: torch.Tensor
    wsum: torch.Tensor
    c0: int
    cg: int
    segments: int
    taps: int
    cout: int


def dense_k_step(c0: int, cg: int) -> int | None:
    """The K step of :func:`dense_conv` for segments of ``c0`` and ``cg`` channels: the largest of
    64, 32 and 16 that divides both (K steps never straddle a tap or a segment); None where none
    does."""
    return next((k for k in (64, 32, 16) if c0 % k == 0 and cg % k == 0), None)


def dense_config(c0: int, cg: int) -> triton.Config:
    """:func:`dense_conv`'s tiles on a GPU (not yet tuned or timed): 128 pixels, 64 output channels
    (all of them where fewer), K steps of :func:`dense_k_step`, 8 warps, 3 stages. Compiled for
    sm_90 (``kernels.aot``, RDN-B's 64-channel segments), every variant keeps 80-133 registers a
    thread and spills none (4 warps: 118-240 registers)."""
    return triton.Config({"BLOCK_M": 128, "BLOCK_K": dense_k_step(c0, cg)}, num_warps=8, num_stages=3)


def dense_conv_applies(c0: int, cg: int, cout: int, device: torch.device) -> bool:
    """Whether :func:`dense_conv` runs segments of ``c0`` / ``cg`` channels into ``cout``: K steps
    of at least 32 bytes on a GPU (16 in the interpreter) and ``cout`` a multiple of 16."""
    step = dense_k_step(c0, cg)
    least = 16 if INTERPRET or device.type != "cuda" else 32
    return step is not None and step >= least and cout % 16 == 0


def prepare_dense_weight(segments: list[torch.Tensor]) -> DenseWeight:
    """Per-segment (Cout, C_j, k, k) int8 weight codes (k = 3, or 1 for a 1x1 conv; the first
    segment ``c0`` channels wide, every later one ``cg``) -> :class:`DenseWeight`."""
    if not segments:
        raise ValueError("a dense conv needs at least one segment")
    first = segments[0]
    k = first.shape[-1]
    for w in segments:
        if w.dtype != torch.int8 or w.dim() != 4 or w.shape[2:] != (k, k) or k not in (1, 3) \
                or w.shape[0] != first.shape[0]:
            raise ValueError(f"expected (Cout, C, 3, 3) or (Cout, C, 1, 1) int8 codes of one Cout and kernel size, "
                             f"got {tuple(w.shape)} {w.dtype} beside {tuple(first.shape)}")
    widths = {w.shape[1] for w in segments[1:]}
    if len(widths) > 1:
        raise ValueError(f"the later segments must be equally wide, got widths {sorted(widths)}")
    cout, c0 = first.shape[:2]
    cg = widths.pop() if widths else c0
    rows = [w.permute(0, 2, 3, 1).reshape(cout, -1) for w in segments]  # (Cout, taps * C_j), tap-major
    w = torch.cat(rows, 1).contiguous()
    wsum = torch.stack([s.sum((1, 2, 3), dtype=torch.int32) for s in segments]).contiguous()
    return DenseWeight(w.t(), wsum, c0, cg, len(segments), k * k, cout)


def _pixel_stride(t: torch.Tensor, what: str, dtype: torch.dtype, shape: tuple[int, int, int]) -> int:
    """The pixel stride of an (N, H, W, C) ``t`` whose pixels lie evenly spaced with contiguous
    channels (a channel slice of a contiguous NHWC tensor); ValueError otherwise."""
    if t.dtype != dtype or t.dim() != 4 or tuple(t.shape[:3]) != shape:
        raise ValueError(f"{what} must be a {dtype} (N, H, W, C) tensor with (N, H, W) = {shape}, got {t.dtype} "
                         f"{tuple(t.shape)}")
    n, h, w, c = t.shape
    # a size-1 dimension's stride is arbitrary (torch's contiguous() keeps a permuted one): the
    # pixel stride from the first dimension longer than 1, every such dimension checked against it
    p = t.stride(2) if w > 1 else t.stride(1) if h > 1 else t.stride(0) if n > 1 else c
    if (c > 1 and t.stride(3) != 1) or p < c or (w > 1 and t.stride(2) != p) or (h > 1 and t.stride(1) != w * p) \
            or (n > 1 and t.stride(0) != h * w * p):
        raise ValueError(f"{what} must be a channel slice of a contiguous NHWC tensor, got strides {t.stride()}")
    return p


def dense_conv(codes: torch.Tensor, weight: DenseWeight, mult: torch.Tensor, bias: torch.Tensor,
               out: torch.Tensor, out_quant: ActQuant | None = None, residual: torch.Tensor | None = None,
               shift_later: bool = False, next_quant: ActQuant | None = None,
               next_codes: torch.Tensor | None = None) -> torch.Tensor:
    """One dense-block conv over all its segments in one launch (:mod:`.dense_conv`), NHWC: the
    segment chain's values (``DenseIntegerBody``), bit for bit, with the partial sum in registers.

    Args:
        codes: (N, H, W, XC) uint8, the block's codes, one per byte: segment 0 (signed, ``c0``
            channels) at byte 0, segment ``j`` at ``c0 + (j - 1) * cg``; the first
            ``weight.segments`` are read. It may be a channel slice of a larger buffer.
        weight: from :func:`prepare_dense_weight`.
        mult: (segments, Cout) fp32 epilogue multipliers (``s_j * s_w``); bias: (Cout,) fp32, added
            with the first segment.
        out: where the result goes, (N, H, W, Cout): uint8 codes of ``out_quant`` (8-bit
            containers), or fp32 without it; a channel slice of a larger buffer (e.g. the block's
            own codes, past the segments read, or the body's concatenated output).
        residual: (N, H, W, Cout) fp32 (a channel slice too), added after the first segment.
        shift_later: the later segments hold 8-bit unsigned codes above 127 (0..255): read shifted,
            with the weight sums' correction; otherwise every byte is a signed code.
        next_quant, next_codes: also the codes of ``next_quant`` (8-bit containers) into
            ``next_codes``, (N, H, W, Cout) uint8 (the next block's input segment).
    Returns:
        ``out``.
    """
    n, h, w_, _ = codes.shape if codes.dim() == 4 else (0, 0, 0, 0)
    x_stride = _pixel_stride(codes, "codes", torch.uint8, (n, h, w_))
    cout, dev = weight.cout, codes.device
    need = weight.c0 + (weight.segments - 1) * weight.cg
    if codes.shape[3] < need:
        raise ValueError(f"{weight.segments} segments need {need} bytes per pixel, codes hold {codes.shape[3]}")
    if not dense_conv_applies(weight.c0, weight.cg, cout, dev):
        raise ValueError(f"dense_conv takes segments of multiples of 32 channels on a GPU (16 interpreted) and Cout "
                         f"a multiple of 16, got c0={weight.c0}, cg={weight.cg}, Cout={cout}")
    if mult.shape != (weight.segments, cout) or bias.shape != (cout,):
        raise ValueError(f"mult must be ({weight.segments}, {cout}) and bias ({cout},), got {tuple(mult.shape)} and "
                         f"{tuple(bias.shape)}")
    for q, what in ((out_quant, "out_quant"), (next_quant, "next_quant")):
        if q is not None and q.container != 8:
            raise ValueError(f"{what} must store one code per byte (container 8), got {q.container}-bit containers")
    o_bits, lo, hi, inv_s = requant_args(out_quant)
    out_stride = _pixel_stride(out, "out", torch.uint8 if o_bits else torch.float32, (n, h, w_))
    res_stride = 0 if residual is None else _pixel_stride(residual, "residual", torch.float32, (n, h, w_))
    if (next_quant is None) != (next_codes is None):
        raise ValueError("next_quant and next_codes go together")
    next_stride = 0 if next_codes is None else _pixel_stride(next_codes, "next_codes", torch.uint8, (n, h, w_))
    for t, what in ((out, "out"), (residual, "residual"), (next_codes, "next_codes")):
        if t is not None and t.shape[3] != cout:
            raise ValueError(f"{what} must hold Cout = {cout} channels, got {t.shape[3]}")
    if weight.w.dim() != 2 or weight.w.stride() != (1, weight.w.shape[0]) or weight.w.shape[1] != cout:
        raise ValueError("weight.w must be prepare_dense_weight's K-contiguous (KTOT, Cout) view")
    # the layer's codes go into the same buffer, past the bytes it reads; the next block's codes must not
    # land in a buffer this launch reads (other programs still read the bytes a program writes)
    same = codes.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
    if same and not need <= out.data_ptr() - codes.data_ptr() <= x_stride - cout:
        raise ValueError(f"out lies in the codes' buffer but overlaps the {need} bytes a pixel the conv reads")
    if next_codes is not None and next_codes.untyped_storage().data_ptr() == codes.untyped_storage().data_ptr():
        raise ValueError("next_codes must not share the codes' buffer (use the other block's buffer)")
    if n * h * w_ * max(x_stride, out_stride, res_stride, next_stride) >= 2**31:
        raise ValueError("the buffers hold more than 32-bit offsets reach; split the batch")
    _, nlo, nhi, next_inv_s = requant_args(next_quant)
    m, block_n = n * h * w_, min(64, triton.next_power_of_2(cout))
    cfg = dense_config(weight.c0, weight.cg)
    if INTERPRET or dev.type != "cuda":  # small row tiles in the interpreter
        cfg = triton.Config({**cfg.kwargs, "BLOCK_M": 32})
    grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]), triton.cdiv(cout, block_n))
    meta = dict(C0=weight.c0, CG=weight.cg, SEGS=weight.segments, TAPS=weight.taps, SHIFT=bool(shift_later),
                HAS_RES=residual is not None, O_BITS=o_bits, O_LO=lo, O_HI=hi, NEXT=next_quant is not None,
                NEXT_LO=nlo, NEXT_HI=nhi, BLOCK_N=block_n, **cfg.kwargs)
    if dev.type == "cuda":
        meta.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _launcher(_dense_conv_kernel, False)[grid](
        codes, weight.w.to(dev), weight.wsum.to(dev), mult.to(dev, torch.float32).contiguous(),
        bias.to(dev, torch.float32).contiguous(), residual if residual is not None else out, out,
        next_codes if next_codes is not None else out, m, h, w_, cout, x_stride, res_stride, out_stride,
        next_stride, inv_s, next_inv_s, **meta, **_COMPILE)
    return out


# The last conv's (fp_conv.py) tiles: (BLOCK_H output rows, BLOCK_W pixels wide, warps, stages). A
# program walks BLOCK_H + 2 input rows, so taller strips re-read fewer halo rows. One stage: plain
# loads, which L1 caches, so a row's three shifted reads mostly hit L1; more stages: Triton's
# pipeliner fetches the next row by cp.async while the current one is multiplied, but its 16-byte
# copies bypass L1, so each shifted read comes from L2.
FP_TUNE_CONFIGS = [
    triton.Config({"BLOCK_H": bh, "BLOCK_W": bw}, num_warps=w, num_stages=s)
    for bh, bw, w, s in [(16, 64, 4, 1), (32, 64, 4, 1), (16, 128, 4, 1), (16, 64, 4, 2), (32, 64, 4, 2),
                         (16, 128, 4, 2), (32, 128, 8, 2), (16, 128, 4, 3)]
]
FIXED_FP_CONFIG = FP_TUNE_CONFIGS[0]  # GDQ_TRITON_AUTOTUNE=0
_tuned_fp_conv = triton.autotune(FP_TUNE_CONFIGS, key=["C", "COUT", "W"])(_fp_conv3x3_kernel)
# fp16 only: Triton's interpreter returns wrong values for tl.dot of bf16 tiles (3.9: about 1e10 for
# unit-normal 16 x 16 tiles), so CI could not check a bf16 kernel
FP_CONV_DTYPES = (torch.float16,)
FP_CONV_MAX_COUT = 16
FP_KY = KY.value  # the weights' kernel-row blocks (3 rows, padded)


def _fp_padded_sizes(cin: int, cout: int) -> tuple[int, int]:
    """(CP, COUT_P) of :func:`fp_conv3x3`: input channels rounded up to a power of two (at least
    16, the MMA's K), output channels rounded up to a power of two (at least 4, so the weights'
    KY * COUT_P columns reach the MMA's N of 16)."""
    return max(16, triton.next_power_of_2(cin)), max(4, triton.next_power_of_2(cout))


def prepare_fp_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP conv's (Cout, C, 3, 3) weight and (Cout,) bias -> :func:`fp_conv3x3`'s operands.

    Returns the weight as (3 * CP, 4 * COUT_P) in its dtype, row ``kx * CP + c``, column
    ``ky * COUT_P + o`` (the kernel rows side by side in the MMA's N, fp_conv.py), zero for
    c >= C, the fourth kernel-row block and o >= Cout; and the bias as (COUT_P,) fp32, zero past
    Cout (zero everywhere for no bias). CP, COUT_P: C and Cout rounded up to powers of two (at
    least 16 and 4)."""
    cout, cin, kh, kw = weight.shape
    if (kh, kw) != (3, 3) or cout > FP_CONV_MAX_COUT or cin % 16 or weight.dtype not in FP_CONV_DTYPES:
        raise ValueError(f"fp_conv3x3 takes 3x3 fp16 weights with at most {FP_CONV_MAX_COUT} output channels "
                         f"and input channels a multiple of 16, got {weight.dtype} {tuple(weight.shape)}")
    cp, cout_p = _fp_padded_sizes(cin, cout)
    w = torch.zeros(3, cp, FP_KY, cout_p, dtype=weight.dtype, device=weight.device)
    w[:, :cin, :3, :cout] = weight.permute(3, 1, 2, 0)  # (kx, c, ky, o)
    b = torch.zeros(cout_p, dtype=torch.float32, device=weight.device)
    if bias is not None:
        b[:cout] = bias.float()
    return w.reshape(3 * cp, FP_KY * cout_p), b


def fp_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cout: int,
               out: torch.Tensor | None = None, out_scale: float | None = None,
               out_shift: torch.Tensor | None = None) -> torch.Tensor:
    """3x3 conv (stride 1, zero pad 1) of fp16 NHWC activations with fp32 accumulation
    (``fp_conv.py``): the network's last conv on the HR map.

    Args:
        x: (N, H, W, C) fp16, contiguous (a channels_last (N, C, H, W) tensor permuted).
        weight, bias: from :func:`prepare_fp_weight` of a (cout, C, 3, 3) weight, in ``x``'s dtype.
        cout: output channels (at most 16).
        out: optional (N, cout, H, W) fp32 contiguous output.
        out_scale, out_shift: optional, together: an fp32 factor and a (cout,) fp32 tensor; each
            result ``y`` of channel ``o`` is then stored as ``(y * out_scale) + out_shift[o]``, two
            fp32 roundings (the output glue of :class:`~gdq_engine.runtime.lastconv.KernelConv2d`).
    Returns:
        (N, cout, H, W) fp32, contiguous (NCHW): bias + the conv, each product exact, summed in fp32.
    """
    if x.dim() != 4 or not x.is_contiguous() or x.dtype not in FP_CONV_DTYPES:
        raise ValueError(f"x must be a contiguous (N, H, W, C) fp16 tensor, got {x.dtype} {tuple(x.shape)}")
    if not 1 <= cout <= FP_CONV_MAX_COUT:
        raise ValueError(f"fp_conv3x3 computes 1 to {FP_CONV_MAX_COUT} output channels, got {cout}")
    n, h, w_, cin = x.shape
    cp, cout_p = _fp_padded_sizes(cin, cout)
    if tuple(weight.shape) != (3 * cp, FP_KY * cout_p) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous ({3 * cp}, {FP_KY * cout_p}) {x.dtype} tensor from "
                         f"prepare_fp_weight for {cin} input and {cout} output channels, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if tuple(bias.shape) != (cout_p,) or bias.dtype != torch.float32:
        raise ValueError(f"bias must be a ({cout_p},) fp32 tensor from prepare_fp_weight, got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    if len({x.device, weight.device, bias.device}) != 1:
        raise ValueError(f"x, weight and bias must be on one device, got {x.device}, {weight.device}, {bias.device}")
    affine = out_scale is not None
    if affine != (out_shift is not None):
        raise ValueError("out_scale and out_shift go together")
    if affine:
        if tuple(out_shift.shape) != (cout,) or out_shift.dtype != torch.float32 or out_shift.device != x.device:
            raise ValueError(f"out_shift must be a ({cout},) fp32 tensor on {x.device}, got {out_shift.dtype} "
                             f"{tuple(out_shift.shape)} on {out_shift.device}")
        if not math.isfinite(out_scale):
            raise ValueError(f"out_scale must be finite, got {out_scale}")
    out = _output(out, (n, cout, h, w_), torch.float32, x.device)
    args = (x, weight, bias, out_shift if affine else bias, out, h, w_, float(out_scale) if affine else 1.0)
    meta = dict(C=cin, CP=cp, COUT=cout, COUT_P=cout_p, AFFINE=affine, **_COMPILE)
    own = _options.config if _options.config is not None and "BLOCK_H" in _options.config.kwargs else None
    if INTERPRET or x.device.type != "cuda" or not AUTOTUNE or own is not None:
        cfg = own or FIXED_FP_CONFIG
        grid = (triton.cdiv(w_, cfg.kwargs["BLOCK_W"]), triton.cdiv(h, cfg.kwargs["BLOCK_H"]), n)
        _launcher(_fp_conv3x3_kernel, False)[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps,
                                                   num_stages=cfg.num_stages)
    else:
        grid = lambda cfg: (triton.cdiv(w_, cfg["BLOCK_W"]), triton.cdiv(h, cfg["BLOCK_H"]), n)
        _launcher(_tuned_fp_conv, False)[grid](*args, **meta)
    return out


STITCH_BLOCK = (8, 128)  # rows x columns of an owned box per program


def stitch_windows(canvas: torch.Tensor, sr: torch.Tensor, boxes: torch.Tensor, extent: tuple[int, int],
                   bad: torch.Tensor) -> None:
    """Copy each SR window's owned box into ``canvas`` in one launch (``stitch.py``), and set
    ``bad`` to 1 if a copied value is NaN or infinite (it is never reset here).

    Args:
        canvas: (C, H, W) fp32, any strides; written in place.
        sr: (K, C, h, w) fp32 windows, any strides, on ``canvas``' device.
        boxes: (K, 6) int32 contiguous, on that device: per window (y0, y1, x0, x1, oy, ox), the
            canvas rows [y0, y1) and columns [x0, x1) it owns, taken from its pixels from (oy, ox) on.
        extent: (rows, columns) of the largest box (the launch grid covers it).
        bad: (1,) int32 on that device.
    """
    if canvas.dim() != 3 or sr.dim() != 4 or sr.shape[1] != canvas.shape[0]:
        raise ValueError(f"expected a (C, H, W) canvas and (K, C, h, w) windows, got {tuple(canvas.shape)} and "
                         f"{tuple(sr.shape)}")
    if canvas.dtype != torch.float32 or sr.dtype != torch.float32:
        raise ValueError(f"canvas and windows must be fp32, got {canvas.dtype} and {sr.dtype}")
    if (tuple(boxes.shape) != (sr.shape[0], BOX_FIELDS) or boxes.dtype != torch.int32 or not boxes.is_contiguous()
            or tuple(bad.shape) != (1,) or bad.dtype != torch.int32):
        raise ValueError(f"boxes must be a contiguous ({sr.shape[0]}, {BOX_FIELDS}) int32 tensor and bad a (1,) "
                         f"int32 one, got {boxes.dtype} {tuple(boxes.shape)} and {bad.dtype} {tuple(bad.shape)}")
    if len({canvas.device, sr.device, boxes.device, bad.device}) != 1:
        raise ValueError(f"canvas, windows, boxes and bad must be on one device, got {canvas.device}, {sr.device}, "
                         f"{boxes.device}, {bad.device}")
    if sr.shape[0] == 0 or min(extent) <= 0:
        return
    by, bx = STITCH_BLOCK
    grid = (sr.shape[0], triton.cdiv(extent[0], by), triton.cdiv(extent[1], bx))
    _launcher(_stitch_kernel, False)[grid](sr, canvas, boxes, bad, sr.shape[1], *sr.stride(), *canvas.stride(),
                                           BLOCK_Y=by, BLOCK_X=bx, num_warps=4)


ENTROPY_BLOCK, ENTROPY_STEPS = 128, 8  # pixels per step of a patch's soft histogram (x 32 bins), steps per program
MOMENTS_TILES, MOMENTS_CHANNELS = 32, 64  # 4x4 tiles and channels per program of the pooled moments


def patch_entropy(lr: torch.Tensor, grey: tuple[float, float, float], sigma: float, bins: int) -> torch.Tensor:
    """(P,) fp32 soft-histogram entropies in nats of (P, 3, h, w) images in [0, 1] (fp32, fp16 or
    bf16, any strides; ``policy_stage.py``): grey ``grey`` weights, ``bins`` Gaussian bins of
    width ``sigma`` at ``i / (bins - 1)``. Two launches: partial histograms of
    runs of ``ENTROPY_BLOCK * ENTROPY_STEPS`` pixels, then each patch's sum and entropy. The
    pure-torch reference is :func:`gdq_engine.policy.entropy.patch_entropy` (which divides by
    ``2 sigma^2`` where the kernel multiplies by its reciprocal: fp32 rounding apart, equal)."""
    if lr.dim() != 4 or lr.shape[1] != 3:
        raise ValueError(f"patch_entropy expects (P,3,h,w), got {tuple(lr.shape)}")
    if lr.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"patch_entropy expects floating-point images, got {lr.dtype}")
    if bins < 2 or bins & (bins - 1):
        raise ValueError(f"the kernel's bin count must be a power of two, got {bins}")
    p, _, h, w = lr.shape
    out = torch.empty(p, dtype=torch.float32, device=lr.device)
    if p == 0:
        return out
    splits = max(1, triton.cdiv(h * w, ENTROPY_BLOCK * ENTROPY_STEPS))
    part = torch.empty(splits, p, bins, dtype=torch.float32, device=lr.device)
    _launcher(_patch_histogram_kernel, False)[(p, splits)](
        lr, part, h, w, *lr.stride(), G0=float(grey[0]), G1=float(grey[1]), G2=float(grey[2]),
        NEG_INV_TWO_SIGMA_SQ=-1.0 / (2.0 * sigma * sigma), BINS=bins, BLOCK=ENTROPY_BLOCK, STEPS=ENTROPY_STEPS,
        num_warps=4, **_COMPILE)
    _launcher(_entropy_kernel, False)[(p,)](part, out, splits, p, BINS=bins, num_warps=1, **_COMPILE)
    return out


def pooled_moments(feat: torch.Tensor) -> torch.Tensor:
    """(2, 3, P, F) fp32 per-channel sums of (P, F, h, w) features (fp32, fp16 or bf16, any strides;
    h and w multiples of 4): [0, v] the sums and [1, v] the sums of squares of view v, the
    features (v = 0), their 2x2 (1) and 4x4 (2) average pools (rounded to ``feat``'s dtype, as
    ``avg_pool2d`` gives them; ``policy_stage.py``). Each program's partial sums are added
    here in a fixed order (deterministic). The pure-torch reference is the pooling and reductions
    of :meth:`gdq_engine.policy.granular.GBC.descriptor`."""
    if feat.dim() != 4:
        raise ValueError(f"pooled_moments expects (P, F, h, w) features, got {tuple(feat.shape)}")
    if feat.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"pooled_moments expects floating-point features, got {feat.dtype}")
    p, f, h, w = feat.shape
    if h % 4 or w % 4 or h == 0 or w == 0:
        raise ValueError(f"pooled_moments needs sides that are positive multiples of 4, got {h}x{w}")
    tw, nt = w // 4, (h // 4) * (w // 4)
    splits = triton.cdiv(nt, MOMENTS_TILES)
    part = torch.empty(splits, *MOMENTS, p, f, dtype=torch.float32, device=feat.device)
    if p and f:
        grid = (p, splits, triton.cdiv(f, MOMENTS_CHANNELS))
        _launcher(_pooled_moments_kernel, False)[grid](feat, part, f, tw, nt, *feat.stride(), TILES=MOMENTS_TILES,
                                                       BLOCK_C=MOMENTS_CHANNELS, num_warps=4, **_COMPILE)
    return part.sum(0)
