// CPU packed 3x3 convolution (stride 1, zero pad 1, NHWC) with the fused epilogue of
// docs/numerics.md, and quantize+pack. Registered as torch.ops.gdq_engine.packed_conv3x3_cpu and
// the CPU kernel of torch.ops.gdq_engine.quantize_pack; bit-exact with gdq_engine/ops/reference.py.
//
// Integer core: each thread unpacks the input rows its output rows need, right before their use,
// into a ring of three zero-padded uint8 rows (signed codes are stored as code + 128, so padding
// is 128 and the dot products run unsigned x signed); weights come prepared as (9, C/4, Cout, 4)
// int8 so four input channels of sixteen output channels fill one 64-byte vector. With
// AVX512-VNNI (vpdpbusd: u8 x s8 -> s32, four products per lane) a
// register tile of PX pixels x NB*16 output channels accumulates over 9 taps x C/4 channel quads;
// with AVX2 only (most AMD CPUs before Zen 4, many laptops), vpmaddwd on the operands widened to
// int16 (exact; the 8-bit vpmaddubsw would saturate); otherwise a portable loop computes the same
// int32 sums. For signed inputs the shift is removed with -128 * sum(w[o]) over all taps
// (padding, stored as 128, is code 0).
// A 1x1 conv (RDN's dense-block fusion) runs through the same cores with (1, C/4, Cout, 4)
// weights: only the centre tap, the sums of a 3x3 conv whose other taps are zero at a ninth of
// its multiply-adds.
//
// With AMX-INT8 (Sapphire Rapids and later; Linux grants the tile state on request) the same sums
// come from tile matrix multiplies (tdpbusd: u8 x s8 -> s32, 16 x 16 outputs x 64 bytes of K per
// instruction): per output row, blocks of 32 pixels x 32 output channels are four accumulator
// tiles; per tap and 64-channel chunk, two A tiles (16 consecutive pixels of a padded row,
// rows C bytes apart: no im2col) and two B tiles (the same (9, C/4, Cout, 4) weights, rows Cout*4
// bytes apart) feed four tdpbusd. Pixels past the row end compute garbage that is never read: the
// padded rows and the accumulator rows carry slack for them. Each 32-pixel block's epilogue runs
// right after its tiles are stored, while its accumulators are in L1.
//
// Epilogue (AVX-512 with the per-channel constants held in registers across pixels where the
// channel count allows, else per pixel), one fp32 operation per step, no fused multiply-add
// (built with -ffp-contract=off):
// y = float(acc) * mult[o]; y = y + bias[o]; ReLU; y = y * res_scale; y = residual + y;
// then fp32 out or code = clamp(floor(y * inv_s + 0.5)) packed at o_bits. Optionally the store
// pixel-shuffles (output channels sub-pixel major: block b = i*r + j of Cout / r^2 channels goes to
// pixel (r*y + i, r*x + j)) and fp32 results are stored as bf16 (round to nearest even); an fp32
// result can also be re-quantized and packed into a second output (the next block's input codes).

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define GDQ_AMX 1
#endif

#include "packing.h"

namespace gdq {
namespace {

bool cpu_has_vnni() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

// AMX-INT8 in the CPU (CPUID.(7,0):EDX[25] AMX-INT8, [24] AMX-TILE), AVX-512 for the epilogue,
// and the kernel's permission to use the tile state (arch_prctl ARCH_REQ_XCOMP_PERM, Linux >= 5.16).
bool cpu_has_amx() {
#ifdef GDQ_AMX
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1) || !((d >> 25) & 1) || !cpu_has_vnni()) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return has;
#else
  return false;
#endif
}

// ---- integer core -------------------------------------------------------------------------

struct ConvGeom {
  int64_t H, W, C, Cout;  // C: input channels; a padded input row is W + 2 (+ slack) pixels of C bytes
  // The taps the weights hold, tap0 .. tap0 + taps - 1 of the 3x3 window (tap = 3 * ky + kx):
  // all nine, or only the centre one (tap 4) for a 1x1 conv, whose weights are (1, C/4, Cout, 4).
  int64_t tap0 = 0, taps = 9;
};

// The first 64-byte boundary in `data` (which must hold 64 bytes of slack). AMX tile rows of 64
// bytes that straddle two cache lines load and store far slower, and a heap vector's data is only
// 16-byte aligned.
template <typename T>
T* align64(T* data) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(data) + 63) & ~static_cast<uintptr_t>(63));
}

// The three padded input rows of one output row (rows[ky] starts at padding pixel -1; W + 2
// pixels, plus slack the AMX kernel reads and never uses).
using InRows = const uint8_t* const*;

