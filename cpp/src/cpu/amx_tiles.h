// What the CPU's AMX kernels share (cpu/amx_linear.cc for BF16 / F16 weights, cpu/amx_weight_only.cc for
// integer codes): the check that AMX is usable, the tile configuration of a pair of row tiles, and the
// split of float32 x into two bf16 parts (numerics: amx_linear.cc). RTLLM_CPU_AMX is 1 where the build
// targets a CPU with AMX-BF16; everything below but the constants exists only then.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/amx_linear.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512F__)
#define RTLLM_CPU_AMX 1
#include <immintrin.h>
#endif

namespace rtllm {
class ThreadPool;
}

namespace rtllm::cpu {

constexpr int64_t kAmxTileRows = 16;                 // rows of x per A and C tile
constexpr int64_t kAmxPairRows = 2 * kAmxTileRows;   // rows of x per pass over a block's k steps

inline int64_t amx_padded_k(int64_t K) { return amx_num_k_steps(K) * kAmxStepK; }

#if RTLLM_CPU_AMX

// This CPU has AMX-TILE, AMX-BF16 and AVX512-BF16 (CPUID), and Linux granted the process the tile data
// state (asked once).
bool amx_supported();

// LDTILECFG's 64-byte operand (palette 1).
struct TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

// C[r][h] = tmm(2r + h), A of row tile r = tmm(4 + r), B of column half h = tmm(6 + h); every tile row
// is 64 bytes (16 float32 or 32 bf16). Row tile 0 has m0 rows, row tile 1 m1 (0: unused).
inline void configure_tiles(int m0, int m1) {
  TileConfig cfg;
  const int rows[8] = {m0, m0, m1, m1, m0, m1, kAmxTileRows, kAmxTileRows};
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows[t]);
    cfg.colsb[t] = rows[t] ? 64 : 0;
  }
  // GCC 12's _tile_loadconfig reads the config through another struct type: with strict aliasing, -O2
  // dropped the stores to cfg (LDTILECFG then faulted). An "m" operand of cfg's own type keeps them.
  asm volatile("ldtilecfg %0" : : "m"(cfg));
}

// Configures the tiles for a pair of row tiles of m0 and m1 rows unless *configured says they are
// (a thread's key, -1 before its first task: LDTILECFG costs about 500 cycles).
inline void configure_pair(int m0, int m1, int* configured) {
  if (m0 + 17 * m1 == *configured) return;
  configure_tiles(m0, m1);
  *configured = m0 + 17 * m1;
}

// GCC's tile load and store intrinsics are asm statements that declare no memory operands, so the
// compiler may move (or drop as dead) ordinary stores that a tile load reads, and loads of what a tile
// store wrote, across them. This fence orders them, at no cost at run time.
inline void tile_memory_fence() { asm volatile("" : : : "memory"); }

// C[r][h] += A[r] · B[h]: the A tiles of one k step from `rows` (its 16 or 32 rows ldx bytes apart), B in
// tmm6 and tmm7.
template <bool kTwo>
inline void add_products(const char* rows, int64_t ldx) {
  _tile_loadd(4, rows, ldx);
  if constexpr (kTwo) _tile_loadd(5, rows + kAmxTileRows * ldx, ldx);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  if constexpr (kTwo) {
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// The C tiles of one (kTwo: two) row tiles: zeroed, or loaded from / stored to c [rows][32 + ...] float32
// rows ldc floats apart (C[r][h] at c + 16 r ldc + 16 h).
template <bool kTwo>
inline void zero_c() {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (kTwo) {
    _tile_zero(2);
    _tile_zero(3);
  }
}
template <bool kTwo>
inline void load_c(const float* c, int64_t ldc) {
  const int64_t stride = ldc * static_cast<int64_t>(sizeof(float));
  _tile_loadd(0, c, stride);
  _tile_loadd(1, c + kAmxTileRows, stride);
  if constexpr (kTwo) {
    _tile_loadd(2, c + kAmxTileRows * ldc, stride);
    _tile_loadd(3, c + kAmxTileRows * ldc + kAmxTileRows, stride);
  }
}
template <bool kTwo>
inline void store_c(float* c, int64_t ldc) {
  const int64_t stride = ldc * static_cast<int64_t>(sizeof(float));
  _tile_stored(0, c, stride);
  _tile_stored(1, c + kAmxTileRows, stride);
  if constexpr (kTwo) {
    _tile_stored(2, c + kAmxTileRows * ldc, stride);
    _tile_stored(3, c + kAmxTileRows * ldc + kAmxTileRows, stride);
  }
}

// The mask of a vector's first n of 16 lanes (n clamped to 0..16): with n - 16, the second vector's of 32 values.
inline __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1);
}

// 16 float32 of a bf16 vector's half (bf16 is float32's upper half: a 16-bit shift, exact).
inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// Rows x[0:rows, 0:K] (row-major) -> hi and lo [rows, amx_padded_k(K)] bf16, zero past K, on the pool:
// hi = bf16(x), lo = bf16(x - hi), both rounded to nearest even (amx_linear.cc).
void split_rows(ThreadPool& pool, const float* x, int64_t rows, int64_t K, uint16_t* hi, uint16_t* lo);

#endif  // RTLLM_CPU_AMX

}  // namespace rtllm::cpu
