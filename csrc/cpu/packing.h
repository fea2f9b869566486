// The packed layout of gdq_engine/quant/packing.py, shared by the CPU kernels.
//
// Byte j of a row holds channel j + i*G in bits [i*bits, (i+1)*bits), G = C / (8 / bits).
#pragma once

#include <cstdint>

namespace gdq {

// One row of C integer codes -> C * bits / 8 packed bytes (only the low ``bits`` bits of a code are kept).
inline void pack_row(const int32_t* codes, int64_t channels, int64_t bits, uint8_t* dst) {
  const int64_t per_byte = 8 / bits, group = channels / per_byte;
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t j = 0; j < group; ++j) {
    uint32_t byte = 0;
    for (int64_t i = 0; i < per_byte; ++i) {
      byte |= (static_cast<uint32_t>(codes[j + i * group]) & mask) << (i * bits);
    }
    dst[j] = static_cast<uint8_t>(byte);
  }
}

}  // namespace gdq
