// AMX-INT8 multiply-add peak of one core: tdpbusd on L1-resident tiles, the ceiling the C++
// conv kernel (csrc/cpu/conv.cpp) is measured against. Four 16x16 int32 accumulators, two A and
// two B tiles reloaded every step (as the conv's inner loop does, from the same addresses here).
//
//     g++ -O2 -mamx-tile -mamx-int8 benchmarks/amx_peak.cpp -o /tmp/amx_peak && /tmp/amx_peak
//
// Prints int8 multiply-adds per second (1 MAC = 2 ops). Linux >= 5.16 on an AMX CPU.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

alignas(64) static uint8_t a_tiles[2][16 * 64];
alignas(64) static int8_t b_tiles[2][16 * 64];
alignas(64) static int32_t sink[16 * 16];

int main() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    std::puts("AMX tile state not granted (no AMX, or Linux < 5.16)");
    return 1;
  }
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  constexpr long kSteps = 20000000;
  for (int round = 0; round < 3; ++round) {  // the first warms the core up
    const auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < kSteps; ++i) {
      _tile_loadd(4, a_tiles[0], 64);
      _tile_loadd(5, a_tiles[1], 64);
      _tile_loadd(6, b_tiles[0], 64);
      _tile_loadd(7, b_tiles[1], 64);
      _tile_dpbusd(0, 4, 6);
      _tile_dpbusd(1, 4, 7);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("round %d: %.2f int8 TMAC/s on one core\n", round, kSteps * 4.0 * 16 * 16 * 64 / s / 1e12);
  }
  _tile_stored(0, sink, 64);
  _tile_release();
  return 0;
}
