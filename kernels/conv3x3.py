"""Packed 3x3 convolution (stride 1, zero pad 1, NHWC) as a Triton implicit GEMM, with the fused
epilogue of docs/numerics.md. Bit-exact with :func:`gdq_engine.ops.reference.packed_conv3x3`.

GEMM view: M = N*H*W output pixels, N = Cout, K = 9 taps x C channels. Activations arrive packed
(``8 // a_bits`` codes per byte, channel j + i*G of a pixel in bits [i*a_bits, (i+1)*a_bits) of
byte j, G = C*a_bits/8). The K loop walks *packed bytes* ``kk = tap*G + j``: one load of a
(BLOCK_M, BLOCK_K) byte tile feeds ``8 // a_bits`` int8 MMAs, one per channel group ``i``, each
against its own weight rows (prepared once by :func:`prepare_conv_weight`). Unpacking happens in
registers; bit-widths are constexpr, so every group's launch is specialised.

8-bit unsigned codes (0..255) do not fit int8: they enter the MMA shifted by -128 (padding taps
load code 0, i.e. -128 after the shift) and ``128 * sum(w[o])`` over *all* taps is added back,
which is exactly the sum over in-image taps with padding contributing code 0.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _unpack_group(raw, GROUP: tl.constexpr, BITS: tl.constexpr, SIGNED: tl.constexpr):
    """uint8 tile of packed bytes -> int8 codes of channel group ``GROUP`` (8-bit lane arithmetic)."""
    if BITS == 8:
        if SIGNED:
            v = raw if raw.dtype == tl.int8 else raw.to(tl.int8, bitcast=True)
        else:  # unsigned 0..255 -> code - 128, which fits int8 (the epilogue adds 128 * sum(w) back)
            v = (raw ^ 0x80).to(tl.int8, bitcast=True)
    else:
        if SIGNED:  # move the field to the top bits, then an arithmetic shift sign-extends it
            v = (raw << (8 - BITS * (GROUP + 1))).to(tl.int8, bitcast=True) >> (8 - BITS)
        else:
            v = ((raw >> (BITS * GROUP)) & ((1 << BITS) - 1)).to(tl.int8, bitcast=True)
    return v


@triton.jit
def _pack_tile(q, BLOCK_M: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr):
    """int32 codes (BLOCK_M, C) -> int32 bytes (BLOCK_M, C*BITS/8) in the packed layout."""
    if BITS == 8:
        return q & 0xFF
    else:
        K: tl.constexpr = 8 // BITS
        G: tl.constexpr = C // K
        fields = tl.reshape(q & ((1 << BITS) - 1), (BLOCK_M, K, G))
        shifts = tl.arange(0, K) * BITS
        return tl.sum(fields << shifts[None, :, None], axis=1)


# The conversions by adds (_requantize's and _to_float's BY_ADD; the Gluon body conv's twins use
# them too): 1.5 * 2**23 as fp32 bits and value, the fp32 add rounding toward minus infinity of it
# (inline PTX), and that add as it appears in a compiled kernel's PTX (the compile reports count it).
MAGIC_BITS = tl.constexpr(0x4B400000)
MAGIC = tl.constexpr(12582912.0)
ROUND_DOWN_ADD = tl.constexpr("add.rm.f32 $0, $1, 0f4B400000;")
ROUND_DOWN_ADD_PTX = r"\badd\.rm\.f32 %\w+, %\w+, 0f4B400000;"
# The saturating codes (_requantize's SAT; the Gluon body conv's twin uses them too): one conversion
# that floors and clamps to 0..255 / -128..127 (SASS F2I.U8.FLOOR / F2I.S8.FLOOR), and both in a
# compiled kernel's PTX (the compile reports count them).
FLOOR_SAT_U8 = tl.constexpr("cvt.rmi.sat.u8.f32 $0, $1;")
FLOOR_SAT_S8 = tl.constexpr("cvt.rmi.sat.s8.f32 $0, $1;")
FLOOR_SAT_PTX = r"\bcvt\.rmi\.sat\.[us]8\.f32 %\w+, %\w+;"


# The rules of _requantize's SAT, at compile time, for both twins (this one and the Gluon body
# conv's, which can call constexpr functions but not Triton ones):
@triton.constexpr_function
def floor_sat_applies(lo, hi):
    """Whether codes ``lo..hi`` lie within one byte's range (0..255 or -128..127), so ``SAT`` makes
    them by one saturating conversion (others go as ``BY_ADD`` says)."""
    return lo >= -128 and hi <= 255 and (lo >= 0 or hi <= 127)


@triton.constexpr_function
def floor_sat_max(lo, hi):
    """Whether ``SAT`` takes ``max(t, lo)`` first: for signed codes. The conversion takes NaN to
    0, the clamp's min/max to ``lo``: for codes from 0 the same, as long as NaN reaches the
    conversion, so their ``min`` propagates it (``min.NaN``); a plain ``min`` would give ``hi``."""
    return lo != 0


@triton.constexpr_function
def floor_sat_min(lo, hi):
    """Whether ``SAT`` takes ``min(t, hi)`` (after any ``max``): where the range ends below its
    byte's top (255 for codes from 0 on, 127 for signed ones)."""
    return hi < (255 if lo >= 0 else 127)


