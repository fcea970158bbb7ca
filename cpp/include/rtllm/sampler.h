// Sampler: turns one step's logits into the next token of each sequence, on the CPU.
//
// Per sequence, five stages with the same semantics on every backend (the CUDA kernel,
// kernels/include/rtllm/kernels/sampling.cuh, follows them step for step):
//   1. penalties       repetition penalty (distinct prompt and output tokens), then presence and
//                      frequency penalties (output tokens);
//   2. bias and mask   logit_bias added; masked ids and ids outside the allowed-token bitmask (the
//                      request's LogitsProcessor) set to -inf;
//   3. temperature     0 skips to stage 5's argmax (lowest id on ties); else softmax(logits / T);
//   4. filters         top-k -> top-p -> min-p, over integer masses (exact rules in
//                      kernels/include/rtllm/kernels/sampling.cuh);
//   5. draw            inverse CDF of the kept mass walking the kept tokens in id order, or the
//                      argmax when greedy.
// The draw for step i uses one uniform number that depends only on the sequence's seed and i, so a
// sequence samples the same tokens whatever else is in the batch.
#pragma once

#include <cstdint>
#include <map>
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
  // token id -> bias added to its logit after the penalties, before temperature (OpenAI's and
  // vLLM's logit_bias). Biases must be finite; ids must lie in the vocabulary, which the executor
  // checks (validate() does not know the vocabulary).
  std::map<int32_t, float> logit_bias;
  // Prompt log-probabilities (vLLM's prompt_logprobs): -1 none; 0: each prompt token's (the first has
  // none); N: also the top N at each position. Computed from the raw logits, as num_logprobs.
  int32_t num_prompt_logprobs = -1;
  void validate() const;            // throws InvalidArgument naming the value and the limit
};

// Words of an allowed-token bitmask over vocab_size tokens: bit (i % 32) of word i / 32 is token i.
constexpr int32_t num_bitmask_words(int32_t vocab_size) { return (vocab_size + 31) / 32; }

// A per-request hook that narrows the tokens the next draw may produce, e.g. a grammar matcher of
// structured output (xgrammar's fill_next_token_bitmask). The executor calls it on its loop thread,
// on the host, before every draw of its request (never for a prompt chunk that draws nothing), with
// the tokens so far; both backends apply the bitmask in stage 2 with the other masked ids. A draw
// with no allowed token left ends the request with kError, as does an exception out of the hook.
class RTLLM_API LogitsProcessor {
 public:
  virtual ~LogitsProcessor() = default;
  // bitmask: [num_bitmask_words(vocab_size)] uint32, every bit set on entry; clear the bit of each
  // token the draw that follows output_token_ids may not produce. Bits past vocab_size are ignored.
  virtual void fill_next_token_bitmask(const std::vector<int32_t>& prompt_token_ids,
                                       const std::vector<int32_t>& output_token_ids, int32_t vocab_size,
                                       uint32_t* bitmask) = 0;
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
  // [num_bitmask_words(vocab_size)] uint32: only tokens whose bit is set may be drawn; null: all.
  const uint32_t* allowed_token_bitmask = nullptr;
  // >= 0: no draw; the result is this token with its log-probability (and, with num_logprobs > 0,
  // the top ones) from the raw logits: how prompt tokens are scored (prompt_logprobs).
  int32_t score_token_id = -1;
};

struct SampledToken {
  int32_t token_id = -1;
  // log_softmax of the raw logits (before every stage) at token_id; set when
  // num_logprobs >= 0, with the num_logprobs highest raw log-probabilities when num_logprobs > 0.
  float logprob = 0.0f;
  std::vector<TokenLogprob> top_logprobs;
};

// The uniform number in [0, 1) that drives the draw of step `step` of a sequence seeded with `seed`.
RTLLM_API double sampling_uniform(uint64_t seed, int64_t step);

class RTLLM_API Sampler {
 public:
  // logits: [inputs.size(), vocab_size] float32 row-major, row s for inputs[s]. out[s] for inputs[s];
  // an input without a config draws nothing, and a draw with every token masked or -inf fails:
  // both leave out[s].token_id -1 (as the CUDA sampler does). Other errors throw.
  void sample(const float* logits, int32_t vocab_size, const std::vector<SamplingInput>& inputs,
              std::vector<SampledToken>* out);
  // One sequence; throws Error when every token is masked or -inf.
  SampledToken sample_one(const float* logits, int32_t vocab_size, const SamplingInput& input);

 private:
  // False when every token is masked or -inf (out untouched).
  bool try_sample(const float* logits, int32_t vocab_size, const SamplingInput& input, SampledToken& out);
  // Stages 3-5 over logits_, which stages 1-2 adjusted in place.
  void apply_temperature(int32_t vocab_size, float temperature, float max_logit);
  void filter_candidates(const SamplingConfig& config);
  int32_t draw_candidate(uint64_t uniform_bits) const;

  // Work buffers reused across calls: [vocab_size] adjusted logits, candidate ids and integer masses
  // (floor(p · 2^33), kernels/include/rtllm/kernels/sampling_math.h).
  std::vector<float> logits_;
  std::vector<int32_t> candidates_;
  std::vector<uint64_t> masses_;
  // The rank keys of the candidates permuted by the top-k / top-p selections (order_), and in id order
  // (keys_, when cut_ != 0). The draw keeps the candidates of key >= cut_ (0: every one) and mass >= least_
  // (min-p).
  std::vector<uint64_t> keys_, order_;
  uint64_t cut_ = 0, least_ = 0;
};

}  // namespace rtllm