// acc[x][o] for one output row.
void row_portable(InRows in, const int8_t* wv, const ConvGeom& g, int32_t* acc) {
  const int64_t C4 = g.C / 4;
  std::fill(acc, acc + g.W * g.Cout, 0);
  for (int64_t t = 0; t < g.taps; ++t) {
    const int64_t ky = (g.tap0 + t) / 3, kx = (g.tap0 + t) % 3;
    for (int64_t x = 0; x < g.W; ++x) {
      const uint8_t* a = in[ky] + (x + kx) * g.C;
      int32_t* out = acc + x * g.Cout;
      for (int64_t c4 = 0; c4 < C4; ++c4) {
        const int8_t* w = wv + (t * C4 + c4) * g.Cout * 4;
        const int32_t a0 = a[c4 * 4], a1 = a[c4 * 4 + 1], a2 = a[c4 * 4 + 2], a3 = a[c4 * 4 + 3];
        for (int64_t o = 0; o < g.Cout; ++o) {
          out[o] += a0 * w[o * 4] + a1 * w[o * 4 + 1] + a2 * w[o * 4 + 2] + a3 * w[o * 4 + 3];
        }
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
template <int PX, int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline void tile_vnni(
    InRows in, const int8_t* wv, const ConvGeom& g, int64_t x0, int64_t o0, int32_t* acc) {
  const int64_t C4 = g.C / 4;
  __m512i s[PX][NB];
  for (int p = 0; p < PX; ++p)
    for (int b = 0; b < NB; ++b) s[p][b] = _mm512_setzero_si512();
  for (int64_t t = 0; t < g.taps; ++t) {
    const int64_t ky = (g.tap0 + t) / 3, kx = (g.tap0 + t) % 3;
    const uint8_t* a = in[ky] + (x0 + kx) * g.C;
    const int8_t* w = wv + (t * C4 * g.Cout + o0) * 4;
    for (int64_t c4 = 0; c4 < C4; ++c4) {
      __m512i wr[NB];
      for (int b = 0; b < NB; ++b) wr[b] = _mm512_loadu_si512(w + (c4 * g.Cout + b * 16) * 4);
      for (int p = 0; p < PX; ++p) {
        int32_t quad;
        std::memcpy(&quad, a + p * g.C + c4 * 4, 4);
        const __m512i av = _mm512_set1_epi32(quad);
        for (int b = 0; b < NB; ++b) s[p][b] = _mm512_dpbusd_epi32(s[p][b], av, wr[b]);
      }
    }
  }
  for (int p = 0; p < PX; ++p)
    for (int b = 0; b < NB; ++b) _mm512_storeu_si512(acc + (x0 + p) * g.Cout + o0 + b * 16, s[p][b]);
}

template <int NB>
void row_blocks_vnni(InRows in, const int8_t* wv, const ConvGeom& g, int64_t o0, int32_t* acc) {
  constexpr int PX = NB <= 2 ? 12 : 6;  // accumulators PX*NB <= 24 of the 32 vector registers
  int64_t x = 0;
  for (; x + PX <= g.W; x += PX) tile_vnni<PX, NB>(in, wv, g, x, o0, acc);
  for (; x < g.W; ++x) tile_vnni<1, NB>(in, wv, g, x, o0, acc);
}

void row_vnni(InRows in, const int8_t* wv, const ConvGeom& g, int32_t* acc) {
  int64_t o0 = 0;
  for (; o0 + 64 <= g.Cout; o0 += 64) row_blocks_vnni<4>(in, wv, g, o0, acc);
  switch ((g.Cout - o0) / 16) {
    case 3: row_blocks_vnni<3>(in, wv, g, o0, acc); break;
    case 2: row_blocks_vnni<2>(in, wv, g, o0, acc); break;
    case 1: row_blocks_vnni<1>(in, wv, g, o0, acc); break;
    default: break;
  }
}

// AVX2 (no VNNI): exact int32 sums from vpmaddwd on 16-bit operands. Each output row's three
// padded input rows are widened to int16 once (a few percent of the work), and the weights once
// per call (the (9, C/4, Cout, 4) layout as int16); per tap and channel quad, a pixel's four
// channels are one 64-bit broadcast, and a block of 8 output channels' four weights each are two
// vectors of 4 outputs x 4 channels.
// vpmaddwd sums channel pairs into int32 exactly (|a * w| <= 255 * 128; vpmaddubsw's int16 pair
// sums would saturate for 8-bit codes); each output's two pair sums, each at most half its sum's
// magnitude bound, are added once per tile, at the store.
template <int PX>
__attribute__((target("avx2"))) inline void tile_avx2(const int16_t* const* in, const int16_t* wv, const ConvGeom& g,
                                                     int64_t x0, int64_t o0, int32_t* acc) {
  const int64_t C4 = g.C / 4;
  __m256i s[PX][2];
  for (int p = 0; p < PX; ++p) s[p][0] = s[p][1] = _mm256_setzero_si256();
  for (int64_t t = 0; t < g.taps; ++t) {
    const int64_t ky = (g.tap0 + t) / 3, kx = (g.tap0 + t) % 3;
    const int16_t* a = in[ky] + (x0 + kx) * g.C;
    const int16_t* w = wv + (t * C4 * g.Cout + o0) * 4;
    for (int64_t c4 = 0; c4 < C4; ++c4) {
      const __m256i* wq = reinterpret_cast<const __m256i*>(w + c4 * g.Cout * 4);
      const __m256i w_lo = _mm256_loadu_si256(wq), w_hi = _mm256_loadu_si256(wq + 1);  // outputs 0..3, 4..7
      for (int p = 0; p < PX; ++p) {
        int64_t quad;
        std::memcpy(&quad, a + p * g.C + c4 * 4, 8);
        const __m256i av = _mm256_set1_epi64x(quad);
        s[p][0] = _mm256_add_epi32(s[p][0], _mm256_madd_epi16(av, w_lo));
        s[p][1] = _mm256_add_epi32(s[p][1], _mm256_madd_epi16(av, w_hi));
      }
    }
  }
  for (int p = 0; p < PX; ++p) {
    // lanes (o, channels 0-1), (o, channels 2-3) for o = 0..3 and 4..7 -> (o0, o1, o4, o5 | o2, o3, o6, o7)
    const __m256i h = _mm256_hadd_epi32(s[p][0], s[p][1]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + (x0 + p) * g.Cout + o0),
                        _mm256_permute4x64_epi64(h, _MM_SHUFFLE(3, 1, 2, 0)));
  }
}

// n bytes as int16 (unsigned: padded rows; signed: weights).
template <bool SIGNED, typename T>
__attribute__((target("avx2"))) void widen_avx2(const T* src, int64_t n, int16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m256i wide = SIGNED ? _mm256_cvtepi8_epi16(v) : _mm256_cvtepu8_epi16(v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), wide);
  }
  for (; i < n; ++i) dst[i] = src[i];
}

void row_avx2(InRows in, const int16_t* wv, const ConvGeom& g, int16_t* wide, int32_t* acc) {
  const int64_t n = (g.W + 2) * g.C;
  const int16_t* rows[3] = {};
  for (int64_t ky = g.tap0 / 3; ky <= (g.tap0 + g.taps - 1) / 3; ++ky) {  // the rows the taps read
    widen_avx2<false>(in[ky], n, wide + ky * n);
    rows[ky] = wide + ky * n;
  }
  constexpr int PX = 6;  // 12 accumulators, 2 weight vectors and the broadcast of the 16 registers
  for (int64_t o0 = 0; o0 < g.Cout; o0 += 8) {
    int64_t x = 0;
    for (; x + PX <= g.W; x += PX) tile_avx2<PX>(rows, wv, g, x, o0, acc);
    for (; x < g.W; ++x) tile_avx2<1>(rows, wv, g, x, o0, acc);
  }
}

#ifdef GDQ_AMX
constexpr int64_t kAmxPx = 32;  // pixels per accumulator block (two 16-row tiles)

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Whether the AMX row kernel takes these channel counts: K chunks of min(C, 64) bytes that divide
// C (a multiple of 4), output channels in pairs of 16.
bool amx_fits(const ConvGeom& g) {
  const int64_t kb = std::min<int64_t>(g.C, 64);
  return g.C % 4 == 0 && g.C % kb == 0 && g.Cout % 32 == 0;
}

// acc[x][o] for x < round_up(W, 32) (pixels >= W are garbage) of output row `row`; tiles 0-3 hold
// (pixels 0-15 | 16-31) x (channels o..o+15 | o+16..o+31), 4-5 the A tiles, 6-7 the B tiles.
// Output channels go in groups of whole epilogue blocks of `cs` channels (lcm(cs, 32): all of Cout
// without a shuffle, one sub-pixel block of the upsampler's 256): per group, every 32-pixel block
// of the row, then `finish(row, acc, x0, x1, b_lo, b_hi)` runs the epilogue of those pixels and
// blocks while the accumulators are in L1 and the group's weights (9 x C x group bytes) stay in
// L1 across the row instead of streaming from L2 per pixel block. Measured and not kept:
// interleaving the epilogue between K steps to overlap the AVX-512 and tile units (slower: the two
// do not overlap on this core).
template <class Finish>
__attribute__((target("amx-tile,amx-int8,avx512f"))) void row_amx(InRows in, const int8_t* wv, const ConvGeom& g,
                                                                   int64_t cs, int32_t* acc, int64_t row,
                                                                   const Finish& finish) {
  const int64_t kb = std::min<int64_t>(g.C, 64), C4 = g.C / 4;
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  for (int t = 4; t < 6; ++t) cfg.rows[t] = 16, cfg.colsb[t] = static_cast<uint16_t>(kb);
  for (int t = 6; t < 8; ++t) cfg.rows[t] = static_cast<uint8_t>(kb / 4), cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  const int64_t a_stride = g.C, b_stride = g.Cout * 4, c_stride = g.Cout * 4;
  const int64_t group = std::lcm<int64_t>(cs, 32);
  for (int64_t g0 = 0; g0 < g.Cout; g0 += group) {
    for (int64_t x0 = 0; x0 < g.W; x0 += kAmxPx) {
      for (int64_t o0 = g0; o0 < g0 + group; o0 += 32) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t t = 0; t < g.taps; ++t) {
          const int64_t ky = (g.tap0 + t) / 3, kx = (g.tap0 + t) % 3;
          const uint8_t* a = in[ky] + (x0 + kx) * g.C;
          for (int64_t k = 0; k < g.C; k += kb) {
            const int8_t* w = wv + ((t * C4 + k / 4) * g.Cout + o0) * 4;
            _tile_loadd(4, a + k, a_stride);
            _tile_loadd(5, a + 16 * g.C + k, a_stride);
            _tile_loadd(6, w, b_stride);
            _tile_loadd(7, w + 64, b_stride);
            _tile_dpbusd(0, 4, 6);
            _tile_dpbusd(1, 4, 7);
            _tile_dpbusd(2, 5, 6);
            _tile_dpbusd(3, 5, 7);
          }
        }
        int32_t* c = acc + x0 * g.Cout + o0;
        _tile_stored(0, c, c_stride);
        _tile_stored(1, c + 16, c_stride);
        _tile_stored(2, c + 16 * g.Cout, c_stride);
        _tile_stored(3, c + 16 * g.Cout + 16, c_stride);
      }
      finish(row, acc, x0, std::min(x0 + kAmxPx, g.W), g0 / cs, (g0 + group) / cs);
    }
  }
  _tile_release();
}
#endif

