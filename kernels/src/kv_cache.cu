// qkv_prepare: per (token, head) one warp loads the head's values of the packed qkv row, applies
// qk-norm (q and k heads) and rotate-half RoPE (q and k heads) in float32 and writes q to q_out and
// k, v into the paged pool (of element type KV: T, or e4m3 / int8 codes of k / k_scale, v / v_scale). Lane l holds
// the pairs (i, i + hd/2) for i = l, l + 32, ...
#include <cmath>

#include "dispatch.cuh"
#include "rtllm/kernels/kv_cache.cuh"

namespace rtllm::kernels {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T, typename KV, int HEAD_DIM>
__global__ void qkv_prepare_kernel(T* q_out, const T* qkv, int64_t row_stride, int64_t q_col, int64_t k_col,
                                   int64_t v_col, const float* inv_freq, const T* q_norm_weight,
                                   const T* k_norm_weight, float eps, StepMetaDevice meta, PagedKv kv,
                                   int32_t num_heads, int32_t num_kv_heads) {
  pdl_begin();
  constexpr int kHalf = HEAD_DIM / 2;
  constexpr int kPairs = (kHalf + 31) / 32;  // pairs per lane
  const int lane = threadIdx.x & 31;
  const int heads_per_token = num_heads + 2 * num_kv_heads;
  const int64_t item = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (item >= (int64_t)meta.num_tokens * heads_per_token) return;  // whole warp
  const int64_t t = item / heads_per_token;
  const int h = (int)(item % heads_per_token);
  // kind 0: query head h; 1: key head; 2: value head.
  const int kind = h < num_heads ? 0 : (h < num_heads + num_kv_heads ? 1 : 2);
  const int head = kind == 0 ? h : (kind == 1 ? h - num_heads : h - num_heads - num_kv_heads);
  const int64_t col = (kind == 0 ? q_col : (kind == 1 ? k_col : v_col)) + (int64_t)head * HEAD_DIM;
  const T* src = qkv + t * row_stride + col;

  float x1[kPairs], x2[kPairs];
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    const int i = lane + 32 * j;
    x1[j] = i < kHalf ? to_float(src[i]) : 0.0f;
    x2[j] = i < kHalf ? to_float(src[i + kHalf]) : 0.0f;
  }
  const T* norm_weight = kind == 0 ? q_norm_weight : (kind == 1 ? k_norm_weight : nullptr);
  if (norm_weight) {
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) ss += x1[j] * x1[j] + x2[j] * x2[j];
    ss = warp_sum(ss);
    const float inv_rms = 1.0f / sqrtf(ss / (float)HEAD_DIM + eps);
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const int i = lane + 32 * j;
      if (i < kHalf) {
        x1[j] = to_float(norm_weight[i]) * (x1[j] * inv_rms);
        x2[j] = to_float(norm_weight[i + kHalf]) * (x2[j] * inv_rms);
      }
    }
  }
  const int32_t pos = meta.positions[t];
  if (inv_freq && kind != 2) {
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const int i = lane + 32 * j;
      if (i < kHalf) {
        float s, c;
        sincosf((float)pos * inv_freq[i], &s, &c);
        const float a = x1[j], b = x2[j];
        x1[j] = a * c - b * s;
        x2[j] = b * c + a * s;
      }
    }
  }
  if (kind == 0) {
    T* dst = q_out + t * (int64_t)num_heads * HEAD_DIM + (int64_t)head * HEAD_DIM;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const int i = lane + 32 * j;
      if (i < kHalf) {
        dst[i] = from_float<T>(x1[j]);
        dst[i + kHalf] = from_float<T>(x2[j]);
      }
    }
  } else {
    // A position or block id outside the table/pool is a runtime bug: skip the write rather than
    // corrupt another sequence's blocks.
    const int32_t seq = meta.token_seq[t];
    const int32_t block_index = pos / kv.tokens_per_block;
    if (pos < 0 || seq < 0 || block_index >= kv.max_blocks_per_seq) return;
    const int32_t block = kv.block_table[(int64_t)seq * kv.max_blocks_per_seq + block_index];
    if (block < 0 || block >= kv.num_blocks) return;
    const int64_t offset =
        ((((int64_t)block * 2 + (kind - 1)) * kv.num_kv_heads + head) * kv.tokens_per_block +
         pos % kv.tokens_per_block) * HEAD_DIM;
    KV* dst = static_cast<KV*>(kv.data) + offset;
    const float scale = kind == 1 ? kv.k_scale : kv.v_scale;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const int i = lane + 32 * j;
      if (i < kHalf) {
        dst[i] = encode_kv<KV>(x1[j], scale);
        dst[i + kHalf] = encode_kv<KV>(x2[j], scale);
      }
    }
  }
}

}  // namespace

cudaError_t qkv_prepare(void* q_out, const void* qkv, int64_t qkv_row_stride, int64_t q_col, int64_t k_col,
                        int64_t v_col, const float* inv_freq, const void* q_norm_weight, const void* k_norm_weight,
                        float qk_norm_eps, StepMetaDevice meta, PagedKv kv, int32_t num_heads, int32_t num_kv_heads,
                        int32_t head_dim, DType dtype, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(q_out && qkv && meta.token_seq && meta.positions && kv.data && kv.block_table);
  RTLLM_KERNEL_CHECK(meta.num_tokens >= 0 && num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0);
  RTLLM_KERNEL_CHECK(kv.head_dim == head_dim && kv.num_kv_heads == num_kv_heads && kv.tokens_per_block > 0 &&
                     kv.max_blocks_per_seq > 0 && kv.num_blocks > 0);
  RTLLM_KERNEL_CHECK((q_norm_weight == nullptr) == (k_norm_weight == nullptr));
  RTLLM_KERNEL_CHECK(kv_scales_valid(kv.dtype, kv.k_scale, kv.v_scale));
  RTLLM_KERNEL_CHECK(q_col >= 0 && k_col >= 0 && v_col >= 0);
  const int64_t width = (int64_t)num_heads * head_dim, kv_width = (int64_t)num_kv_heads * head_dim;
  RTLLM_KERNEL_CHECK(q_col + width <= qkv_row_stride && k_col + kv_width <= qkv_row_stride &&
                     v_col + kv_width <= qkv_row_stride);
  if (meta.num_tokens == 0) return cudaSuccess;
  const int64_t items = (int64_t)meta.num_tokens * (num_heads + 2 * num_kv_heads);
  const unsigned blocks = (unsigned)ceil_div(items, kWarpsPerBlock);
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    RTLLM_DISPATCH_KV(kv.dtype, T, KV, {
      RTLLM_DISPATCH_HEAD_DIM(head_dim, HEAD_DIM, {
        launch_pdl(qkv_prepare_kernel<T, KV, HEAD_DIM>, blocks, kWarpsPerBlock * 32, 0, stream,
            static_cast<T*>(q_out), static_cast<const T*>(qkv), qkv_row_stride, q_col, k_col, v_col, inv_freq,
            static_cast<const T*>(q_norm_weight), static_cast<const T*>(k_norm_weight), qk_norm_eps, meta, kv,
            num_heads, num_kv_heads);
      });
    });
  });
  return cudaGetLastError();
}

}  // namespace rtllm::kernels
