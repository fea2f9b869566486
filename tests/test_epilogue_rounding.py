"""The epilogue's code rounding paths, modelled in numpy fp32: the same codes on every input.

The kernels write a code as ``clamp(floor(y * inv_s + 0.5), LO, HI)`` (the plain path: ``FRND``, two
``FMNMX`` and ``F2I``), or by the conversions by adds (``ROUND_ADD``: clamp, then ``add.rm`` of
``1.5 * 2**23``) or by one saturating conversion (``ROUND_SAT``: ``max(t, LO)`` where the range is
signed, ``min(t, HI)`` propagating NaN where it ends below the byte's top, then
``cvt.rmi.sat.u8/s8.f32``; conv1's ReLU folded in before codes from 0). The GPU tests check the
kernels bit for bit; these check, on any machine, that the three sequences agree as the PTX ISA
defines their instructions: fp32 ``max``/``min`` return the other operand for NaN, ``min.NaN``
returns NaN; ``cvt.rmi``
rounds toward minus infinity, ``.sat`` clamps to the destination type's range and NaN converts
to 0; ``add.rm`` rounds the exact sum toward minus infinity. Inputs: NaN, infinities, signed
zeros, values far outside the range, and values whose ``t`` lands on, just below and just above
integers and the bounds. And the sums to fp32 by adds (``I2F_ADD``), exact for every sum below the
launcher's bound.
"""

import numpy as np
import pytest

MAGIC = np.float32(1.5 * 2**23)
MAGIC_BITS = 0x4B400000


def _t(y: np.ndarray, inv_s: float) -> np.ndarray:
    """``y * inv_s + 0.5``: two fp32 operations, each rounded to nearest even (overflow to inf)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return (y * np.float32(inv_s)).astype(np.float32) + np.float32(0.5)


def plain_codes(y, inv_s, lo, hi, relu):
    """ReLU (fp32 max), then clamp(floor(t)) with fp32 max/min, then the conversion."""
    if relu:
        y = np.fmax(y, np.float32(0))
    t = np.floor(_t(y, inv_s))
    return np.fmin(np.fmax(t, np.float32(lo)), np.float32(hi)).astype(np.int64)


def add_codes(y, inv_s, lo, hi, relu):
    """``ROUND_ADD``: clamp ``t``, then the bits of ``add.rm(t, 1.5 * 2**23)`` minus ``0x4B400000``."""
    if relu:
        y = np.fmax(y, np.float32(0))
    t = np.fmin(np.fmax(_t(y, inv_s), np.float32(lo)), np.float32(hi))
    exact = t.astype(np.float64) + np.float64(MAGIC)  # exact: |t| < 2**8, 24-bit mantissas
    rounded = np.floor(exact).astype(np.float32)  # in [2**23, 2**24) the fp32 grid is the integers
    return rounded.view(np.int32).astype(np.int64) - MAGIC_BITS


def _cvt_rmi_sat(t: np.ndarray, unsigned: bool) -> np.ndarray:
    """``cvt.rmi.sat.{u8,s8}.f32``: floor, clamp to the byte's range, NaN to 0."""
    lo, hi = (0, 255) if unsigned else (-128, 127)
    return np.where(np.isnan(t), 0, np.clip(np.floor(np.nan_to_num(t, nan=0.0)), lo, hi)).astype(np.int64)


def sat_codes(y, inv_s, lo, hi, relu):
    """``ROUND_SAT`` as ``_requantize`` (``kernels/conv3x3.py``, ``body_conv_sm90.py``) computes it,
    with the ReLU left out before codes from 0 (``conv3x3.relu_kept``)."""
    if relu and lo != 0:
        y = np.fmax(y, np.float32(0))
    t = _t(y, inv_s)
    if lo != 0:
        t = np.fmax(t, np.float32(lo))
    unsigned = lo >= 0
    if hi < (255 if unsigned else 127):
        t = np.minimum(t, np.float32(hi))  # min.NaN.f32: NaN stays NaN
    return _cvt_rmi_sat(t, unsigned)