// clamp(floor(v * inv + 0.5), lo, hi) as int32: the scalar requantize's operations, in its order
// (clamping before flooring gives the same integer: lo and hi are integers).
__attribute__((target("avx512f"))) inline __m512i requantize16(__m512 v, __m512 inv, __m512 lo, __m512 hi) {
  const __m512 t = _mm512_add_ps(_mm512_mul_ps(v, inv), _mm512_set1_ps(0.5f));
  return _mm512_cvt_roundps_epi32(_mm512_min_ps(_mm512_max_ps(t, lo), hi), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
}

// fp32 -> bf16 bits of 16 lanes, round to nearest even, NaN -> 0x7FC0 (torch's conversion, with
// integer operations: bit-identical to the scalar to_bf16).
__attribute__((target("avx512f"))) inline __m256i bf16x16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)),
                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, _mm512_srli_epi32(r, 16), _mm512_set1_epi32(0x7FC0)));
}

// Epilogue of one pixel's Cout accumulators, 16 channels per step (same fp32 operations, in the
// same order, as the scalar epilogue: separate multiply and add, requantize16).
__attribute__((target("avx512f"))) void epilogue_pixel_avx512(
    const int32_t* a, const int32_t* wsum, int32_t shift_fix, const float* mult, const float* bias, bool relu,
    const float* res, float rs, bool scale_res, int64_t Cout, float* out_f, int32_t* codes, float inv, int64_t lo,
    int64_t hi) {
  const __m512i fix = _mm512_set1_epi32(shift_fix);
  const __m512 zero = _mm512_setzero_ps(), vinv = _mm512_set1_ps(inv);
  const __m512 vlo = _mm512_set1_ps(static_cast<float>(lo)), vhi = _mm512_set1_ps(static_cast<float>(hi));
  const __m512 vrs = _mm512_set1_ps(rs);
  for (int64_t o = 0; o < Cout; o += 16) {
    __m512i acc = _mm512_add_epi32(_mm512_loadu_si512(a + o), _mm512_mullo_epi32(fix, _mm512_loadu_si512(wsum + o)));
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(mult + o));
    v = _mm512_add_ps(v, _mm512_loadu_ps(bias + o));
    if (relu) v = _mm512_max_ps(v, zero);
    if (res != nullptr) {
      if (scale_res) v = _mm512_mul_ps(v, vrs);
      v = _mm512_add_ps(_mm512_loadu_ps(res + o), v);
    }
    if (codes == nullptr) {
      _mm512_storeu_ps(out_f + o, v);
    } else {
      _mm512_storeu_si512(codes + o, requantize16(v, vinv, vlo, vhi));
    }
  }
}

__attribute__((target("avx512f"))) void requantize_row_avx512(const float* in, int64_t C, float inv, int64_t lo,
                                                                int64_t hi, int32_t* codes) {
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512 vlo = _mm512_set1_ps(static_cast<float>(lo)), vhi = _mm512_set1_ps(static_cast<float>(hi));
  for (int64_t c = 0; c < C; c += 16) {
    _mm512_storeu_si512(codes + c, requantize16(_mm512_loadu_ps(in + c), vinv, vlo, vhi));
  }
}

// int32 codes (C) -> packed bytes (C * bits / 8), 16 bytes per step; needs (C * bits / 8) % 16 == 0.
__attribute__((target("avx512f"))) void pack_row_avx512(const int32_t* codes, int64_t C, int64_t bits, uint8_t* dst) {
  const int64_t groups = 8 / bits, gsize = C / groups;
  const __m512i mask = _mm512_set1_epi32((1 << bits) - 1);
  for (int64_t j = 0; j < gsize; j += 16) {
    __m512i v = _mm512_setzero_si512();
    for (int64_t i = 0; i < groups; ++i) {
      const __m512i field = _mm512_and_si512(_mm512_loadu_si512(codes + j + i * gsize), mask);
      v = _mm512_or_si512(v, _mm512_sllv_epi32(field, _mm512_set1_epi32(static_cast<int>(i * bits))));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), _mm512_cvtepi32_epi8(v));
  }
}

// The same epilogue, requantization and packing 8 lanes at a time for CPUs with AVX2 and no
// AVX-512 (the same fp32 operations in the same order: bit-identical to the scalar ones).
__attribute__((target("avx2"))) inline __m256i requantize8(__m256 v, __m256 inv, __m256 lo, __m256 hi) {
  const __m256 t = _mm256_add_ps(_mm256_mul_ps(v, inv), _mm256_set1_ps(0.5f));
  return _mm256_cvtps_epi32(_mm256_floor_ps(_mm256_min_ps(_mm256_max_ps(t, lo), hi)));
}

