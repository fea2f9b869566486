// Torch glue of the CUDA kernels (csrc/cuda/conv3x3.cu, declared in launch.h): argument checks and
// the ops torch.ops.gdq_engine.packed_conv3x3_cuda, and the CUDA kernels of quantize_pack,
// pack_codes and unpack_codes. Compiled by the host C++ compiler, not nvcc (launch.h says why).

#include "launch.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ATen.h>
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
  TORCH_CHECK(C % kConvInChannels == 0, "the CUDA conv needs input channels in multiples of ", kConvInChannels,
              ", got ", C);
  TORCH_CHECK(Cout % kConvOutChannels == 0, "the CUDA conv needs output channels in multiples of ",
              kConvOutChannels, ", got ", Cout);
  TORCH_CHECK(mult.numel() == Cout && bias.numel() == Cout, "mult and bias need ", Cout, " values");
  // The kernel reads x in 32-bit words and copies weight rows 16 bytes at a time (cp.async).
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 == 0 && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
              "x must start on a 4-byte and w on a 16-byte boundary (pass tensors that own their storage)");
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
