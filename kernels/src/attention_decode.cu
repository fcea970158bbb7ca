// attention_decode: one new token per sequence attends over its whole paged context (flash-decoding).
//
// Grid (num_seqs, num_kv_heads x head chunks, num_splits). A CTA serves up to kMaxGroup query heads of one
// KV head (the GQA group, so each K/V byte is read once per group) over one split of the keys.
// Thread layout: HEAD_DIM / 8 lanes share one key, each holding 8 dims (one 16-byte load of K and of V);
// a warp covers 32 / (HEAD_DIM / 8) consecutive keys per load, so a warp's loads are contiguous in a block.
// Each thread keeps its own online-softmax state (max, sum, 8 accumulators per head) over the keys it
// visits; the states merge across lanes, then warps, at the end. With num_splits > 1, each split writes
// its normalized output and log2-sum-exp to the workspace and decode_merge_kernel combines them.
#include <algorithm>
#include <type_traits>

#include "attention_common.cuh"

namespace rtllm::kernels {
namespace {

using namespace attn;

constexpr int kNumWarps = 4;
constexpr int kThreads = kNumWarps * 32;
constexpr int kMaxGroup = 8;  // query heads per CTA; larger groups are split into chunks of heads
// A split shorter than one step of a CTA's key loop (4 warps x 2 keys x 4 unrolled = 32 keys at head_dim
// 128 and groups <= 4) leaves lanes idle.
constexpr int32_t kMinKeysPerSplit = 32;

// The splits sequence s uses: the launch's num_splits (fixed per captured graph, sized for max_seq_len)
// cut to what its current length fills, read on the device so a graph replay follows the lengths. At
// batch 1 and a few hundred keys, an engine built for 4096 tokens otherwise ran 66 splits of ~6 keys.
__device__ __forceinline__ int splits_used(int num_splits, int seq_len) {
  return max(1, min(num_splits, (seq_len + kMinKeysPerSplit - 1) / kMinKeysPerSplit));
}

template <typename T, int HEAD_DIM, int MAX_GROUP>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(T* __restrict__ out, const T* __restrict__ q,
                                                                StepMetaDevice meta, PagedKv kv, int num_heads,
                                                                int group, int num_head_chunks, float scale_log2,
                                                                int num_splits, float* __restrict__ partial_o,
                                                                float* __restrict__ partial_lse) {
  constexpr int kLanesPerKey = HEAD_DIM / 8;
  constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  constexpr int kUnroll = MAX_GROUP >= 8 ? 2 : 4;  // keys per thread per step: loads in flight vs registers
  constexpr int kKeysPerStep = kNumWarps * kKeysPerWarp * kUnroll;
  __shared__ float red_acc[kNumWarps][MAX_GROUP][HEAD_DIM];
  __shared__ float red_m[kNumWarps][MAX_GROUP], red_l[kNumWarps][MAX_GROUP];
  pdl_begin();

  const int s = blockIdx.x;
  const int kv_head = blockIdx.y / num_head_chunks, chunk = blockIdx.y % num_head_chunks;
  const int split = blockIdx.z;
  const int h0 = kv_head * group + chunk * MAX_GROUP;
  const int num_h = min(MAX_GROUP, group - chunk * MAX_GROUP);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int dim0 = (lane % kLanesPerKey) * 8, key_slot = lane / kLanesPerKey;

  const int seq_len = meta.seq_len[s];
  const int used_splits = splits_used(num_splits, seq_len);
  if (split >= used_splits) return;  // the whole CTA: nothing merges its (unwritten) partials
  const int keys_per_split = (seq_len + used_splits - 1) / used_splits;
  const int k_begin = split * keys_per_split, k_end = min(seq_len, k_begin + keys_per_split);

  float qf[MAX_GROUP][8];
#pragma unroll
  for (int g = 0; g < MAX_GROUP; ++g) {
    if (g < num_h) {
      const uint4 raw = *reinterpret_cast<const uint4*>(q + ((int64_t)s * num_heads + h0 + g) * HEAD_DIM + dim0);
      unpack8<T>(raw, qf[g]);
#pragma unroll
      for (int i = 0; i < 8; ++i) qf[g][i] *= scale_log2;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) qf[g][i] = 0.0f;
    }
  }
  float m_run[MAX_GROUP], l_run[MAX_GROUP], acc[MAX_GROUP][8];
#pragma unroll
  for (int g = 0; g < MAX_GROUP; ++g) {
    m_run[g] = -INFINITY;
    l_run[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.0f;
  }

  const T* pool = static_cast<const T*>(kv.data);
  const PagedKvIndex kv_index(kv, s, kv_head);
  for (int base = k_begin; base < k_end; base += kKeysPerStep) {
    uint4 k_raw[kUnroll], v_raw[kUnroll];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int key = base + (u * kNumWarps + warp) * kKeysPerWarp + key_slot;
      valid[u] = key < k_end;
      if (valid[u]) {
        const T* k = pool + kv_index.key_offset(key) + dim0;
        k_raw[u] = load_stream_16(k);
        v_raw[u] = load_stream_16(k + kv_index.v_offset);
      } else {
        k_raw[u] = make_uint4(0, 0, 0, 0);
        v_raw[u] = make_uint4(0, 0, 0, 0);
      }
    }
    float score[kUnroll][MAX_GROUP];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[8];
      unpack8<T>(k_raw[u], kf);
#pragma unroll
      for (int g = 0; g < MAX_GROUP; ++g) {
        float x = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) x += qf[g][i] * kf[i];
#pragma unroll
        for (int off = kLanesPerKey / 2; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
        score[u][g] = valid[u] ? x : -INFINITY;
      }
    }
    float vf[kUnroll][8];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) unpack8<T>(v_raw[u], vf[u]);
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
      float step_max = score[0][g];
#pragma unroll
      for (int u = 1; u < kUnroll; ++u) step_max = fmaxf(step_max, score[u][g]);
      const float m_new = fmaxf(m_run[g], step_max);
      const float m_use = safe_max(m_new);
      const float corr = exp2f(m_run[g] - m_use);
      m_run[g] = m_new;
      float p[kUnroll], p_sum = 0.0f;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        p[u] = exp2f(score[u][g] - m_use);
        p_sum += p[u];
      }
      l_run[g] = l_run[g] * corr + p_sum;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        float a = acc[g][i] * corr;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) a += p[u] * vf[u][i];
        acc[g][i] = a;
      }
    }
  }

  // Merge the states of lanes holding the same dims (different keys) within the warp.