__attribute__((target("avx2"))) void epilogue_pixel_avx2(
    const int32_t* a, const int32_t* wsum, int32_t shift_fix, const float* mult, const float* bias, bool relu,
    const float* res, float rs, bool scale_res, int64_t Cout, float* out_f, int32_t* codes, float inv, int64_t lo,
    int64_t hi) {
  const __m256i fix = _mm256_set1_epi32(shift_fix);
  const __m256 zero = _mm256_setzero_ps(), vinv = _mm256_set1_ps(inv);
  const __m256 vlo = _mm256_set1_ps(static_cast<float>(lo)), vhi = _mm256_set1_ps(static_cast<float>(hi));
  const __m256 vrs = _mm256_set1_ps(rs);
  for (int64_t o = 0; o < Cout; o += 8) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wsum + o));
    const __m256i acc = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + o)),
                                         _mm256_mullo_epi32(fix, w));
    __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_loadu_ps(mult + o));
    v = _mm256_add_ps(v, _mm256_loadu_ps(bias + o));
    if (relu) v = _mm256_max_ps(v, zero);
    if (res != nullptr) {
      if (scale_res) v = _mm256_mul_ps(v, vrs);
      v = _mm256_add_ps(_mm256_loadu_ps(res + o), v);
    }
    if (codes == nullptr) {
      _mm256_storeu_ps(out_f + o, v);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + o), requantize8(v, vinv, vlo, vhi));
    }
  }
}

__attribute__((target("avx2"))) void requantize_row_avx2(const float* in, int64_t C, float inv, int64_t lo, int64_t hi,
                                                         int32_t* codes) {
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256 vlo = _mm256_set1_ps(static_cast<float>(lo)), vhi = _mm256_set1_ps(static_cast<float>(hi));
  for (int64_t c = 0; c < C; c += 8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + c), requantize8(_mm256_loadu_ps(in + c), vinv, vlo, vhi));
  }
}

// int32 codes (C) -> packed bytes (C * bits / 8), 8 bytes per step; needs (C * bits / 8) % 8 == 0.
__attribute__((target("avx2"))) void pack_row_avx2(const int32_t* codes, int64_t C, int64_t bits, uint8_t* dst) {
  const int64_t groups = 8 / bits, gsize = C / groups;
  const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
  const __m256i first_dwords = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
  for (int64_t j = 0; j < gsize; j += 8) {
    __m256i v = _mm256_setzero_si256();
    for (int64_t i = 0; i < groups; ++i) {
      const __m256i* src = reinterpret_cast<const __m256i*>(codes + j + i * gsize);
      const __m256i field = _mm256_and_si256(_mm256_loadu_si256(src), mask);
      v = _mm256_or_si256(v, _mm256_sllv_epi32(field, _mm256_set1_epi32(static_cast<int>(i * bits))));
    }
    // 8 values < 256 -> bytes: packs within each 128-bit lane, then the lanes' first dwords together
    const __m256i b = _mm256_packus_epi16(_mm256_packus_epi32(v, v), _mm256_setzero_si256());
    const __m256i both = _mm256_permutevar8x32_epi32(b, first_dwords);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + j), _mm256_castsi256_si128(both));
  }
}
#endif

// Pack one row of codes: 16 bytes per AVX-512 step where allowed and the packed row is a multiple
// of 16 bytes, 8 per AVX2 step where allowed and it is a multiple of 8, the shared scalar loop
// otherwise.
void pack_codes_row(const int32_t* codes, int64_t C, int64_t bits, uint8_t* dst, bool avx512, bool avx2 = false) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (avx512 && (C * bits / 8) % 16 == 0) {
    pack_row_avx512(codes, C, bits, dst);
    return;
  }
  if (avx2 && (C * bits / 8) % 8 == 0) {
    pack_row_avx2(codes, C, bits, dst);
    return;
  }
#endif
  pack_row(codes, C, bits, dst);
}

// ---- register-held epilogue (AVX-512, per-channel constants in registers) ----------------------

// What the epilogue of a run of pixels of one output row needs; pointers are null where a part
// is absent, and point at the run's first pixel.
struct EpilogueArgs {
  const int32_t* wsum;
  const float *mult, *bias;
  int32_t shift_fix;
  bool relu;
  const float* res;  // fp32 residual, Cout values per pixel
  float rs;
  float inv;  // codes out: clamp(floor(y * inv + 0.5), lo, hi) packed at o_bits
  int64_t lo, hi;
  float* out_f;       // fp32 out
  uint16_t* out_h;    // bf16 out
  uint8_t* out_b;     // packed codes out
  float q2_inv;       // second output: the fp32 result quantized at q2_bits
  int64_t q2_lo, q2_hi;
  uint8_t* q2_b;
};

#if defined(__x86_64__) && defined(__GNUC__)
// NV vectors of 16 codes (channels 16v..16v+15) -> NV * BITS / 8 * 16 packed bytes (packing.h layout).
template <int NV, int BITS>
__attribute__((target("avx512f"))) inline void pack16(const __m512i* codes, uint8_t* dst) {
  constexpr int kGroups = 8 / BITS, kOut = NV / kGroups;
  static_assert(NV % kGroups == 0, "the packed row must be whole 16-byte vectors");
  const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1);
  for (int j = 0; j < kOut; ++j) {
    __m512i v = BITS == 8 ? codes[j] : _mm512_and_si512(codes[j], mask);
    for (int i = 1; i < kGroups; ++i) {
      v = _mm512_or_si512(v, _mm512_slli_epi32(_mm512_and_si512(codes[j + i * kOut], mask), i * BITS));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j * 16), _mm512_cvtepi32_epi8(v));
  }
}

// Epilogue of W pixels' NV*16 channels (one sub-pixel block), the per-channel constants held in
// registers across pixels. acc rows are acc_stride int32 apart; outputs of pixel x go to
// out + x * out_step elements (out_step = NV*16 * shuffle: the pixel-shuffled neighbours between).
// O_BITS: 0 = fp32 (or bf16) out, else packed codes; Q2: width of the second packed output (0 = none).
template <int NV, int O_BITS, int Q2>
__attribute__((target("avx512f,avx512bw"))) void epilogue_block_avx512(const int32_t* acc, int64_t acc_stride,
                                                                       int64_t W, int64_t out_step,
                                                                       const EpilogueArgs& e) {
  __m512i fix[NV];
  __m512 mult[NV], bias[NV];
  for (int v = 0; v < NV; ++v) {
    fix[v] = _mm512_mullo_epi32(_mm512_set1_epi32(e.shift_fix), _mm512_loadu_si512(e.wsum + 16 * v));
    mult[v] = _mm512_loadu_ps(e.mult + 16 * v);
    bias[v] = _mm512_loadu_ps(e.bias + 16 * v);
  }
  const __m512 zero = _mm512_setzero_ps(), rs = _mm512_set1_ps(e.rs);
  const __m512 inv = _mm512_set1_ps(e.inv), lo = _mm512_set1_ps(static_cast<float>(e.lo)),
               hi = _mm512_set1_ps(static_cast<float>(e.hi));
  const __m512 inv2 = _mm512_set1_ps(e.q2_inv), lo2 = _mm512_set1_ps(static_cast<float>(e.q2_lo)),
               hi2 = _mm512_set1_ps(static_cast<float>(e.q2_hi));
  const bool scale_res = e.rs != 1.0f;
  for (int64_t x = 0; x < W; ++x) {
    __m512 y[NV];
    for (int v = 0; v < NV; ++v) {
      const __m512i a = _mm512_add_epi32(_mm512_loadu_si512(acc + x * acc_stride + 16 * v), fix[v]);
      y[v] = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a), mult[v]), bias[v]);
      if (e.relu) y[v] = _mm512_max_ps(y[v], zero);
      if (e.res != nullptr) {
        if (scale_res) y[v] = _mm512_mul_ps(y[v], rs);
        y[v] = _mm512_add_ps(_mm512_loadu_ps(e.res + x * NV * 16 + 16 * v), y[v]);
      }
    }
    if constexpr (O_BITS != 0) {
      __m512i q[NV];
      for (int v = 0; v < NV; ++v) q[v] = requantize16(y[v], inv, lo, hi);
      pack16<NV, O_BITS>(q, e.out_b + x * out_step * O_BITS / 8);
    } else {
      if (e.out_h != nullptr) {  // bf16, round to nearest even
        for (int v = 0; v < NV; ++v) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(e.out_h + x * out_step + 16 * v), bf16x16(y[v]));
        }
      } else {
        for (int v = 0; v < NV; ++v) _mm512_storeu_ps(e.out_f + x * out_step + 16 * v, y[v]);
      }
      if constexpr (Q2 != 0) {
        __m512i q[NV];
        for (int v = 0; v < NV; ++v) q[v] = requantize16(y[v], inv2, lo2, hi2);
        pack16<NV, Q2>(q, e.q2_b + x * NV * 16 * Q2 / 8);
      }
    }
  }
}

