// CUDA packed 3x3 convolution (stride 1, zero pad 1, NHWC) with the fused epilogue of
// docs/numerics.md, quantize+pack, and pack/unpack. Registered as
// torch.ops.gdq_engine.packed_conv3x3_cuda / quantize_pack_cuda (new ops) and as the CUDA kernels
// of pack_codes / unpack_codes; bit-exact with gdq_engine/ops/reference.py.
//
// Implicit GEMM: M = N*H*W output pixels, N = Cout, K = 9 taps x C. A CTA (4 warps) owns an
// 8 x 16 pixel tile of one image (128 pixels) x 64 output channels. It loads the tile's halo,
// (8 + 2) x (16 + 2) input pixels with zeros outside the image, into shared memory once, unpacked
// to int8 (int4/int2 fields are pulled out four bytes at a time with masks and per-byte SIMD sign
// extension, __vsub4, rather than per-element shifts); every tap then reads the same halo at a
// constant row offset, so no input byte is loaded or unpacked more than once per CTA. The taps'
// 64 x C weight tiles are double-buffered with cp.async: tap t + 1's tile loads while tap t
// multiplies. Each warp runs 64 x 32 outputs with mma.sync m16n8k32 (s8 x s8, or u8 x s8 for
// unsigned 8-bit codes, so no offset correction is needed). Shared-memory rows are padded by 16
// bytes: the fragment loads of a warp hit 32 distinct banks.
//
// Packed outputs need every code of an output byte in one CTA: with k codes per byte and
// G = Cout / k, the CTA with blockIdx.y = b owns bytes [b*64/k, (b+1)*64/k) of every pixel, i.e.
// output channels j + i*G for those bytes j and i < k (for fp32 outputs, k = 1: channels
// [64b, 64b+64)). The epilogue stages codes in shared memory and packs whole bytes.
//
// Epilogue, one IEEE fp32 operation per step via __fmul_rn / __fadd_rn (never contracted into
// FMA, no fast math): y = float(acc) * mult[o]; y = y + bias[o]; ReLU; y = y * res_scale;
// y = residual + y; then fp32 out or code = clamp(floor(y * inv_s + 0.5), lo, hi), packed.

// Kernels and their launchers only (the CUDA runtime, no torch): the torch glue is csrc/cuda/ops.cpp,
// compiled by the host compiler; CI compiles this file for sm_80 and sm_90a (tests/test_cuda_compile.py).

#include "launch.h"

namespace gdq {
namespace {

constexpr int kTileH = 8, kTileW = 16;        // output pixels per CTA: one 8 x 16 tile of one image
constexpr int kBM = kTileH * kTileW;          // 128
constexpr int kHaloW = kTileW + 2;            // the tile's input rows and columns, padding included
constexpr int kHaloPx = (kTileH + 2) * kHaloW;
constexpr int kBN = kConvOutChannels;  // output channels per CTA
constexpr int kThreads = 128;  // 4 warps: 2 along pixels x 2 along channels
constexpr int kPad = 16;      // bytes of padding per shared-memory row
static_assert(kTileW == 16, "a warp's 16-row MMA fragment is one tile row");

// ---- unpacking: four codes of one field of a 32-bit word, as four int8/uint8 bytes ----------------

template <int BITS, bool SIGNED>
__device__ __forceinline__ uint32_t unpack_field(uint32_t word, int field) {
  constexpr uint32_t kMask = BITS == 4 ? 0x0F0F0F0Fu : 0x03030303u;
  constexpr uint32_t kSign = BITS == 4 ? 0x08080808u : 0x02020202u;
  const uint32_t v = (word >> (field * BITS)) & kMask;
  // Per-byte sign extension: (v ^ s) - s, byte by byte without borrows between bytes.
  return SIGNED ? __vsub4(v ^ kSign, kSign) : v;
}

// ---- asynchronous global -> shared copies (sm_80+) ---------------------------------------------------

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* global_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src));
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {  // at most PENDING committed groups still in flight
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
#endif
}

// ---- one m16n8k32 int8 tensor-core MMA -------------------------------------------------------------

template <bool A_U8>
__device__ __forceinline__ void mma_16832(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (A_U8) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // built only for sm_80+; the host launcher refuses older devices
#endif
}

__device__ __forceinline__ int quantize_code(float y, float inv_s, int lo, int hi) {
  const float t = floorf(__fadd_rn(__fmul_rn(y, inv_s), 0.5f));
  return static_cast<int>(fminf(fmaxf(t, static_cast<float>(lo)), static_cast<float>(hi)));
}

