"""A dynamic policy's device stage on Triton: patch entropies (E2B, EntropyOnly) and the GBC's moments.

A dynamic policy decides each patch's bit-width on the GPU before the network runs, and on the
seventh H100 run that stage took about 0.35 ms of a 2.37 ms Granular-DQ frame at 1080p (18 patches):
some 60 torch launches, among them the soft histogram's (P, h*w, 32) temporaries and the GBC's
pooled views (``avg_pool2d``), reductions and norms. Three kernels read each input once:

* ``_patch_histogram_kernel`` and ``_entropy_kernel``: the soft-histogram entropy of
  :func:`gdq_engine.policy.entropy.patch_entropy` (its pure-torch reference), each program of the
  first one histogramming a run of a patch's pixels (one program per patch took 60 us of the H100
  at 1080p: 18 programs, most SMs idle), the second adding a patch's partial histograms in order.
* ``_pooled_moments_kernel``: per patch and channel, the sums and sums of squares of the head
  features and of their 2x2 and 4x4 average pools (rounded to the features' dtype, as
  ``avg_pool2d`` rounds them), the moments :meth:`gdq_engine.policy.granular.GBC.descriptor`
  turns into the GroupNorm'd means (its ``from_moments=False`` path is the reference). One program
  per (patch, run of ``TILES`` 4x4 tiles, block of channels) writes its partial sums; the caller
  adds them in a fixed order (no atomics: the result does not depend on scheduling).

All are fp32 arithmetic on any input strides; they differ from torch in rounding only (summation
order; the histogram's exponent multiplied by ``-1 / 2 sigma^2`` where torch divides by ``2 sigma^2``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .conv3x3 import _to_out_dtype  # fp32 -> the features' dtype as torch rounds (bf16 by its bits)

MOMENTS = (2, 3)  # per channel: sums and sums of squares (2) of the features, their 2x2 and their 4x4 pools (3)


@triton.jit
def _patch_histogram_kernel(lr_ptr, part_ptr, H, W, s_p, s_c, s_h, s_w, G0: tl.constexpr, G1: tl.constexpr,
                            G2: tl.constexpr, NEG_INV_TWO_SIGMA_SQ: tl.constexpr, BINS: tl.constexpr,
                            BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """Program (p, s): pixels ``s * BLOCK * STEPS ...`` (row-major) of patch p of the (P, 3, H, W)
    images in [0, 1] (strides ``s_*``, elements) -> their soft histogram, ``BINS`` fp32 values at
    ``part_ptr``'s contiguous (S, P, BINS) row (s, p): each pixel's grey level ``G0 r + G1 g +
    G2 b`` adds ``exp(NEG_INV_TWO_SIGMA_SQ * (grey - c)^2)`` to the bin of each centre
    ``c = i / (BINS - 1)``."""
    p = tl.program_id(0)
    s = tl.program_id(1)
    base = lr_ptr + p.to(tl.int64) * s_p
    centres = tl.arange(0, BINS).to(tl.float32) / (BINS - 1)
    hist = tl.zeros((BINS,), dtype=tl.float32)
    n = H * W
    for step in tl.static_range(STEPS):
        i = (s * STEPS + step) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        off = (i // W) * s_h + (i % W) * s_w
        r = tl.load(base + off, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(base + s_c + off, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(base + 2 * s_c + off, mask=ok, other=0.0).to(tl.float32)
        grey = r * G0 + g * G1 + b * G2
        d = grey[:, None] - centres[None, :]
        e = tl.exp(d * d * NEG_INV_TWO_SIGMA_SQ)
        hist += tl.sum(tl.where(ok[:, None], e, 0.0), 0)
    tl.store(part_ptr + (s * tl.num_programs(0) + p).to(tl.int64) * BINS + tl.arange(0, BINS), hist)


@triton.jit
def _entropy_kernel(part_ptr, out_ptr, S, P, BINS: tl.constexpr):
    """Program p: patch p's histogram, the sum of its S partial ones in ``part_ptr``'s (S, P, BINS)
    rows taken in order (deterministic), normalised -> its entropy ``-sum q log q`` (q clamped below
    at 1e-12 inside the log) in nats, fp32 at ``out_ptr + p``."""
    p = tl.program_id(0)
    bins = tl.arange(0, BINS)
    hist = tl.zeros((BINS,), dtype=tl.float32)
    for s in range(S):
        hist += tl.load(part_ptr + (s * P + p).to(tl.int64) * BINS + bins)
    prob = hist / tl.maximum(tl.sum(hist, 0), 1e-12)
    tl.store(out_ptr + p, -tl.sum(prob * tl.log(tl.maximum(prob, 1e-12)), 0))


@triton.jit
def _pooled_moments_kernel(feat_ptr, part_ptr, F, TW, NT, s_p, s_c, s_h, s_w, TILES: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    """Program (p, s, cb): 4x4 tiles ``s * TILES ...`` (of ``NT``, ``TW`` per row) of patch p of the
    (P, F, 4 * NT / TW, 4 * TW) features (strides ``s_*``, elements), channels ``cb * BLOCK_C ...``.
    Writes its fp32 partial sums to ``part_ptr``, a contiguous (S, 2, 3, P, F) tensor: [s, 0, v]
    the sums and [s, 1, v] the sums of squares of view v (the features, their 2x2 and 4x4 pools)."""
    p = tl.program_id(0)
    s = tl.program_id(1)
    t = s * TILES + tl.arange(0, TILES)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (t < NT)[:, None] & (c < F)[None, :]
    y = (t // TW) * 4
    x = (t % TW) * 4
    base = feat_ptr + p.to(tl.int64) * s_p + (c * s_c)[None, :]
    s1 = tl.zeros((TILES, BLOCK_C), dtype=tl.float32)
    s2 = tl.zeros((TILES, BLOCK_C), dtype=tl.float32)
    p2 = tl.zeros((TILES, BLOCK_C), dtype=tl.float32)
    q2 = tl.zeros((TILES, BLOCK_C), dtype=tl.float32)
    acc4 = tl.zeros((TILES, BLOCK_C), dtype=tl.float32)
    for blk in tl.static_range(4):  # the tile's four 2x2 blocks
        acc2 = tl.zeros((TILES, BLOCK_C), dtype=tl.float32)
        for k in tl.static_range(4):
            dy = (blk // 2) * 2 + k // 2
            dx = (blk % 2) * 2 + k % 2
            v = tl.load(base + ((y + dy) * s_h + (x + dx) * s_w)[:, None], mask=ok, other=0.0).to(tl.float32)
            s1 += v
            s2 += v * v
            acc2 += v
        # avg_pool2d's value: the fp32 mean rounded to the features' dtype
        m2 = _to_out_dtype(acc2 * 0.25, feat_ptr.dtype.element_ty).to(tl.float32)
        p2 += m2
        q2 += m2 * m2
        acc4 += acc2
    m4 = _to_out_dtype(acc4 * 0.0625, feat_ptr.dtype.element_ty).to(tl.float32)
    P = tl.num_programs(0)
    out = part_ptr + (s * 6 * P + p).to(tl.int64) * F + c  # [s, 0, 0, p]; [s, k, v, p] is (3k + v) P F further
    cok = c < F
    tl.store(out, tl.sum(s1, 0), mask=cok)
    tl.store(out + P * F, tl.sum(p2, 0), mask=cok)
    tl.store(out + 2 * P * F, tl.sum(m4, 0), mask=cok)
    tl.store(out + 3 * P * F, tl.sum(s2, 0), mask=cok)
    tl.store(out + 4 * P * F, tl.sum(q2, 0), mask=cok)
    tl.store(out + 5 * P * F, tl.sum(m4 * m4, 0), mask=cok)
