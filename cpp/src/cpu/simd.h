// 8-wide float vectors for the CPU ops (GCC vector extensions; AVX2/AVX-512 with -march=native).
// Sums use explicit FMA so that every code path that computes one value rounds the same way,
// whatever the compiler's contraction setting.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__FMA__)
#include <immintrin.h>
#endif

namespace rtllm::cpu {

typedef float v8 __attribute__((vector_size(32)));
constexpr int kLanes = 8;

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

}  // namespace rtllm::cpu
