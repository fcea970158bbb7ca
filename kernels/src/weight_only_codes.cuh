// Weight-only codes as pairs of T values (bf16 / fp16), shared by the weight-only GEMV (weight_only.cu) and the
// Hopper GEMM (weight_only_gemm.cu).
#pragma once

#include "dispatch.cuh"

namespace rtllm::kernels::woq {

// ---- the dequantized weight, in the activation dtype T ----
//
// W = fma(q, scale, offset) with one rounding to T (fma.rn.bf16x2 / fma.rn.f16x2; q is an exact T, so
// without an offset W is q · scale rounded once). Both kernels go through dequant2(), so they multiply
// the same weights.
template <typename T>
struct Pair;
template <>
struct Pair<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  // int4 codes to exact bf16: (nibble ^ 8) in the low mantissa bits of 128.0 is 128 + q + 8.
  static constexpr uint32_t kInt4Magic = 0x43004300u;  // bf16x2 {128, 128}
  static constexpr uint32_t kInt4Bias = 0x43084308u;   // bf16x2 {136, 136}
};
template <>
struct Pair<__half> {
  using T2 = __half2;
  static constexpr uint32_t kInt4Magic = 0x64006400u;  // f16x2 {1024, 1024}
  static constexpr uint32_t kInt4Bias = 0x64086408u;   // f16x2 {1032, 1032}
  static constexpr uint32_t kInt8Magic = 0x64646464u;  // high bytes of f16 1024 + u, u in 0..255
  static constexpr uint32_t kInt8Bias = 0x64806480u;   // f16x2 {1152, 1152}: 1024 + 128
};

template <typename T2>
__device__ __forceinline__ uint32_t as_u32(T2 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}
template <typename T2>
__device__ __forceinline__ T2 as_t2(uint32_t v) {
  return *reinterpret_cast<T2*>(&v);
}

// Nibbles j and j + 4 of the word u as T values 128 + u_j, 128 + u_{j+4} (bf16; 1024 + for fp16): one AND/OR,
// no shifts across halves. In the MMA layout (woq_pack_int4) u holds codes q + 8 with nibbles j, j + 4 the
// codes 2j, 2j + 1 of its 8, so pair j is the codes (2j, 2j + 1) in k order.
template <typename T>
__device__ __forceinline__ uint32_t int4_magic_pair(uint32_t u, int j) {
  return ((u >> (4 * j)) & 0x000F000Fu) | Pair<T>::kInt4Magic;
}

// The same pair as exact values u_j - 8 (the codes q when u holds q + 8).
template <typename T>
__device__ __forceinline__ typename Pair<T>::T2 int4_pair(uint32_t u, int j) {
  using P = Pair<T>;
  return __hsub2(as_t2<typename P::T2>(int4_magic_pair<T>(u, j)), as_t2<typename P::T2>(P::kInt4Bias));
}

// Bytes b and b + 1 of the int8 word w (codes 4i + b, 4i + b + 1) as exact T values. `u` is
// w ^ 0x80808080: each byte q + 128 in 0..255.
template <typename T>
__device__ __forceinline__ typename Pair<T>::T2 int8_pair(uint32_t u, int b);
template <>
__device__ __forceinline__ __nv_bfloat162 int8_pair<__nv_bfloat16>(uint32_t u, int b) {
  // bf16 keeps 8 significant bits, too few for 128 + u with a magic exponent: go through float32's
  // 2^23 + u (exact), then two exact conversions.
  const float f0 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540u | b)) - 8388736.0f;  // 2^23 + 128
  const float f1 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540u | (b + 1))) - 8388736.0f;
  return __floats2bfloat162_rn(f0, f1);
}
template <>
__device__ __forceinline__ __half2 int8_pair<__half>(uint32_t u, int b) {
  // Halves 0x64uu: 1024 + u (f16 keeps 11 significant bits).
  const uint32_t sel = 0x4040u | b | ((b + 1) << 8);
  const uint32_t m = __byte_perm(u, Pair<__half>::kInt8Magic, sel);
  return __hsub2(as_t2<__half2>(m), as_t2<__half2>(Pair<__half>::kInt8Bias));
}

// (lo, hi) as a pair; a pair of its low / high half twice.
__device__ __forceinline__ __nv_bfloat162 pair_of(__nv_bfloat16 lo, __nv_bfloat16 hi) { return __halves2bfloat162(lo, hi); }
__device__ __forceinline__ __half2 pair_of(__half lo, __half hi) { return __halves2half2(lo, hi); }
__device__ __forceinline__ __nv_bfloat162 low_twice(__nv_bfloat162 v) { return __low2bfloat162(v); }
__device__ __forceinline__ __half2 low_twice(__half2 v) { return __low2half2(v); }
__device__ __forceinline__ __nv_bfloat162 high_twice(__nv_bfloat162 v) { return __high2bfloat162(v); }
__device__ __forceinline__ __half2 high_twice(__half2 v) { return __high2half2(v); }

template <typename T2>
__device__ __forceinline__ T2 dequant2(T2 q, T2 s, T2 o) {
  return __hfma2(q, s, o);
}

// The A fragment (mma m16n8k16, or a warp's rows of wgmma m64nNk16) of MMA (w, h) of a 128-code step, from
// word w of a lane's 16 code bytes in the MMA layout of rows g (lo) and g + 8 (hi): a0 / a2 = pairs 2h /
// 2h + 1 of row g, a1 / a3 those of row g + 8, each dequantized with its row's (s, o).
template <typename T, typename T2>
__device__ __forceinline__ void int4_a_fragment(uint32_t (&a)[4], uint32_t lo, uint32_t hi, int h, T2 s_lo, T2 o_lo,
                                                T2 s_hi, T2 o_hi) {
  a[0] = as_u32(dequant2(int4_pair<T>(lo, 2 * h), s_lo, o_lo));
  a[1] = as_u32(dequant2(int4_pair<T>(hi, 2 * h), s_hi, o_hi));
  a[2] = as_u32(dequant2(int4_pair<T>(lo, 2 * h + 1), s_lo, o_lo));
  a[3] = as_u32(dequant2(int4_pair<T>(hi, 2 * h + 1), s_hi, o_hi));
}

}  // namespace rtllm::kernels::woq
