"""The network's last conv (3x3, stride 1, zero pad 1, a few output channels) on the HR map, in
Triton: fp16 NHWC in, fp32 NCHW out.

Why a kernel of our own: cuDNN's fp16 64 -> 3 conv on EDSR-baseline x4's 1080p HR map
(18 x 384 x 384 x 64) took 0.38 ms on an H200 and 0.46 ms on an H100, 3-4x its byte floor
(docs/kernels.md, "The last conv"). The conv is byte-bound: with 3 output channels each input
value takes part in 27 MACs (13.5 per byte), far below the 100-150 MACs per byte at which an
H100's fp16 tensor cores and HBM balance. So what counts is how often each input byte is read.

Row sliding (this kernel). A program owns a BLOCK_W-wide strip of BLOCK_H output rows of one
image and walks its BLOCK_H + 2 input rows top to bottom. Each input row is read three times,
shifted one pixel left, not, and right (the three kernel columns kx), and each read is one
``tl.dot`` of the (BLOCK_W, C) tile with that column's (C, 4 * COUT_P) weights, whose columns are
(ky, o): the kernel rows go into the MMA's N, which the few output channels leave mostly empty
anyway. The (BLOCK_W, 4 * COUT_P) result holds what this input row gives the output rows below
(ky = 0), level (ky = 1) and above (ky = 2); the program adds them to two running partial rows,
and the row above is then complete and stored. So each input byte is read 3 times through L1 and
(BLOCK_H + 2) / BLOCK_H times from L2/HBM.

The first kernel (2026-11-26, replaced) computed each output tile's 9 taps as 9 dots, re-reading
each input byte 9 times through L1 and staging it 9 times in shared memory for wgmma. Nsight
Compute on an H100 (``ncu-convs-nvidia-h100-80gb-hbm3-2026-11-26-run3.csv``) found it L1-bound
(L1/TEX throughput 86%, DRAM 25%), 439 us against cuDNN's 461 us and a 124 us byte floor.

Numerics: fp16 x fp16 products are exact in fp32 and the MMAs accumulate in fp32; the three
kernel rows' partial sums and the bias are added in fp32 in a fixed order. The result differs
from torch's fp32 conv of the same values only in the order of fp32 additions (tests bound it).
No bf16: Triton's interpreter returns wrong values for tl.dot of bf16 tiles, so CI could not check
it. The epilogue stores fp32 NCHW: no fp16 rounding of the network's output and no fp16 -> fp32
copy of the HR image (cuDNN's result is fp16, which the engine then converts).
"""

from __future__ import annotations

import triton
import triton.language as tl

KY = tl.constexpr(4)  # kernel rows per weight column block: 3, padded to a power of two


@triton.jit
def _shifted_row(image, r, ww, H, W, C: tl.constexpr, cs):
    """(BLOCK_W, CP) fp16 tile: input pixels ``ww`` of row ``r``, channels ``cs``; zero outside the
    image (the conv's padding) and past C."""
    rr = r + tl.zeros_like(ww)  # per pixel: Triton 3.9's interpreter makes a scalar & vector mask int32
    ok = (rr >= 0) & (rr < H) & (ww >= 0) & (ww < W)
    ptr = image + (tl.cast(rr, tl.int64) * W + ww)[:, None] * C + cs[None, :]
    return tl.load(ptr, mask=ok[:, None] & (cs < C)[None, :], other=0.0)


@triton.jit
def _kernel_row(p3, ky: tl.constexpr):
    """The (BLOCK_W, COUT_P) block of kernel row ``ky`` of a (BLOCK_W, KY, COUT_P) product: a sum of
    that block and exact zeros, so exactly its values."""
    sel = (tl.arange(0, KY) == ky)[None, :, None]
    return tl.sum(tl.where(sel, p3, 0.0), axis=1)


@triton.jit
def _fp_conv3x3_kernel(x_ptr, w_ptr, b_ptr, shift_ptr, out_ptr, H, W, out_scale, C: tl.constexpr, CP: tl.constexpr,
                       COUT: tl.constexpr, COUT_P: tl.constexpr, AFFINE: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_W: tl.constexpr):
    """out[n, o, h, w] = bias[o] + sum over ky, kx, c of x[n, h+ky-1, w+kx-1, c] * weight[o, c, ky, kx].

    x: (N, H, W, C) fp16 contiguous. w: (3 * CP, KY * COUT_P) fp16, row ``kx * CP + c``, column
    ``ky * COUT_P + o``, zero for c >= C, ky = 3 or o >= COUT. b: (COUT_P,) fp32, zero past COUT.
    out: (N, COUT, H, W) fp32 contiguous. CP: C rounded up to a power of two (>= 16); COUT_P: COUT
    rounded up to a power of two (>= 4). Grid: (cdiv(W, BLOCK_W), cdiv(H, BLOCK_H), N).

    ``AFFINE``: each result ``y`` is stored as ``(y * out_scale) + shift[o]``, two fp32 operations
    (not fused: the kernels compile without FMA contraction), ``shift_ptr`` (COUT,) fp32: the
    network's output glue, ``y / pixel_range + mean``, as torch computes it on a CUDA tensor
    (division by a scalar there multiplies by its fp32 reciprocal), without two more passes over
    the HR image."""
    NW: tl.constexpr = KY * COUT_P
    n = tl.program_id(2).to(tl.int64)
    w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    h0 = tl.program_id(1) * BLOCK_H
    cs = tl.arange(0, CP)
    ns = tl.arange(0, NW)
    os = tl.arange(0, COUT_P)
    plane = tl.cast(H, tl.int64) * W  # H == 1 arrives as a plain int: Triton specializes it
    image = x_ptr + n * plane * C
    dst = out_ptr + n * COUT * plane + w[:, None] + os[None, :].to(tl.int64) * plane
    store_ok = (w < W)[:, None] & (os < COUT)[None, :]
    w_left = tl.load(w_ptr + cs[:, None] * NW + ns[None, :])
    w_mid = tl.load(w_ptr + (CP + cs)[:, None] * NW + ns[None, :])
    w_right = tl.load(w_ptr + (2 * CP + cs)[:, None] * NW + ns[None, :])
    bias = tl.load(b_ptr + os)
    if AFFINE:
        shift = tl.load(shift_ptr + os, mask=os < COUT, other=0.0)
    above = tl.zeros((BLOCK_W, COUT_P), dtype=tl.float32)  # output row r - 1: input rows r - 2 and r - 1
    here = tl.zeros((BLOCK_W, COUT_P), dtype=tl.float32)  # output row r: input row r - 1
    for i in range(BLOCK_H + 2):  # input rows r = h0 - 1 ... h0 + BLOCK_H; output row r - 1 is complete after row r
        r = h0 - 1 + i
        p = tl.dot(_shifted_row(image, r, w - 1, H, W, C, cs), w_left)
        p = tl.dot(_shifted_row(image, r, w, H, W, C, cs), w_mid, p)
        p = tl.dot(_shifted_row(image, r, w + 1, H, W, C, cs), w_right, p)
        p3 = tl.reshape(p, (BLOCK_W, KY, COUT_P))
        y = (above + _kernel_row(p3, 2)) + bias[None, :]
        if AFFINE:
            y = y * out_scale
            y = y + shift[None, :]
        done = r - 1 + tl.zeros_like(w)
        row_ok = (done >= h0) & (done < H)
        tl.store(dst + (tl.cast(done, tl.int64) * W)[:, None], y, mask=store_ok & row_ok[:, None])
        above = here + _kernel_row(p3, 1)
        here = _kernel_row(p3, 0)
