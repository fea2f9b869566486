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

// Two sections: the kernels and their launchers need only the CUDA runtime; the torch glue below
// (argument checks, op registration) is left out with -DGDQ_KERNELS_ONLY, which is how CI
// compiles every kernel instantiation for sm_80 and sm_90a on machines whose (CPU) torch lacks
// the c10 CUDA headers (tests/test_cuda_compile.py).

#include <cuda_runtime.h>

#include <cstdint>

namespace gdq {
namespace {

constexpr int kBM = 128;      // output pixels per CTA
constexpr int kBN = 64;       // output channels per CTA
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

struct ConvArgs {
  const uint8_t* x;       // (N, H, W, C * A_BITS / 8) packed codes
  const int8_t* w;        // (9, Cout, C) int8 weight codes
  const float* mult;      // (Cout,) fp32(s_in) * fp32(s_w[o])
  const float* bias;      // (Cout,)
  const float* residual;  // (N, H, W, Cout) fp32 or nullptr
  float* out_f;           // (N, H, W, Cout) fp32 when O_BITS == 0
  uint8_t* out_q;         // (N, H, W, Cout * O_BITS / 8) packed codes otherwise
  int N, H, W, C, Cout;
  float res_scale;
  bool scale_res, relu;
  int lo, hi;
  float inv_s;
};

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

#ifndef GDQ_KERNELS_ONLY
// ---- torch glue ----------------------------------------------------------------------------------

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

namespace gdq {
namespace {

void check_bits(int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "unsupported bit-width ", bits, "; packed containers are 2, 4, 8");
}

void check_cuda(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, name, " must be a CUDA tensor on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

at::Tensor packed_conv3x3_cuda(const at::Tensor& x, int64_t a_bits, bool a_signed, const at::Tensor& w,
                               const at::Tensor& mult, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                               double res_scale, bool relu, int64_t o_bits, int64_t lo, int64_t hi, double inv_s) {
  TORCH_CHECK(a_bits == 8 || a_bits == 4 || a_bits == 2, "a_bits must be a container (8, 4, 2), got ", a_bits);
  TORCH_CHECK(x.dim() == 4, "x must be (N, H, W, C * a_bits / 8) packed codes, got ", x.sizes());
  const auto device = x.device();
  check_cuda(x, "x", at::kByte, device);
  check_cuda(w, "w", at::kChar, device);
  check_cuda(mult, "mult", at::kFloat, device);
  check_cuda(bias, "bias", at::kFloat, device);
  TORCH_CHECK(w.dim() == 3 && w.size(0) == 9, "w must be (9, Cout, C) int8 codes (prepare_conv_weight), got ", w.sizes());
  const int64_t C = x.size(3) * 8 / a_bits, Cout = w.size(1);
  TORCH_CHECK(w.size(2) == C, "w has ", w.size(2), " input channels, x has ", C);
  TORCH_CHECK(C % 32 == 0, "the CUDA conv needs input channels in multiples of 32, got ", C);
  TORCH_CHECK(Cout % kBN == 0, "the CUDA conv needs output channels in multiples of ", kBN, ", got ", Cout);
  TORCH_CHECK(mult.numel() == Cout && bias.numel() == Cout, "mult and bias need ", Cout, " values");
  TORCH_CHECK(x.numel() < (int64_t{1} << 31) && x.size(0) * x.size(1) * x.size(2) * Cout < (int64_t{1} << 31),
              "tensor too large for 32-bit pixel indexing; split the batch");
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()));
  TORCH_CHECK(major >= 8, "the CUDA conv needs sm_80 or newer (int8 mma.sync m16n8k32)");
  c10::cuda::CUDAGuard guard(device);
  ConvArgs args{};
  args.x = x.data_ptr<uint8_t>();
  args.w = w.data_ptr<int8_t>();
  args.mult = mult.data_ptr<float>();
  args.bias = bias.data_ptr<float>();
  args.N = static_cast<int>(x.size(0));
  args.H = static_cast<int>(x.size(1));
  args.W = static_cast<int>(x.size(2));
  args.C = static_cast<int>(C);
  args.Cout = static_cast<int>(Cout);
  args.res_scale = static_cast<float>(res_scale);
  args.scale_res = res_scale != 1.0;
  args.relu = relu;
  args.lo = static_cast<int>(lo);
  args.hi = static_cast<int>(hi);
  args.inv_s = static_cast<float>(inv_s);
  if (residual.has_value()) {
    check_cuda(*residual, "residual", at::kFloat, device);
    TORCH_CHECK(residual->dim() == 4 && residual->size(0) == x.size(0) && residual->size(1) == x.size(1) &&
                    residual->size(2) == x.size(2) && residual->size(3) == Cout,
                "residual must be (N, H, W, Cout) fp32, got ", residual->sizes());
    args.residual = residual->data_ptr<float>();
  }
  at::Tensor out;
  if (o_bits == 0) {
    out = at::empty({x.size(0), x.size(1), x.size(2), Cout}, x.options().dtype(at::kFloat));
    args.out_f = out.data_ptr<float>();
  } else {
    TORCH_CHECK(o_bits == 8 || o_bits == 4 || o_bits == 2, "o_bits must be 0, 8, 4 or 2, got ", o_bits);
    out = at::empty({x.size(0), x.size(1), x.size(2), Cout * o_bits / 8}, x.options());
    args.out_q = out.data_ptr<uint8_t>();
  }
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(launch_packed_conv3x3(args, static_cast<int>(a_bits), a_signed, static_cast<int>(o_bits),
                                       c10::cuda::getCurrentCUDAStream(device.index())));
  return out;
}

at::Tensor quantize_pack_cuda(const at::Tensor& x, int64_t bits, int64_t lo, int64_t hi, double inv_s) {
  check_bits(bits);
  TORCH_CHECK(x.is_cuda() && x.dim() >= 1, "quantize_pack (CUDA) expects a CUDA tensor (..., C)");
  c10::cuda::CUDAGuard guard(x.device());
  const auto src = x.to(at::kFloat).contiguous();
  const int64_t C = x.size(-1), per_byte = 8 / bits;
  TORCH_CHECK(C % per_byte == 0, C, " channels cannot be packed at ", bits, " bits: need a multiple of ", per_byte);
  auto sizes = x.sizes().vec();
  sizes.back() = C / per_byte;
  auto out = at::empty(sizes, x.options().dtype(at::kByte));
  const int64_t rows = C ? src.numel() / C : 0;
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(launch_quantize_pack(src.data_ptr<float>(), out.data_ptr<uint8_t>(), rows, static_cast<int>(C),
                                     static_cast<int>(bits), static_cast<int>(lo), static_cast<int>(hi),
                                     static_cast<float>(inv_s), c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor pack_codes_cuda(const at::Tensor& codes, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK(codes.scalar_type() == at::kChar || codes.scalar_type() == at::kByte || codes.scalar_type() == at::kInt,
              "pack_codes expects int8, uint8 or int32 codes, got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() >= 1, "pack_codes expects at least one dimension");
  c10::cuda::CUDAGuard guard(codes.device());
  const int64_t C = codes.size(-1), per_byte = 8 / bits;
  TORCH_CHECK(C % per_byte == 0, C, " channels cannot be packed at ", bits, " bits: need a multiple of ", per_byte);
  const auto src = codes.to(at::kInt).contiguous();
  auto sizes = codes.sizes().vec();
  sizes.back() = C / per_byte;
  auto out = at::empty(sizes, codes.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(launch_pack(src.data_ptr<int32_t>(), out.data_ptr<uint8_t>(), src.numel() / C, static_cast<int>(C),
                            static_cast<int>(bits), c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor unpack_codes_cuda(const at::Tensor& packed, int64_t bits, bool is_signed) {
  check_bits(bits);
  TORCH_CHECK(packed.scalar_type() == at::kByte, "unpack_codes expects uint8 packed data, got ", packed.scalar_type());
  TORCH_CHECK(packed.dim() >= 1, "unpack_codes expects at least one dimension");
  c10::cuda::CUDAGuard guard(packed.device());
  const auto src = packed.contiguous();
  const int64_t group = packed.size(-1), C = group * (8 / bits);
  auto sizes = packed.sizes().vec();
  sizes.back() = C;
  auto out = at::empty(sizes, packed.options().dtype(is_signed ? at::kChar : at::kByte));
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(launch_unpack(src.data_ptr<uint8_t>(), static_cast<uint8_t*>(out.data_ptr()), src.numel() / group,
                              static_cast<int>(C), static_cast<int>(bits), is_signed,
                              c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace gdq

TORCH_LIBRARY_FRAGMENT(gdq_engine, m) {
  m.def(
      "packed_conv3x3_cuda(Tensor x, int a_bits, bool a_signed, Tensor w, Tensor mult, Tensor bias, "
      "Tensor? residual, float res_scale, bool relu, int o_bits, int lo, int hi, float inv_s) -> Tensor");
}

TORCH_LIBRARY_IMPL(gdq_engine, CUDA, m) {
  m.impl("packed_conv3x3_cuda", &gdq::packed_conv3x3_cuda);
  m.impl("quantize_pack", &gdq::quantize_pack_cuda);
  m.impl("pack_codes", &gdq::pack_codes_cuda);
  m.impl("unpack_codes", &gdq::unpack_codes_cuda);
}
#endif  // GDQ_KERNELS_ONLY
