// The paged KV pool and the step metadata every attention kernel reads, and qkv_prepare: qk-norm +
// RoPE fused with the write of the step's new keys and values into the pool.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "rtllm/common.h"
#include "rtllm/kernels/common.cuh"

namespace rtllm::kernels {

// One layer's pool. Token t of sequence s lives in block block_table[s · max_blocks_per_seq + t / tpb],
// slot t % tpb (tpb = tokens_per_block).
struct PagedKv {
  void* data;  // [num_blocks, 2 (K, V), num_kv_heads, tokens_per_block, head_dim] of dtype
  int32_t num_blocks, num_kv_heads, tokens_per_block, head_dim;
  const int32_t* block_table;  // device [num_seqs, max_blocks_per_seq]
  int32_t max_blocks_per_seq;
  // The pool's element type, separate from the activations'. The kernels read and write it; each
  // launcher lists the (activation, KV) pairs it supports and returns cudaErrorInvalidValue for others:
  // the activation dtype itself, kFP8E4M3 or kINT8 (docs/engine_format.md, "KV cache layout").
  DType dtype;
  // kFP8E4M3 and kINT8 only (ignored otherwise; finite, > 0): the pool holds e4m3(k / k_scale) and
  // e4m3(v / v_scale) (float32 division, round to nearest even, saturated to ±448), or int8
  // clamp(round_half_even(k / k_scale), -127, 127) and likewise v; readers decode code · scale.
  float k_scale = 1.0f, v_scale = 1.0f;
};

// Device arrays filled by the runtime once per step; the counts are launch arguments.
struct StepMetaDevice {
  const int32_t* token_seq;        // [num_tokens] sequence index of each packed token
  const int32_t* positions;        // [num_tokens] position of each token in its sequence
  const int32_t* seq_token_start;  // [num_seqs + 1] first packed token of each sequence
  const int32_t* num_cached;       // [num_seqs] tokens already cached before this step
  const int32_t* seq_len;          // [num_seqs] cached + new
  int32_t num_tokens, num_seqs;
};

// Per packed token t (row t of `qkv`, row stride qkv_row_stride elements):
//   q = row[q_col : q_col + nh·hd], k = row[k_col : k_col + nkv·hd], v = row[v_col : v_col + nkv·hd];
//   with q_norm_weight/k_norm_weight [hd] (both or neither): each head rms-normalized (float32, eps);
//   with inv_freq [hd / 2] float32: rotate-half RoPE at meta.positions[t] (as in rope.cuh);
//   q -> q_out [num_tokens, nh·hd] contiguous; k, v -> the pool at (block_table[seq][pos / tpb], pos % tpb)
//   with seq = meta.token_seq[t], pos = meta.positions[t]; with an FP8 or INT8 pool (kv.dtype kFP8E4M3,
//   kINT8) the float32 k / kv.k_scale and v / kv.v_scale are stored as e4m3 or int8 codes (not rounded to T
//   first).
// Reads meta.token_seq, meta.positions (the other meta arrays may be null). T = bf16 or fp16, kv.dtype T,
// kFP8E4M3 or kINT8; head_dim 16, 32, 64, 80, 96, 128 or 256; the row stride and column offsets multiples of 8 (16-byte loads).
// Graph-safe: every size is a launch argument; positions and block ids are read on the device.
RTLLM_API cudaError_t qkv_prepare(void* q_out, const void* qkv, int64_t qkv_row_stride, int64_t q_col,
                                  int64_t k_col, int64_t v_col, const float* inv_freq, const void* q_norm_weight,
                                  const void* k_norm_weight, float qk_norm_eps, StepMetaDevice meta, PagedKv kv,
                                  int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, DType dtype,
                                  cudaStream_t stream);

}  // namespace rtllm::kernels
