// The CUDA kernels' host interface (csrc/cuda/conv3x3.cu): plain pointers and the CUDA runtime
// only, no torch. The torch glue (argument checks, op registration) is csrc/cuda/ops.cpp, compiled
// by the host C++ compiler like csrc/cpu: nvcc never compiles torch's headers. (A TORCH_CHECK
// message with an integer crashed on the lent GPU machine, with the glue compiled by nvcc and by
// g++ alike: its compiler wrapper had linked a static libstdc++ into _C.so; setup.py fixes that.)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace gdq {

constexpr int kConvOutChannels = 64;  // output channels per CTA: Cout must be a multiple
constexpr int kConvInChannels = 32;   // input channels per MMA k-step: C must be a multiple

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

// Packed 3x3 conv with the fused epilogue; a_bits / o_bits are containers (8, 4, 2; o_bits 0: fp32 out).
cudaError_t launch_packed_conv3x3(const ConvArgs& args, int a_bits, bool a_signed, int o_bits, cudaStream_t stream);
// fp32 (rows, C) -> packed (rows, C * bits / 8) codes of clamp(floor(x * inv_s + 0.5), lo, hi).
cudaError_t launch_quantize_pack(const float* x, uint8_t* out, int64_t rows, int C, int bits, int lo, int hi,
                                 float inv_s, cudaStream_t stream);
// int32 codes (rows, C) -> packed (rows, C * bits / 8).
cudaError_t launch_pack(const int32_t* codes, uint8_t* out, int64_t rows, int C, int bits, cudaStream_t stream);
// packed (rows, C * bits / 8) -> codes (rows, C) as int8 (signed) or uint8 bytes.
cudaError_t launch_unpack(const uint8_t* packed, uint8_t* out, int64_t rows, int C, int bits, bool is_signed,
                          cudaStream_t stream);

}  // namespace gdq
