// Private device helpers shared by attention_prefill.cu and attention_decode.cu: paged KV addressing,
// element conversions, cp.async, ldmatrix and mma.sync wrappers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "dispatch.cuh"  // to_float / from_float
#include "rtllm/kernels/attention.cuh"

namespace rtllm::kernels::attn {

constexpr float kLog2e = 1.4426950408889634f;

__host__ __device__ __forceinline__ int32_t log2_of_pow2(int32_t x) {
  int32_t shift = 0;
  while ((1 << shift) < x) ++shift;
  return shift;
}

// Addressing of one (sequence, KV head) in a layer's pool [num_blocks, 2, num_kv_heads, tokens_per_block,
// head_dim], with tokens_per_block a power of two: token t's key starts at key_offset(t) elements, its value
// v_offset elements later.
struct PagedKvIndex {
  const int32_t* table;  // the sequence's row of the block table
  int32_t shift, slot_mask, head_dim;
  int64_t block_stride, head_offset, v_offset;

  __device__ __forceinline__ PagedKvIndex(const PagedKv& kv, int32_t s, int32_t kv_head)
      : table(kv.block_table + (int64_t)s * kv.max_blocks_per_seq),
        shift(log2_of_pow2(kv.tokens_per_block)),
        slot_mask(kv.tokens_per_block - 1),
        head_dim(kv.head_dim),
        block_stride(2 * (int64_t)kv.num_kv_heads * kv.tokens_per_block * kv.head_dim),
        head_offset((int64_t)kv_head * kv.tokens_per_block * kv.head_dim),
        v_offset((int64_t)kv.num_kv_heads * kv.tokens_per_block * kv.head_dim) {}

  __device__ __forceinline__ int64_t key_offset(int32_t t) const {
    return table[t >> shift] * block_stride + head_offset + (int64_t)(t & slot_mask) * head_dim;
  }
};

// Launch-side check shared by both launchers: the pool layout the kernels index.
inline bool paged_kv_supported(const PagedKv& kv) {
  const int32_t tpb = kv.tokens_per_block;
  return kv.data != nullptr && kv.block_table != nullptr && tpb > 0 && (tpb & (tpb - 1)) == 0 &&
         kv.max_blocks_per_seq > 0;
}

// Two floats packed into one 32-bit register of T (low element first).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// 8 elements of T (16 bytes) to floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float* f) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_float(e[i]);
}

// Two e4m3 codes (low byte first) to two halves with the hardware conversion (cvt.rn.f16x2.e4m3x2 on
// sm_89+): exact, every e4m3 value is a half.
__device__ __forceinline__ __half2 e4m3x2_to_half2(uint16_t codes) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(codes), __NV_E4M3);
  return __half2(h);
}

// 16 e4m3 codes (16 bytes) to floats.
__device__ __forceinline__ void unpack16_e4m3(const uint4& raw, float* f) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 lo = __half22float2(e4m3x2_to_half2(static_cast<uint16_t>(w[i] & 0xffffu)));
    const float2 hi = __half22float2(e4m3x2_to_half2(static_cast<uint16_t>(w[i] >> 16)));
    f[4 * i + 0] = lo.x;
    f[4 * i + 1] = lo.y;
    f[4 * i + 2] = hi.x;
    f[4 * i + 3] = hi.y;
  }
}

// 8 e4m3 codes (8 bytes) to 8 elements of T (16 bytes), exactly: every e4m3 value is a bf16 and a half.
template <typename T>
__device__ __forceinline__ uint4 e4m3x8_to(const uint2& raw) {
  const uint32_t w[2] = {raw.x, raw.y};
  uint32_t r[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2 h = e4m3x2_to_half2(static_cast<uint16_t>(w[i / 2] >> (16 * (i % 2))));
    if constexpr (std::is_same_v<T, __half>) {
      r[i] = *reinterpret_cast<const uint32_t*>(&h);
    } else {
      const float2 f = __half22float2(h);
      r[i] = pack2<T>(f.x, f.y);
    }
  }
  return make_uint4(r[0], r[1], r[2], r[3]);
}

// INT8 codes to floats without an I2F per code: byte j of `biased` (a word of codes xor 0x80808080, i.e.
// code + 128 as an unsigned byte) becomes the low mantissa byte of 2^23 (one prmt), and 2^23 + 128 comes
// off (one FADD). Exact: both operands and the result are integers below 2^24.
__device__ __forceinline__ float biased_i8_to_float(uint32_t biased, int j) {
  return __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7440u + j)) - 8388736.0f;
}

// 16 int8 codes (16 bytes) to floats, exactly.
__device__ __forceinline__ void unpack16_i8(const uint4& raw, float* f) {
  const uint32_t w[4] = {raw.x ^ 0x80808080u, raw.y ^ 0x80808080u, raw.z ^ 0x80808080u, raw.w ^ 0x80808080u};
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) f[4 * i + j] = biased_i8_to_float(w[i], j);
}

// 8 int8 codes (8 bytes) to 8 elements of T (16 bytes), exactly: every integer in [-128, 127] is a bf16 and
// a half.
template <typename T>
__device__ __forceinline__ uint4 i8x8_to(const uint2& raw) {
  const uint32_t w[2] = {raw.x ^ 0x80808080u, raw.y ^ 0x80808080u};
  uint32_t r[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    r[i] = pack2<T>(biased_i8_to_float(w[i / 2], 2 * (i % 2)), biased_i8_to_float(w[i / 2], 2 * (i % 2) + 1));
  return make_uint4(r[0], r[1], r[2], r[3]);
}

// Starts fetching the line holding p into L1 (a hint: no fault, no result).
__device__ __forceinline__ void prefetch_l1(const void* p) { asm volatile("prefetch.global.L1 [%0];" ::"l"(p)); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async of 16 bytes; when `valid` is false the destination is zero-filled and nothing is read.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// The 8x8 matrix of 16-bit elements held as an mma fragment (lane l: row l / 4, columns 2(l % 4), +1),
// transposed across the warp in registers (sm_75+).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

// d += a (16x16, row) * b (16x8, col), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float* d, const uint32_t* a, const uint32_t* b);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// exp2 that treats a fully masked running max (-inf) as 0 so that exp2(-inf - max) is 0, never NaN.
__device__ __forceinline__ float safe_max(float m) { return m == -INFINITY ? 0.0f : m; }

}  // namespace rtllm::kernels::attn
