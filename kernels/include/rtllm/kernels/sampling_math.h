// The arithmetic the CPU Sampler (cpp/src/sampler.cc) and the CUDA sampler (kernels/src/sampling.cu)
// share, written once so both make the same decisions bit for bit.
//
// Probabilities. For a temperature T > 0 and the row's largest adjusted logit `max`:
//   x_i    = fl32(fl32(l_i − max) · inv_t),  inv_t = fl32(1 / T)    (two IEEE float32 operations;
//                                                                    x = 0 exactly where l_i == max)
//   p_i    = prob_exp(x_i)                                          (exp(x_i), unnormalized: p = 1 at the max)
//   mass_i = floor(p_i · 2^33)                                      (uint64, in [0, 2^33])
// prob_exp is a range reduction (x = k·ln2 + r, |r| <= ln2/2) and a degree-7 polynomial, all in float32
// with explicit fused multiply-adds (std::fma on the host, __fmaf_rn on the device; IEEE fma is
// correctly rounded, so both give the same bits); no other operation may be contracted, hence the
// explicit __fmul_rn / __fsub_rn on the device. Its relative error against float64 exp is below 2e-7
// (tests/python/test_sampling_rules.py measures it). x < -24 gives p = 0 (its mass would be 0 anyway:
// exp(-24) < 2^-34).
//
// Masses are integers, so every sum is exact whatever the order of summation: a row of at most 2^30
// elements weighs at most 2^63. The rules (sampling.cuh) compare masses only through the exact integer
// helpers below.
#pragma once

#include <cstdint>
#ifndef __CUDACC__
#include <cmath>
#include <cstring>
#endif

#ifdef __CUDACC__
#define RTLLM_SAMPLING_HD __host__ __device__ __forceinline__
#else
#define RTLLM_SAMPLING_HD inline
#endif

