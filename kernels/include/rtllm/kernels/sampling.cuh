// On-device sampling: only the sampled ids (and requested logprobs) go back to the host.
//
// Same stages and semantics as the CPU Sampler (rtllm/sampler.h), per sequence, in this order:
//   1. repetition penalty over the distinct prompt + output tokens (logit > 0 ? logit / r : logit · r),
//      presence/frequency penalties over output tokens (logit -= presence + frequency · count);
//   2. logit bias added (float32, after the penalties), then masked ids and ids outside the
//      allowed-token bitmask set to -inf;
//   3-5. temperature 0 takes the argmax (lowest id on ties); otherwise, exactly (sampling_math.h has
//   the arithmetic, shared by both samplers, so their decisions are equal bit for bit):
//     mass_i   = floor(2^33 · prob_exp(fl32(fl32(l_i − max) · fl32(1 / T))))   (uint64; 2^33 at the max,
//              whose exponent is exactly 0)
//     order    (adjusted logit desc, id asc) over the candidates (mass_i > 0); -0 == +0;
//     top-k    when 0 < top_k < #candidates, keep the first top_k in that order;
//     top-p    when top_p < 1: total = the mass kept so far, T = ceil(top_p · total) (exact, in
//              integers), keep the shortest prefix in that order whose mass reaches T;
//     min-p    drop the kept candidates with mass_i < ceil(min_p · 2^33);
//     draw     u_bits = the 53 bits of sampling_uniform(seed, step) (u = u_bits · 2^-53),
//              target = floor(u · kept_total) (exact), the token is the first kept candidate in ID
//              ORDER whose cumulative mass exceeds target.
//   The kept set is the one of the float64 rules up to float32 rounding; walking it in id order
//   instead of probability order changes which token a given u maps to, not the distribution.
// Logprobs are log_softmax of the RAW logits (before penalties, bias, mask and temperature), in double.
//
// Each row is split over a cluster of CTAs for small batches (one CTA per row for large ones);
// graph-safe (params, CSR lists and seeds are read on the device).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "rtllm/common.h"
#include "rtllm/kernels/common.cuh"

namespace rtllm::kernels {

// One per sequence, in device memory. Same meaning and limits as rtllm::SamplingConfig.
struct SamplingParamsDevice {
  float temperature;  // 0: greedy
  float top_p;        // (0, 1]
  float min_p;        // [0, 1]
  float repetition_penalty;
  float presence_penalty;
  float frequency_penalty;
  int32_t top_k;         // 0: off
  int32_t num_logprobs;  // -1: none; 0: the sampled token's; N: also the top N (N <= max_top)
  uint64_t seed;         // the resolved per-sequence seed
  int64_t step;          // index of the token being drawn
};

// Most top logprobs one call can return per sequence.
constexpr int32_t kMaxTopLogprobs = 64;

// logits      [num_seqs, vocab_size] float32 (not modified).
// params      [num_seqs].
// CSR token lists (offsets [num_seqs + 1]; a null offsets pointer means empty lists for every sequence):
//   prompt_ids/prompt_offsets  prompt tokens (repetition penalty),
//   output_ids/output_offsets  generated tokens (repetition, presence and frequency penalties),
//   masked_ids/masked_offsets  ids that may not be drawn (e.g. end ids before min_tokens),
//   bias_ids/bias_values/bias_offsets  (token id, bias) pairs added to the logits; a sequence's ids
//                              strictly ascending (found by binary search); bias_values is float32,
//                              parallel to bias_ids.
//   Ids must lie in [0, vocab_size) (ids outside are ignored).
// allowed_bitmask [num_seqs, (vocab_size + 31) / 32] uint32 (null: every token allowed): token i of
//               sequence s may be drawn only when bit i % 32 of word i / 32 of row s is set.
// out_ids       [num_seqs]: the sampled id, or -1 when every token of the sequence is masked or -inf.
// out_logprobs  [num_seqs, 1 + max_top] (may be null when no sequence asks for logprobs): [0] the raw
//               logprob of the sampled id, [1 + j] the j-th highest raw logprob (j < num_logprobs);
// out_top_ids   [num_seqs, max_top] the ids of those (ties: lower id first). Slots past num_logprobs
//               hold id -1 and logprob -inf; rows of sequences with num_logprobs < 0 are left untouched.
// workspace     sample_workspace_bytes(num_seqs, vocab_size) bytes, 4-byte aligned; needed only when a
//               sequence has penalties, masked ids, biases or a bitmask (may be null otherwise).
// max_top in [0, kMaxTopLogprobs]; vocab_size in [1, 2^30].
RTLLM_API cudaError_t sample(int32_t* out_ids, float* out_logprobs, int32_t* out_top_ids, const float* logits,
                             const SamplingParamsDevice* params, const int32_t* prompt_ids,
                             const int32_t* prompt_offsets, const int32_t* output_ids, const int32_t* output_offsets,
                             const int32_t* masked_ids, const int32_t* masked_offsets, const int32_t* bias_ids,
                             const float* bias_values, const int32_t* bias_offsets, const uint32_t* allowed_bitmask,
                             int32_t num_seqs, int32_t vocab_size, int32_t max_top, void* workspace,
                             cudaStream_t stream);

// Workspace bytes for sample() with up to max_num_seqs sequences: one uint32 of flags and count per
// (sequence, vocab id).
RTLLM_API size_t sample_workspace_bytes(int32_t max_num_seqs, int32_t vocab_size);

}  // namespace rtllm::kernels