#pragma unroll
  for (int off = kLanesPerKey; off < 32; off *= 2) {
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
      const float m_other = __shfl_xor_sync(0xffffffffu, m_run[g], off);
      const float l_other = __shfl_xor_sync(0xffffffffu, l_run[g], off);
      const float m_new = fmaxf(m_run[g], m_other), m_use = safe_max(m_new);
      const float c_self = exp2f(m_run[g] - m_use), c_other = exp2f(m_other - m_use);
      m_run[g] = m_new;
      l_run[g] = l_run[g] * c_self + l_other * c_other;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float a_other = __shfl_xor_sync(0xffffffffu, acc[g][i], off);
        acc[g][i] = acc[g][i] * c_self + a_other * c_other;
      }
    }
  }
  if (key_slot == 0) {
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
#pragma unroll
      for (int i = 0; i < 8; ++i) red_acc[warp][g][dim0 + i] = acc[g][i];
      if (lane == 0) {
        red_m[warp][g] = m_run[g];
        red_l[warp][g] = l_run[g];
      }
    }
  }
  __syncthreads();

  // Merge the warps: one thread per (head, dim).
  for (int idx = threadIdx.x; idx < num_h * HEAD_DIM; idx += kThreads) {
    const int g = idx / HEAD_DIM, d = idx % HEAD_DIM;
    float m_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) m_all = fmaxf(m_all, red_m[w][g]);
    const float m_use = safe_max(m_all);
    float l_all = 0.0f, a_all = 0.0f;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) {
      const float c = exp2f(red_m[w][g] - m_use);
      l_all += red_l[w][g] * c;
      a_all += red_acc[w][g][d] * c;
    }
    const float o = l_all > 0.0f ? a_all / l_all : 0.0f;
    const int64_t head = (int64_t)s * num_heads + h0 + g;
    if (num_splits == 1) {
      out[head * HEAD_DIM + d] = from_float<T>(o);
    } else {
      partial_o[(head * num_splits + split) * HEAD_DIM + d] = o;
      if (d == 0) partial_lse[head * num_splits + split] = l_all > 0.0f ? m_use + log2f(l_all) : -INFINITY;
    }
  }
}

// One CTA of head_dim threads per (sequence, query head): out = Σ_i w_i · o_i / Σ_i w_i, w_i = 2^(lse_i - max).
template <typename T>
__global__ void decode_merge_kernel(T* __restrict__ out, const float* __restrict__ partial_o,
                                    const float* __restrict__ partial_lse, const int32_t* __restrict__ seq_lens,
                                    int num_heads, int head_dim, int num_splits) {
  pdl_begin();
  const int64_t head = (int64_t)blockIdx.x * num_heads + blockIdx.y;
  const int d = threadIdx.x;
  const int used_splits = splits_used(num_splits, seq_lens[blockIdx.x]);
  const float* lse = partial_lse + head * num_splits;
  float m = -INFINITY;
  for (int i = 0; i < used_splits; ++i) m = fmaxf(m, lse[i]);
  const float m_use = safe_max(m);
  float w_sum = 0.0f, o = 0.0f;
  for (int i = 0; i < used_splits; ++i) {
    const float w = exp2f(lse[i] - m_use);
    w_sum += w;
    o += w * partial_o[(head * num_splits + i) * head_dim + d];
  }
  out[head * head_dim + d] = from_float<T>(w_sum > 0.0f ? o / w_sum : 0.0f);
}

