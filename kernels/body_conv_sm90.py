"""The residual body's 64 -> 64 packed conv on Hopper (sm_90) as a Gluon kernel: tap tiles by TMA,
weights resident in shared memory, asynchronous int8 wgmma, persistent programs. Bit-exact with
:func:`gdq_engine.ops.reference.packed_conv3x3` and the flat Triton kernel (``conv3x3.py``).

Why a second kernel. Compiled by Triton (3.6 and 3.9), the flat kernel's int8 MMA is synchronous:
Triton's pipeliner makes a ``warp_group_dot`` asynchronous only for fp32 accumulators, so every K
step waits for its MMA before it issues the next copies. And each 128-pixel tile reads its 9
shifted 8 KB activation tiles plus the 36 KB of weights from L2 (108 KB per tile). Gluon, Triton's
lower-level language, states the schedule instead:

* **Tile**: 8 rows x 16 columns of one image, 128 output pixels; row ``r`` of the MMA is pixel
  ``(y0 + r // 16, x0 + r % 16)``. Tap ``(dy, dx)`` is one TMA box of the codes, (1, 8, 16, 64) at
  ``(image, y0 + dy - 1, x0 + dx - 1, 0)``; outside the image TMA fills zeros, which is the conv's
  zero padding (code 0).
* **Ring**: the boxes go through ``STAGES`` shared-memory stages of 8 KB, each with an mbarrier;
  copies run ``STAGES - 1`` taps ahead, across tile boundaries.
* **Weights** (9 taps of 64 x 64, K-major, 36 KB) are copied once per program and stay.
* **MMA**: each tap's ``wgmma`` is issued asynchronously on the one accumulator; waiting until at
  most one is in flight frees the previous tap's stage for the next copy.
* **Persistent programs** (``SM90_PER_SM`` per SM) walk the tiles ``program_id + i * programs``.
* **Warp-specialized twin** (``_body_conv_sm90_ws_kernel``, the default: ``ops.SM90_WS``): one
  producer warp issues the copies, the MMA warpgroup only waits on them, multiplies and stores;
  ``empty`` barriers hand the stages back. Its conv1 (8-bit codes, no residual) skips the row
  layout: the codes go from the MMA layout into one shared-memory box and out by a TMA store.
  Its conv2 on an fp16 stream (``TMA_RES``; on by default since the eleventh H100 run:
  ``ops.SM90_TMA_RES``) has the producer load the tile's residual box; the epilogue reads it in
  the MMA layout, writes the new stream over it and the next codes into another box, and both
  leave by TMA stores.

Signed codes feed the MMA from shared memory as they landed. Unsigned 8-bit codes (0..255) are
read into registers and flipped there (``^ 0x80``: code - 128, as the flat kernel does), with
``128 * sum(w)`` added back in the epilogue. (wgmma multiplies u8 by s8, but Triton lowers a u8
operand as s8.) The twin's ``A_REGS`` takes signed codes through registers too, unflipped
(``ops.SM90_A_REGS``, an A/B switch): on the twelfth run (H200) conv2 + next codes on the fp16
stream took 1.05x as long with signed codes (a4 one per byte, from shared memory) as with unsigned
ones (a8, registers).

The epilogue is ``conv3x3._epilogue``'s for 8-bit containers without a pixel shuffle: per-channel
multiplier and bias, ReLU, residual (fp32 / fp16 / bf16, ``res_scale``), then 8-bit codes or an
fp32 / fp16 result, optionally with the next conv's 8-bit codes; the same sequence of separate
fp32 operations (compiled without FMA contraction). ``EPI_ROWS`` first moves the sums from the MMA
layout (2 adjacent channels per thread) to rows of 8 channels per thread: 8-32 byte accesses.

* **Conversions by adds** (``ROUND_ADD``, ``I2F_ADD``, the twin only; on by default since the tenth
  H100 run: ``ops.SM90_CVT_ADD``): Hopper's conversion pipe (XU) runs 16 lanes a cycle per SM,
  an eighth of the fp32 pipe, and the epilogue spent three of its instructions per value (int ->
  float, floor, float -> int): 24,576 a tile, about 1,500 cycles of an SM. The codes come from a
  clamp and one add rounding toward minus infinity (:func:`_requantize`), the floats, where the
  weights bound every sum below ``2**22``, from an integer add and an fp32 subtraction
  (:func:`_to_float`): the same bits by construction.
* **8-bit codes by one saturating conversion** (``ROUND_SAT``, the twin only; by default since the
  eleventh H100 run on every conv but those writing an fp16 stream, where it measured slower:
  ``ops.SM90_CVT_SAT``, ``ops.sm90_cvt_sat_applies``): each code by one
  ``cvt.rmi.sat.u8.f32`` (conv1's, 0..255 after its ReLU, which folds into it) or ``max`` and
  ``cvt.rmi.sat.s8.f32`` (the next codes, signed) instead of a floor, two clamps and a conversion
  (:func:`_requantize`, ``conv3x3.relu_kept``): the same codes.
* **Output-channel groups** (``OUT_GROUPS``, ``SHUFFLE``, the twin only; on by default since the
  tenth H100 run: ``ops.SM90_UP``): the upsampler's 64 -> 64 r^2 convs as r^2 groups of 64 output
  channels, one a program (the grid's second axis), each group a sub-pixel of the pixel-shuffled
  output.
* **Halo boxes** (``HALO``, the twin only; on by default since the tenth H100 run where this
  Triton builds them: ``ops.SM90_HALO``):
  each tile's input as 3 boxes, one per column offset ``dx``, of ``HALO_ROWS`` image rows (the
  tile's 8 and one above and below: an 8-row and a 2-row TMA copy), 30 KB a tile instead of 9 tap
  boxes' 72; tap ``(dy, dx)`` is the 128-row view ``dy`` image rows (1 KB each, a multiple of the
  64-byte swizzle's 512-byte period) into its box. Gluon's subviews must start at a multiple of
  their own size, so the view is the ring's row ``dy`` reinterpreted past its own extent: Triton
  3.6's ``_reinterpret`` does that (:data:`HALO_VIEWS`); 3.9 refuses it.

Gluon kernels do not run in Triton's CPU interpreter: this kernel is checked bit-exactly on GPU
sessions (``tests/test_body_conv_sm90.py``) and compiled for sm_90 on any machine
(``python -m gdq_engine.kernels.body_conv_sm90``, run by the same test file in CI).
"""

from __future__ import annotations

import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .conv3x3 import (
    FLOOR_SAT_PTX,
    MAGIC,
    MAGIC_BITS,
    ROUND_DOWN_ADD,
    ROUND_DOWN_ADD_PTX,
    floor_sat_applies,
    floor_sat_asm,
    floor_sat_max,
    floor_sat_min,
    relu_kept,
)

# Triton 3.9 renamed the TMA copy into shared memory (3.6: async_copy_global_to_shared).
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global  # and back

TILE_H, TILE_W = 8, 16  # output pixels per tile (the kernel's box; C = Cout = 64)
# The layouts of a tile's (128, 64) sums: the MMA's (one warpgroup, m64n64k32 wgmmas), unsigned
# codes as its register A operand, and rows of 8 channels of a pixel per thread (EPI_ROWS)
_MMA_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 32]))
_A_REGS = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=_MMA_LAYOUT.value, k_width=4))
_EPI_LAYOUT = gl.constexpr(gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1],
                                            order=[1, 0]))
# The halo ring (HALO): image rows of 16 pixels x 64 bytes (1 KB each, 64-byte swizzled like the tap
# boxes, so a view may start at any row), HALO_ROWS of them a box.
HALO_ROWS = gl.constexpr(TILE_H + 2)  # the tile's 8 rows, one above and one below
_HALO_RING = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=8, rank=2))
# the 8-bit codes' TMA boxes (1, 8, 16, 64) and (1, 2, 16, 64): the launcher's descriptors use it too
_BOX_LAYOUT = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=8, rank=4))
# A tap's MMA operand starts 0, 1 or 2 rows into a box and spans 8 rows, past the 1 KB view that
# indexing the ring gives. Triton 3.6's Gluon reinterprets a view past its extent (`_reinterpret`);
# 3.9's refuses ("result shared-memory footprint exceeds the source view") and has no other way to
# start a 128-row operand 16 or 32 rows into a buffer, so the halo needs the former.
HALO_VIEWS = hasattr(gl.shared_memory_descriptor, "_reinterpret")


@gluon.jit
def _tiles(N, H, W, items_ptr, SKIP_PAD: gl.constexpr):
    """(tiles per row of an image, tiles per image, tiles to compute) for (N, H, W) images in
    8 x 16-pixel tiles; ``SKIP_PAD``: only the first ``items_ptr[0]`` images are computed."""
    tiles_x = gl.cdiv(W, 16)
    per_image = tiles_x * gl.cdiv(H, 8)
    images = N
    if SKIP_PAD:
        images = gl.minimum(gl.load(items_ptr), N)
    return tiles_x, per_image, images * per_image


@gluon.jit
def _tile_origin(tile, tiles_x, per_image):
    """(image, first row, first column) of tile number ``tile`` (:func:`_tiles`' counts)."""
    rest = tile % per_image
    return tile // per_image, (rest // tiles_x) * 8, (rest % tiles_x) * 16


