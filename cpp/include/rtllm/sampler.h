// Sampler: turns one step's logits into the next token of each sequence, on the CPU.
//
// Per sequence, in this order: repetition penalty (prompt and output tokens), presence and
// frequency penalties (output tokens), masked ids set to -inf; then temperature 0 takes the argmax
// (lowest id on ties); otherwise logits / temperature -> softmax -> top-k -> top-p -> min-p ->
// renormalize -> draw. The draw for step i uses one uniform number that depends only on the
// sequence's seed and i, so a sequence samples the same tokens whatever else is in the batch.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "rtllm/common.h"

namespace rtllm {

// How the next token is drawn from the logits. Defaults are greedy-equivalent off switches.
struct RTLLM_API SamplingConfig {
  float temperature = 1.0f;         // 0: greedy; must be finite and >= 0
  int32_t top_k = 0;                // 0: off; >= 0
  float top_p = 1.0f;               // in (0, 1]
  float min_p = 0.0f;               // in [0, 1]
  float repetition_penalty = 1.0f;  // > 0; 1: off (applied over prompt and output tokens)
  float presence_penalty = 0.0f;    // in [-2, 2] (output tokens)
  float frequency_penalty = 0.0f;   // in [-2, 2] (output tokens)
  std::optional<uint64_t> seed;     // per-request RNG seed; unset: drawn from the executor's RNG
  int32_t num_logprobs = -1;        // -1: none; 0: the sampled token's; N: also the top N
  void validate() const;            // throws InvalidArgument naming the value and the limit
};

struct TokenLogprob {
  int32_t token_id;
  float logprob;
};

// One sequence's part of a sampling step. The pointed-to vectors must live until sample() returns;
// a null pointer means an empty list.
struct SamplingInput {
  const SamplingConfig* config = nullptr;
  uint64_t seed = 0;   // the resolved per-sequence seed
  int64_t step = 0;    // index of the token being drawn (number of tokens generated so far)
  const std::vector<int32_t>* prompt_token_ids = nullptr;
  const std::vector<int32_t>* output_token_ids = nullptr;
  const std::vector<int32_t>* masked_token_ids = nullptr;  // may not be drawn (e.g. end ids before min_tokens)
};

struct SampledToken {
  int32_t token_id = -1;
  // log_softmax of the raw logits (before penalties and temperature) at token_id; set when
  // num_logprobs >= 0, with the num_logprobs highest raw log-probabilities when num_logprobs > 0.
  float logprob = 0.0f;
  std::vector<TokenLogprob> top_logprobs;
};

// The uniform number in [0, 1) that drives the draw of step `step` of a sequence seeded with `seed`.
RTLLM_API double sampling_uniform(uint64_t seed, int64_t step);

class RTLLM_API Sampler {
 public:
  // logits: [inputs.size(), vocab_size] float32 row-major, row s for inputs[s].
  std::vector<SampledToken> sample(const float* logits, int32_t vocab_size,
                                   const std::vector<SamplingInput>& inputs);
  SampledToken sample_one(const float* logits, int32_t vocab_size, const SamplingInput& input);

 private:
  int32_t draw(const float* logits, int32_t vocab_size, const SamplingConfig& config, double u);

  // Work buffers reused across calls: [vocab_size] adjusted logits, candidate ids and probabilities.
  std::vector<float> logits_;
  std::vector<int32_t> candidates_;
  std::vector<double> probs_;
};

}  // namespace rtllm
