// Paged attention over the KV pool: prefill (tensor cores, causal) and decode (split-KV).
//
// Host-side declarations only (plain C++ + cuda_runtime_api.h): cpp/src/cuda/*.cc includes this.
// Both launchers read the step's per-sequence lengths on the device, so they are CUDA-graph safe.
//
// Layouts (T = bf16 or fp16, nh = num_heads, hd = head_dim):
//   q, out     [num_tokens, nh * hd] contiguous; q is the output of qkv_prepare (qk-norm + RoPE done).
//   kv.data    [num_blocks, 2 (K, V), num_kv_heads, tokens_per_block, hd]; token t of sequence s lives in
//              block kv.block_table[s * max_blocks_per_seq + t / tokens_per_block], slot t % tokens_per_block.
//   query head h reads KV head h / (nh / num_kv_heads); tokens_per_block is a power of two.
//   q and out rows 16-byte aligned.
// KV pool: kv.dtype == dtype, or kFP8E4M3 / kINT8 with kv.k_scale / kv.v_scale (kv_cache.cuh): keys and
//   values are read as code · scale (the scales are folded into the softmax scale and the output) in float32
//   math. FP8 and INT8 decode load 16 codes (16 bytes) per lane; FP8 and INT8 prefill convert the codes to T
//   (exact) on their way into shared memory.
// Return: cudaErrorInvalidValue for an unsupported dtype/head_dim/shape, else cudaGetLastError() after launch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "rtllm/common.h"
#include "rtllm/kernels/common.cuh"
#include "rtllm/kernels/kv_cache.cuh"

namespace rtllm::kernels {

// Every new token of every sequence of the step (tokens num_cached[s] .. seq_len[s] - 1 of sequence s,
// packed at seq_token_start[s] ..) attends causally over keys 0 .. its own position, read from the pool
// (qkv_prepare has already stored the new keys and values). max_new_tokens >= every sequence's new-token
// count: it sizes the grid; query tiles past a sequence's end exit at once.
// head_dim 64 and 128 run on tensor cores; other head_dims (multiples of 8, <= 256) on a simple path.
RTLLM_API cudaError_t attention_prefill(void* out, const void* q, StepMetaDevice meta, PagedKv kv,
                                        int32_t max_new_tokens, int32_t num_heads, int32_t num_kv_heads,
                                        int32_t head_dim, float scale, DType dtype, cudaStream_t stream);

// One new token per sequence (token index = sequence index), attending to keys 0 .. seq_len[s] - 1.
// Split-KV: each of num_splits CTAs per (sequence, KV head) covers max(32, ceil(seq_len / num_splits))
// consecutive keys and serves all query heads of that KV head (the CTAs past the sequence's end exit at
// once); with num_splits > 1 the partial results go to `workspace`
// (attention_decode_workspace_bytes(num_seqs, ...) bytes, float) and a second kernel merges them.
// head_dim: 16, 32, 64, 80, 96, 128, 256 (80 and 96 in the lanes of 128, the rest idle). num_splits in
// [1, kMaxDecodeSplits].
constexpr int32_t kMaxDecodeSplits = 128;
RTLLM_API cudaError_t attention_decode(void* out, const void* q, StepMetaDevice meta, PagedKv kv,
                                       int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, float scale,
                                       int32_t num_splits, float* workspace, DType dtype, cudaStream_t stream);

// attention_decode with qkv_prepare's work for the new tokens folded in, for decode steps: q, k and v come
// from row s of `qkv` as qkv_prepare reads them (columns q_col, k_col, v_col; stride qkv_row_stride), get
// its qk-norm and RoPE at meta.positions[s], and the new key and value are written into the pool at that
// position, which must be seq_len[s] - 1. Reads meta.positions and meta.seq_len. Same limits as
// qkv_prepare and attention_decode.
RTLLM_API cudaError_t attention_decode_qkv(void* out, const void* qkv, int64_t qkv_row_stride, int64_t q_col,
                                           int64_t k_col, int64_t v_col, const float* inv_freq,
                                           const void* q_norm_weight, const void* k_norm_weight, float qk_norm_eps,
                                           StepMetaDevice meta, PagedKv kv, int32_t num_heads,
                                           int32_t num_kv_heads, int32_t head_dim, float scale, int32_t num_splits,
                                           float* workspace, DType dtype, cudaStream_t stream);

// Bytes of `workspace` attention_decode needs for up to max_num_seqs sequences and max_splits splits:
// partial outputs [num_seqs, num_heads, max_splits, head_dim] then log-sum-exps [num_seqs, num_heads, max_splits].
RTLLM_API size_t attention_decode_workspace_bytes(int32_t max_num_seqs, int32_t num_heads, int32_t head_dim,
                                                  int32_t max_splits);

// How decode-only steps of num_seqs sequences run, fixed per captured graph:
// - num_splits: num_seqs x num_kv_heads x splits CTAs come close to, without passing, one wave of the
//   kernel that runs (4 CTAs per SM; 2 for the CUDA-core kernels of FP8 / INT8 pools), at most 32 splits,
//   each still covering at least 32 keys of max_seq_len;
// - fuse_prepare: whether a split step (num_splits > 1) runs attention_decode_qkv (the preparation folded
//   into the CUDA-core kernel) rather than qkv_prepare + attention_decode. False for an FP8 pool at
//   head_dim 64 / 128, which attention_decode reads on tensor cores faster than the fused kernel does.
// kv_dtype: the pool's (kBF16 / kFP16 for a 16-bit pool).
struct DecodePlan {
  int32_t num_splits = 1;
  bool fuse_prepare = false;
};
RTLLM_API DecodePlan attention_decode_plan(int32_t num_seqs, int32_t num_kv_heads, int32_t head_dim,
                                           int32_t max_seq_len, int32_t num_sms, DType kv_dtype);

}  // namespace rtllm::kernels