// Shared memory: the halo (kHaloPx rows of C + kPad bytes, reused for the epilogue's codes), then
// two weight tiles (kBN rows each). Every region and row starts on a 16-byte boundary (cp.async).
__host__ __device__ inline size_t halo_bytes(int C) {
  const size_t halo = static_cast<size_t>(kHaloPx) * (C + kPad), codes = static_cast<size_t>(kBM) * kBN;
  return halo > codes ? halo : codes;
}

__host__ __device__ inline size_t conv_smem_bytes(int C) {
  return halo_bytes(C) + 2 * static_cast<size_t>(kBN) * (C + kPad);
}

// The tap's (kBN, C) weight tile into sB with cp.async, one 16-byte chunk per copy.
__device__ __forceinline__ void load_weight_tile(int8_t* sB, const ConvArgs& p, int tap, int j0, int kBytes, int G,
                                                 int lda) {
  const int chunks = p.C / 16;
  for (int i = threadIdx.x; i < kBN * chunks; i += kThreads) {
    const int n = i / chunks, c = i % chunks;
    const int o = j0 + (n / kBytes) * G + (n % kBytes);
    cp_async16(sB + n * lda + 16 * c, p.w + (static_cast<size_t>(tap) * p.Cout + o) * p.C + 16 * c);
  }
  cp_async_commit();
}