using EpilogueBlock = void (*)(const int32_t*, int64_t, int64_t, int64_t, const EpilogueArgs&);

// The instance for these widths, or null where a packed row would not be whole 16-byte vectors.
template <int NV, int O_BITS, int Q2>
EpilogueBlock epilogue_block_if_whole() {
  constexpr int bits = O_BITS ? O_BITS : Q2;
  if constexpr (bits == 0 || NV % (8 / bits) == 0) {
    return epilogue_block_avx512<NV, O_BITS, Q2>;
  } else {
    return nullptr;
  }
}

template <int NV>
EpilogueBlock epilogue_block_for_nv(int64_t o_bits, int64_t q2_bits) {
  if (o_bits == 8) return epilogue_block_if_whole<NV, 8, 0>();
  if (o_bits == 4) return epilogue_block_if_whole<NV, 4, 0>();
  if (o_bits == 2) return epilogue_block_if_whole<NV, 2, 0>();
  if (q2_bits == 8) return epilogue_block_if_whole<NV, 0, 8>();
  if (q2_bits == 4) return epilogue_block_if_whole<NV, 0, 4>();
  if (q2_bits == 2) return epilogue_block_if_whole<NV, 0, 2>();
  return epilogue_block_if_whole<NV, 0, 0>();
}

// The register-held epilogue for Cs output channels per stored pixel, or null where it does not
// apply (Cs not 32, 64 or 128; a packed row not whole 16-byte vectors): the per-pixel loop runs then.
EpilogueBlock epilogue_block_for(int64_t Cs, int64_t o_bits, int64_t q2_bits) {
  switch (Cs) {
    case 32: return epilogue_block_for_nv<2>(o_bits, q2_bits);
    case 64: return epilogue_block_for_nv<4>(o_bits, q2_bits);
    case 128: return epilogue_block_for_nv<8>(o_bits, q2_bits);
    default: return nullptr;
  }
}
#endif

// ---- unpack into padded rows --------------------------------------------------------------

// One image row of W pixels: packed (W, CP) bytes -> (W, C) unpacked bytes, signed codes as
// code + 128. Field f of a byte (BITS wide, sign bit s = 2^(BITS-1)) becomes f for unsigned codes
// and (f ^ s) + (128 - s) for signed ones: (f ^ s) - s is the code, +128 the stored offset (for
// 8 bits: the byte ^ 0x80). With CP a multiple of 16 the fields come out 16 bytes at a time (SSE2,
// byte fields from 16-bit shifts and a mask); otherwise one byte at a time, same arithmetic.
template <int BITS, bool SIGNED>
void unpack_row(const uint8_t* src, uint8_t* dst, int64_t W, int64_t CP) {
  constexpr int kPer = 8 / BITS;
  constexpr uint8_t kMask = static_cast<uint8_t>((1u << BITS) - 1u), kSign = static_cast<uint8_t>(1u << (BITS - 1));
  constexpr uint8_t kAdd = SIGNED ? static_cast<uint8_t>(128 - kSign) : 0, kXor = SIGNED ? kSign : 0;
  const int64_t C = CP * kPer;
  if (CP % 16 == 0) {
#if defined(__x86_64__)
    const __m128i mask = _mm_set1_epi8(static_cast<char>(kMask)), flip = _mm_set1_epi8(static_cast<char>(kXor)),
                  add = _mm_set1_epi8(static_cast<char>(kAdd));
    for (int64_t p = 0; p < W; ++p) {
      for (int64_t j = 0; j < CP; j += 16) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + p * CP + j));
        for (int i = 0; i < kPer; ++i) {
          __m128i f = BITS == 8 ? v : _mm_and_si128(_mm_srli_epi16(v, i * BITS), mask);
          if (SIGNED) f = _mm_add_epi8(_mm_xor_si128(f, flip), add);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + p * C + i * CP + j), f);
        }
      }
    }
    return;
#endif
  }
  for (int64_t p = 0; p < W; ++p) {
    for (int i = 0; i < kPer; ++i) {
      for (int64_t j = 0; j < CP; ++j) {
        const uint8_t f = static_cast<uint8_t>((src[p * CP + j] >> (i * BITS)) & kMask);
        dst[p * C + i * CP + j] = static_cast<uint8_t>((f ^ kXor) + kAdd);
      }
    }
  }
}

using UnpackRow = void (*)(const uint8_t*, uint8_t*, int64_t, int64_t);

UnpackRow unpack_row_for(int64_t bits, bool is_signed) {
  if (bits == 8) return is_signed ? unpack_row<8, true> : unpack_row<8, false>;
  if (bits == 4) return is_signed ? unpack_row<4, true> : unpack_row<4, false>;
  return is_signed ? unpack_row<2, true> : unpack_row<2, false>;
}

// The padded input rows an output row reads, unpacked on demand into a ring of three rows owned
// by one thread: packed (W, CP) -> (W + 2 + slack, C) bytes, signed codes + 128 (pad 128),
// unsigned as is (pad 0); `slack` pixels of padding value follow each row (the AMX kernel reads
// past the row end). Output rows in order reuse two of the three rows, so each input row is
// unpacked about once, right before its three uses, and stays in L1/L2 (a whole-image pass ahead
// of the convolution left it in L3 for images over a few megabytes).
class RowRing {
 public:
  RowRing(const uint8_t* src, int64_t H, int64_t W, int64_t CP, int64_t C, int64_t slack, int64_t bits,
          bool is_signed)
      : src_(src), H_(H), W_(W), CP_(CP), C_(C), pad_(is_signed ? 128 : 0),
        row_bytes_(((W + 2 + slack) * C + 63) / 64 * 64), unpack_(unpack_row_for(bits, is_signed)),
        buffer_(3 * row_bytes_ + 64), base_(align64(buffer_.data())) {}

