// CUDA packed 3x3 convolution (stride 1, zero pad 1, NHWC) with the fused epilogue of
// docs/numerics.md, quantize+pack, and pack/unpack. Registered as
// torch.ops.gdq_engine.packed_conv3x3_cuda / quantize_pack_cuda (new ops) and as the CUDA kernels
// of pack_codes / unpack_codes; bit-exact with gdq_engine/ops/reference.py.
//
// Implicit GEMM: M = N*H*W output pixels, N = Cout, K = 9 taps x C. A CTA (4 warps) owns 128
// pixels x 64 output channels; per tap it unpacks the 128 shifted input pixels into shared memory
// as int8 (int4/int2 fields are pulled out four bytes at a time with masks and per-byte SIMD
// sign extension, __vsub4, rather than per-element shifts) next to the tap's 64 x C weight codes,
// then each warp runs 64 x 32 outputs with mma.sync m16n8k32 (s8 x s8, or u8 x s8 for unsigned
// 8-bit codes, so no offset correction is needed). Rows are padded by 16 bytes: the fragment
// loads of a warp hit 32 distinct banks.
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

constexpr int kBM = 128;      // output pixels per CTA
constexpr int kBN = kConvOutChannels;  // output channels per CTA
constexpr int kThreads = 128;  // 4 warps: 2 along pixels x 2 along channels
constexpr int kPad = 16;      // bytes of padding per shared-memory row

// ---- unpacking: four codes of one field of a 32-bit word, as four int8/uint8 bytes ----------------