@triton.constexpr_function
def floor_sat_asm(lo):
    """``SAT``'s conversion: to u8 for codes from 0 on, else to s8 (the PTX, for
    ``inline_asm_elementwise``)."""
    return (FLOOR_SAT_U8 if lo >= 0 else FLOOR_SAT_S8).value


@triton.constexpr_function
def relu_kept(relu, sat, lo):
    """Whether an epilogue still applies its ReLU: not before codes from 0 (``lo`` 0) made by
    ``SAT`` (``sat``: the codes are the result, no residual between). For ``y < 0``,
    ``y * inv_s + 0.5 < 0.5`` (``inv_s > 0``) floors to 0 or less, which saturates to 0, the code
    of ``relu(y) = 0``; NaN gives 0 both ways."""
    return relu and not (sat and lo == 0)


@triton.jit
def _requantize(y, inv_s, LO: tl.constexpr, HI: tl.constexpr, BY_ADD: tl.constexpr = False,
                SAT: tl.constexpr = False):
    """fp32 -> int32 codes: clamp(floor(y * inv_s + 0.5)), three separate fp32 operations.

    ``BY_ADD`` (compiled kernels only: inline PTX, which Triton's interpreter cannot run): the
    same codes without the GPU's conversion pipe (16 lanes a cycle per SM on Hopper), whose floor
    and float -> int conversion cost two of its instructions per value. ``t`` is clamped to
    ``[LO, HI]`` first (for integer bounds floor and clamp commute; NaN goes to ``LO`` either
    way), then added to ``1.5 * 2**23`` rounding toward minus infinity: the sum lies in
    ``[2**23, 2**24)``, where the floats are the integers, so its bits are ``0x4B400000 +
    floor(t)``. ``t`` is never subnormal (a sum with 0.5 is 0 or at least ``2**-25`` in magnitude),
    so the floor's flush of subnormals changes nothing. (The Gluon body conv's twin:
    ``body_conv_sm90._requantize``.)

    ``SAT`` (compiled kernels only, inline PTX), for codes in an 8-bit range (within 0..255 or
    -128..127; others as ``BY_ADD`` says): one conversion that floors and saturates to that byte's
    range (``cvt.rmi.sat.u8.f32`` / ``.s8``), after ``min(t, HI)`` where the range ends below the
    byte's top and, for signed codes, ``max(t, LO)`` before it: the conversion takes NaN to 0, the
    clamp's min/max to ``LO``; for codes from 0 that is 0 too, so they take no ``max``, and their
    ``min`` propagates NaN (``min.NaN.f32``: a plain ``min`` would take it to ``HI``). For
    integer bounds floor and clamp commute (``tests/test_epilogue_rounding.py`` checks the three
    sequences against each other on NaN, infinities and values at every integer and bound). Only the
    result's low ``8`` bits are the code (every caller masks or truncates to them; a signed
    conversion's upper bits are not promised)."""
    t = y * inv_s
    t = t + 0.5
    if SAT and floor_sat_applies(LO, HI):
        if floor_sat_max(LO, HI):
            t = tl.maximum(t, LO)
        if floor_sat_min(LO, HI):  # NaN stays NaN (min.NaN.f32), for the conversion to take to 0
            t = tl.minimum(t, HI, propagate_nan=tl.PropagateNan.ALL)
        return tl.inline_asm_elementwise(floor_sat_asm(LO), "=r,f", [t], dtype=tl.int32, is_pure=True, pack=1)
    if BY_ADD:
        t = tl.minimum(tl.maximum(t, LO), HI)
        bits = tl.inline_asm_elementwise(ROUND_DOWN_ADD, "=r,f", [t], dtype=tl.int32, is_pure=True, pack=1)
        return bits - MAGIC_BITS
    return tl.minimum(tl.maximum(tl.floor(t), LO), HI).to(tl.int32)