namespace rtllm::sampling {

constexpr int kMassBits = 33;                        // mass = floor(p · 2^kMassBits)
constexpr uint64_t kMaxMass = uint64_t{1} << kMassBits;  // the mass of p = 1 (the row's maximum)
constexpr float kMinExponent = -24.0f;               // prob_exp(x) = 0 below (mass 0 from x < -22.9)

RTLLM_SAMPLING_HD float fma32(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
RTLLM_SAMPLING_HD float mul32(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
RTLLM_SAMPLING_HD float sub32(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
RTLLM_SAMPLING_HD uint32_t float_bits(float a) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(a);
#else
  uint32_t u;
  std::memcpy(&u, &a, sizeof(u));
  return u;
#endif
}
RTLLM_SAMPLING_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float a;
  std::memcpy(&a, &u, sizeof(a));
  return a;
#endif
}

// 1 / temperature, correctly rounded (temperature > 0).
RTLLM_SAMPLING_HD float inverse_temperature(float temperature) {
#ifdef __CUDA_ARCH__
  return __frcp_rn(temperature);
#else
  return 1.0f / temperature;
#endif
}

// x_i of the header comment: the exponent of an adjusted logit l (may be -inf) against the row max;
// exactly 0 at the max, so the max weighs 2^33 even when inv_t or the max is infinite.
RTLLM_SAMPLING_HD float scaled_exponent(float l, float max, float inv_t) {
  return l == max ? 0.0f : mul32(sub32(l, max), inv_t);
}

// exp(x) · 2^scale_log2 for x <= 0 (0 for x < kMinExponent, -inf and NaN), in float32; exactly 2^scale_log2 at
// x = 0; scale_log2 in [0, 64]. The power of two is folded into the range reduction's 2^k, so the scaled
// value has the bits of prob_exp(x) · 2^scale_log2 (both products are exact: powers of two, normal range).
// Branch-free (a select at the end), so the device interleaves the polynomials of many elements.
RTLLM_SAMPLING_HD float scaled_prob_exp(float x, int scale_log2) {
  const bool in_range = x >= kMinExponent;  // false for NaN
  x = in_range ? x : 0.0f;
  constexpr float kLog2e = 1.44269502162933349609375f;
  constexpr float kLn2Hi = 0.693147182464599609375f;       // float(ln 2)
  constexpr float kLn2Lo = -1.904654323148236e-09f;        // ln 2 - kLn2Hi
  constexpr float kRound = 12582912.0f;                    // 1.5 · 2^23: adding it rounds to an integer
  constexpr uint32_t kRoundBits = 0x4B400000u;             // float_bits(kRound)
  const float t = fma32(x, kLog2e, kRound);                // kRound + rint(x · log2 e), in [2^23, 2^24)
  const float k = sub32(t, kRound);                        // rint(x · log2 e), in [-35, 0]
  float r = fma32(k, -kLn2Hi, x);
  r = fma32(k, -kLn2Lo, r);
  // Taylor series of exp(r) to r^7 (truncation < 1e-8 relative for |r| <= 0.35), Horner with fma.
  float q = 1.0f / 5040.0f;
  q = fma32(q, r, 1.0f / 720.0f);
  q = fma32(q, r, 1.0f / 120.0f);
  q = fma32(q, r, 1.0f / 24.0f);
  q = fma32(q, r, 1.0f / 6.0f);
  q = fma32(q, r, 0.5f);
  q = fma32(q, r, 1.0f);
  q = fma32(q, r, 1.0f);
  // t's unit in the last place is 1, so its bits are kRoundBits + k: the exponent of 2^(k + scale_log2)
  // without a float-to-integer conversion (modulo 2^32, which the shift into the exponent field drops).
  const uint32_t pow2 = (float_bits(t) - kRoundBits + 127u + static_cast<uint32_t>(scale_log2)) << 23;
  const float p = mul32(q, bits_float(pow2));
  return in_range ? p : 0.0f;
}

// exp(x) for x <= 0 (0 for x < kMinExponent, -inf and NaN), in float32; exactly 1 at x = 0.
RTLLM_SAMPLING_HD float prob_exp(float x) { return scaled_prob_exp(x, 0); }

// floor(scaled) for a float in [0, 2^33]: a mass.
RTLLM_SAMPLING_HD uint64_t floor_to_mass(float scaled) {
#ifdef __CUDA_ARCH__
  return __float2ull_rz(scaled);
#else
  return static_cast<uint64_t>(scaled);
#endif
}

// floor(p · 2^33) of a probability p in [0, 1].
RTLLM_SAMPLING_HD uint64_t mass_of(float p) { return floor_to_mass(mul32(p, 8589934592.0f)); }  // · 2^33, exact

// mass_of(prob_exp(x)), with the · 2^33 folded into prob_exp's power of two (one multiplication fewer).
RTLLM_SAMPLING_HD uint64_t exponent_mass(float x) { return floor_to_mass(scaled_prob_exp(x, kMassBits)); }

// The mass of an adjusted logit l against the row max.
RTLLM_SAMPLING_HD uint64_t logit_mass(float l, float max, float inv_t) {
  return exponent_mass(scaled_exponent(l, max, inv_t));
}

// Larger float -> larger key; -0 and +0 share a key (they are equal logits); -inf has the lowest
// finite-or-infinite key. The order of the top-k / top-p rules is (key desc, id asc).
RTLLM_SAMPLING_HD uint32_t order_key(float a) {
  if (a == 0.0f) a = 0.0f;
  const uint32_t bits = float_bits(a);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// 128-bit product of two uint64 (portable: the same code on the host and the device).
struct U128 {
  uint64_t hi, lo;
};
RTLLM_SAMPLING_HD U128 mul_wide(uint64_t a, uint64_t b) {
  const uint64_t a0 = a & 0xffffffffu, a1 = a >> 32, b0 = b & 0xffffffffu, b1 = b >> 32;
  const uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
  const uint64_t mid = (p00 >> 32) + (p01 & 0xffffffffu) + (p10 & 0xffffffffu);
  return U128{p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32), (mid << 32) | (p00 & 0xffffffffu)};
}

// ceil(top_p · total), exactly, for a float top_p in (0, 1] and total < 2^63: the top-p threshold.
RTLLM_SAMPLING_HD uint64_t top_p_threshold(uint64_t total, float top_p) {
  const uint32_t bits = float_bits(top_p);
  const uint32_t e = (bits >> 23) & 0xffu, m = bits & 0x7fffffu;
  const uint64_t mant = e ? (m | 0x800000u) : m;  // top_p = mant · 2^-shift
  const int shift = e ? 150 - static_cast<int>(e) : 149;
  const U128 p = mul_wide(total, mant);           // < 2^87
  if (p.hi == 0 && p.lo == 0) return 0;
  if (shift >= 128) return 1;
  uint64_t q;
  bool rest;
  if (shift >= 64) {
    q = p.hi >> (shift - 64);
    rest = p.lo != 0 || (shift > 64 && (p.hi & ((uint64_t{1} << (shift - 64)) - 1)) != 0);
  } else {  // shift >= 23 (top_p <= 1)
    q = (p.lo >> shift) | (p.hi << (64 - shift));
    rest = (p.lo & ((uint64_t{1} << shift) - 1)) != 0;
  }
  return q + (rest ? 1 : 0);
}

// ceil(min_p · 2^33): the least mass min-p keeps (min_p in [0, 1]; the scaling by 2^33 is exact).
RTLLM_SAMPLING_HD uint64_t min_p_threshold(float min_p) {
  const double scaled = static_cast<double>(min_p) * 8589934592.0;
  const uint64_t t = static_cast<uint64_t>(scaled);  // exact integer part
  return t + (static_cast<double>(t) < scaled ? 1 : 0);
}

// SplitMix64's output function: a bijective 64-bit mix.
RTLLM_SAMPLING_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// The 53 random bits of the draw of step `step` of a sequence seeded with `seed` (the uniform number
// is bits · 2^-53): the SplitMix64 stream of mix64(seed), read at position `step`.
RTLLM_SAMPLING_HD uint64_t uniform_bits(uint64_t seed, int64_t step) {
  return mix64(mix64(seed) + static_cast<uint64_t>(step + 1) * 0x9e3779b97f4a7c15ULL) >> 11;
}

// floor(u · total) for u = bits · 2^-53: the draw's target, in [0, total) for total > 0.
RTLLM_SAMPLING_HD uint64_t draw_target(uint64_t total, uint64_t bits) {
  const U128 p = mul_wide(total, bits);  // < 2^116
  return (p.hi << 11) | (p.lo >> 53);
}

}  // namespace rtllm::sampling