template <int A_BITS, bool A_SIGNED, int O_BITS>
__global__ void __launch_bounds__(kThreads) packed_conv3x3_kernel(const ConvArgs p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int lda = p.C + kPad;
  uint8_t* sA = smem;
  int8_t* const sB = reinterpret_cast<int8_t*>(smem + halo_bytes(p.C));  // two tiles, kBN * lda bytes apart
  const int tile_bytes = kBN * lda;
  constexpr bool kU8 = A_BITS == 8 && !A_SIGNED;
  constexpr int kPerByte = O_BITS == 0 ? 1 : 8 / O_BITS;  // output codes per byte
  constexpr int kBytes = kBN / kPerByte;                    // output bytes per pixel owned here
  const int G = p.Cout / kPerByte;
  const int j0 = blockIdx.y * kBytes;
  const int tiles_x = (p.W + kTileW - 1) / kTileW, tiles_y = (p.H + kTileH - 1) / kTileH;
  const int img = blockIdx.x / (tiles_x * tiles_y);
  const int y0 = (blockIdx.x / tiles_x) % tiles_y * kTileH, x0 = blockIdx.x % tiles_x * kTileW;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int warp_m = warp >> 1, warp_n = warp & 1;

  load_weight_tile(sB, p, 0, j0, kBytes, G, lda);  // tap 0's weights fly while the halo loads

  // The halo: input pixel (y0 - 1 + hy, x0 - 1 + hx) in row hy * kHaloW + hx, zeros outside the image
  // (code 0, signed or not: the contract's padding).
  const int packed_row = p.C * A_BITS / 8;
  const int words_per_px = packed_row / 4;
  for (int i = tid; i < kHaloPx * words_per_px; i += kThreads) {
    const int hp = i / words_per_px, wd = i % words_per_px;
    const int sy = y0 - 1 + hp / kHaloW, sx = x0 - 1 + hp % kHaloW;
    uint32_t word = 0;
    if (sy >= 0 && sy < p.H && sx >= 0 && sx < p.W) {
      const size_t pix = (static_cast<size_t>(img) * p.H + sy) * p.W + sx;
      word = __ldg(reinterpret_cast<const uint32_t*>(p.x + pix * packed_row) + wd);
    }
    uint8_t* row = sA + hp * lda;
    if constexpr (A_BITS == 8) {
      *reinterpret_cast<uint32_t*>(row + 4 * wd) = word;
    } else {
      constexpr int kFields = 8 / A_BITS;
      const int group = p.C / kFields;  // channels per field (docs/numerics.md packing)
#pragma unroll
      for (int f = 0; f < kFields; ++f)
        *reinterpret_cast<uint32_t*>(row + f * group + 4 * wd) = unpack_field<A_BITS, A_SIGNED>(word, f);
    }
  }

  int acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][j][k] = 0;

  // Fragment rows mi*16 + g (+ 8) of warp_m's 64 pixels are tile row warp_m*4 + mi, columns g (g + 8):
  // halo row (warp_m*4 + mi + 1) * kHaloW + g + 1 for the centre tap.
  const int centre = (warp_m * 4 + 1) * kHaloW + g + 1;
  for (int tap = 0; tap < 9; ++tap) {
    if (tap + 1 < 9) {
      load_weight_tile(sB + ((tap + 1) & 1) * tile_bytes, p, tap + 1, j0, kBytes, G, lda);
      cp_async_wait<1>();  // this tap's tile has landed; the next one may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // every thread's copies (and, at tap 0, the halo) are visible
    const int shift = (tap / 3 - 1) * kHaloW + (tap % 3 - 1);
    const int8_t* wt = sB + (tap & 1) * tile_bytes;
    for (int k0 = 0; k0 < p.C; k0 += 32) {
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const uint8_t* r0 = sA + (centre + mi * kHaloW + shift) * lda + k0 + t * 4;
        const uint8_t* r1 = r0 + 8 * lda;
        a[mi][0] = *reinterpret_cast<const uint32_t*>(r0);
        a[mi][1] = *reinterpret_cast<const uint32_t*>(r1);
        a[mi][2] = *reinterpret_cast<const uint32_t*>(r0 + 16);
        a[mi][3] = *reinterpret_cast<const uint32_t*>(r1 + 16);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int8_t* c0 = wt + (warp_n * 32 + ni * 8 + g) * lda + k0 + t * 4;
        b[ni][0] = *reinterpret_cast<const uint32_t*>(c0);
        b[ni][1] = *reinterpret_cast<const uint32_t*>(c0 + 16);
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_16832<kU8>(acc[mi][ni], a[mi], b[ni]);
    }
    __syncthreads();  // all reads of this tap's tile are done before the next copy overwrites it
  }

  // ---- epilogue ----
  uint8_t* sC = smem;  // (kBM, kBN) codes, low O_BITS bits, when packing (the halo is no longer read)
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int px = warp_m * 64 + mi * 16 + g + (e >> 1) * 8;
        const int n = warp_n * 32 + ni * 8 + t * 2 + (e & 1);
        const int yy = y0 + px / kTileW, xx = x0 + px % kTileW;
        if (yy >= p.H || xx >= p.W) continue;
        const size_t m = (static_cast<size_t>(img) * p.H + yy) * p.W + xx;
        const int o = j0 + (n / kBytes) * G + (n % kBytes);
        float y = __fmul_rn(__int2float_rn(acc[mi][ni][e]), p.mult[o]);
        y = __fadd_rn(y, p.bias[o]);
        if (p.relu) y = fmaxf(y, 0.0f);
        if (p.residual != nullptr) {
          if (p.scale_res) y = __fmul_rn(y, p.res_scale);
          y = __fadd_rn(p.residual[m * p.Cout + o], y);
        }
        if constexpr (O_BITS == 0) {
          p.out_f[m * p.Cout + o] = y;
        } else {
          const int code = quantize_code(y, p.inv_s, p.lo, p.hi);
          sC[px * kBN + n] = static_cast<uint8_t>(code & ((1 << O_BITS) - 1));
        }
      }
    }
  }
  if constexpr (O_BITS != 0) {
    __syncthreads();
    for (int i = tid; i < kBM * kBytes; i += kThreads) {
      const int px = i / kBytes, byte = i % kBytes;
      const int yy = y0 + px / kTileW, xx = x0 + px % kTileW;
      if (yy >= p.H || xx >= p.W) continue;
      const size_t m = (static_cast<size_t>(img) * p.H + yy) * p.W + xx;
      uint32_t packed = 0;
#pragma unroll
      for (int f = 0; f < kPerByte; ++f) packed |= static_cast<uint32_t>(sC[px * kBN + f * kBytes + byte]) << (f * O_BITS);
      p.out_q[m * G + j0 + byte] = static_cast<uint8_t>(packed);
    }
  }
}