  // Padded rows y, y+1, y+2 of image n (padded row 0 and H+1 are the zero-code border).
  void rows_for(int64_t n, int64_t y, const uint8_t* out[3]) {
    for (int ky = 0; ky < 3; ++ky) out[ky] = row(n, y + ky);
  }

 private:
  const uint8_t* row(int64_t n, int64_t yp) {
    const int slot = static_cast<int>(yp % 3);
    uint8_t* line = base_ + slot * row_bytes_;
    const int64_t tag = n * (H_ + 2) + yp;
    if (tags_[slot] == tag) return line;
    tags_[slot] = tag;
    if (yp == 0 || yp == H_ + 1) {
      std::memset(line, pad_, row_bytes_);
    } else {
      std::memset(line, pad_, C_);
      unpack_(src_ + (n * H_ + yp - 1) * W_ * CP_, line + C_, W_, CP_);
      std::memset(line + (W_ + 1) * C_, pad_, row_bytes_ - (W_ + 1) * C_);
    }
    return line;
  }

  const uint8_t* src_;
  int64_t H_, W_, CP_, C_;
  uint8_t pad_;
  int64_t row_bytes_;
  UnpackRow unpack_;
  std::vector<uint8_t> buffer_;
  uint8_t* base_;
  int64_t tags_[3] = {-1, -1, -1};
};

// ---- epilogue ----------------------------------------------------------------------------------

// fp32 -> bf16 bits, round to nearest even (NaN -> 0x7FC0): torch's own conversion.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return std::isnan(f) ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same 16 lanes at a time (bf16x16).
__attribute__((target("avx512f"))) void to_bf16_row_avx512(const float* in, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), bf16x16(_mm512_loadu_ps(in + i)));
  }
  for (; i < n; ++i) out[i] = to_bf16(in[i]);
}
#endif

// bf16 bits -> fp32 (exact: the bits are the top half of the fp32 value's).
inline float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) void from_bf16_row_avx512(const uint16_t* in, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i));
    _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
  for (; i < n; ++i) out[i] = from_bf16(in[i]);
}
#endif

void from_bf16_row(const uint16_t* in, int64_t n, float* out, bool avx512) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (avx512) {
    from_bf16_row_avx512(in, n, out);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = from_bf16(in[i]);
}

void to_bf16_row(const float* in, int64_t n, uint16_t* out, bool avx512) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (avx512) {
    to_bf16_row_avx512(in, n, out);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = to_bf16(in[i]);
}

inline int32_t requantize(float y, float inv_s, int64_t lo, int64_t hi) {
  float t = y * inv_s;
  t = t + 0.5f;
  const float q = std::floor(t);
  return static_cast<int32_t>(std::min(std::max(q, static_cast<float>(lo)), static_cast<float>(hi)));
}

// fp32 row of C values -> codes clamp(floor(x * inv + 0.5)) packed at `bits` into dst (one
// quantize_pack row; `vec`: AVX-512 with C % 16 == 0).
void quantize_pack_row(const float* in, int64_t C, float inv, int64_t lo, int64_t hi, int64_t bits, int32_t* codes,
                       uint8_t* dst, bool vec, bool avx2 = false) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (vec) {
    requantize_row_avx512(in, C, inv, lo, hi, codes);
  } else if (avx2 && C % 8 == 0) {
    requantize_row_avx2(in, C, inv, lo, hi, codes);
  } else
#endif
  for (int64_t c = 0; c < C; ++c) codes[c] = requantize(in[c], inv, lo, hi);
  pack_codes_row(codes, C, bits, dst, vec, avx2);
}

const char* dtype_name(at::ScalarType t) {
  return t == at::kByte ? "uint8" : t == at::kBFloat16 ? "bfloat16" : "float32";
}

// A caller-given output buffer: contiguous, on the CPU, of this dtype and shape.
void check_out_buffer(const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef sizes, const char* what) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.device().is_cpu() && t.sizes() == sizes, what,
              " must be a contiguous CPU ", dtype_name(dtype), " tensor of shape ", sizes);
}

}  // namespace

