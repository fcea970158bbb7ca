#include "request.h"

#include <algorithm>

namespace rtllm {

void StopConfig::validate() const {
  RTLLM_CHECK_FIELD(max_tokens >= 1, "max_tokens", "max_tokens=", max_tokens, " is invalid: it must be >= 1");
  RTLLM_CHECK_FIELD(min_tokens >= 0 && min_tokens <= max_tokens, "min_tokens", "min_tokens=", min_tokens,
                    " is invalid: it must be in [0, max_tokens=", max_tokens, "]");
  auto check_ids = [](const std::vector<int32_t>& ids, const char* field) {
    for (size_t i = 0; i < ids.size(); ++i)
      RTLLM_CHECK_FIELD(ids[i] >= 0, field, field, "[", i, "]=", ids[i], " is invalid: it must be >= 0");
  };
  check_ids(end_ids, "end_ids");
  check_ids(stop_token_ids, "stop_token_ids");
}

LlmRequest::LlmRequest(RequestId id_, Request request_, uint64_t seed_, int32_t max_seq_len)
    : request(std::move(request_)), seed(seed_) {
  id = id_;
  num_prompt_tokens = static_cast<int32_t>(request.prompt_token_ids.size());
  num_tokens = num_prompt_tokens;
  token_ids = request.prompt_token_ids;
  cache_key = cache_salt_key(request.cache_salt);
  // Ungrouped requests each form their own group, in a range no group id reaches (ids are < 2^63).
  group = request.group_id ? *request.group_id : (uint64_t{1} << 63) | static_cast<uint64_t>(id);
  scores_prompt = request.sampling.num_prompt_logprobs >= 0;
  prompt_scoring = request.sampling;
  prompt_scoring.num_logprobs = request.sampling.num_prompt_logprobs;
  max_num_tokens = static_cast<int32_t>(
      std::min<int64_t>(int64_t{num_prompt_tokens} + request.stop.max_tokens, max_seq_len));
}

std::vector<int32_t> LlmRequest::masked_token_ids() const {
  const StopConfig& stop = request.stop;
  if (num_generated() >= stop.min_tokens) return {};
  std::vector<int32_t> masked(stop.stop_token_ids);
  if (!stop.ignore_eos) masked.insert(masked.end(), stop.end_ids.begin(), stop.end_ids.end());
  return masked;
}

SamplingInput LlmRequest::sampling_input(const std::vector<int32_t>* masked) const {
  SamplingInput input;
  input.config = &request.sampling;
  input.seed = seed;
  input.step = num_generated();
  input.prompt_token_ids = &request.prompt_token_ids;
  input.output_token_ids = &output_token_ids;
  input.masked_token_ids = masked;
  return input;
}

SamplingInput LlmRequest::prompt_scoring_input(int32_t position) const {
  SamplingInput input;
  input.config = &prompt_scoring;
  input.score_token_id = request.prompt_token_ids[position + 1];
  return input;
}

void LlmRequest::add_token(const SampledToken& token) {
  num_cached_tokens = num_tokens;
  num_tokens += 1;
  output_token_ids.push_back(token.token_id);
  token_ids.push_back(token.token_id);
  if (request.sampling.num_logprobs >= 0) logprobs.push_back(token.logprob);
  if (request.sampling.num_logprobs > 0) top_logprobs.push_back(token.top_logprobs);

  const StopConfig& stop = request.stop;
  auto contains = [](const std::vector<int32_t>& ids, int32_t id) {
    return std::find(ids.begin(), ids.end(), id) != ids.end();
  };
  bool may_stop = num_generated() > stop.min_tokens;
  if (may_stop && !stop.ignore_eos && contains(stop.end_ids, token.token_id)) {
    stop_token_id = token.token_id;
    finish(FinishReason::kEndId);
  } else if (may_stop && contains(stop.stop_token_ids, token.token_id)) {
    stop_token_id = token.token_id;
    finish(FinishReason::kStopTokenId);
  } else if (num_tokens >= max_num_tokens) {
    finish(FinishReason::kLength);
  }
}

void LlmRequest::finish(FinishReason reason, std::string message) {
  finish_reason = reason;
  error = std::move(message);
}

bool LlmRequest::take_response(Response& response) {
  if (sent_final_) return false;
  bool has_news = is_finished() || (request.streaming && output_token_ids.size() > num_sent_tokens_);
  if (!has_news) return false;
  size_t first = request.streaming ? num_sent_tokens_ : 0;
  response = Response{};
  response.request_id = id;
  response.token_ids.assign(output_token_ids.begin() + first, output_token_ids.end());
  if (!logprobs.empty()) response.logprobs.assign(logprobs.begin() + first, logprobs.end());
  if (!top_logprobs.empty()) response.top_logprobs.assign(top_logprobs.begin() + first, top_logprobs.end());
  const size_t first_prompt = request.streaming ? num_sent_prompt_logprobs_ : 0;
  response.prompt_logprobs.assign(prompt_logprobs.begin() + first_prompt, prompt_logprobs.end());
  num_sent_prompt_logprobs_ = prompt_logprobs.size();
  response.is_final = is_finished();
  response.finish_reason = finish_reason;
  response.stop_token_id = stop_token_id;
  response.error = error;
  num_sent_tokens_ = output_token_ids.size();
  sent_final_ = is_finished();
  return true;
}

}  // namespace rtllm
