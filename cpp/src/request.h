// LlmRequest: the executor's state of one request from enqueue to its final response. The
// Sequence part is what the scheduler reads; the rest (outputs, stop state, what has been sent)
// belongs to the executor's loop thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "rtllm/executor.h"
#include "rtllm/sampler.h"
#include "rtllm/scheduler.h"

namespace rtllm {

struct LlmRequest : Sequence {
  // max_seq_len caps prompt + generated tokens (the request then ends with kLength).
  LlmRequest(RequestId id, Request request, uint64_t seed, int32_t max_seq_len);

  Request request;
  uint64_t seed = 0;  // resolved: the request's own or one drawn by the executor
  std::vector<int32_t> output_token_ids;
  std::vector<float> logprobs;                          // per output token, if requested
  std::vector<std::vector<TokenLogprob>> top_logprobs;  // per output token, if requested
  // Prompt scoring (request.sampling.num_prompt_logprobs >= 0): prompt tokens 1.. in order, scored
  // from the logits at the position before each; positions below num_scored_positions are done (a
  // recompute after preemption does not score them twice).
  std::vector<SampledToken> prompt_logprobs;
  int32_t num_scored_positions = 0;
  SamplingConfig prompt_scoring;  // request.sampling with num_logprobs = num_prompt_logprobs
  FinishReason finish_reason = FinishReason::kNotFinished;
  int32_t stop_token_id = -1;
  std::string error;

  int32_t num_generated() const { return static_cast<int32_t>(output_token_ids.size()); }
  bool is_finished() const { return finish_reason != FinishReason::kNotFinished; }
  // Whether the scheduled tokens are all it has left to feed: the step then yields a token.
  bool completes_step() const { return num_cached_tokens + num_scheduled_tokens == num_tokens; }
  // Ids the next draw may not produce: end ids (unless ignore_eos) and stop ids while fewer than
  // min_tokens tokens were generated.
  std::vector<int32_t> masked_token_ids() const;
  SamplingInput sampling_input(const std::vector<int32_t>* masked) const;
  // The input that scores prompt token position + 1 from the logits at `position`.
  SamplingInput prompt_scoring_input(int32_t position) const;

  // Records a token sampled after a step that fed all num_new_tokens() tokens, then ends the
  // request if the token or the length says so (end id, stop id, length; in that order).
  void add_token(const SampledToken& token);
  void finish(FinishReason reason, std::string message = {});

  // The response for what happened since the last one: streaming sends the new tokens and
  // nothing once more; non-streaming sends everything, only when finished. Returns false if
  // there is nothing to send.
  bool take_response(Response& response);

 private:
  size_t num_sent_tokens_ = 0;  // output tokens already in a streaming response
  size_t num_sent_prompt_logprobs_ = 0;
  bool sent_final_ = false;
};

}  // namespace rtllm