template <typename T, int HEAD_DIM>
cudaError_t launch_decode(T* out, const T* q, const StepMetaDevice& meta, const PagedKv& kv, int num_heads,
                          int num_kv_heads, float scale_log2, int num_splits, float* workspace,
                          cudaStream_t stream) {
  const int group = num_heads / num_kv_heads;
  float* partial_o = workspace;
  float* partial_lse = workspace + (int64_t)meta.num_seqs * num_heads * num_splits * HEAD_DIM;
  auto launch = [&](auto max_group_tag) {
    constexpr int kGroup = decltype(max_group_tag)::value;
    const int num_chunks = (group + kGroup - 1) / kGroup;
    const dim3 grid(meta.num_seqs, num_kv_heads * num_chunks, num_splits);
    launch_pdl(decode_split_kernel<T, HEAD_DIM, kGroup>, grid, kThreads, 0, stream,
        out, q, meta, kv, num_heads, group, num_chunks, scale_log2, num_splits, partial_o, partial_lse);
  };
  if (group == 1) launch(std::integral_constant<int, 1>{});
  else if (group == 2) launch(std::integral_constant<int, 2>{});
  else if (group <= 4) launch(std::integral_constant<int, 4>{});
  else launch(std::integral_constant<int, kMaxGroup>{});
  if (num_splits > 1) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    launch_pdl(decode_merge_kernel<T>, dim3(meta.num_seqs, num_heads), HEAD_DIM, 0, stream, out, partial_o,
               partial_lse, meta.seq_len, num_heads, HEAD_DIM, num_splits);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_head_dim(void* out, const void* q, const StepMetaDevice& meta, const PagedKv& kv,
                              int num_heads, int num_kv_heads, int head_dim, float scale_log2, int num_splits,
                              float* workspace, cudaStream_t stream) {
  T* o = static_cast<T*>(out);
  const T* qt = static_cast<const T*>(q);
  switch (head_dim) {
    case 16: return launch_decode<T, 16>(o, qt, meta, kv, num_heads, num_kv_heads, scale_log2, num_splits, workspace, stream);
    case 32: return launch_decode<T, 32>(o, qt, meta, kv, num_heads, num_kv_heads, scale_log2, num_splits, workspace, stream);
    case 64: return launch_decode<T, 64>(o, qt, meta, kv, num_heads, num_kv_heads, scale_log2, num_splits, workspace, stream);
    case 128: return launch_decode<T, 128>(o, qt, meta, kv, num_heads, num_kv_heads, scale_log2, num_splits, workspace, stream);
    case 256: return launch_decode<T, 256>(o, qt, meta, kv, num_heads, num_kv_heads, scale_log2, num_splits, workspace, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t attention_decode(void* out, const void* q, StepMetaDevice meta, PagedKv kv, int32_t num_heads,
                             int32_t num_kv_heads, int32_t head_dim, float scale, int32_t num_splits,
                             float* workspace, DType dtype, cudaStream_t stream) {
  if (num_heads <= 0 || num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || kv.head_dim != head_dim ||
      kv.num_kv_heads != num_kv_heads || !attn::paged_kv_supported(kv) || num_splits < 1 || num_splits > kMaxDecodeSplits ||
      (num_splits > 1 && workspace == nullptr) || num_heads > 65535)
    return cudaErrorInvalidValue;
  if (meta.num_seqs == 0) return cudaSuccess;
  const float scale_log2 = scale * attn::kLog2e;
  switch (dtype) {
    case DType::kBF16:
      return dispatch_head_dim<__nv_bfloat16>(out, q, meta, kv, num_heads, num_kv_heads, head_dim, scale_log2,
                                              num_splits, workspace, stream);
    case DType::kFP16:
      return dispatch_head_dim<__half>(out, q, meta, kv, num_heads, num_kv_heads, head_dim, scale_log2, num_splits,
                                       workspace, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

size_t attention_decode_workspace_bytes(int32_t max_num_seqs, int32_t num_heads, int32_t head_dim,
                                        int32_t max_splits) {
  return (size_t)max_num_seqs * num_heads * max_splits * (head_dim + 1) * sizeof(float);
}

int32_t attention_decode_num_splits(int32_t num_seqs, int32_t num_kv_heads, int32_t max_seq_len, int32_t num_sms) {
  // About 4 CTAs fit on an SM (128 threads, <= 128 registers for groups <= 4) and keep enough 16-byte loads
  // in flight; a split count that overshoots one such wave leaves a mostly idle second wave (measured on an
  // H100: 8 sequences x 8 KV heads at 16k keys, 8 splits 87% of copy bandwidth, 9 splits 66%).
  // Splits of kMinKeysPerSplit keys, no fewer: longer splits mean more dependent steps per CTA, and at
  // batch 1 and a few hundred keys each step's load latency, not bandwidth, sets the time. The kernel
  // cuts the count further per sequence from its current length (splits_used).
  constexpr int64_t kCtasPerSm = 4;
  const int64_t num_ctas = (int64_t)num_seqs * num_kv_heads;
  if (num_ctas <= 0) return 1;
  const int64_t for_waves = std::max<int64_t>(1, kCtasPerSm * num_sms / num_ctas);
  const int64_t by_length = std::max<int64_t>(1, max_seq_len / kMinKeysPerSplit);
  return (int32_t)std::min<int64_t>({for_waves, by_length, kMaxDecodeSplits});
}

}  // namespace rtllm::kernels
