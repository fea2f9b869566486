"""One dense-block conv over all its segments in one launch (RDN's residual dense blocks), NHWC,
8-bit containers. Bit-exact with the segment chain of :class:`gdq_engine.runtime.densebody.DenseIntegerBody`.

A dense layer convolves the concatenation of the block input (signed codes) and every earlier
layer's post-ReLU output (unsigned codes), each segment with its own scale, so one int32 sum
cannot hold them all. The chain runs one conv per segment and passes an fp32 partial sum from
launch to launch: layer ``i`` reads and writes ``i`` fp32 tensors. This kernel keeps the partial
sum in registers instead. All segments' codes live in one uint8 buffer per block, (M, XC) with
segment ``j`` at bytes ``[off_j, off_j + C_j)`` (``off_0 = 0``, ``C_0 = C0``, later segments ``CG``
wide), and each program walks the segments in order: for segment ``j`` an int32 MMA sum over its
taps and channels, then, in the chain's order of fp32 operations (docs/numerics.md, "Dense blocks")::

    j = 0:   t = float(acc) * m[0]; t = t + bias; y = res + t (HAS_RES) or t
    j > 0:   t = float(acc + 128 * wsum[j] if SHIFT) * m[j]; t = t + 0.0; y = y + t

and stores ``y`` once: as the codes of the layer's quantizer into the block buffer's slice of this
layer (a dense layer), or as fp32 (the fusion conv, ``TAPS == 1``), optionally also as the next
block's input codes (``NEXT``). The chain's later segments add ``p + (acc * m + 0)``; IEEE addition
is commutative, so ``y + t`` is the same bits.

Unsigned codes of at most 7 bits are read as signed bytes (the same bytes); 8-bit unsigned codes
enter the MMA shifted by -128 (``SHIFT``) and ``128 * sum(w)`` over all taps is added back, as in
:mod:`.conv3x3`, so zero padding still means code 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .conv3x3 import _requantize, _tile_indices


@triton.jit
def _segment_acc(x_ptr, w_ptr, offs_m, m_ok, n_ok, px, py, kr, w_cols, H, W, X_STRIDE, off, CJ: tl.constexpr,
                 TAPS: tl.constexpr, SHIFTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """The int32 sums (BLOCK_M, BLOCK_N) of one segment: ``CJ`` channels at byte ``off`` of each
    pixel's codes, its weight rows from ``TAPS * off``. ``SHIFTED``: 8-bit unsigned codes, read as
    code - 128 (the caller adds ``128 * sum(w)`` back)."""
    KPT: tl.constexpr = CJ // BLOCK_K  # K steps per tap
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for step in range(TAPS * KPT):
        tap = step // KPT
        c0 = (step % KPT) * BLOCK_K
        if TAPS == 9:
            dy = tap // 3 - 1
            dx = tap % 3 - 1
            ok = m_ok & (py + dy >= 0) & (py + dy < H) & (px + dx >= 0) & (px + dx < W)
            row = offs_m + dy * W + dx
        else:
            ok = m_ok
            row = offs_m
        raw = tl.load(x_ptr + (row * X_STRIDE + off + c0)[:, None] + kr[None, :], mask=ok[:, None], other=0)
        if SHIFTED:  # 0..255 -> code - 128 (padding: 0 -> -128, undone by the correction)
            a = (raw ^ 0x80).to(tl.int8, bitcast=True)
        else:
            a = raw.to(tl.int8, bitcast=True)
        w = tl.load(w_ptr + (TAPS * off + tap * CJ + c0 + kr)[:, None] + w_cols, mask=n_ok[None, :], other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _dense_conv_kernel(
    x_ptr, w_ptr, wsum_ptr, mult_ptr, bias_ptr, res_ptr, out_ptr, next_ptr,
    M, H, W, COUT, X_STRIDE, RES_STRIDE, OUT_STRIDE, NEXT_STRIDE, inv_s_out, inv_s_next,
    C0: tl.constexpr, CG: tl.constexpr, SEGS: tl.constexpr, TAPS: tl.constexpr, SHIFT: tl.constexpr,
    HAS_RES: tl.constexpr, O_BITS: tl.constexpr, O_LO: tl.constexpr, O_HI: tl.constexpr,
    NEXT: tl.constexpr, NEXT_LO: tl.constexpr, NEXT_HI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M pixels, BLOCK_N output channels) tile of a dense-block conv.

    ``x_ptr``: the block's codes, (M, X_STRIDE) uint8, segment ``j`` at byte ``0`` (j = 0) or
    ``C0 + (j - 1) * CG``; the first ``SEGS`` segments are read. ``w_ptr``: (KTOT, COUT) int8 with
    strides (1, KTOT): row ``TAPS * off_j + tap * C_j + c`` holds segment ``j``'s channel ``c`` of
    tap ``tap`` (ky * 3 + kx; the centre only when ``TAPS == 1``). ``wsum_ptr``, ``mult_ptr``:
    (SEGS, COUT) int32 weight sums and fp32 multipliers; ``bias_ptr``: (COUT,) fp32.
    ``res_ptr``: (M, RES_STRIDE) fp32, channels from 0 (``HAS_RES``). Output: ``O_BITS == 8``:
    codes in ``[O_LO, O_HI]``, one byte each, at ``out_ptr + pixel * OUT_STRIDE +
    channel``; ``O_BITS == 0``: fp32 there. ``NEXT``: also the codes of ``inv_s_next`` in
    ``[NEXT_LO, NEXT_HI]`` at ``next_ptr + pixel * NEXT_STRIDE + channel``. ``SHIFT``: the later
    segments' codes are 8-bit unsigned (0..255). Every C is a multiple of ``BLOCK_K``."""
    offs_m, offs_n, m_ok, n_ok, px, py, kr = _tile_indices(tl.program_id(0), tl.program_id(1), M, H, W, COUT,
                                                           BLOCK_M, BLOCK_N, BLOCK_K)
    w_cols = offs_n[None, :] * (TAPS * (C0 + (SEGS - 1) * CG))  # the weights' K-contiguous columns

    # segment 0: the block input (signed codes, C0 channels), with the bias and the residual
    acc = _segment_acc(x_ptr, w_ptr, offs_m, m_ok, n_ok, px, py, kr, w_cols, H, W, X_STRIDE, 0, C0, TAPS, False,
                       BLOCK_M, BLOCK_N, BLOCK_K)
    y = acc.to(tl.float32) * tl.load(mult_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    y = y + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_RES:
        res = tl.load(res_ptr + offs_m[:, None] * RES_STRIDE + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :],
                      other=0.0)
        y = res + y
    # the later segments (CG channels each), in order: a loop, not unrolled, so the registers a
    # program needs do not grow with the segments
    for j in range(1, SEGS):
        off = C0 + (j - 1) * CG
        acc = _segment_acc(x_ptr, w_ptr, offs_m, m_ok, n_ok, px, py, kr, w_cols, H, W, X_STRIDE, off, CG, TAPS, SHIFT,
                           BLOCK_M, BLOCK_N, BLOCK_K)
        if SHIFT:
            acc += 128 * tl.load(wsum_ptr + j * COUT + offs_n, mask=n_ok, other=0)[None, :]
        t = acc.to(tl.float32) * tl.load(mult_ptr + j * COUT + offs_n, mask=n_ok, other=0.0)[None, :]
        t = t + 0.0  # the chain's zero bias of the later segments (-0.0 becomes +0.0)
        y = y + t

    mn_ok = m_ok[:, None] & n_ok[None, :]
    dst = offs_m[:, None] * OUT_STRIDE + offs_n[None, :]
    if O_BITS == 8:
        codes = _requantize(y, inv_s_out, O_LO, O_HI) & 0xFF
        tl.store(out_ptr + dst, codes.to(tl.uint8), mask=mn_ok)
    else:
        tl.store(out_ptr + dst, y, mask=mn_ok)
    if NEXT:
        codes = _requantize(y, inv_s_next, NEXT_LO, NEXT_HI) & 0xFF
        tl.store(next_ptr + offs_m[:, None] * NEXT_STRIDE + offs_n[None, :], codes.to(tl.uint8), mask=mn_ok)