def _inputs(inv_s: float, lo: int, hi: int, rng: np.random.Generator) -> np.ndarray:
    """fp32 values of ``y``: random over a wide range, the special values, and values whose ``t``
    lies on, one ulp below and one ulp above every integer from ``lo - 2`` to ``hi + 2``."""
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 1e-30, -1e-30, 3e38, -3e38],
                       np.float32)
    wide = (rng.standard_normal(20000) * np.float32(4 * max(abs(lo), hi) / inv_s)).astype(np.float32)
    centres = (np.arange(lo - 2, hi + 3, dtype=np.float32) - np.float32(0.5)) / np.float32(inv_s)
    near = [centres]
    for direction in (np.float32(np.inf), np.float32(-np.inf)):  # up to 3 ulps either side
        step = centres
        for _ in range(3):
            step = np.nextafter(step, direction)
            near.append(step)
    return np.concatenate([special, wide, *near]).astype(np.float32)


RANGES = [(0, 255, True), (0, 255, False), (0, 15, True), (-128, 127, False), (-8, 7, False), (-128, 127, True)]


@pytest.mark.parametrize("lo,hi,relu", RANGES)
@pytest.mark.parametrize("inv_s", [50.0, 1 / 0.3, 0.731, 1e-3])
def test_codes_by_adds_and_by_saturating_conversion_equal_the_plain_codes(lo, hi, relu, inv_s):
    """On every input, NaN and infinities included, the three sequences give the same code byte
    (the callers keep the low 8 bits; 4-bit codes their low 4)."""
    y = _inputs(inv_s, lo, hi, np.random.default_rng(abs(lo) * 1000 + hi + int(relu)))
    want = plain_codes(y, inv_s, lo, hi, relu)
    low = 0 if relu and lo < 0 else lo  # after a ReLU the codes start at 0
    assert want.min() == low and want.max() == hi and ((want > low) & (want < hi)).any()
    mask = 0xF if hi - lo < 16 else 0xFF
    for path in (add_codes, sat_codes):
        got = path(y, inv_s, lo, hi, relu)
        bad = np.nonzero((got & mask) != (want & mask))[0]
        assert bad.size == 0, (path.__name__, y[bad[:5]], got[bad[:5]], want[bad[:5]])


def test_the_saturating_conversion_needs_its_max_for_nan():
    """Without ``max(t, LO)`` NaN would become 0 after the signed conversion, and ``HI`` after a
    plain ``min`` alone, where the clamp gives ``LO``; a ``min`` propagating NaN leaves it to the
    conversion, which gives 0, ``LO`` of codes from 0: the model tells them apart, so the test
    above would catch a missing ``max`` or a plain ``min``."""
    nan = np.array([np.nan], np.float32)
    assert plain_codes(nan, 1.0, -128, 127, False)[0] == -128
    assert _cvt_rmi_sat(_t(nan, 1.0), unsigned=False)[0] == 0
    assert _cvt_rmi_sat(np.fmin(_t(nan, 1.0), np.float32(15)), unsigned=True)[0] == 15
    assert _cvt_rmi_sat(np.minimum(_t(nan, 1.0), np.float32(15)), unsigned=True)[0] == 0
    assert sat_codes(nan, 1.0, -128, 127, False)[0] == -128
    assert sat_codes(nan, 1.0, 0, 15, False)[0] == plain_codes(nan, 1.0, 0, 15, False)[0] == 0


def test_sums_to_fp32_by_adds_are_exact_below_the_bound():
    """``I2F_ADD``: the bits ``0x4B400000 + acc`` read as fp32, minus ``1.5 * 2**23``, equal
    ``float(acc)`` for every ``|acc| < 2**22`` (all 8,388,608 of them), the bound
    ``ops.fp32_sums_by_add`` asks of the weights; just past it they do not."""
    acc = np.arange(-(2**22) + 1, 2**22, dtype=np.int64)
    by_add = (acc + MAGIC_BITS).astype(np.int32).view(np.float32) - MAGIC
    assert np.array_equal(by_add, acc.astype(np.float32))
    past = np.array([2**22 + 1, -(2**22) - 1], dtype=np.int64)
    assert not np.any((past + MAGIC_BITS).astype(np.int32).view(np.float32) - MAGIC == past.astype(np.float32))
