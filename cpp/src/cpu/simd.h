// 8-wide float vectors for the CPU ops (GCC vector extensions; AVX2/AVX-512 with -march=native).
// Sums use explicit FMA so that every code path that computes one value rounds the same way,
// whatever the compiler's contraction setting.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__FMA__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "rtllm/dtype.h"

namespace rtllm::cpu {

typedef float v8 __attribute__((vector_size(32)));
constexpr int kLanes = 8;

// Vector registers a loop's accumulators share with its operands: AVX2 has 16 ymm, AVX-512VL 32. An
// accumulator array that does not fit stays on the stack (a store and a reload in every FMA chain).
#if defined(__AVX512VL__)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }
inline v8 splat8(float x) { return v8{x, x, x, x, x, x, x, x}; }

// a * b + c with one rounding.
inline v8 fmadd8(v8 a, v8 b, v8 c) {
#if defined(__FMA__)
  return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  v8 r;
  for (int i = 0; i < kLanes; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
#endif
}

// Fixed pairwise order: ((0+4)+(2+6)) + ((1+5)+(3+7)).
inline float hsum8(v8 v) {
  float a = v[0] + v[4], b = v[1] + v[5], c = v[2] + v[6], d = v[3] + v[7];
  return (a + c) + (b + d);
}

// sum_i a[i] * b[i]: 8-lane partial sums over the full chunks, then the tail in order.
inline float dot(const float* a, const float* b, int64_t n) {
  v8 acc = splat8(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc = fmadd8(load8(a + i), load8(b + i), acc);
  float s = hsum8(acc);
  for (; i < n; ++i) s = std::fma(a[i], b[i], s);
  return s;
}

// 16-bit float weights as stored (their bits), as distinct types so that kernels template on them.
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

// One value widened to float32: exact for both (every bf16 and fp16 value is a float32 value).
inline float widen(float v) { return v; }
inline float widen(bf16_t v) { return bf16_to_float(v.bits); }
inline float widen(fp16_t v) { return fp16_to_float(v.bits); }

// 8 consecutive values widened to float32 in registers: bf16 is the high half of a float32 (a 16-bit
// shift), fp16 goes through F16C's vcvtph2ps. Same values as widen(), lane by lane.
inline v8 load8(const bf16_t* p) {
#if defined(__AVX2__)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (v8)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
  v8 v;
  for (int i = 0; i < kLanes; ++i) v[i] = widen(p[i]);
  return v;
#endif
}
inline v8 load8(const fp16_t* p) {
#if defined(__F16C__)
  return (v8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  v8 v;
  for (int i = 0; i < kLanes; ++i) v[i] = widen(p[i]);
  return v;
#endif
}

}  // namespace rtllm::cpu