at::Tensor packed_conv3x3_cpu(const at::Tensor& x_packed, int64_t a_bits, bool a_signed, const at::Tensor& w_vnni,
                              const at::Tensor& wsum, const at::Tensor& mult, const at::Tensor& bias,
                              const std::optional<at::Tensor>& residual, double res_scale, bool relu, int64_t o_bits,
                              int64_t o_lo, int64_t o_hi, double inv_s, bool allow_vnni, bool allow_amx,
                              int64_t shuffle, bool out_bf16, const std::optional<at::Tensor>& out_buffer,
                              int64_t q2_bits, int64_t q2_lo, int64_t q2_hi, double q2_inv,
                              const std::optional<at::Tensor>& q2_out, bool allow_avx2) {
  TORCH_CHECK(a_bits == 2 || a_bits == 4 || a_bits == 8, "a_bits must be a container (2, 4, 8), got ", a_bits);
  TORCH_CHECK(o_bits == 0 || o_bits == 2 || o_bits == 4 || o_bits == 8, "o_bits must be 0 (fp32), 2, 4 or 8");
  TORCH_CHECK(x_packed.scalar_type() == at::kByte && x_packed.dim() == 4 && x_packed.device().is_cpu(),
              "x_packed must be a CPU uint8 NHWC tensor");
  TORCH_CHECK(w_vnni.scalar_type() == at::kChar && w_vnni.dim() == 4 && (w_vnni.size(0) == 9 || w_vnni.size(0) == 1) &&
                  w_vnni.size(3) == 4,
              "w_vnni must be (9, C/4, Cout, 4) int8, or (1, C/4, Cout, 4) for a 1x1 conv (see prepare_conv_weight)");
  const int64_t N = x_packed.size(0), H = x_packed.size(1), W = x_packed.size(2);
  const int64_t C = w_vnni.size(1) * 4, Cout = w_vnni.size(2);
  TORCH_CHECK(x_packed.size(3) * (8 / a_bits) == C, "activations hold ", x_packed.size(3) * (8 / a_bits),
              " channels, weights expect ", C);
  TORCH_CHECK(wsum.numel() == Cout && mult.numel() == Cout && bias.numel() == Cout, "per-channel vectors need ", Cout,
              " entries");
  TORCH_CHECK(shuffle >= 1 && Cout % (shuffle * shuffle) == 0, "shuffle must be >= 1 and divide Cout into r*r "
              "sub-pixel blocks, got ", shuffle, " for ", Cout, " channels");
  const int64_t blocks = shuffle * shuffle, Cs = Cout / blocks;  // output channels per stored pixel
  TORCH_CHECK(shuffle == 1 || !residual.has_value(), "a pixel-shuffle store takes no residual");
  TORCH_CHECK(!out_bf16 || o_bits == 0, "bf16 output is for unquantized (o_bits 0) results");
  TORCH_CHECK(o_bits == 0 || Cs % (8 / o_bits) == 0, Cs, " output channels cannot be packed at ", o_bits, " bits");
  // Second output: the fp32 result also quantized and packed at q2_bits (the next block's input).
  TORCH_CHECK(q2_bits == 0 || ((q2_bits == 2 || q2_bits == 4 || q2_bits == 8) && o_bits == 0 && !out_bf16 &&
                               shuffle == 1 && q2_out.has_value() && Cout % (8 / q2_bits) == 0),
              "q2 (a second, packed output) needs fp32 output without shuffle, a container width and q2_out");
  const auto xin = x_packed.contiguous();
  const auto wv = w_vnni.contiguous();
  const auto ws = wsum.to(at::kInt).contiguous();
  const auto m = mult.to(at::kFloat).contiguous();
  const auto bs = bias.to(at::kFloat).contiguous();
  at::Tensor res;
  if (residual.has_value()) {
    res = residual->contiguous();
    TORCH_CHECK(res.scalar_type() == at::kFloat && res.numel() == N * H * W * Cout, "residual must be fp32 (N,H,W,Cout)");
  }
  const int64_t taps = w_vnni.size(0);
  const ConvGeom g{H, W, C, Cout, taps == 1 ? 4 : 0, taps};
  bool vnni = false, amx = false, avx2 = false;
#if defined(__x86_64__) && defined(__GNUC__)
  vnni = allow_vnni && cpu_has_vnni() && Cout % 16 == 0;
#endif
#ifdef GDQ_AMX
  amx = allow_amx && cpu_has_amx() && amx_fits(g);
  const int64_t acc_w = amx ? (W + kAmxPx - 1) / kAmxPx * kAmxPx : W;
#else
  const int64_t acc_w = W;
#endif
#if defined(__x86_64__) && defined(__GNUC__)
  avx2 = !vnni && !amx && allow_avx2 && cpu_has_avx2() && Cout % 8 == 0;  // its int16 copies only where it runs
#endif
  const uint8_t* src = xin.data_ptr<uint8_t>();
  const int64_t slack = acc_w - W;  // AMX blocks of 32 pixels read up to round_up(W, 32) + 2 pixels
  const int64_t out_c = o_bits ? Cs * o_bits / 8 : Cs;
  const auto out_type = o_bits ? at::kByte : out_bf16 ? at::kBFloat16 : at::kFloat;
  at::Tensor out;
  if (out_buffer.has_value()) {  // e.g. the residual itself: each value is read before its output is written
    out = *out_buffer;
    check_out_buffer(out, out_type, {N, H * shuffle, W * shuffle, out_c}, "out");
  } else {
    out = at::empty({N, H * shuffle, W * shuffle, out_c}, x_packed.options().dtype(out_type));
  }
  const bool avx512 = (vnni || amx) && Cs % 16 == 0;  // VNNI and AMX imply AVX-512F
  bool avx2_epilogue = false;  // 8 lanes where the 16-lane one does not run (allow_avx2=False: scalar)
#if defined(__x86_64__) && defined(__GNUC__)
  avx2_epilogue = !avx512 && allow_avx2 && cpu_has_avx2() && Cs % 8 == 0;
#endif
  const int8_t* pw = wv.data_ptr<int8_t>();
  std::vector<int16_t> w16(avx2 ? taps * C * Cout : 0);  // the AVX2 core's weights, widened once per call
#if defined(__x86_64__) && defined(__GNUC__)
  if (avx2) widen_avx2<true>(pw, taps * C * Cout, w16.data());
#endif
  const int32_t* pws = ws.data_ptr<int32_t>();
  const float* pm = m.data_ptr<float>();
  const float* pb = bs.data_ptr<float>();
  const float* pr = residual.has_value() ? res.data_ptr<float>() : nullptr;
  const float rs = static_cast<float>(res_scale), inv = static_cast<float>(inv_s);
  const int32_t shift_fix = a_signed ? -128 : 0;
  float* out_f = o_bits || out_bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* out_h = out_bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  uint8_t* out_b = o_bits ? out.data_ptr<uint8_t>() : nullptr;
  uint8_t* q2_b = nullptr;
  const float q2_inv_f = static_cast<float>(q2_inv);
  if (q2_bits) {
    check_out_buffer(*q2_out, at::kByte, {N, H, W, Cout * q2_bits / 8}, "q2_out");
    q2_b = q2_out->data_ptr<uint8_t>();
  }
  EpilogueBlock fast_epilogue = nullptr;
#if defined(__x86_64__) && defined(__GNUC__)
  if (avx512) fast_epilogue = epilogue_block_for(Cs, o_bits, q2_bits);
#endif
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> acc_buffer(acc_w * Cout + 16);
    int32_t* const acc = align64(acc_buffer.data());
    RowRing ring(src, H, W, x_packed.size(3), C, slack, a_bits, a_signed);
    const uint8_t* rows[3];
    std::vector<int32_t> codes(o_bits ? Cs : 0);
    std::vector<float> staged(out_bf16 ? Cs : 0);
    std::vector<int32_t> codes2(q2_bits ? Cout : 0);
    std::vector<int16_t> wide(avx2 ? 3 * (W + 2) * C : 0);  // the AVX2 core's int16 copies of the 3 rows
    // The epilogue of pixels [xa, xb) of output row r, sub-pixel blocks [b_lo, b_hi) of Cs channels
    // (all of them without a shuffle), whose accumulators are acc (x * Cout + o).
    const auto finish = [&](int64_t r, const int32_t* acc, int64_t xa, int64_t xb, int64_t b_lo, int64_t b_hi) {
      const int64_t n = r / H, y = r % H;
      if (fast_epilogue != nullptr) {
        for (int64_t b = b_lo; b < b_hi; ++b) {  // sub-pixel (b / shuffle, b % shuffle)
          const int64_t o0 = b * Cs;
          const int64_t dst = ((n * H + y) * shuffle + b / shuffle) * W * shuffle + xa * shuffle + b % shuffle;
          const EpilogueArgs e{pws + o0, pm + o0, pb + o0, shift_fix, relu,
                               pr ? pr + ((n * H + y) * W + xa) * Cout : nullptr, rs, inv, o_lo, o_hi,
                               out_f ? out_f + dst * Cs : nullptr, out_h ? out_h + dst * Cs : nullptr,
                               out_b ? out_b + dst * out_c : nullptr, q2_inv_f, q2_lo, q2_hi,
                               q2_b ? q2_b + dst * Cs * q2_bits / 8 : nullptr};
          fast_epilogue(acc + xa * Cout + o0, Cout, xb - xa, Cs * shuffle, e);
        }
        return;
      }
      for (int64_t x = xa; x < xb; ++x) {
        const int64_t pix = (n * H + y) * W + x;
        for (int64_t b = b_lo; b < b_hi; ++b) {  // sub-pixel (b / shuffle, b % shuffle); one block without shuffle
          const int64_t o0 = b * Cs;
          const int64_t dst = ((n * H + y) * shuffle + b / shuffle) * W * shuffle + x * shuffle + b % shuffle;
          const int32_t* a = acc + x * Cout + o0;
          float* f = out_bf16 ? staged.data() : o_bits ? nullptr : out_f + dst * Cs;
          const float* rp = pr ? pr + pix * Cout : nullptr;
#if defined(__x86_64__) && defined(__GNUC__)
          if (avx512) {
            epilogue_pixel_avx512(a, pws + o0, shift_fix, pm + o0, pb + o0, relu, rp, rs, rs != 1.0f, Cs, f,
                                  o_bits ? codes.data() : nullptr, inv, o_lo, o_hi);
          } else if (avx2_epilogue) {
            epilogue_pixel_avx2(a, pws + o0, shift_fix, pm + o0, pb + o0, relu, rp, rs, rs != 1.0f, Cs, f,
                                o_bits ? codes.data() : nullptr, inv, o_lo, o_hi);
          } else
#endif
          for (int64_t o = 0; o < Cs; ++o) {
            float v = static_cast<float>(a[o] + shift_fix * pws[o0 + o]) * pm[o0 + o];
            v = v + pb[o0 + o];
            if (relu) v = v < 0.0f ? 0.0f : v;
            if (rp != nullptr) {
              if (rs != 1.0f) v = v * rs;
              v = rp[o] + v;
            }
            if (o_bits) {
              codes[o] = requantize(v, inv, o_lo, o_hi);
            } else {
              f[o] = v;
            }
          }
          if (o_bits) pack_codes_row(codes.data(), Cs, o_bits, out_b + dst * out_c, avx512, avx2_epilogue);
          if (q2_bits) {  // the fp32 values just stored, re-read from L1
            quantize_pack_row(f, Cs, q2_inv_f, q2_lo, q2_hi, q2_bits, codes2.data(), q2_b + dst * Cs * q2_bits / 8,
                              avx512, avx2_epilogue);
          }
          if (out_bf16) to_bf16_row(staged.data(), Cs, out_h + dst * Cs, avx512);
        }
      }
    };
#ifdef GDQ_AMX
    if (amx) {
      for (int64_t r = begin; r < end; ++r) {
        ring.rows_for(r / H, r % H, rows);
        row_amx(rows, pw, g, Cs, acc, r, finish);
      }
      return;
    }
#endif
    for (int64_t r = begin; r < end; ++r) {
      ring.rows_for(r / H, r % H, rows);
#if defined(__x86_64__) && defined(__GNUC__)
      if (vnni) {
        row_vnni(rows, pw, g, acc);
      } else if (avx2) {
        row_avx2(rows, w16.data(), g, wide.data(), acc);
      } else {
        row_portable(rows, pw, g, acc);
      }
#else
      row_portable(rows, pw, g, acc);
#endif
      finish(r, acc, 0, W, 0, blocks);
    }
  });
  return out;
}