@triton.jit
def _to_float(acc, BY_ADD: tl.constexpr = False):
    """int32 -> fp32, rounded to nearest as ``.to``. ``BY_ADD`` (only for ``|acc| < 2**22``, which
    the launcher proves from the weights: ``ops.fp32_sums_by_add``): without the conversion pipe,
    as the bits ``0x4B400000 + acc`` (the float ``1.5 * 2**23 + acc``, exact in ``[2**23, 2**24)``)
    minus ``1.5 * 2**23``, an exact difference: ``acc`` itself, as the conversion gives it."""
    if BY_ADD:
        return (acc + MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC
    return acc.to(tl.float32)


@triton.jit
def _to_out_dtype(y, DTYPE: tl.constexpr):
    """fp32 -> the output dtype, rounded to nearest even as torch's ``.to`` does. bf16 is rounded
    on the bits (Triton's interpreter truncates fp32 -> bf16; the GPU would round either way)."""
    if DTYPE == tl.bfloat16:
        b = y.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(y != y, 0x7FC0, r)  # NaN stays a (quiet) NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(DTYPE)


@triton.jit
def _residual_tile(res_ptr, offs_m, m_ok, offs_n, n_ok, COUT):
    """The (BLOCK_M, BLOCK_N) tile of the (M, COUT) residual at pixels ``offs_m``, channels
    ``offs_n`` (0 where masked), as fp32 (an fp16 / bf16 stream converts exactly): read in the
    epilogue, or before the K loop (``RES_EARLY``)."""
    res = tl.load(res_ptr + offs_m[:, None] * COUT + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
    return res.to(tl.float32)


@triton.jit
def _epilogue(acc, offs_m, m_ok, offs_n, n_ok, px, keep, W, wsum_ptr, mult_ptr, bias_ptr, res_ptr, out_ptr, next_ptr,
              COUT, res_scale, inv_s_out, inv_s_next, A_BITS: tl.constexpr, A_SIGNED: tl.constexpr,
              RELU: tl.constexpr, HAS_RES: tl.constexpr, SCALE_RES: tl.constexpr, O_BITS: tl.constexpr,
              O_LO: tl.constexpr, O_HI: tl.constexpr, NEXT_BITS: tl.constexpr, NEXT_LO: tl.constexpr,
              NEXT_HI: tl.constexpr, SHUFFLE: tl.constexpr, ZERO_OUTSIDE: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, O_OFFSET: tl.constexpr = False, res=None, ROUND_ADD: tl.constexpr = False,
              I2F_ADD: tl.constexpr = False, ROUND_SAT: tl.constexpr = False):
    """int32 sums (BLOCK_M, BLOCK_N) of pixels ``offs_m`` (rows of the (M, COUT) result; ``px``
    their column in a W-wide image, for ``SHUFFLE``) -> the stored result (the conv kernels'
    docstrings). ``ZERO_OUTSIDE``: pixels where ``keep`` is false get value 0 (and code 0).
    ``O_OFFSET`` (8-bit codes): each stored byte is ``code ^ 0x80``, the code - 128 as a signed byte.
    ``res``: the (BLOCK_M, BLOCK_N) fp32 residual tile when the caller loaded it already (RES_EARLY).
    ``ROUND_ADD``, ``I2F_ADD``: codes and floats by adds instead of the conversion pipe
    (:func:`_requantize`, :func:`_to_float`; ``I2F_ADD`` only where every sum is below ``2**22``).
    ``ROUND_SAT``: codes by one saturating conversion each (:func:`_requantize`); before codes from
    0 without a residual the ReLU folds into it (:func:`relu_kept`)."""
    if A_BITS == 8 and not A_SIGNED:
        acc += 128 * tl.load(wsum_ptr + offs_n, mask=n_ok, other=0)[None, :]
    y = _to_float(acc, I2F_ADD) * tl.load(mult_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    y = y + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if relu_kept(RELU, ROUND_SAT and O_BITS > 0 and not HAS_RES, O_LO):
        y = tl.maximum(y, 0.0)
    mn_ok = m_ok[:, None] & n_ok[None, :]
    nhwc = offs_m[:, None] * COUT + offs_n[None, :]  # (pixel, channel) offsets of an unshuffled (M, COUT) tensor
    if HAS_RES:
        if SCALE_RES:
            y = y * res_scale
        if res is None:
            res = _residual_tile(res_ptr, offs_m, m_ok, offs_n, n_ok, COUT)
        y = res + y
    if ZERO_OUTSIDE:
        y = tl.where(keep[:, None], y, 0.0)
    if SHUFFLE > 1:  # pixel (n, py, px), channel (i*r + j)*CQ + c -> (n, py*r + i, px*r + j), channel c
        CQ = COUT // (SHUFFLE * SHUFFLE)
        sub = offs_n // CQ
        out_row = ((offs_m // W) * SHUFFLE)[:, None] + (sub // SHUFFLE)[None, :]  # (n*H + py)*r + i
        out_col = (px * SHUFFLE)[:, None] + (sub % SHUFFLE)[None, :]
        dst = (out_row * (W * SHUFFLE) + out_col) * CQ + (offs_n % CQ)[None, :]
    else:
        dst = nhwc
    if O_BITS == 0:
        stored = _to_out_dtype(y, out_ptr.dtype.element_ty)
        tl.store(out_ptr + dst, stored, mask=mn_ok)
        if NEXT_BITS > 0:  # the next conv's packed input codes, of the values as stored (fp16 / bf16: rounded)
            if out_ptr.dtype.element_ty != tl.float32:
                y = stored.to(tl.float32)
            NCP: tl.constexpr = BLOCK_N * NEXT_BITS // 8
            codes = _pack_tile(_requantize(y, inv_s_next, NEXT_LO, NEXT_HI, ROUND_ADD, ROUND_SAT), BLOCK_M, BLOCK_N,
                               NEXT_BITS)
            offs_nb = tl.arange(0, NCP)
            tl.store(next_ptr + offs_m[:, None] * NCP + offs_nb[None, :], codes.to(tl.uint8), mask=m_ok[:, None])
    elif SHUFFLE > 1:  # 8-bit codes: one byte per channel, no packing across the channels the shuffle separates
        codes = _requantize(y, inv_s_out, O_LO, O_HI, ROUND_ADD, ROUND_SAT) & 0xFF
        tl.store(out_ptr + dst, codes.to(tl.uint8), mask=mn_ok)
    else:  # re-quantize and pack; the launcher guarantees BLOCK_N == COUT
        OCP: tl.constexpr = BLOCK_N * O_BITS // 8
        packed = _pack_tile(_requantize(y, inv_s_out, O_LO, O_HI, ROUND_ADD, ROUND_SAT), BLOCK_M, BLOCK_N, O_BITS)
        if O_OFFSET:
            packed = packed ^ 0x80
        offs_b = tl.arange(0, OCP)
        tl.store(out_ptr + offs_m[:, None] * OCP + offs_b[None, :], packed.to(tl.uint8), mask=m_ok[:, None])


@triton.jit
def _tile_indices(pid_m, pid_n, M, H, W, COUT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """A (pid_m, pid_n) tile of an (M pixels of H x W images, COUT) result: its pixel rows and
    channels, their bounds masks, each pixel's column and row in its image, and the K-step lanes."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < COUT, offs_m % W, (offs_m // W) % H, tl.arange(0, BLOCK_K)


@triton.jit
def _packed_conv3x3_kernel(
    x_ptr, w_ptr, wsum_ptr, mult_ptr, bias_ptr, res_ptr, out_ptr, next_ptr, items_ptr,
    M, H, W, COUT, stride_wg, stride_wk, stride_wn, res_scale, inv_s_out, inv_s_next,
    C: tl.constexpr, A_BITS: tl.constexpr, A_SIGNED: tl.constexpr,
    RELU: tl.constexpr, HAS_RES: tl.constexpr, SCALE_RES: tl.constexpr,
    O_BITS: tl.constexpr, O_LO: tl.constexpr, O_HI: tl.constexpr,
    NEXT_BITS: tl.constexpr, NEXT_LO: tl.constexpr, NEXT_HI: tl.constexpr, SHUFFLE: tl.constexpr,
    A_L1: tl.constexpr, SKIP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, RES_EARLY: tl.constexpr, ROUND_ADD: tl.constexpr, I2F_ADD: tl.constexpr,
    ROUND_SAT: tl.constexpr,
):
    """One (BLOCK_M pixels, BLOCK_N output channels) tile. Outputs, by constexpr:

    * ``O_BITS == 0``: the fp32 epilogue values, stored in ``out_ptr``'s dtype (fp32, or fp16 /
      bf16 rounded to nearest even); with ``NEXT_BITS`` also the packed codes of the next
      quantizer in ``next_ptr`` (``quantize_pack`` of the stored result, fused; needs BLOCK_N ==
      COUT). The residual (``HAS_RES``) may be fp32, fp16 or bf16; it is added in fp32.
    * ``O_BITS > 0``: re-quantized codes, packed (BLOCK_N == COUT).
    * ``SHUFFLE == r > 1``: stored pixel-shuffled, (N, rH, rW, COUT / r^2), output channels read
      sub-pixel major (channel (i*r + j) * COUT/r^2 + c goes to sub-pixel (i, j), channel c);
      fp outputs or 8-bit codes.

    Weight element (group i, packed row k, output channel o) is at ``w_ptr + i*stride_wg +
    k*stride_wk + o*stride_wn``. The prepared layout is K-contiguous (``stride_wk == 1``, which
    Triton specialises to a constant): wgmma takes 8-bit B operands K-major only, so such tiles go
    to shared memory by cp.async as they are, pipelined; N-contiguous tiles were loaded into
    registers and stored transposed, byte by byte, every K step.

    ``A_L1`` (K steps inside one tap): activation tiles come by 8-byte ``cp.async.ca``, which
    caches in L1, instead of 16-byte ``cp.async.cg``, which bypasses it (the only cache mode of a
    16-byte copy in Triton 3.6). The 9 taps of a tile read mostly the same input bytes, so with L1
    most of them need not come from L2 again; the price is twice the copy instructions.

    ``RES_EARLY`` (with ``HAS_RES``): the tile's fp32 residual is loaded before the K loop, so its
    read overlaps the MMAs instead of stalling the epilogue (an autotuning option: ops.TUNE_CONFIGS).

    ``ROUND_ADD``, ``I2F_ADD``: the epilogue's codes and floats by adds instead of the conversion
    pipe (:func:`_requantize`, :func:`_to_float`; compiled kernels only; ``I2F_ADD`` only where the
    weights bound every sum below ``2**22``: ``ops.fp32_sums_by_add``). ``ROUND_SAT``: its 8-bit
    codes by one saturating conversion each (compiled kernels only; :func:`_epilogue`).

    ``SKIP_PAD``: only the first ``items_ptr[0]`` of the N images need results (a CUDA graph
    captured for a padded batch, replayed for fewer images); programs whose row tile starts past
    them return at once, leaving those rows unwritten. An image's taps never reach another image,
    so the rows that are computed are exact.
    """
    GROUPS: tl.constexpr = 8 // A_BITS
    CP: tl.constexpr = C // GROUPS  # packed bytes per pixel
    KK: tl.constexpr = 9 * CP  # packed bytes per 3x3 window (the real K of each group's MMA)
    # K-step shape: one tap (BLOCK_K divides CP), several whole taps (CP divides BLOCK_K), or general.
    MODE: tl.constexpr = 1 if CP % BLOCK_K == 0 else (2 if BLOCK_K % CP == 0 else 0)
    TPS: tl.constexpr = BLOCK_K // CP if MODE == 2 else 1  # taps per K step
    STEPS: tl.constexpr = (9 + TPS - 1) // TPS if MODE == 2 else (KK + BLOCK_K - 1) // BLOCK_K

    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if SKIP_PAD:
        if pid_m * BLOCK_M >= tl.load(items_ptr) * H * W:
            return
    offs_m, offs_n, m_ok, n_ok, px, py, kr = _tile_indices(pid_m, pid_n, M, H, W, COUT, BLOCK_M, BLOCK_N, BLOCK_K)

    res = None
    if HAS_RES and RES_EARLY:
        res = _residual_tile(res_ptr, offs_m, m_ok, offs_n, n_ok, COUT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for step in range(STEPS):
        kk = step * BLOCK_K + kr  # packed-byte index within the 3x3 window
        if MODE == 1:
            tap = (step * BLOCK_K) // CP
            dy = tap // 3 - 1
            dx = tap % 3 - 1
            ok = m_ok & (py + dy >= 0) & (py + dy < H) & (px + dx >= 0) & (px + dx < W)
            VEC: tl.constexpr = 8 if A_L1 else BLOCK_K  # contiguity the copies may use
            row = tl.multiple_of((offs_m + dy * W + dx) * CP, 8 if A_L1 else 16)
            col = tl.max_contiguous(tl.multiple_of((step * BLOCK_K) % CP + kr, VEC), VEC)
            a_off = row[:, None] + col[None, :]
            a_ok = ok[:, None]
        elif MODE == 2:
            a_off = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.int32)
            a_ok = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.int1)
            for s in tl.static_range(TPS):
                tap = step * TPS + s
                dy = tap // 3 - 1
                dx = tap % 3 - 1
                ok = m_ok & (py + dy >= 0) & (py + dy < H) & (px + dx >= 0) & (px + dx < W) & (tap < 9)
                sel = (kr // CP == s)[None, :]
                a_off = tl.where(sel, ((offs_m + dy * W + dx) * CP)[:, None] + (kr % CP)[None, :], a_off)
                a_ok = tl.where(sel, ok[:, None], a_ok)
        else:
            tap = kk // CP
            dy = (tap // 3 - 1)[None, :]
            dx = (tap % 3 - 1)[None, :]
            yy = py[:, None] + dy
            xx = px[:, None] + dx
            a_ok = m_ok[:, None] & (tap < 9)[None, :] & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            a_off = (offs_m[:, None] + dy * W + dx) * CP + (kk % CP)[None, :]
        # Signed 8-bit codes loaded as int8 are the MMA operand as they are: the tile can stay in shared memory.
        a_ptr = x_ptr.to(tl.pointer_type(tl.int8)) if A_BITS == 8 and A_SIGNED else x_ptr
        if A_L1 and MODE == 1:
            raw = tl.load(a_ptr + a_off, mask=a_ok, other=0, cache_modifier=".ca")
        else:
            raw = tl.load(a_ptr + a_off, mask=a_ok, other=0)
        w_ok = (kk < KK)[:, None] & n_ok[None, :]
        w_off = kk[:, None] * stride_wk + offs_n[None, :] * stride_wn
        for i in tl.static_range(GROUPS):
            a = _unpack_group(raw, i, A_BITS, A_SIGNED)
            w = tl.load(w_ptr + i * stride_wg + w_off, mask=w_ok, other=0)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)

    _epilogue(acc, offs_m, m_ok, offs_n, n_ok, px, m_ok, W, wsum_ptr, mult_ptr, bias_ptr, res_ptr, out_ptr,
              next_ptr, COUT, res_scale, inv_s_out, inv_s_next, A_BITS=A_BITS, A_SIGNED=A_SIGNED, RELU=RELU,
              HAS_RES=HAS_RES, SCALE_RES=SCALE_RES, O_BITS=O_BITS, O_LO=O_LO, O_HI=O_HI, NEXT_BITS=NEXT_BITS,
              NEXT_LO=NEXT_LO, NEXT_HI=NEXT_HI, SHUFFLE=SHUFFLE, ZERO_OUTSIDE=False, BLOCK_M=BLOCK_M,
              BLOCK_N=BLOCK_N, res=res, ROUND_ADD=ROUND_ADD, I2F_ADD=I2F_ADD, ROUND_SAT=ROUND_SAT)


@triton.jit
def _padded_conv3x3_tma_kernel(
    x_desc, w_desc, wsum_ptr, mult_ptr, bias_ptr, res_ptr, out_ptr, next_ptr,
    M, H, W, COUT, res_scale, inv_s_out, inv_s_next,
    C: tl.constexpr, A_SIGNED: tl.constexpr, A_OFFSET: tl.constexpr,
    RELU: tl.constexpr, HAS_RES: tl.constexpr, SCALE_RES: tl.constexpr,
    O_BITS: tl.constexpr, O_LO: tl.constexpr, O_HI: tl.constexpr, O_OFFSET: tl.constexpr,
    NEXT_BITS: tl.constexpr, NEXT_LO: tl.constexpr, NEXT_HI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PERSISTENT: tl.constexpr,
    ROUND_ADD: tl.constexpr, I2F_ADD: tl.constexpr, ROUND_SAT: tl.constexpr,
):
    """The conv of :func:`_packed_conv3x3_kernel` on 8-bit codes in the *padded layout*: every image
    is stored with a one-pixel zero ring, (N, H + 2, W + 2, C), and so is the result.

    Tap (dy, dx) of the pixel at flat padded index p reads pixel p + dy * (W + 2) + dx, inside
    the image or on its zero ring, so each K step is one (BLOCK_M, BLOCK_K) box of the
    (M = N * (H + 2) * (W + 2), C) codes at a shifted row: a TMA copy (``x_desc``; rows outside
    [0, M) read zeros) with no per-pixel address or mask work, which wgmma reads from shared memory
    as it landed (signed codes). ``w_desc`` tiles the prepared weights (1, Cout, 9 * C), K-major.

    Ring pixels are computed too (4% more work for 96 x 96 patches) and stored as value 0 (code 0),
    so the result is again a padded input. 8-bit containers only (``C``, the bytes per pixel, a
    multiple of ``BLOCK_K``); no pixel shuffle.

    Offset codes: unsigned 8-bit codes stored as ``code ^ 0x80`` (code - 128 in a signed byte; the
    ring then holds 0x80, code 0). ``O_OFFSET`` stores the result's codes so, ``A_OFFSET`` reads
    the input's (unsigned) codes so: as signed bytes, which wgmma takes from shared memory as they
    landed, where plain unsigned codes need ``^ 0x80`` in registers first. The epilogue's
    ``128 * sum(w)`` correction is the same either way. TMA's zero fill (rows outside [0, M)) is
    read only by ring pixels, whose results are discarded, so it never stands for a code.

    ``PERSISTENT``: each program walks row tiles ``program_id(0) + i * num_programs(0)`` in one
    flattened loop, so Triton's pipeliner issues the next tile's first copies during this tile's
    epilogue (9 K steps per tile at C = 64 leave little loop to hide a pipeline fill in);
    otherwise one tile per program. ``ROUND_ADD``, ``I2F_ADD``, ``ROUND_SAT``: as
    :func:`_packed_conv3x3_kernel`'s.
    """
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0), flatten=True):
            _padded_tile(tile, x_desc, w_desc, wsum_ptr, mult_ptr, bias_ptr, res_ptr, out_ptr, next_ptr, M, H, W, COUT,
                         res_scale, inv_s_out, inv_s_next, C, A_SIGNED, A_OFFSET, RELU, HAS_RES, SCALE_RES, O_BITS,
                         O_LO, O_HI, O_OFFSET, NEXT_BITS, NEXT_LO, NEXT_HI, BLOCK_M, BLOCK_N, BLOCK_K, ROUND_ADD,
                         I2F_ADD, ROUND_SAT)
    else:
        _padded_tile(tl.program_id(0), x_desc, w_desc, wsum_ptr, mult_ptr, bias_ptr, res_ptr, out_ptr, next_ptr, M, H,
                     W, COUT, res_scale, inv_s_out, inv_s_next, C, A_SIGNED, A_OFFSET, RELU, HAS_RES, SCALE_RES,
                     O_BITS, O_LO, O_HI, O_OFFSET, NEXT_BITS, NEXT_LO, NEXT_HI, BLOCK_M, BLOCK_N, BLOCK_K, ROUND_ADD,
                     I2F_ADD, ROUND_SAT)


@triton.jit
def _padded_tile(tile, x_desc, w_desc, wsum_ptr, mult_ptr, bias_ptr, res_ptr, out_ptr, next_ptr, M, H, W, COUT,
                 res_scale, inv_s_out, inv_s_next, C: tl.constexpr, A_SIGNED: tl.constexpr, A_OFFSET: tl.constexpr,
                 RELU: tl.constexpr, HAS_RES: tl.constexpr, SCALE_RES: tl.constexpr, O_BITS: tl.constexpr,
                 O_LO: tl.constexpr, O_HI: tl.constexpr, O_OFFSET: tl.constexpr, NEXT_BITS: tl.constexpr,
                 NEXT_LO: tl.constexpr, NEXT_HI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, ROUND_ADD: tl.constexpr, I2F_ADD: tl.constexpr, ROUND_SAT: tl.constexpr):
    """Row tile ``tile`` x channel tile ``program_id(1)`` of :func:`_padded_conv3x3_tma_kernel`."""
    STEPS_PER_TAP: tl.constexpr = C // BLOCK_K
    WP = W + 2
    p0 = tile * BLOCK_M
    n0 = tl.program_id(1) * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for step in range(9 * STEPS_PER_TAP):
        tap = step // STEPS_PER_TAP
        k0 = (step % STEPS_PER_TAP) * BLOCK_K
        raw = x_desc.load([p0 + (tap // 3 - 1) * WP + (tap % 3 - 1), k0])
        a = _unpack_group(raw, 0, 8, A_SIGNED or A_OFFSET)  # offset codes are the MMA operand as loaded
        w = w_desc.load([0, n0, tap * C + k0]).reshape(BLOCK_N, BLOCK_K)
        acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)

    offs_m = p0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    px = offs_m % WP
    py = (offs_m // WP) % (H + 2)
    inside = (px >= 1) & (px <= W) & (py >= 1) & (py <= H)
    _epilogue(acc, offs_m, m_ok, offs_n, offs_n < COUT, px, inside, WP, wsum_ptr, mult_ptr, bias_ptr, res_ptr,
              out_ptr, next_ptr, COUT, res_scale, inv_s_out, inv_s_next, A_BITS=8, A_SIGNED=A_SIGNED, RELU=RELU,
              HAS_RES=HAS_RES, SCALE_RES=SCALE_RES, O_BITS=O_BITS, O_LO=O_LO, O_HI=O_HI, NEXT_BITS=NEXT_BITS,
              NEXT_LO=NEXT_LO, NEXT_HI=NEXT_HI, SHUFFLE=1, ZERO_OUTSIDE=True, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
              O_OFFSET=O_OFFSET, ROUND_ADD=ROUND_ADD, I2F_ADD=I2F_ADD, ROUND_SAT=ROUND_SAT)


@triton.jit
def _quantize_pack_kernel(x_ptr, out_ptr, M, inv_s, C: tl.constexpr, BITS: tl.constexpr,
                          LO: tl.constexpr, HI: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, C)
    m_ok = offs_m < M
    x = tl.load(x_ptr + offs_m[:, None] * C + offs_c[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
    packed = _pack_tile(_requantize(x, inv_s, LO, HI), BLOCK_M, C, BITS)
    CP: tl.constexpr = C * BITS // 8
    offs_b = tl.arange(0, CP)
    tl.store(out_ptr + offs_m[:, None] * CP + offs_b[None, :], packed.to(tl.uint8), mask=m_ok[:, None])


@triton.jit
def _unpack_kernel(x_ptr, out_ptr, M, C: tl.constexpr, BITS: tl.constexpr, SIGNED: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    CP: tl.constexpr = C * BITS // 8
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, C)
    m_ok = offs_m < M
    raw = tl.load(x_ptr + offs_m[:, None] * CP + (offs_c % CP)[None, :], mask=m_ok[:, None], other=0).to(tl.int32)
    group = (offs_c // CP)[None, :]
    if BITS == 8:
        v = raw
        if SIGNED:
            v = (raw << 24) >> 24
    else:
        if SIGNED:
            v = (raw << (32 - BITS * (group + 1))) >> (32 - BITS)
        else:
            v = (raw >> (BITS * group)) & ((1 << BITS) - 1)
    tl.store(out_ptr + offs_m[:, None] * C + offs_c[None, :], v.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])