@gluon.jit
def _issue_tap(x_desc, ring, bars, load, pid, step, tiles_x, per_image, total, STAGES: gl.constexpr):
    """Start copy number ``load`` of this program (tap ``load % 9`` of its ``load // 9``-th tile)
    into stage ``load % STAGES`` of ``ring``, completing on that stage's barrier; nothing past the
    program's last tile."""
    tile = pid + (load // 9) * step
    tap = load % 9
    img, y0, x0 = _tile_origin(tile, tiles_x, per_image)
    y = y0 + tap // 3 - 1
    x = x0 + tap % 3 - 1
    s = load % STAGES
    ok = tile < total
    mbarrier.expect(bars.index(s), 128 * 64, ok)
    _tma_load(x_desc, [img, y, x, 0], bars.index(s), ring.index(s), pred=ok)


@gluon.jit
def _issue_weights(w_desc, w_smem, wbar, row0=0):
    """Start the copies of the 9 taps' (64, 64) weights of output channels ``row0 .. row0 + 63``
    into ``w_smem``, completing on ``wbar``."""
    mbarrier.expect(wbar, 9 * 64 * 64)
    for t in gl.static_range(9):
        _tma_load(w_desc, [row0, t * 64], wbar, w_smem.index(t))


@gluon.jit
def _halo_view(ring, row, shape: gl.constexpr, layout: gl.constexpr):
    """The view of the halo ``ring`` from its image row ``row`` on, as ``shape`` in ``layout``
    (past the row's own 1 KB: :data:`HALO_VIEWS`)."""
    return ring.index(row)._reinterpret(gl.int8, shape, layout)


@gluon.jit
def _tap_mma(a_smem, w_tap, acc, A_SIGNED: gl.constexpr, IN_FLIGHT: gl.constexpr = 1, A_REGS: gl.constexpr = False):
    """One tap's wgmma on ``acc``, issued asynchronously; returns once at most ``IN_FLIGHT`` taps'
    (this one's and those before it) are in flight. ``a_smem``: the tap's codes, a (128, 64) view of
    shared memory; ``w_tap``: its (64, 64) K-major weights. Signed codes are read from shared
    memory as they landed (``A_REGS``: loaded into registers first); unsigned ones go through
    registers (``_A_REGS``), flipped there (ptxas keeps the in-flight MMAs' registers apart:
    :func:`register_hazards`)."""
    if A_SIGNED and not A_REGS:
        acc = warpgroup_mma(a_smem, w_tap.permute((1, 0)), acc, is_async=True)
    else:
        a = a_smem.load(_A_REGS)
        if not A_SIGNED:
            a = a ^ -128
        acc = warpgroup_mma(a, w_tap.permute((1, 0)), acc, is_async=True)
    return warpgroup_mma_wait(num_outstanding=IN_FLIGHT, deps=(acc,))


@gluon.jit
def _requantize(y, inv_s, LO: gl.constexpr, HI: gl.constexpr, BY_ADD: gl.constexpr = False,
                SAT: gl.constexpr = False):
    """fp32 -> int32 codes: clamp(floor(y * inv_s + 0.5)), three separate fp32 operations (the
    Gluon twin of ``conv3x3._requantize``: a Gluon kernel calls Gluon functions only). ``BY_ADD``:
    the same codes without the conversion pipe, ``t`` clamped and then added to ``1.5 * 2**23``
    rounding toward minus infinity; ``SAT``: one saturating floor conversion (the proofs:
    ``conv3x3._requantize``; only the result's low byte is the code, which every caller keeps)."""
    t = y * inv_s
    t = t + 0.5
    if SAT and floor_sat_applies(LO, HI):
        if floor_sat_max(LO, HI):
            t = gl.maximum(t, LO)
        if floor_sat_min(LO, HI):  # NaN stays NaN (min.NaN.f32), for the conversion to take to 0
            t = gl.minimum(t, HI, propagate_nan=tl.PropagateNan.ALL)
        return gl.inline_asm_elementwise(floor_sat_asm(LO), "=r,f", [t], dtype=gl.int32, is_pure=True, pack=1)
    if BY_ADD:
        t = gl.minimum(gl.maximum(t, LO), HI)
        bits = gl.inline_asm_elementwise(ROUND_DOWN_ADD, "=r,f", [t], dtype=gl.int32, is_pure=True, pack=1)
        return bits - MAGIC_BITS
    return gl.minimum(gl.maximum(gl.floor(t), LO), HI).to(gl.int32)


@gluon.jit
def _to_float(acc, BY_ADD: gl.constexpr = False):
    """int32 -> fp32 as ``.to``; ``BY_ADD`` (only for ``|acc| < 2**22``: ``ops.fp32_sums_by_add``)
    without the conversion pipe (the Gluon twin of ``conv3x3._to_float``, with the proof)."""
    if BY_ADD:
        return (acc + MAGIC_BITS).to(gl.float32, bitcast=True) - MAGIC
    return acc.to(gl.float32)


@gluon.jit
def _dequantize(acc, wsum_ptr, mult_ptr, bias_ptr, A_SIGNED: gl.constexpr, RELU: gl.constexpr, layout: gl.constexpr,
                I2F_ADD: gl.constexpr = False):
    """int32 sums (128, 64) in ``layout`` -> fp32: ``128 * sum(w)`` added back for unsigned codes,
    times the channels' multipliers, plus their biases, ReLU; separate fp32 operations, in
    ``conv3x3._epilogue``'s order (``I2F_ADD``: :func:`_to_float`'s ``BY_ADD``)."""
    ch = gl.arange(0, 64, layout=gl.SliceLayout(0, layout))
    if not A_SIGNED:  # the MMA took code - 128: add 128 * sum(w) back
        acc += 128 * gl.load(wsum_ptr + ch)[None, :]
    yv = _to_float(acc, I2F_ADD) * gl.load(mult_ptr + ch)[None, :]
    yv = yv + gl.load(bias_ptr + ch)[None, :]
    if RELU:
        yv = gl.maximum(yv, 0.0)
    return yv


@gluon.jit
def _body_epilogue(acc, tile, tiles_x, per_image, H, W, wsum_ptr, mult_ptr, bias_ptr, res_ptr, out_ptr, next_ptr,
                   res_scale, inv_s_out, inv_s_next, A_SIGNED: gl.constexpr, RELU: gl.constexpr, HAS_RES: gl.constexpr,
                   SCALE_RES: gl.constexpr, O_BITS: gl.constexpr, O_LO: gl.constexpr, O_HI: gl.constexpr,
                   NEXT_BITS: gl.constexpr, NEXT_LO: gl.constexpr, NEXT_HI: gl.constexpr, EPI_ROWS: gl.constexpr,
                   ROUND_ADD: gl.constexpr = False, I2F_ADD: gl.constexpr = False, grp=0,
                   OUT_GROUPS: gl.constexpr = 1, SHUFFLE: gl.constexpr = 1, ROUND_SAT: gl.constexpr = False):
    """int32 sums (128, 64) of ``tile`` in the MMA's layout -> the stored result, by masked stores;
    ``EPI_ROWS``: from rows of 8 channels per thread (the sums moved there through shared memory:
    8-32 byte accesses instead of the MMA layout's 2-8). ``ROUND_ADD``, ``I2F_ADD``: codes and
    floats without the conversion pipe (:func:`_requantize`, :func:`_to_float`). The sums are
    output channels ``64 * grp ..`` of ``64 * OUT_GROUPS`` (the per-channel pointers already
    offset to them); ``SHUFFLE == r > 1`` (``OUT_GROUPS == r * r``, no residual, no next codes):
    stored pixel-shuffled, group ``grp`` being sub-pixel ``(grp // r, grp % r)`` of every
    (N, rH, rW, 64) output pixel (``conv3x3._epilogue``'s sub-pixel-major channels). ``ROUND_SAT``:
    8-bit codes by one saturating conversion each, the ReLU folded into it before codes from 0
    (:func:`_requantize`, ``conv3x3.relu_kept``)."""
    layout: gl.constexpr = _EPI_LAYOUT if EPI_ROWS else _MMA_LAYOUT
    if EPI_ROWS:
        acc = gl.convert_layout(acc, _EPI_LAYOUT)
    img, y0, x0 = _tile_origin(tile, tiles_x, per_image)
    r = gl.arange(0, 128, layout=gl.SliceLayout(1, layout))
    y = y0 + r // 16
    x = x0 + r % 16
    m_ok = (y < H) & (x < W)
    ch = gl.arange(0, 64, layout=gl.SliceLayout(0, layout))
    if SHUFFLE > 1:  # HR pixel (n, r*y + i, r*x + j) of the (N, rH, rW, 64) output, (i, j) = divmod(grp, r)
        hr_pix = ((img * H + y) * SHUFFLE + grp // SHUFFLE) * (W * SHUFFLE) + x * SHUFFLE + grp % SHUFFLE
        offs = hr_pix[:, None] * 64 + ch[None, :]
    elif OUT_GROUPS > 1:
        offs = ((img * H + y) * W + x)[:, None] * (64 * OUT_GROUPS) + (grp * 64 + ch)[None, :]
    else:
        pix = (img * H + y) * W + x
        offs = pix[:, None] * 64 + ch[None, :]
    mask = m_ok[:, None] & (ch < 64)[None, :]
    relu: gl.constexpr = relu_kept(RELU, ROUND_SAT and O_BITS > 0 and not HAS_RES, O_LO)
    yv = _dequantize(acc, wsum_ptr, mult_ptr, bias_ptr, A_SIGNED, relu, layout, I2F_ADD)
    if HAS_RES:
        if SCALE_RES:
            yv = yv * res_scale
        res = gl.load(res_ptr + offs, mask=mask, other=0.0).to(gl.float32)
        yv = res + yv
    if O_BITS == 0:
        stored = yv.to(out_ptr.dtype.element_ty)
        gl.store(out_ptr + offs, stored, mask=mask)
        if NEXT_BITS > 0:
            if out_ptr.dtype.element_ty != gl.float32:
                yv = stored.to(gl.float32)
            codes = _requantize(yv, inv_s_next, NEXT_LO, NEXT_HI, ROUND_ADD, ROUND_SAT) & 0xFF
            gl.store(next_ptr + offs, codes.to(gl.uint8), mask=mask)
    else:
        codes = _requantize(yv, inv_s_out, O_LO, O_HI, ROUND_ADD, ROUND_SAT) & 0xFF
        gl.store(out_ptr + offs, codes.to(gl.uint8), mask=mask)


@gluon.jit
def _body_conv_sm90_kernel(x_desc, w_desc, wsum_ptr, mult_ptr, bias_ptr, res_ptr, out_ptr, next_ptr, items_ptr,
                           N, H, W, res_scale, inv_s_out, inv_s_next,
                           A_SIGNED: gl.constexpr, RELU: gl.constexpr, HAS_RES: gl.constexpr,
                           SCALE_RES: gl.constexpr, O_BITS: gl.constexpr, O_LO: gl.constexpr, O_HI: gl.constexpr,
                           NEXT_BITS: gl.constexpr, NEXT_LO: gl.constexpr, NEXT_HI: gl.constexpr,
                           SKIP_PAD: gl.constexpr, STAGES: gl.constexpr, EPI_ROWS: gl.constexpr,
                           num_warps: gl.constexpr):
    """Persistent 3x3 conv over (N, H, W, 64) 8-bit codes with the prepared weights; the result
    as ``conv3x3._epilogue`` stores it for an unshuffled (N * H * W, 64) output.

    ``x_desc``: the codes' bytes as int8, boxes (1, 8, 16, 64); ``A_SIGNED`` false: unsigned codes,
    which enter the MMA as ``code ^ 0x80`` (``128 * sum(w)`` added back in the epilogue).
    ``w_desc``: the weights as (64, 9 * 64) int8, K-major, boxes (64, 64). ``STAGES``: the ring of
    tap copies. ``SKIP_PAD``: only the first ``items_ptr[0]`` images are computed. ``EPI_ROWS``: the
    epilogue in a row layout (8 channels of a pixel per thread; the sums moved there through
    shared memory) instead of the MMA's."""
    ring = gl.allocate_shared_memory(x_desc.dtype, [STAGES, 1, 8, 16, 64], x_desc.layout)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [9, 64, 64], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES + 1, 1], mbarrier.MBarrierLayout())
    for k in gl.static_range(STAGES + 1):
        mbarrier.init(bars.index(k), count=1)

    tiles_x, per_image, total = _tiles(N, H, W, items_ptr, SKIP_PAD)
    pid = gl.program_id(0)
    step = gl.num_programs(0)

    wbar = bars.index(STAGES)
    _issue_weights(w_desc, w_smem, wbar)
    for k in gl.static_range(STAGES - 1):
        _issue_tap(x_desc, ring, bars, k, pid, step, tiles_x, per_image, total, STAGES)
    mbarrier.wait(wbar, 0)

    use = 0  # copies consumed so far
    for tile in range(pid, total, step):
        acc = gl.zeros([128, 64], gl.int32, layout=_MMA_LAYOUT)
        for tap in gl.static_range(9):
            s = use % STAGES
            mbarrier.wait(bars.index(s), (use // STAGES) & 1)
            acc = _tap_mma(ring.index(s).reshape([128, 64]), w_smem.index(tap), acc, A_SIGNED)
            # the MMA of copy use - 1 has retired: its stage takes copy use + STAGES - 1
            _issue_tap(x_desc, ring, bars, use + STAGES - 1, pid, step, tiles_x, per_image, total, STAGES)
            use += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        _body_epilogue(acc, tile, tiles_x, per_image, H, W, wsum_ptr, mult_ptr, bias_ptr, res_ptr, out_ptr,
                       next_ptr, res_scale, inv_s_out, inv_s_next, A_SIGNED, RELU, HAS_RES, SCALE_RES, O_BITS, O_LO,
                       O_HI, NEXT_BITS, NEXT_LO, NEXT_HI, EPI_ROWS)

    for k in gl.static_range(STAGES + 1):
        mbarrier.invalidate(bars.index(k))


@gluon.jit
def _load_residual(res_desc, res_smem, res_bars, t, img, y0, x0, RES_BUFS: gl.constexpr = 1):
    """The producer's copy of tile number ``t``'s residual box into box ``t % RES_BUFS`` of
    ``res_smem``, once the stores of the tile that used that box before have read it (``res_bars``:
    ``RES_BUFS`` landed barriers, then ``RES_BUFS`` free ones; a box's first use passes at once)."""
    b = t % RES_BUFS
    mbarrier.wait(res_bars.index(RES_BUFS + b), ((t // RES_BUFS) & 1) ^ 1)
    mbarrier.expect(res_bars.index(b), 128 * 64 * res_desc.dtype.primitive_bitwidth // 8)
    _tma_load(res_desc, [img, y0, x0, 0], res_bars.index(b), res_smem.index(b))


@gluon.jit
def _hand_back_residual(res_bars, t, RES_BUFS: gl.constexpr = 1):
    """The MMA warpgroup's side of :func:`_load_residual`, at tile number ``t``'s first MMA (one box:
    the producer is about to refill it for this tile) or, with two boxes, at its epilogue (by then
    the stores have long read it, and the box is refilled for the tile after): once the previous
    tile's stores have read its residual box (and the next codes' box), the producer may refill that
    box (its free barrier in ``res_bars``)."""
    tma.store_wait(0)
    mbarrier.arrive(res_bars.index(RES_BUFS + (t - 1) % RES_BUFS))


@gluon.jit
def _pair_tiles(PAIR: gl.constexpr, PAIRS: gl.constexpr):
    """(first tile, stride) of pair ``PAIR`` (a producer warp and its MMA warpgroup) of the
    ``PAIRS`` in each program: the program's tiles in turn, as if each pair were a program."""
    return gl.program_id(0) * PAIRS + PAIR, gl.num_programs(0) * PAIRS


@gluon.jit
def _ws_loader(x_desc, x2_desc, ring, ready, empty, res_desc, res_smem, res_bars, N, H, W, items_ptr,
               SKIP_PAD: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr, TMA_RES: gl.constexpr,
               HALO: gl.constexpr, RES_BUFS: gl.constexpr, RES_LATE: gl.constexpr, PAIR: gl.constexpr = 0,
               PAIRS: gl.constexpr = 1):
    """The producer warp of :func:`_body_conv_sm90_ws_kernel`: every tap box of this program's tiles
    into the ring, each group of ``GROUP`` stages as soon as the MMAs that read it last have
    retired (``empty``, one barrier per group). ``HALO``: instead, per tile, 3 halo boxes (one per
    column offset ``dx``: the tile's rows and one above and below, ``HALO_ROWS`` x 16 pixels, as an
    8-row and a 2-row TMA copy), each a stage of the ring. ``TMA_RES``: also each tile's residual
    box into ``res_smem`` (``RES_BUFS`` boxes, used in turn) after its first 3 taps' copies (its
    first halo box), or with ``RES_LATE`` after all of them, once the stores of the tile that used
    the box before have read it (``res_bars``: landed, free). ``PAIR`` of ``PAIRS``: this
    producer's MMA warpgroup's share of the program's tiles (:func:`_pair_tiles`)."""
    groups: gl.constexpr = STAGES // GROUP
    tiles_x, per_image, total = _tiles(N, H, W, items_ptr, SKIP_PAD)
    load = 0
    t = 0  # tiles of this program so far
    first, stride = _pair_tiles(PAIR, PAIRS)
    for tile in range(first, total, stride):
        img, y0, x0 = _tile_origin(tile, tiles_x, per_image)
        if HALO:
            for dx in gl.static_range(3):
                s = load % STAGES
                mbarrier.wait(empty.index(s), ((load // STAGES) & 1) ^ 1)  # a fresh stage passes at once
                mbarrier.expect(ready.index(s), HALO_ROWS * 16 * 64)
                row = s * HALO_ROWS
                _tma_load(x_desc, [img, y0 - 1, x0 + dx - 1, 0], ready.index(s),
                          _halo_view(ring, row, [1, 8, 16, 64], _BOX_LAYOUT))
                _tma_load(x2_desc, [img, y0 + 7, x0 + dx - 1, 0], ready.index(s),
                          _halo_view(ring, row + 8, [1, 2, 16, 64], _BOX_LAYOUT))
                load += 1
                if TMA_RES and dx == 2 * RES_LATE:  # (1 box: freed at this tile's first MMA; 2: at an epilogue)
                    _load_residual(res_desc, res_smem, res_bars, t, img, y0, x0, RES_BUFS)
        else:
            for tap in gl.static_range(9):
                s = load % STAGES
                if tap % GROUP == 0:  # a new group (9 taps a tile: load % GROUP == tap % GROUP)
                    g = load // GROUP
                    mbarrier.wait(empty.index(g % groups), ((g // groups) & 1) ^ 1)  # a fresh group passes at once
                mbarrier.expect(ready.index(s), 128 * 64)
                _tma_load(x_desc, [img, y0 + tap // 3 - 1, x0 + tap % 3 - 1, 0], ready.index(s), ring.index(s))
                load += 1
                if TMA_RES and tap == 2 + 6 * RES_LATE:  # (1 box: freed at this tile's first MMA; 2: at an epilogue)
                    _load_residual(res_desc, res_smem, res_bars, t, img, y0, x0, RES_BUFS)
        t += 1


@gluon.jit
def _codes_tma_epilogue(acc, tile, tiles_x, per_image, wsum_ptr, mult_ptr, bias_ptr, out_desc, code_smem, inv_s_out,
                        A_SIGNED: gl.constexpr, RELU: gl.constexpr, O_LO: gl.constexpr, O_HI: gl.constexpr,
                        layout: gl.constexpr, ROUND_ADD: gl.constexpr, I2F_ADD: gl.constexpr,
                        ROUND_SAT: gl.constexpr = False):
    """int32 sums (128, 64) of ``tile`` in the MMA's ``layout`` -> 8-bit codes, stored by TMA: into
    ``code_smem`` (one (1, 8, 16, 64) box, once the previous tile's store has read it), then one
    bulk copy, which drops the rows and columns outside the image. (conv1: no residual.)"""
    img, y0, x0 = _tile_origin(tile, tiles_x, per_image)
    relu: gl.constexpr = relu_kept(RELU, ROUND_SAT, O_LO)
    yv = _dequantize(acc, wsum_ptr, mult_ptr, bias_ptr, A_SIGNED, relu, layout, I2F_ADD)
    codes = _requantize(yv, inv_s_out, O_LO, O_HI, ROUND_ADD, ROUND_SAT).to(gl.int8)  # 0..255 -> the byte
    tma.store_wait(0)
    code_smem.reshape([128, 64]).store(codes)
    fence_async_shared()
    _tma_store(out_desc, [img, y0, x0, 0], code_smem)


@gluon.jit
def _stream_tma_epilogue(acc, tile, tiles_x, per_image, wsum_ptr, mult_ptr, bias_ptr, res_smem, res_landed, phase,
                         code_smem, out_desc, next_desc, res_scale, inv_s_next, A_SIGNED: gl.constexpr,
                         RELU: gl.constexpr, SCALE_RES: gl.constexpr, NEXT_BITS: gl.constexpr, NEXT_LO: gl.constexpr,
                         NEXT_HI: gl.constexpr, layout: gl.constexpr, ROUND_ADD: gl.constexpr,
                         I2F_ADD: gl.constexpr, ROUND_SAT: gl.constexpr = False):
    """int32 sums (128, 64) of ``tile`` in the MMA's ``layout`` -> the residual stream updated
    (fp16) and the next conv's 8-bit codes, through shared memory both ways: the residual box
    (landed by TMA on ``res_landed``, phase ``phase``) is read in the MMA layout, overwritten with
    the result, and stored by TMA with the codes' box. The same fp32 operations as
    :func:`_body_epilogue`'s. The caller makes sure the previous tile's stores have read
    ``code_smem`` (``tma.store_wait``) before this runs."""
    img, y0, x0 = _tile_origin(tile, tiles_x, per_image)
    yv = _dequantize(acc, wsum_ptr, mult_ptr, bias_ptr, A_SIGNED, RELU, layout, I2F_ADD)
    if SCALE_RES:
        yv = yv * res_scale
    box = res_smem.reshape([128, 64])
    mbarrier.wait(res_landed, phase)
    yv = box.load(layout).to(gl.float32) + yv
    stored = yv.to(res_smem.dtype)
    box.store(stored)
    if NEXT_BITS > 0:
        codes = _requantize(stored.to(gl.float32), inv_s_next, NEXT_LO, NEXT_HI, ROUND_ADD, ROUND_SAT).to(gl.int8)
        code_smem.reshape([128, 64]).store(codes)
    fence_async_shared()
    _tma_store(out_desc, [img, y0, x0, 0], res_smem)
    if NEXT_BITS > 0:
        _tma_store(next_desc, [img, y0, x0, 0], code_smem)


@gluon.jit
def _ws_mma(ring, w_smem, ready, empty, code_smem, out_desc, res_smem, res_bars, next_desc, wsum_ptr, mult_ptr,
            bias_ptr, res_ptr, out_ptr, next_ptr, items_ptr, N, H, W, res_scale, inv_s_out, inv_s_next,
            A_SIGNED: gl.constexpr, RELU: gl.constexpr, HAS_RES: gl.constexpr, SCALE_RES: gl.constexpr,
            O_BITS: gl.constexpr, O_LO: gl.constexpr, O_HI: gl.constexpr, NEXT_BITS: gl.constexpr,
            NEXT_LO: gl.constexpr, NEXT_HI: gl.constexpr, SKIP_PAD: gl.constexpr, STAGES: gl.constexpr,
            EPI_ROWS: gl.constexpr, GROUP: gl.constexpr, TMA_OUT: gl.constexpr, TMA_RES: gl.constexpr,
            IN_FLIGHT: gl.constexpr, HALO: gl.constexpr, ROUND_ADD: gl.constexpr, I2F_ADD: gl.constexpr,
            OUT_GROUPS: gl.constexpr, SHUFFLE: gl.constexpr, ROUND_SAT: gl.constexpr, A_REGS: gl.constexpr,
            RES_BUFS: gl.constexpr, PAIR: gl.constexpr = 0, PAIRS: gl.constexpr = 1):
    """The MMA warpgroup of :func:`_body_conv_sm90_ws_kernel`: per tile, the 9 taps' wgmmas as their
    boxes land, each group of ``GROUP`` stages released (``empty``) once the MMAs reading it have
    retired (an arrive costs the warpgroup a barrier: 9 / ``GROUP`` a tile); then the epilogue,
    while the producer fills the ring for the next tile. ``TMA_OUT``: 8-bit codes stored by TMA
    from the MMA layout (:func:`_codes_tma_epilogue`); ``TMA_RES``: the fp16 stream read and
    written, and the next codes written, through shared memory by TMA (:func:`_stream_tma_epilogue`;
    the residual box is handed back once the tile's stores have read it, at the next tile's first
    MMA, or with ``RES_BUFS`` 2 at its epilogue). ``IN_FLIGHT``: taps' MMAs left in flight after
    each issue (2 with ``GROUP`` 1: each stage released two taps later). ``HALO``: the stages are
    halo boxes, each the 3 taps of a column offset ``dx`` as views 0, 1 and 2 image rows into it; a
    box is released once its last tap's MMA has retired (3 arrivals a tile). ``ROUND_ADD``,
    ``I2F_ADD``: the epilogue's codes and floats without the conversion pipe (:func:`_requantize`,
    :func:`_to_float`). ``OUT_GROUPS``, ``SHUFFLE``: this program's 64 output channels are group
    ``program_id(1)`` of ``OUT_GROUPS``, stored pixel-shuffled for ``SHUFFLE > 1``
    (:func:`_body_epilogue`). ``ROUND_SAT``: 8-bit codes by one saturating conversion each
    (:func:`_requantize`), the ReLU folded into conv1's. ``A_REGS``: signed codes into the MMA
    through registers too (:func:`_tap_mma`). ``PAIR`` of ``PAIRS``: this warpgroup's share of the
    program's tiles (:func:`_pair_tiles`)."""
    groups: gl.constexpr = STAGES // GROUP
    tiles_x, per_image, total = _tiles(N, H, W, items_ptr, SKIP_PAD)
    grp = 0
    if OUT_GROUPS > 1:  # this group's per-channel multipliers, biases and weight sums
        grp = gl.program_id(1)
        wsum_ptr += grp * 64
        mult_ptr += grp * 64
        bias_ptr += grp * 64
    use = 0
    t = 0  # tiles of this program so far
    first, stride = _pair_tiles(PAIR, PAIRS)
    for tile in range(first, total, stride):
        acc = gl.zeros([128, 64], gl.int32, layout=_MMA_LAYOUT)
        if HALO:
            for dx in gl.static_range(3):
                s = use % STAGES
                mbarrier.wait(ready.index(s), (use // STAGES) & 1)
                for dy in gl.static_range(3):
                    a_smem = _halo_view(ring, s * HALO_ROWS + dy, [128, 64], _HALO_RING)
                    acc = _tap_mma(a_smem, w_smem.index(dy * 3 + dx), acc, A_SIGNED, IN_FLIGHT, A_REGS)
                    if dx > 0 and dy == IN_FLIGHT - 1:  # the previous box's last tap has retired
                        mbarrier.arrive(empty.index((use - 1) % STAGES))
                    if TMA_RES and RES_BUFS == 1 and dx == 0 and dy == 0 and t > 0:
                        _hand_back_residual(res_bars, t, RES_BUFS)
                use += 1
        else:
            for tap in gl.static_range(9):
                s = use % STAGES
                mbarrier.wait(ready.index(s), (use // STAGES) & 1)
                acc = _tap_mma(ring.index(s).reshape([128, 64]), w_smem.index(tap), acc, A_SIGNED, IN_FLIGHT,
                               A_REGS)
                if tap % GROUP == 0 and tap >= IN_FLIGHT:  # the group ending IN_FLIGHT taps back has retired
                    mbarrier.arrive(empty.index(((use - IN_FLIGHT) // GROUP) % groups))
                if TMA_RES and RES_BUFS == 1 and tap == 0 and t > 0:
                    _hand_back_residual(res_bars, t, RES_BUFS)
                use += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        if HALO:  # the tile's last box
            mbarrier.arrive(empty.index((use - 1) % STAGES))
        else:
            for k in gl.static_range(IN_FLIGHT):  # the tile's last group (last two taps' with IN_FLIGHT 2)
                mbarrier.arrive(empty.index(((use - IN_FLIGHT + k) // GROUP) % groups))
        if TMA_OUT:
            _codes_tma_epilogue(acc, tile, tiles_x, per_image, wsum_ptr, mult_ptr, bias_ptr, out_desc, code_smem,
                                inv_s_out, A_SIGNED, RELU, O_LO, O_HI, _MMA_LAYOUT, ROUND_ADD, I2F_ADD, ROUND_SAT)
        elif TMA_RES:
            if RES_BUFS > 1 and t > 0:  # no wait for the stores' reads at the tile's first MMA
                _hand_back_residual(res_bars, t, RES_BUFS)
            _stream_tma_epilogue(acc, tile, tiles_x, per_image, wsum_ptr, mult_ptr, bias_ptr,
                                 res_smem.index(t % RES_BUFS), res_bars.index(t % RES_BUFS), (t // RES_BUFS) & 1,
                                 code_smem, out_desc, next_desc, res_scale, inv_s_next,
                                 A_SIGNED, RELU, SCALE_RES, NEXT_BITS, NEXT_LO, NEXT_HI, _MMA_LAYOUT, ROUND_ADD,
                                 I2F_ADD, ROUND_SAT)
        else:
            _body_epilogue(acc, tile, tiles_x, per_image, H, W, wsum_ptr, mult_ptr, bias_ptr, res_ptr, out_ptr,
                           next_ptr, res_scale, inv_s_out, inv_s_next, A_SIGNED, RELU, HAS_RES, SCALE_RES, O_BITS,
                           O_LO, O_HI, NEXT_BITS, NEXT_LO, NEXT_HI, EPI_ROWS, ROUND_ADD, I2F_ADD, grp, OUT_GROUPS,
                           SHUFFLE, ROUND_SAT)
        t += 1
    if TMA_OUT or TMA_RES:
        tma.store_wait(0)  # the last stores have read their boxes before the program ends


@gluon.jit
def _body_conv_sm90_ws_kernel(x_desc, x2_desc, w_desc, out_desc, res_desc, next_desc, wsum_ptr, mult_ptr, bias_ptr,
                              res_ptr, out_ptr, next_ptr, items_ptr, N, H, W, res_scale, inv_s_out, inv_s_next,
                              A_SIGNED: gl.constexpr, RELU: gl.constexpr, HAS_RES: gl.constexpr,
                              SCALE_RES: gl.constexpr, O_BITS: gl.constexpr, O_LO: gl.constexpr, O_HI: gl.constexpr,
                              NEXT_BITS: gl.constexpr, NEXT_LO: gl.constexpr, NEXT_HI: gl.constexpr,
                              SKIP_PAD: gl.constexpr, STAGES: gl.constexpr, EPI_ROWS: gl.constexpr,
                              GROUP: gl.constexpr, TMA_OUT: gl.constexpr, TMA_RES: gl.constexpr,
                              IN_FLIGHT: gl.constexpr, HALO: gl.constexpr, LOADER_REGS: gl.constexpr,
                              num_warps: gl.constexpr, ROUND_ADD: gl.constexpr = False,
                              I2F_ADD: gl.constexpr = False, OUT_GROUPS: gl.constexpr = 1,
                              SHUFFLE: gl.constexpr = 1, ROUND_SAT: gl.constexpr = False,
                              A_REGS: gl.constexpr = False, RES_BUFS: gl.constexpr = 1,
                              RES_LATE: gl.constexpr = False, PAIRS: gl.constexpr = 1, MMA_REGS: gl.constexpr = 128):
    """:func:`_body_conv_sm90_kernel` warp-specialized (the engine's default on sm_90: x1.03-1.15
    against it on the ninth H100 run, docs/kernels.md): one producer warp issues the tap boxes
    (:func:`_ws_loader`) while the MMA warpgroup only waits, multiplies and stores
    (:func:`_ws_mma`), so no copy's issue sits between two taps' MMAs. Same arguments,
    plus boxes (1, 8, 16, 64) of the output (``out_desc``: the 8-bit codes as int8 for ``TMA_OUT``,
    the fp16 result for ``TMA_RES``), of the fp16 residual (``res_desc``) and of the next codes as
    int8 (``next_desc``), each any descriptor where unused; ``GROUP`` (stages released together: 1
    or 3, ``STAGES`` a multiple of it, at least two groups); ``TMA_OUT`` (codes out, no residual:
    stored by TMA); ``TMA_RES`` (an fp16 residual in and result out, with 8-bit next codes or
    none: all by TMA); ``IN_FLIGHT`` (taps' MMAs left in flight: 1, or 2 with ``GROUP`` 1 and 4
    stages at least); ``HALO`` (each tile's input read once per column offset instead of once per
    tap: 3 halo boxes of ``HALO_ROWS`` image rows, a stage each, 30 KB a tile instead of 72;
    ``x2_desc``: boxes (1, 2, 16, 64) of the codes, for each halo box's last 2 rows; ``GROUP`` 1,
    ``STAGES`` boxes, 2 at least; Triton 3.6: :data:`HALO_VIEWS`), ``LOADER_REGS``, the
    producer warp's registers (the rest go to the MMA warpgroup), and ``ROUND_ADD`` / ``I2F_ADD``
    (the epilogue's codes / floats by adds instead of the conversion pipe: :func:`_requantize`,
    :func:`_to_float`; ``I2F_ADD`` only where every sum is below ``2**22`` in magnitude), ``OUT_GROUPS``
    (``Cout / 64``: the grid's second axis is the group of 64 output channels a program computes,
    with that group's weights resident: ``w_desc`` is the (Cout, 9 * 64) weights, the per-channel
    pointers Cout long; results by masked stores, ``TMA_OUT`` / ``TMA_RES`` off) and ``SHUFFLE``
    (``r``: stored pixel-shuffled into (N, rH, rW, 64), ``OUT_GROUPS == r * r``, as the upsampler's
    convs store; no residual, no next codes) and ``ROUND_SAT`` (8-bit codes by one saturating floor
    conversion each instead of a floor, a clamp and a conversion, or of ``ROUND_ADD``'s clamp and
    add; before conv1's codes from 0 the ReLU folded in: :func:`_requantize`, ``conv3x3.relu_kept``) and
    ``A_REGS`` (signed codes into the MMA through registers, as unsigned ones always go, instead of
    from shared memory: :func:`_tap_mma`), ``RES_BUFS`` (``TMA_RES``'s residual boxes, 1 or 2: with
    2 the producer loads a tile's residual while the previous tile's box is still in use) and
    ``RES_LATE`` (``TMA_RES``: the producer copies a tile's residual after all its input boxes
    instead of after its first 3 taps' / first halo box) and ``PAIRS`` (1 or 2 pairs of a producer
    warp and an MMA warpgroup, each with its own ring, barriers and boxes and every ``PAIRS``-th of
    the program's tiles, :func:`_pair_tiles`; the weights loaded once for both; the second MMA
    warpgroup a worker partition asking for ``MMA_REGS`` registers a thread)."""
    gl.static_assert(RES_BUFS == 1 or RES_BUFS == 2)
    gl.static_assert(STAGES % GROUP == 0 and STAGES // GROUP >= 2 and 9 % GROUP == 0)
    gl.static_assert(OUT_GROUPS == 1 or not (TMA_OUT or TMA_RES))
    gl.static_assert(SHUFFLE == 1 or (OUT_GROUPS == SHUFFLE * SHUFFLE and not HAS_RES and NEXT_BITS == 0))
    gl.static_assert(IN_FLIGHT == 1 or (IN_FLIGHT == 2 and GROUP == 1 and (STAGES >= 4 or HALO)))
    gl.static_assert(not HALO or GROUP == 1)
    gl.static_assert(PAIRS == 1 or PAIRS == 2)
    ring = _ring_buffer(x_desc, STAGES, HALO)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [9, 64, 64], w_desc.layout)
    ready, empty = _ring_barriers(STAGES, GROUP)
    wbar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    code_smem, res_smem, res_bars = _stream_boxes(x_desc, res_desc, ring, ready, TMA_OUT, TMA_RES, NEXT_BITS, RES_BUFS)
    mbarrier.init(wbar, count=1)
    if OUT_GROUPS > 1:  # the weights of this program's group of 64 output channels
        _issue_weights(w_desc, w_smem, wbar, gl.program_id(1) * 64)
    else:
        _issue_weights(w_desc, w_smem, wbar)
    mbarrier.wait(wbar, 0)
    if PAIRS == 1:
        gl.warp_specialize([(_ws_mma, (ring, w_smem, ready, empty, code_smem, out_desc, res_smem, res_bars, next_desc,
                                       wsum_ptr, mult_ptr, bias_ptr, res_ptr, out_ptr, next_ptr, items_ptr, N, H, W,
                                       res_scale, inv_s_out, inv_s_next, A_SIGNED, RELU, HAS_RES, SCALE_RES, O_BITS,
                                       O_LO, O_HI, NEXT_BITS, NEXT_LO, NEXT_HI, SKIP_PAD, STAGES, EPI_ROWS, GROUP,
                                       TMA_OUT, TMA_RES, IN_FLIGHT, HALO, ROUND_ADD, I2F_ADD, OUT_GROUPS, SHUFFLE,
                                       ROUND_SAT, A_REGS, RES_BUFS)),
                            (_ws_loader, (x_desc, x2_desc, ring, ready, empty, res_desc, res_smem, res_bars, N, H, W,
                                          items_ptr, SKIP_PAD, STAGES, GROUP, TMA_RES, HALO, RES_BUFS, RES_LATE))],
                           [1], [LOADER_REGS])
    else:  # a second pair: its own ring, barriers and boxes, the same weights
        ring2 = _ring_buffer(x_desc, STAGES, HALO)
        ready2, empty2 = _ring_barriers(STAGES, GROUP)
        code2, res2, res_bars2 = _stream_boxes(x_desc, res_desc, ring2, ready2, TMA_OUT, TMA_RES, NEXT_BITS, RES_BUFS)
        gl.warp_specialize([(_ws_mma, (ring, w_smem, ready, empty, code_smem, out_desc, res_smem, res_bars, next_desc,
                                       wsum_ptr, mult_ptr, bias_ptr, res_ptr, out_ptr, next_ptr, items_ptr, N, H, W,
                                       res_scale, inv_s_out, inv_s_next, A_SIGNED, RELU, HAS_RES, SCALE_RES, O_BITS,
                                       O_LO, O_HI, NEXT_BITS, NEXT_LO, NEXT_HI, SKIP_PAD, STAGES, EPI_ROWS, GROUP,
                                       TMA_OUT, TMA_RES, IN_FLIGHT, HALO, ROUND_ADD, I2F_ADD, OUT_GROUPS, SHUFFLE,
                                       ROUND_SAT, A_REGS, RES_BUFS, 0, 2)),
                            (_ws_mma, (ring2, w_smem, ready2, empty2, code2, out_desc, res2, res_bars2, next_desc,
                                       wsum_ptr, mult_ptr, bias_ptr, res_ptr, out_ptr, next_ptr, items_ptr, N, H, W,
                                       res_scale, inv_s_out, inv_s_next, A_SIGNED, RELU, HAS_RES, SCALE_RES, O_BITS,
                                       O_LO, O_HI, NEXT_BITS, NEXT_LO, NEXT_HI, SKIP_PAD, STAGES, EPI_ROWS, GROUP,
                                       TMA_OUT, TMA_RES, IN_FLIGHT, HALO, ROUND_ADD, I2F_ADD, OUT_GROUPS, SHUFFLE,
                                       ROUND_SAT, A_REGS, RES_BUFS, 1, 2)),
                            (_ws_loader, (x_desc, x2_desc, ring, ready, empty, res_desc, res_smem, res_bars, N, H, W,
                                          items_ptr, SKIP_PAD, STAGES, GROUP, TMA_RES, HALO, RES_BUFS, RES_LATE,
                                          0, 2)),
                            (_ws_loader, (x_desc, x2_desc, ring2, ready2, empty2, res_desc, res2, res_bars2, N, H, W,
                                          items_ptr, SKIP_PAD, STAGES, GROUP, TMA_RES, HALO, RES_BUFS, RES_LATE,
                                          1, 2))],
                           [4, 1, 1], [MMA_REGS, LOADER_REGS, LOADER_REGS])
        _invalidate_barriers(ready2, empty2, res_bars2, STAGES, GROUP, TMA_RES, RES_BUFS)
    _invalidate_barriers(ready, empty, res_bars, STAGES, GROUP, TMA_RES, RES_BUFS)
    mbarrier.invalidate(wbar)


@gluon.jit
def _ring_buffer(x_desc, STAGES: gl.constexpr, HALO: gl.constexpr):
    """A pair's ring in shared memory: ``STAGES`` halo boxes (``HALO``) or tap boxes."""
    if HALO:
        ring = gl.allocate_shared_memory(gl.int8, [STAGES * HALO_ROWS, 16, 64], _HALO_RING)
    else:
        ring = gl.allocate_shared_memory(x_desc.dtype, [STAGES, 1, 8, 16, 64], x_desc.layout)
    return ring


@gluon.jit
def _ring_barriers(STAGES: gl.constexpr, GROUP: gl.constexpr):
    """A pair's ring barriers, initialised: ``ready`` (one a stage) and ``empty`` (one a group)."""
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES // GROUP, 1], mbarrier.MBarrierLayout())
    for k in gl.static_range(STAGES):
        mbarrier.init(ready.index(k), count=1)
    for k in gl.static_range(STAGES // GROUP):
        mbarrier.init(empty.index(k), count=1)
    return ready, empty


@gluon.jit
def _stream_boxes(x_desc, res_desc, ring, ready, TMA_OUT: gl.constexpr, TMA_RES: gl.constexpr,
                  NEXT_BITS: gl.constexpr, RES_BUFS: gl.constexpr):
    """A pair's boxes for its stores by TMA: (the codes' box, ``RES_BUFS`` residual boxes, their
    barriers: landed, then free; initialised), each a placeholder (``ring``'s first stage, ``ready``)
    where unused."""
    code_smem = ring.index(0)
    res_smem = ring.index(0)
    res_bars = ready
    if TMA_OUT or (TMA_RES and NEXT_BITS > 0):
        code_smem = gl.allocate_shared_memory(x_desc.dtype, [1, 8, 16, 64], x_desc.layout)
    if TMA_RES:
        res_smem = gl.allocate_shared_memory(res_desc.dtype, [RES_BUFS, 1, 8, 16, 64], res_desc.layout)
        res_bars = gl.allocate_shared_memory(gl.int64, [2 * RES_BUFS, 1], mbarrier.MBarrierLayout())
        for k in gl.static_range(2 * RES_BUFS):
            mbarrier.init(res_bars.index(k), count=1)
    return code_smem, res_smem, res_bars


@gluon.jit
def _invalidate_barriers(ready, empty, res_bars, STAGES: gl.constexpr, GROUP: gl.constexpr, TMA_RES: gl.constexpr,
                         RES_BUFS: gl.constexpr):
    """The pair's barriers of :func:`_ring_barriers` and :func:`_stream_boxes`, invalidated."""
    for k in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(k))
    for k in gl.static_range(STAGES // GROUP):
        mbarrier.invalidate(empty.index(k))
    if TMA_RES:
        for k in gl.static_range(2 * RES_BUFS):
            mbarrier.invalidate(res_bars.index(k))

# The launches the integer body makes (conv1: signed codes in, ReLU, 8-bit codes out; conv2:
# unsigned (a8) or signed (a4 / a2) codes in, the residual stream updated, the next block's codes
# out, on the fp32 or the fp16 stream; RDN's dense
# blocks, runtime/densebody.py: a segment's conv with the bias and no residual, or adding onto the
# partial sum, fp32 out), compiled by compile_report: (name, A_SIGNED, RELU, HAS_RES, SCALE_RES,
# O_BITS, O_LO, O_HI, NEXT_BITS, SKIP_PAD, out, res).
VARIANTS = [
    ("conv1", True, True, False, False, 8, 0, 255, 0, False, "u8", "fp32"),
    ("conv1 skip", True, True, False, False, 8, 0, 15, 0, True, "u8", "fp32"),
    ("conv2+next", False, False, True, False, 0, 0, 0, 8, False, "fp32", "fp32"),
    ("conv2+next signed", True, False, True, False, 0, 0, 0, 8, False, "fp32", "fp32"),
    ("conv2 scaled", False, False, True, True, 0, 0, 0, 0, False, "fp32", "fp32"),
    ("conv2+next fp16 stream", False, False, True, False, 0, 0, 0, 8, True, "fp16", "fp16"),
    ("conv2+next fp16 stream signed", True, False, True, False, 0, 0, 0, 8, True, "fp16", "fp16"),
    ("fp32 out", True, True, False, False, 0, 0, 0, 0, False, "fp32", "fp32"),
    ("dense first segment", True, False, False, False, 0, 0, 0, 0, False, "fp32", "fp32"),
    ("dense segment add", False, False, True, False, 0, 0, 0, 0, False, "fp32", "fp32"),
    ("dense segment add signed", True, False, True, False, 0, 0, 0, 0, False, "fp32", "fp32"),
]
# The upsampler's 64 -> 256 convs on the twin (``ops.SM90_UP``), the same fields and the pixel
# shuffle r (Cout = 64 r^2, one group of 64 output channels a program): the x4 tail's first stage
# (8-bit codes, pixel-shuffled, for the second) and its last (fp16, pixel-shuffled, for the FP conv).
UP_VARIANTS = [
    ("up shuffled codes", True, False, False, False, 8, -128, 127, 0, False, "u8", "fp32", 2),
    ("up shuffled fp16", True, False, False, False, 0, 0, 0, 0, False, "fp16", "fp32", 2),
]


def tma_out_applies(setting: bool, o_bits: int, has_res: bool, groups: int = 1) -> bool:
    """Whether the twin stores a conv's codes by TMA (``TMA_OUT``), ``setting`` permitting: 8-bit
    codes (``o_bits``), no residual, one group of 64 output channels. The one rule for
    :func:`compile_report` and the launcher (``ops._sm90_body_into``, which also needs the output's
    boxes aligned for TMA)."""
    return bool(setting) and o_bits == 8 and not has_res and groups == 1


def tma_res_applies(setting: bool, o_bits: int, res: str | None, out: str | None, groups: int = 1) -> bool:
    """Whether the twin moves a conv's stream in and out by TMA (``TMA_RES``), ``setting``
    permitting: a conv2 writing floats (``o_bits`` 0) over an fp16 residual into fp16, in one group
    of 64 output channels. ``res`` / ``out``: the residual's and the output's dtypes as the variants
    name them ("fp16", "fp32", "u8"; ``res`` None: no residual). The one rule for
    :func:`compile_report` and ``ops.sm90_tma_res_applies`` (torch dtypes; the launcher also needs
    the tensors' boxes aligned for TMA)."""
    return bool(setting) and o_bits == 0 and groups == 1 and res == out == "fp16"


def _sass_lines(sass: str) -> list[list[str]]:
    """The instructions of ``cuobjdump -sass`` output, each as its tokens (opcode first, predicate
    dropped, commas stripped)."""
    out = []
    for line in sass.splitlines():
        head, sep, rest = line.strip().partition("*/")
        if not sep or not head.startswith("/*") or not rest.strip():
            continue
        tokens = [t.strip(",") for t in rest.split(";")[0].split()]
        if tokens and tokens[0].startswith("@"):
            tokens = tokens[1:]
        if tokens:
            out.append(tokens)
    return out


def _registers(token: str, count: int) -> set[int]:
    """The ``count`` registers from operand ``token`` (``R104`` -> 104 ...); none for other operands."""
    digits = token[1:].split(".")[0] if token[:1] == "R" else ""
    return set(range(int(digits), int(digits) + count)) if digits.isdigit() else set()


def register_hazards(sass: str) -> tuple[int, int]:
    """Writes into the A registers of a wgmma still in flight, in SASS (``cuobjdump -sass``).

    An ``IGMMA`` with its A operand in registers reads them asynchronously until a
    ``WARPGROUP.DEPBAR.LE gsb0, k`` leaves at most ``k`` groups in flight; an instruction that
    writes one of them before that gives the MMA a wrong operand. (Unsigned codes: each tap's
    flipped codes are loaded while the previous tap's MMA runs, so ptxas must keep two sets.)
    Returns (hazards, ``LDSM`` loads issued while some A registers were in flight: 0 means there
    was no overlap to check)."""
    in_flight: list[set[int]] = []
    group: set[int] = set()
    hazards = loads = 0
    for tokens in _sass_lines(sass):
        op = tokens[0]
        if op.startswith("IGMMA") and len(tokens) > 2:
            group |= _registers(tokens[2], 4)
            if "gsb0" in tokens:
                in_flight.append(group)
                group = set()
        elif op.startswith("WARPGROUP.DEPBAR"):
            keep = int(tokens[-1], 16)
            in_flight = in_flight[len(in_flight) - keep:] if keep else []
        elif len(tokens) > 1 and any(in_flight):
            width = 4 if (".128" in op or op.endswith(".4")) else 2 if (".64" in op or op.endswith(".2")) else 1
            written = _registers(tokens[1], width)
            loads += op.startswith("LDSM")
            hazards += any(written & regs for regs in in_flight)
    return hazards, loads


def compile_report(variant: tuple, stages: int = 6, arch: int = 90, epi_rows: bool = True, ws: bool = False,
                   group: int = 1, tma_out: bool = True, tma_res: bool = False, in_flight: int = 1,
                   halo: bool = False, cvt_add: bool = False, cvt_sat: bool = False, a_regs: bool = False,
                   res_bufs: int = 1, res_late: bool = False, pairs: int = 1) -> dict:
    """Compile one of :data:`VARIANTS` for ``sm_<arch>`` without a GPU (Triton's bundled ptxas) and
    inspect it: ``registers`` per thread, ``local_bytes`` (spills and stack), ``shared_bytes``,
    ``wgmma`` (int8 warpgroup MMAs in the PTX), ``async_waits`` (``wgmma.wait_group 1``, or
    ``in_flight`` for the twin: taps' MMAs left in flight), ``tma_copies`` (TMA copy
    instructions), ``tma_stores`` (those into global memory), ``arrives`` (plain mbarrier
    arrivals: the twin's stage releases), ``fma_f32`` (fused multiply-adds, which the numeric
    contract forbids) and, from the SASS, :func:`register_hazards` (``register_hazards``,
    ``loads_in_flight``) and the static counts of ``instructions``, CTA barriers (``bar_syncs``),
    mbarrier operations (``mbarrier_ops``) and conversion-pipe instructions (``conversions``: I2F*,
    F2I*, FRND), all None without cuobjdump; ``round_adds``: fp32 adds rounding toward minus
    infinity in the PTX (``cvt_add``'s codes); ``sat_cvts``: saturating floor conversions to u8 / s8
    in the PTX (``cvt_sat``'s codes); ``min_nans``: fp32 mins propagating NaN (``min.NaN.f32``) in
    the PTX (``cvt_sat``'s clamp of codes from 0 below 255); ``store_waits``: waits for TMA stores
    to have read their shared-memory boxes (``cp.async.bulk.wait_group.read``) in the PTX, and ``store_waits_synced``
    those a CTA barrier follows before anything else: every thread waits, but only the storing
    thread's stores count, so the others must not reuse the box (or hand it back) before that
    thread's wait is over; ``fmnmx``: fp32 min/max instructions in the SASS; ``shuffle``:
    the variant's pixel shuffle (1, or r for :data:`UP_VARIANTS`, which only the twin computes).
    Defaults: the engine's ring depth and row epilogue (``ops.SM90_STAGES``, ``ops.SM90_EPI_ROWS``). ``ws``: the
    warp-specialized twin, with its producer's 40 registers and 128 a thread at most
    (``ops.SM90_WS_*``), its stages released ``group`` at a time and, with ``tma_out``, codes
    without a residual stored by TMA (``ops.SM90_WS_GROUP``, ``ops.SM90_TMA_OUT``) and, with
    ``tma_res``, an fp16 stream in and out by TMA (``ops.SM90_TMA_RES``), ``in_flight`` taps' MMAs
    left in flight (``ops.SM90_IN_FLIGHT``), ``halo``: its input read as halo boxes (``ops.SM90_HALO``;
    ``stages`` then counts halo boxes; Triton 3.6 only, :data:`HALO_VIEWS`); ``warps`` then counts its
    producer's warpgroup too. ``cvt_add``: the twin's epilogue with its codes and floats by adds
    (``ROUND_ADD`` and ``I2F_ADD``, ``ops.SM90_CVT_ADD``); ``cvt_sat``: its 8-bit codes by one
    saturating conversion each (``ROUND_SAT``, ``ops.SM90_CVT_SAT``); ``a_regs``: signed codes into
    its MMAs through registers (``A_REGS``, ``ops.SM90_A_REGS``); ``res_bufs``, ``res_late``: with
    ``tma_res``, its residual boxes and their copies after each tile's input boxes (``RES_BUFS``,
    ``RES_LATE``, ``ops.SM90_RES_BUFS``, ``ops.SM90_RES_LATE``); ``pairs``: 2 pairs of a producer
    warp and an MMA warpgroup a program sharing the weights (``PAIRS``, ``ops.SM90_PAIRS``; at the
    launcher's ``ops.SM90_PAIRS_MAXNREG`` registers, ``warps`` then 12)."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    name, signed, relu, has_res, scale_res, o_bits, o_lo, o_hi, next_bits, skip, out, res = variant[:12]
    shuffle = variant[12] if len(variant) > 12 else 1  # UP_VARIANTS: r, and r * r groups of 64 channels
    if shuffle > 1 and not ws:
        raise ValueError(f"{name}: only the warp-specialized twin (ws=True) computes output-channel groups")
    box4 = repr(_BOX_LAYOUT.value)
    box2 = repr(gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=8, rank=2))
    box16 = repr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4))
    types = dict(x_desc=f"tensordesc<i8[1, 8, 16, 64],{box4}>", x2_desc=f"tensordesc<i8[1, 2, 16, 64],{box4}>",
                 w_desc=f"tensordesc<i8[64, 64],{box2}>",
                 out_desc=f"tensordesc<i8[1, 8, 16, 64],{box4}>", res_desc=f"tensordesc<fp16[1, 8, 16, 64],{box16}>",
                 next_desc=f"tensordesc<i8[1, 8, 16, 64],{box4}>", wsum_ptr="*i32", mult_ptr="*fp32",
                 bias_ptr="*fp32", res_ptr=f"*{res}", out_ptr=f"*{out}", next_ptr="*u8", items_ptr="*i32", N="i32",
                 H="i32", W="i32", res_scale="fp32", inv_s_out="fp32", inv_s_next="fp32")
    consts = dict(A_SIGNED=signed, RELU=relu, HAS_RES=has_res, SCALE_RES=scale_res, O_BITS=o_bits, O_LO=o_lo,
                  O_HI=o_hi, NEXT_BITS=next_bits, NEXT_LO=-128, NEXT_HI=127, SKIP_PAD=skip, STAGES=stages,
                  EPI_ROWS=epi_rows, num_warps=4)
    options = dict(num_warps=4, enable_fp_fusion=False)
    kernel = _body_conv_sm90_kernel
    if ws:
        kernel, consts["LOADER_REGS"], options["maxnreg"] = _body_conv_sm90_ws_kernel, 40, 128
        consts.update(GROUP=group, IN_FLIGHT=in_flight, HALO=halo, ROUND_ADD=cvt_add, I2F_ADD=cvt_add,
                      OUT_GROUPS=shuffle * shuffle, SHUFFLE=shuffle, ROUND_SAT=cvt_sat, A_REGS=a_regs and signed,
                      RES_BUFS=res_bufs, RES_LATE=res_late, PAIRS=1, MMA_REGS=128,
                      TMA_OUT=tma_out_applies(tma_out, o_bits, has_res, shuffle * shuffle),
                      TMA_RES=tma_res_applies(tma_res, o_bits, res if has_res else None, out, shuffle * shuffle))
        if consts["TMA_RES"]:
            types["out_desc"] = types["res_desc"]
        if pairs > 1:  # as the launcher (ops._sm90_body_into) compiles them
            from .ops import SM90_PAIRS_MAXNREG, SM90_PAIRS_MMA_REGS

            consts.update(PAIRS=pairs, MMA_REGS=SM90_PAIRS_MMA_REGS)
            options["maxnreg"] = SM90_PAIRS_MAXNREG
    signature = {n: types.get(n, "constexpr") for n in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if signature[n].startswith("*")}
    compiled = triton.compile(GluonASTSource(kernel, signature, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    # the first instruction after each wait for TMA stores' reads (.loc lines, comments and labels skipped)
    after_waits = re.findall(r"cp\.async\.bulk\.wait_group\.read\s+\d+;(?:\s*(?:\.loc|//|\$L\w+:)[^\n]*)*\s*([\w.]+)",
                             ptx)
    usage, hazards, counts = {}, (None, None), {}
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if tool.exists():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
            sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        hazards = register_hazards(sass)
        ops = [tokens[0] for tokens in _sass_lines(sass)]
        counts = dict(instructions=len(ops), bar_syncs=sum(op.startswith("BAR.SYNC") for op in ops),
                      mbarrier_ops=sum(op.startswith("SYNCS") for op in ops),
                      conversions=sum(op.startswith(("I2F", "F2I", "FRND")) for op in ops),
                      fmnmx=sum(op.startswith("FMNMX") for op in ops))
        usage = {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL|STACK):(\d+)", text)}
    return dict(name=name, a_signed=signed, stages=stages, arch=arch, ws=ws, tma_res=consts.get("TMA_RES", False),
                shuffle=shuffle,
                in_flight=in_flight if ws else 1, halo=halo and ws, cvt_add=cvt_add and ws, cvt_sat=cvt_sat and ws,
                a_regs=bool(a_regs and signed and ws), res_bufs=res_bufs if consts.get("TMA_RES") else 1,
                res_late=bool(res_late and consts.get("TMA_RES")), pairs=pairs if ws else 1,
                warps=compiled.metadata.num_warps,
                registers=usage.get("REG"),
                local_bytes=usage["LOCAL"] + usage["STACK"] if usage else None,
                shared_bytes=int(compiled.metadata.shared),
                wgmma=len(re.findall(r"\bwgmma\.mma_async[\w.]*\.s32\.s8\.s8", ptx)),
                async_waits=len(re.findall(rf"\bwgmma\.wait_group\.sync\.aligned {in_flight if ws else 1}\b", ptx)),
                tma_copies=len(re.findall(r"\bcp\.async\.bulk\.tensor\.", ptx)),
                tma_stores=len(re.findall(r"\bcp\.async\.bulk\.tensor\.\w+\.global\.shared", ptx)),
                arrives=len(re.findall(r"\bmbarrier\.arrive\.shared::cta\.b64 _, \[%r\d+\];", ptx)),
                fma_f32=len(re.findall(r"\bfma\.rn\.f32", ptx)), register_hazards=hazards[0],
                loads_in_flight=hazards[1], instructions=counts.get("instructions"),
                bar_syncs=counts.get("bar_syncs"), mbarrier_ops=counts.get("mbarrier_ops"),
                conversions=counts.get("conversions"),
                round_adds=len(re.findall(ROUND_DOWN_ADD_PTX, ptx)), sat_cvts=len(re.findall(FLOOR_SAT_PTX, ptx)),
                min_nans=len(re.findall(r"\bmin\.NaN\.f32\b", ptx)),
                store_waits=len(after_waits), store_waits_synced=sum(op in ("bar.sync", "barrier.sync")
                                                                     for op in after_waits),
                fmnmx=counts.get("fmnmx"))


def default_jobs() -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` of :func:`compile_report` for each of :data:`VARIANTS` (and, where the
    twin computes them, :data:`UP_VARIANTS`) as the engine launches it now (``ops.sm90_settings()``,
    so the ``GDQ_SM90_*`` variables count): its ring depth, the twin and its switches, the
    saturating codes where ``ops.sm90_cvt_sat_applies`` says, signed codes through registers where
    ``sm90_a_regs`` says, the residual boxes as ``sm90_res_bufs`` / ``sm90_res_late`` say (and the
    ring ``ops.sm90_ring_stages`` deep), ``sm90_pairs`` pairs a program."""
    from .ops import SM90_DTYPE_NAMES, sm90_cvt_sat_applies, sm90_ring_stages, sm90_settings

    opts = sm90_settings()
    dtypes = {name: dtype for dtype, name in SM90_DTYPE_NAMES.items()}
    variants = VARIANTS + (UP_VARIANTS if opts["sm90_up"] and opts["sm90_ws"] else [])
    jobs = []
    for v in variants:
        kw = dict(epi_rows=opts["sm90_epi_rows"], ws=opts["sm90_ws"])
        stages = opts["sm90_stages"]
        if opts["sm90_ws"]:
            groups = v[12] ** 2 if len(v) > 12 else 1
            res = tma_res_applies(opts["sm90_tma_res"], v[5], v[11] if v[3] else None, v[10], groups)
            stages = sm90_ring_stages(opts, opts["sm90_res_bufs"] if res else 1)
            kw.update(group=opts["sm90_group"], tma_out=opts["sm90_tma_out"], tma_res=opts["sm90_tma_res"],
                      in_flight=opts["sm90_in_flight"], halo=opts["sm90_halo"], cvt_add=opts["sm90_cvt_add"],
                      cvt_sat=sm90_cvt_sat_applies(opts["sm90_cvt_sat"], v[5], dtypes[v[10]]),
                      a_regs=opts["sm90_a_regs"], res_bufs=opts["sm90_res_bufs"], res_late=opts["sm90_res_late"],
                      pairs=opts["sm90_pairs"])
        jobs.append(((v, stages), kw))
    return jobs


def _compile_job(job: tuple[tuple, dict]) -> dict:
    """:func:`compile_report` of one ``(args, kwargs)`` job (a worker process's task)."""
    return compile_report(*job[0], **job[1])


def main(argv: list[str] | None = None) -> int:
    """``python -m gdq_engine.kernels.body_conv_sm90 [--json] [--stages S ...] [--ws] [--tma-res]
    [--in-flight 2] [--halo] [--cvt-add] [--cvt-sat] [--up] [--a-regs] [--res-bufs] [--pairs]
    [--defaults] [--jobs N]``: compile every variant for sm_90 and print one row each (or a JSON list), in ``N``
    worker processes (default: one per CPU; the same reports in the same order either way).
    ``--defaults``: only each variant as the engine launches it (:func:`default_jobs`)."""
    import argparse
    import json
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    ap = argparse.ArgumentParser(prog="python -m gdq_engine.kernels.body_conv_sm90",
                                 description="Compile the Gluon body conv for sm_90 (no GPU needed).")
    ap.add_argument("--json", action="store_true", help="print the reports as one JSON list")
    ap.add_argument("--stages", type=int, nargs="+", default=[6], help="ring depths to compile (default 6)")
    ap.add_argument("--ws", action="store_true", help="also the warp-specialized twin of each variant")
    ap.add_argument("--tma-res", action="store_true",
                    help="also the twin with the fp16 stream by TMA, for the fp16-stream variants")
    ap.add_argument("--in-flight", type=int, choices=(1, 2), default=1,
                    help="2: also the twin with two taps' MMAs in flight, for every variant")
    ap.add_argument("--halo", action="store_true",
                    help="also the twin reading halo boxes, for every variant (ops.SM90_HALO_STAGES boxes; and the "
                         "fp16 stream by TMA; Triton 3.6's Gluon only)")
    ap.add_argument("--cvt-add", action="store_true",
                    help="also the twin with the epilogue's conversions by adds, for every variant")
    ap.add_argument("--cvt-sat", action="store_true",
                    help="also the twin with its 8-bit codes by one saturating conversion each, alone and with the "
                         "conversions by adds, for the variants writing codes (with --up, the upsampler's too)")
    ap.add_argument("--up", action="store_true",
                    help="also the twin computing the upsampler's pixel-shuffled 64 -> 256 convs (UP_VARIANTS), and "
                         "with --cvt-add their conversions by adds")
    ap.add_argument("--a-regs", action="store_true",
                    help="also the twin taking signed codes into its MMAs through registers (A_REGS), for the "
                         "signed variants, on the engine's other settings (halo boxes where this Triton builds them)")
    ap.add_argument("--res-bufs", action="store_true",
                    help="also the fp16-stream variant by TMA as the engine launches it, with 1 and 2 residual "
                         "boxes (RES_BUFS; 2 with a ring one halo box / two tap boxes shorter), each with its residual "
                         "copied after the tile's first input boxes and after all of them (RES_LATE)")
    ap.add_argument("--pairs", action="store_true",
                    help="also each variant (the upsampler's too) as the engine launches it but with 2 pairs of a "
                         "producer and an MMA warpgroup a program (PAIRS), and the fp16 stream by TMA so with 2 "
                         "residual boxes, the ring kept")
    ap.add_argument("--defaults", action="store_true",
                    help="only each variant (the upsampler's too) as the engine launches it: ops.sm90_settings() "
                         "(with its environment variables), the saturating codes where ops.sm90_cvt_sat_applies")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: one per CPU)")
    args = ap.parse_args(argv)
    if args.defaults and (args.ws or args.tma_res or args.in_flight == 2 or args.halo or args.cvt_add or args.cvt_sat
                          or args.up or args.a_regs or args.res_bufs or args.pairs or args.stages != [6]):
        ap.error("--defaults takes the engine's settings: no other variant flags")
    if args.halo and not HALO_VIEWS:
        ap.error("--halo needs a Gluon that reinterprets a shared-memory view past its extent (Triton 3.6's "
                 "_reinterpret); this Triton's refuses")
    fp16 = [v for v in VARIANTS if v[10] == v[11] == "fp16"]
    jobs = [((v, s), dict(ws=ws)) for ws in ((False, True) if args.ws else (False,)) for s in args.stages
            for v in VARIANTS]
    if args.tma_res:
        jobs += [((v, s), dict(ws=True, tma_res=True)) for s in args.stages for v in fp16]
    if args.in_flight == 2:
        jobs += [((v, s), dict(ws=True, in_flight=2)) for s in args.stages for v in VARIANTS]
    if args.halo:
        from .ops import SM90_HALO_STAGES as boxes

        jobs += [((v, boxes), dict(ws=True, halo=True)) for v in VARIANTS]
        jobs += [((v, boxes), dict(ws=True, halo=True, tma_res=True)) for v in fp16]
    if args.cvt_add:
        jobs += [((v, s), dict(ws=True, cvt_add=True)) for s in args.stages for v in VARIANTS]
    codes = [v for v in VARIANTS + (UP_VARIANTS if args.up else []) if v[5] == 8 or v[8] == 8]
    if args.up:
        jobs += [((v, s), dict(ws=True, cvt_add=cvt)) for cvt in ((False, True) if args.cvt_add else (False,))
                 for s in args.stages for v in UP_VARIANTS]
    if args.cvt_sat:
        jobs += [((v, s), dict(ws=True, cvt_add=add, cvt_sat=True)) for add in (False, True) for s in args.stages
                 for v in codes]
        if args.tma_res:
            jobs += [((v, s), dict(ws=True, tma_res=True, cvt_add=True, cvt_sat=True)) for s in args.stages
                     for v in fp16]
    from .ops import launch_options

    if args.a_regs:  # the engine's launches of signed codes, with and without registers
        with launch_options(sm90_ws=True):
            signed = [(job, kw) for job, kw in default_jobs() if job[0][1]]
        jobs += [(job, dict(kw, a_regs=regs)) for job, kw in signed for regs in (False, True)]
    if args.res_bufs:
        for bufs, late in ((1, False), (1, True), (2, False), (2, True)):
            with launch_options(sm90_ws=True, sm90_tma_res=True, sm90_res_bufs=bufs, sm90_res_late=late):
                jobs += [(job, kw) for job, kw in default_jobs() if job[0][0] == "conv2+next fp16 stream"]
    if args.pairs:
        with launch_options(sm90_ws=True, sm90_pairs=2):
            jobs += default_jobs()
        with launch_options(sm90_ws=True, sm90_pairs=2, sm90_tma_res=True, sm90_res_bufs=2, sm90_res_late=True):
            jobs += [(job, kw) for job, kw in default_jobs() if job[0][0].startswith("conv2+next fp16 stream")]
    if args.defaults:
        jobs = default_jobs()
    if args.jobs > 1 and len(jobs) > 1:  # spawned: a forked worker would inherit Triton's state
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(args.jobs, len(jobs)), mp_context=spawn) as pool:
            reports = list(pool.map(_compile_job, jobs))
    else:
        reports = [_compile_job(job) for job in jobs]
    if args.json:
        print(json.dumps(reports))
        return 0
    for r in reports:
        print(f"{r['name']:24} stages={r['stages']} ws={int(r['ws'])} shuffle={r['shuffle']} "
              f"tma_res={int(r['tma_res'])} in_flight={r['in_flight']} halo={int(r['halo'])} "
              f"cvt_add={int(r['cvt_add'])} cvt_sat={int(r['cvt_sat'])} "
              f"warps={r['warps']} regs={r['registers']} local={r['local_bytes']} shared={r['shared_bytes']} "
              f"wgmma={r['wgmma']} async_waits={r['async_waits']} tma={r['tma_copies']} "
              f"tma_stores={r['tma_stores']} arrives={r['arrives']} fma={r['fma_f32']} "
              f"hazards={r['register_hazards']} loads_in_flight={r['loads_in_flight']} "
              f"sass={r['instructions']} bar_syncs={r['bar_syncs']} mbarrier_ops={r['mbarrier_ops']} "
              f"conversions={r['conversions']} round_adds={r['round_adds']} sat_cvts={r['sat_cvts']} "
              f"fmnmx={r['fmnmx']} a_regs={int(r['a_regs'])} res_bufs={r['res_bufs']} res_late={int(r['res_late'])} "
              f"pairs={r['pairs']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
