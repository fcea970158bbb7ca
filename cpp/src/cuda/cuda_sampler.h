// CudaSampler: draws each sequence's next token from logits that stay on the device, so only the
// sampled ids (and requested logprobs) cross to the host. Same semantics as the CPU Sampler
// (rtllm/sampler.h); the kernel is rtllm::kernels::sample (kernels/include/rtllm/kernels/sampling.cuh).
//
// Per step: the per-sequence parameters, the CSR token lists (penalties, masked ids, logit bias)
// and the allowed-token bitmasks of LogitsProcessors are written into one pinned buffer and sent by
// one host-to-device copy; the kernel runs on the caller's stream; one device-to-host copy brings
// the ids and logprobs back; then the stream is synchronized.
// Buffers are allocated at construction for max_num_seqs sequences; the list capacity starts at
// max_num_seqs · (max_seq_len + bitmask words) 4-byte words (prompt + output and a bitmask row of
// every sequence) and grows only for unusually long masked or logit_bias lists.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "rtllm/sampler.h"

namespace rtllm {

class CudaSampler {
 public:
  CudaSampler(int32_t max_num_seqs, int32_t vocab_size, int32_t max_seq_len);
  ~CudaSampler();
  CudaSampler(const CudaSampler&) = delete;
  CudaSampler& operator=(const CudaSampler&) = delete;

  // True when the kernel supports every input (num_logprobs <= kernels::kMaxTopLogprobs, no
  // score_token_id).
  static bool supports(const std::vector<SamplingInput>& inputs);

  // logits: device [inputs.size(), vocab_size] float32, row s for inputs[s]. An input without a
  // config draws nothing (its out entry keeps token_id -1). A sequence whose every token is masked
  // or -inf gets token_id -1. Blocks until the results are on the host.
  void sample(const float* logits, const std::vector<SamplingInput>& inputs, std::vector<SampledToken>* out,
              cudaStream_t stream);

 private:
  // One step's staged inputs: bytes to copy, and where the bias values and bitmask rows start (in
  // words from the start of the lists).
  struct Staged {
    size_t num_bytes = 0;
    int32_t bias_values = 0, bitmask = 0;
    bool has_bitmask = false;
  };
  Staged stage(const std::vector<SamplingInput>& inputs);
  void reserve_words(size_t num_words);

  int32_t max_num_seqs_ = 0, vocab_size_ = 0;
  size_t words_capacity_ = 0;      // 4-byte words (ids, biases, bitmasks) the list buffers hold
  void* staging_ = nullptr;        // pinned: params, offsets and lists of one step
  void* inputs_ = nullptr;         // device mirror of staging_
  void* results_host_ = nullptr;   // pinned: ids, logprobs, top ids
  void* results_ = nullptr;        // device: the kernel's outputs
  void* workspace_ = nullptr;      // device: kernels::sample_workspace_bytes(max_num_seqs, vocab_size)
};

}  // namespace rtllm