template <int A_BITS, bool A_SIGNED, int O_BITS>
cudaError_t launch_conv(const ConvArgs& args, cudaStream_t stream) {
  const size_t smem = conv_smem_bytes(args.C);
  auto kernel = packed_conv3x3_kernel<A_BITS, A_SIGNED, O_BITS>;
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int64_t tiles = static_cast<int64_t>(args.N) * ((args.H + kTileH - 1) / kTileH) *
                        ((args.W + kTileW - 1) / kTileW);
  if (tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(args.Cout / kBN));
  kernel<<<grid, kThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

template <int A_BITS, bool A_SIGNED>
cudaError_t dispatch_out(const ConvArgs& args, int o_bits, cudaStream_t stream) {
  switch (o_bits) {
    case 0: return launch_conv<A_BITS, A_SIGNED, 0>(args, stream);
    case 8: return launch_conv<A_BITS, A_SIGNED, 8>(args, stream);
    case 4: return launch_conv<A_BITS, A_SIGNED, 4>(args, stream);
    case 2: return launch_conv<A_BITS, A_SIGNED, 2>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// Every (a_bits, a_signed, o_bits) instantiation; the caller has checked the arguments.
cudaError_t launch_packed_conv3x3(const ConvArgs& args, int a_bits, bool a_signed, int o_bits, cudaStream_t stream) {
  switch (a_bits) {
    case 8: return a_signed ? dispatch_out<8, true>(args, o_bits, stream) : dispatch_out<8, false>(args, o_bits, stream);
    case 4: return a_signed ? dispatch_out<4, true>(args, o_bits, stream) : dispatch_out<4, false>(args, o_bits, stream);
    case 2: return a_signed ? dispatch_out<2, true>(args, o_bits, stream) : dispatch_out<2, false>(args, o_bits, stream);
    default: return cudaErrorInvalidValue;
  }
}

namespace {

// ---- quantize + pack, pack, unpack ---------------------------------------------------------------

// Packing: byte j of a row holds the codes of channels j + f*G (G = C / codes per byte) in bits
// [f*bits, (f+1)*bits). CodeAt(index into the (rows, C) input) -> int code.
struct QuantizedCode {
  const float* x;
  float inv_s;
  int lo, hi;
  __device__ int operator()(int64_t i) const { return quantize_code(x[i], inv_s, lo, hi); }
};

struct StoredCode {
  const int32_t* codes;
  __device__ int operator()(int64_t i) const { return codes[i]; }
};

template <typename CodeAt>
__global__ void pack_kernel(CodeAt code_at, uint8_t* __restrict__ out, int64_t rows, int C, int bits) {
  const int per_byte = 8 / bits, group = C / per_byte;
  const uint32_t mask = (1u << bits) - 1u;
  const int64_t total = rows * group;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t first = (i / group) * C + i % group;
    uint32_t byte = 0;
    for (int f = 0; f < per_byte; ++f) byte |= (static_cast<uint32_t>(code_at(first + f * group)) & mask) << (f * bits);
    out[i] = static_cast<uint8_t>(byte);
  }
}

__global__ void unpack_kernel(const uint8_t* __restrict__ packed, uint8_t* __restrict__ out, int64_t rows, int C,
                              int bits, bool is_signed) {
  const int per_byte = 8 / bits, group = C / per_byte;
  const int64_t total = rows * C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / C;
    const int c = static_cast<int>(i % C);
    const int f = c / group, j = c % group;
    // Move the field to the top of the byte, then shift back down (arithmetic for signed codes).
    const uint8_t top = static_cast<uint8_t>(packed[r * group + j] << (8 - bits - f * bits));
    out[i] = is_signed ? static_cast<uint8_t>(static_cast<int8_t>(top) >> (8 - bits))
                       : static_cast<uint8_t>(top >> (8 - bits));
  }
}

unsigned blocks_for(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

}  // namespace

// fp32 (rows, C) -> packed (rows, C * bits / 8) codes.
cudaError_t launch_quantize_pack(const float* x, uint8_t* out, int64_t rows, int C, int bits, int lo, int hi,
                                 float inv_s, cudaStream_t stream) {
  pack_kernel<<<blocks_for(rows * (C * bits / 8)), 256, 0, stream>>>(QuantizedCode{x, inv_s, lo, hi}, out, rows, C,
                                                                    bits);
  return cudaGetLastError();
}

// int32 codes (rows, C) -> packed (rows, C * bits / 8).
cudaError_t launch_pack(const int32_t* codes, uint8_t* out, int64_t rows, int C, int bits, cudaStream_t stream) {
  pack_kernel<<<blocks_for(rows * (C * bits / 8)), 256, 0, stream>>>(StoredCode{codes}, out, rows, C, bits);
  return cudaGetLastError();
}

// packed (rows, C * bits / 8) -> codes (rows, C) as int8 (signed) or uint8 bytes.
cudaError_t launch_unpack(const uint8_t* packed, uint8_t* out, int64_t rows, int C, int bits, bool is_signed,
                          cudaStream_t stream) {
  unpack_kernel<<<blocks_for(rows * C), 256, 0, stream>>>(packed, out, rows, C, bits, is_signed);
  return cudaGetLastError();
}

}  // namespace gdq
