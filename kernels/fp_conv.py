"""The network's last conv (3x3, stride 1, zero pad 1, a few output channels) on the HR map, in
Triton: fp16 NHWC in, fp32 NCHW out.

Why a kernel of our own: cuDNN's fp16 64 -> 3 conv on EDSR-baseline x4's 1080p HR map
(18 x 384 x 384 x 64) took 0.38 ms on an H200, about 4.5x its byte floor (docs/kernels.md,
"Where the time goes next"). The conv is byte-bound: with 3 output channels each input value
takes part in 27 MACs (13.5 per byte), far below the 100-150 MACs per byte at which an H200/H100's
fp16 tensor cores and HBM balance. So the kernel reads each input pixel from HBM once and keeps
the taps' re-reads in the caches:

* A program computes a BLOCK_H x BLOCK_W tile of output pixels of one image. Its 9 taps read
  the (BLOCK_H + 2) x (BLOCK_W + 2) input window: through L1 (plain loads in an unrolled tap loop,
  not ``cp.async.cg`` copies, which bypass L1), and L2 serves the rows tiles above and below
  share. A 4 x 32 tile reads 204 input bytes per output pixel from L2 at C = 64, a 1 x 128 row
  tile 390.
* Each tap is one ``tl.dot`` of the (pixels, C) input tile and the tap's (C, 16) weights (output
  channels zero-padded to 16, the MMA's narrowest N), accumulating in fp32. fp16 x fp16 products
  are exact in fp32, so the result differs from torch's fp32 conv of the same values only in the
  order of the fp32 additions. (No bf16: Triton's interpreter returns wrong values for tl.dot of
  bf16 tiles, so CI could not check it.)
* The epilogue adds the bias in fp32 and stores NCHW fp32: no fp16 rounding of the network's
  output and no fp16 -> fp32 copy of the HR image (cuDNN's result is fp16, which the engine then
  converts).
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK_N = 16  # output channels per tile: wgmma's and tl.dot's narrowest


@triton.jit
def _fp_conv3x3_kernel(x_ptr, w_ptr, b_ptr, out_ptr, H, W, C: tl.constexpr, COUT: tl.constexpr,
                       BLOCK_N: tl.constexpr, K_STEP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """out[n, o, h, w] = bias[o] + sum over taps and channels of x[n, h+dy, w+dx, c] * w[tap*C + c, o].

    x: (N, H, W, C) fp16 contiguous; w: (9 * C, BLOCK_N) in x's dtype, row tap*C + c, tap =
    (dy + 1) * 3 + (dx + 1), zero past COUT; b: (BLOCK_N,) fp32; out: (N, COUT, H, W) fp32
    contiguous. K_STEP: channels per ``tl.dot`` (divides C). Grid: (cdiv(W, BLOCK_W), cdiv(H, BLOCK_H), N)."""
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    n = tl.program_id(2).to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    h = tl.program_id(1) * BLOCK_H + r // BLOCK_W
    w = tl.program_id(0) * BLOCK_W + r % BLOCK_W
    inside = (h < H) & (w < W)
    ks = tl.arange(0, K_STEP)
    ns = tl.arange(0, BLOCK_N)
    image = x_ptr + n * H * W * C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in tl.static_range(9):
        hh = h + (tap // 3 - 1)
        ww = w + (tap % 3 - 1)
        ok = inside & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        pixel = (hh.to(tl.int64) * W + ww) * C
        for k0 in tl.static_range(0, C, K_STEP):
            a = tl.load(image + pixel[:, None] + (k0 + ks)[None, :], mask=ok[:, None], other=0.0)
            b = tl.load(w_ptr + ((tap * C + k0 + ks) * BLOCK_N)[:, None] + ns[None, :])
            acc = tl.dot(a, b, acc=acc)
    y = acc + tl.load(b_ptr + ns)[None, :]
    plane = tl.cast(H, tl.int64) * W  # H == 1 arrives as a plain int: Triton specializes it
    dst = out_ptr + n * COUT * plane + (h.to(tl.int64) * W + w)[:, None] + ns[None, :].to(tl.int64) * plane
    tl.store(dst, y, mask=inside[:, None] & (ns < COUT)[None, :])
