// CPU bit packing of integer codes along the last dimension (layout: gdq_engine/quant/packing.py).
//
// Byte j of a row holds channel j + i*G in bits [i*bits, (i+1)*bits), G = C / (8 / bits).
// Registered as torch.ops.gdq_engine.pack_codes / unpack_codes (CPU kernels).

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdint>

#include "packing.h"

namespace gdq {
namespace {

void check_bits(int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "unsupported bit-width ", bits,
              "; packed containers are 2, 4, 8");
}

at::Tensor pack_codes_cpu(const at::Tensor& codes, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK(codes.scalar_type() == at::kChar || codes.scalar_type() == at::kByte ||
                  codes.scalar_type() == at::kInt,
              "pack_codes expects int8, uint8 or int32 codes, got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() >= 1, "pack_codes expects at least one dimension");
  const int64_t per_byte = 8 / bits;
  const int64_t channels = codes.size(-1);
  TORCH_CHECK(channels % per_byte == 0, channels, " channels cannot be packed at ", bits,
              " bits: need a multiple of ", per_byte);
  const auto src = codes.to(at::kInt).contiguous();
  const int64_t rows = src.numel() / std::max<int64_t>(channels, 1);
  const int64_t group = channels / per_byte;
  auto sizes = codes.sizes().vec();
  sizes.back() = group;
  auto out = at::empty(sizes, codes.options().dtype(at::kByte));
  const int32_t* in = src.data_ptr<int32_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) pack_row(in + r * channels, channels, bits, dst + r * group);
  });
  return out;
}

at::Tensor unpack_codes_cpu(const at::Tensor& packed, int64_t bits, bool is_signed) {
  check_bits(bits);
  TORCH_CHECK(packed.scalar_type() == at::kByte, "unpack_codes expects uint8 packed data, got ",
              packed.scalar_type());
  TORCH_CHECK(packed.dim() >= 1, "unpack_codes expects at least one dimension");
  const int64_t per_byte = 8 / bits;
  const int64_t group = packed.size(-1);
  const int64_t channels = group * per_byte;
  const auto src = packed.contiguous();
  const int64_t rows = src.numel() / std::max<int64_t>(group, 1);
  auto sizes = packed.sizes().vec();
  sizes.back() = channels;
  auto out = at::empty(sizes, packed.options().dtype(is_signed ? at::kChar : at::kByte));
  const uint8_t* in = src.data_ptr<uint8_t>();
  uint8_t* dst = static_cast<uint8_t*>(out.data_ptr());
  const int shift_up = 8 - static_cast<int>(bits);
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* row = in + r * group;
      uint8_t* orow = dst + r * channels;
      for (int64_t i = 0; i < per_byte; ++i) {
        for (int64_t j = 0; j < group; ++j) {
          // Move the field to the top of the byte, then shift back down: arithmetic for signed.
          const uint8_t top = static_cast<uint8_t>(row[j] << (shift_up - i * bits));
          orow[j + i * group] = is_signed
                                    ? static_cast<uint8_t>(static_cast<int8_t>(top) >> shift_up)
                                    : static_cast<uint8_t>(top >> shift_up);
        }
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace gdq

TORCH_LIBRARY(gdq_engine, m) {
  m.def("pack_codes(Tensor codes, int bits) -> Tensor");
  m.def("unpack_codes(Tensor packed, int bits, bool signed) -> Tensor");
  // fp32 (..., C) -> packed uint8 codes: clamp(floor(x * inv_s + 0.5), lo, hi) in a bits container.
  // Kernels: CPU in conv.cpp, CUDA in csrc/cuda/conv3x3.cu (one op, dispatched by device).
  m.def("quantize_pack(Tensor x, int bits, int lo, int hi, float inv_s) -> Tensor");
}

TORCH_LIBRARY_IMPL(gdq_engine, CPU, m) {
  m.impl("pack_codes", &gdq::pack_codes_cpu);
  m.impl("unpack_codes", &gdq::unpack_codes_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gdq_engine C++ kernels; the ops live in torch.ops.gdq_engine";
}