template <int BITS, bool SIGNED>
__device__ __forceinline__ uint32_t unpack_field(uint32_t word, int field) {
  constexpr uint32_t kMask = BITS == 4 ? 0x0F0F0F0Fu : 0x03030303u;
  constexpr uint32_t kSign = BITS == 4 ? 0x08080808u : 0x02020202u;
  const uint32_t v = (word >> (field * BITS)) & kMask;
  // Per-byte sign extension: (v ^ s) - s, byte by byte without borrows between bytes.
  return SIGNED ? __vsub4(v ^ kSign, kSign) : v;
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

template <int A_BITS, bool A_SIGNED, int O_BITS>
__global__ void __launch_bounds__(kThreads) packed_conv3x3_kernel(const ConvArgs p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int lda = p.C + kPad;
  const int a_rows = lda > kBN ? lda : kBN;  // the A region is reused for the epilogue's codes
  uint8_t* sA = smem;
  int8_t* sB = reinterpret_cast<int8_t*>(smem + kBM * a_rows);
  constexpr bool kU8 = A_BITS == 8 && !A_SIGNED;
  constexpr int kPerByte = O_BITS == 0 ? 1 : 8 / O_BITS;  // output codes per byte
  constexpr int kBytes = kBN / kPerByte;                    // output bytes per pixel owned here
  const int G = p.Cout / kPerByte;
  const int j0 = blockIdx.y * kBytes;
  const int M = p.N * p.H * p.W;
  const int m0 = blockIdx.x * kBM;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int warp_m = warp >> 1, warp_n = warp & 1;

  int acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][j][k] = 0;

  const int packed_row = p.C * A_BITS / 8;
  const int words_per_px = packed_row / 4;
  const int w_words = p.C / 4;
  for (int tap = 0; tap < 9; ++tap) {
    const int dy = tap / 3 - 1, dx = tap % 3 - 1;
    for (int i = tid; i < kBM * words_per_px; i += kThreads) {
      const int px = i / words_per_px, wd = i % words_per_px;
      const int m = m0 + px;
      uint32_t word = 0;  // zero padding: code 0 in every field, signed or not
      if (m < M) {
        const int xx = m % p.W, yy = (m / p.W) % p.H, nn = m / (p.W * p.H);
        const int sy = yy + dy, sx = xx + dx;
        if (sy >= 0 && sy < p.H && sx >= 0 && sx < p.W) {
          const size_t pix = (static_cast<size_t>(nn) * p.H + sy) * p.W + sx;
          word = __ldg(reinterpret_cast<const uint32_t*>(p.x + pix * packed_row) + wd);
        }
      }
      uint8_t* row = sA + px * lda;
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
    for (int i = tid; i < kBN * w_words; i += kThreads) {
      const int n = i / w_words, wd = i % w_words;
      const int o = j0 + (n / kBytes) * G + (n % kBytes);
      *reinterpret_cast<uint32_t*>(sB + n * lda + 4 * wd) =
          __ldg(reinterpret_cast<const uint32_t*>(p.w + (static_cast<size_t>(tap) * p.Cout + o) * p.C) + wd);
    }
    __syncthreads();
    for (int k0 = 0; k0 < p.C; k0 += 32) {
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const uint8_t* r0 = sA + (warp_m * 64 + mi * 16 + g) * lda + k0 + t * 4;
        const uint8_t* r1 = r0 + 8 * lda;
        a[mi][0] = *reinterpret_cast<const uint32_t*>(r0);
        a[mi][1] = *reinterpret_cast<const uint32_t*>(r1);
        a[mi][2] = *reinterpret_cast<const uint32_t*>(r0 + 16);
        a[mi][3] = *reinterpret_cast<const uint32_t*>(r1 + 16);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int8_t* c0 = sB + (warp_n * 32 + ni * 8 + g) * lda + k0 + t * 4;
        b[ni][0] = *reinterpret_cast<const uint32_t*>(c0);
        b[ni][1] = *reinterpret_cast<const uint32_t*>(c0 + 16);
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_16832<kU8>(acc[mi][ni], a[mi], b[ni]);
    }
    __syncthreads();
  }

  // ---- epilogue ----
  uint8_t* sC = smem;  // (kBM, kBN) codes, low O_BITS bits, when packing
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int px = warp_m * 64 + mi * 16 + g + (e >> 1) * 8;
        const int n = warp_n * 32 + ni * 8 + t * 2 + (e & 1);
        const int m = m0 + px;
        if (m >= M) continue;
        const int o = j0 + (n / kBytes) * G + (n % kBytes);
        float y = __fmul_rn(__int2float_rn(acc[mi][ni][e]), p.mult[o]);
        y = __fadd_rn(y, p.bias[o]);
        if (p.relu) y = fmaxf(y, 0.0f);
        if (p.residual != nullptr) {
          if (p.scale_res) y = __fmul_rn(y, p.res_scale);
          y = __fadd_rn(p.residual[static_cast<size_t>(m) * p.Cout + o], y);
        }
        if constexpr (O_BITS == 0) {
          p.out_f[static_cast<size_t>(m) * p.Cout + o] = y;
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
      const int m = m0 + px;
      if (m >= M) continue;
      uint32_t packed = 0;
#pragma unroll
      for (int f = 0; f < kPerByte; ++f) packed |= static_cast<uint32_t>(sC[px * kBN + f * kBytes + byte]) << (f * O_BITS);
      p.out_q[static_cast<size_t>(m) * G + j0 + byte] = static_cast<uint8_t>(packed);
    }
  }
}

template <int A_BITS, bool A_SIGNED, int O_BITS>
cudaError_t launch_conv(const ConvArgs& args, cudaStream_t stream) {
  const int lda = args.C + kPad;
  const size_t smem = static_cast<size_t>(kBM) * (lda > kBN ? lda : kBN) + static_cast<size_t>(kBN) * lda;
  auto kernel = packed_conv3x3_kernel<A_BITS, A_SIGNED, O_BITS>;
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int64_t M = static_cast<int64_t>(args.N) * args.H * args.W;
  const dim3 grid(static_cast<unsigned>((M + kBM - 1) / kBM), static_cast<unsigned>(args.Cout / kBN));
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