at::Tensor quantize_pack_into(const at::Tensor& x, int64_t bits, int64_t lo, int64_t hi, double inv_s,
                              const std::optional<at::Tensor>& out_buffer) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits must be a container (2, 4, 8)");
  const bool bf16 = x.scalar_type() == at::kBFloat16;  // read as its exact fp32 values
  TORCH_CHECK((x.scalar_type() == at::kFloat || bf16) && x.device().is_cpu() && x.dim() >= 1,
              "x must be a CPU fp32 or bf16 tensor");
  const int64_t C = x.size(-1), groups = 8 / bits;
  TORCH_CHECK(C % groups == 0, C, " channels cannot be packed at ", bits, " bits");
  const auto src = x.contiguous();
  const int64_t rows = src.numel() / std::max<int64_t>(C, 1), gsize = C / groups;
  auto sizes = x.sizes().vec();
  sizes.back() = gsize;
  at::Tensor out;
  if (out_buffer.has_value()) {
    out = *out_buffer;
    check_out_buffer(out, at::kByte, sizes, "out");
  } else {
    out = at::empty(sizes, x.options().dtype(at::kByte));
  }
  const float* in = bf16 ? nullptr : src.data_ptr<float>();
  const uint16_t* in_h = bf16 ? reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>()) : nullptr;
  uint8_t* dst = out.data_ptr<uint8_t>();
  const float inv = static_cast<float>(inv_s);
  bool vec = false;
#if defined(__x86_64__) && defined(__GNUC__)
  vec = C % 16 == 0 && __builtin_cpu_supports("avx512f");
  const bool avx2 = !vec && C % 8 == 0 && cpu_has_avx2();
#else
  const bool avx2 = false;
#endif
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> codes(C);
    std::vector<float> widened(bf16 ? C : 0);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = in + r * C;
      if (bf16) {  // widened exactly
        from_bf16_row(in_h + r * C, C, widened.data(), vec);
        row = widened.data();
      }
      quantize_pack_row(row, C, inv, lo, hi, bits, codes.data(), dst + r * gsize, vec, avx2);
    }
  });
  return out;
}

at::Tensor quantize_pack_cpu(const at::Tensor& x, int64_t bits, int64_t lo, int64_t hi, double inv_s) {
  return quantize_pack_into(x, bits, lo, hi, inv_s, std::nullopt);
}

bool has_vnni() { return cpu_has_vnni(); }
bool has_avx2() { return cpu_has_avx2(); }
bool has_amx() { return cpu_has_amx(); }

// Which integer core packed_conv3x3_cpu runs for these channel counts on this CPU.
std::string conv_path(int64_t C, int64_t Cout, bool allow_vnni, bool allow_amx, bool allow_avx2) {
#ifdef GDQ_AMX
  if (allow_amx && cpu_has_amx() && amx_fits(ConvGeom{1, 1, C, Cout})) return "amx";
#endif
  if (allow_vnni && cpu_has_vnni() && Cout % 16 == 0) return "vnni";
  if (allow_avx2 && cpu_has_avx2() && Cout % 8 == 0) return "avx2";
  return "portable";
}

}  // namespace gdq

TORCH_LIBRARY_FRAGMENT(gdq_engine, m) {
  m.def(
      "packed_conv3x3_cpu(Tensor x_packed, int a_bits, bool a_signed, Tensor w_vnni, Tensor wsum, Tensor mult, "
      "Tensor bias, Tensor? residual, float res_scale, bool relu, int o_bits, int o_lo, int o_hi, float inv_s, "
      "bool allow_vnni=True, bool allow_amx=True, int shuffle=1, bool out_bf16=False, Tensor(a!)? out=None, "
      "int q2_bits=0, int q2_lo=0, int q2_hi=0, float q2_inv=1.0, Tensor(b!)? q2_out=None, "
      "bool allow_avx2=True) -> Tensor");
  m.def("quantize_pack_cpu_into(Tensor x, int bits, int lo, int hi, float inv_s, Tensor(a!)? out) -> Tensor",
        &gdq::quantize_pack_into);
  m.def("cpu_has_vnni() -> bool", &gdq::has_vnni);
  m.def("cpu_has_amx() -> bool", &gdq::has_amx);
  m.def("cpu_has_avx2() -> bool", &gdq::has_avx2);
  m.def("cpu_conv_path(int C, int Cout, bool allow_vnni=True, bool allow_amx=True, bool allow_avx2=True) -> str",
        &gdq::conv_path);
}

TORCH_LIBRARY_IMPL(gdq_engine, CPU, m) {
  m.impl("packed_conv3x3_cpu", &gdq::packed_conv3x3_cpu);
  m.impl("quantize_pack", &gdq::quantize_pack_cpu);
}
