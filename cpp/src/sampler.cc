#include "rtllm/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

// The probability and mass arithmetic shared with the CUDA sampler (header-only).
#include "rtllm/kernels/sampling_math.h"

namespace rtllm {

// Messages read "<field>=<value> is invalid: it must be <limit>", the form Python's checks of the
// fields C++ never sees (SamplingParams.n, stop, ...) use too.
void SamplingConfig::validate() const {
  RTLLM_CHECK_FIELD(std::isfinite(temperature) && temperature >= 0.0f, "temperature", "temperature=", temperature,
                    " is invalid: it must be a finite number >= 0 (0 samples greedily)");
  RTLLM_CHECK_FIELD(top_k >= 0, "top_k", "top_k=", top_k, " is invalid: it must be >= 0 (0: off)");
  RTLLM_CHECK_FIELD(top_p > 0.0f && top_p <= 1.0f, "top_p", "top_p=", top_p, " is invalid: it must be in (0, 1]");
  RTLLM_CHECK_FIELD(min_p >= 0.0f && min_p <= 1.0f, "min_p", "min_p=", min_p, " is invalid: it must be in [0, 1]");
  RTLLM_CHECK_FIELD(std::isfinite(repetition_penalty) && repetition_penalty > 0.0f, "repetition_penalty",
                    "repetition_penalty=", repetition_penalty, " is invalid: it must be a finite number > 0 (1: off)");
  RTLLM_CHECK_FIELD(presence_penalty >= -2.0f && presence_penalty <= 2.0f, "presence_penalty",
                    "presence_penalty=", presence_penalty, " is invalid: it must be in [-2, 2]");
  RTLLM_CHECK_FIELD(frequency_penalty >= -2.0f && frequency_penalty <= 2.0f, "frequency_penalty",
                    "frequency_penalty=", frequency_penalty, " is invalid: it must be in [-2, 2]");
  RTLLM_CHECK_FIELD(num_logprobs >= -1, "num_logprobs", "num_logprobs=", num_logprobs,
                    " is invalid: it must be >= -1 (-1: none)");
  RTLLM_CHECK_FIELD(num_prompt_logprobs >= -1, "prompt_logprobs", "prompt_logprobs=", num_prompt_logprobs,
                    " is invalid: it must be >= -1 (-1: none)");
  for (const auto& [token_id, bias] : logit_bias) {
    RTLLM_CHECK_FIELD(token_id >= 0, "logit_bias", "logit_bias token id ", token_id, " is invalid: it must be >= 0");
    RTLLM_CHECK_FIELD(std::isfinite(bias), "logit_bias", "logit_bias[", token_id, "]=", bias,
                      " is invalid: it must be finite");
  }
}

namespace {

const std::vector<int32_t> kNoTokens;
const std::vector<int32_t>& or_empty(const std::vector<int32_t>* ids) { return ids ? *ids : kNoTokens; }

void check_ids(const std::vector<int32_t>& ids, int32_t vocab_size) {
  for (int32_t id : ids)
    RTLLM_CHECK(id >= 0 && id < vocab_size, "token id ", id, " outside [0, ", vocab_size, ")");
}

// Repetition penalty over the distinct prompt and output tokens, as in HF and vLLM: positive
// logits are divided by it, negative ones multiplied, so a penalty > 1 always makes a seen token
// less likely.
void apply_repetition_penalty(float* logits, float penalty, const std::vector<int32_t>& prompt,
                              const std::vector<int32_t>& output) {
  if (penalty == 1.0f) return;
  std::vector<int32_t> seen(prompt);
  seen.insert(seen.end(), output.begin(), output.end());
  std::sort(seen.begin(), seen.end());
  seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
  for (int32_t id : seen) logits[id] = logits[id] > 0.0f ? logits[id] / penalty : logits[id] * penalty;
}

// OpenAI semantics: logit -= presence * (count > 0) + frequency * count, over output tokens.
void apply_presence_frequency(float* logits, float presence, float frequency,
                              const std::vector<int32_t>& output) {
  if (presence == 0.0f && frequency == 0.0f) return;
  std::vector<int32_t> sorted(output);
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < sorted.size();) {
    size_t j = i;
    while (j < sorted.size() && sorted[j] == sorted[i]) ++j;
    // The product rounded on its own (an fma with 0 is never contracted with the sum), as the kernel.
    logits[sorted[i]] -= presence + std::fma(frequency, static_cast<float>(j - i), 0.0f);
    i = j;
  }
}

// Stage 1.
void apply_penalties(float* logits, const SamplingConfig& config, const std::vector<int32_t>& prompt,
                     const std::vector<int32_t>& output) {
  apply_repetition_penalty(logits, config.repetition_penalty, prompt, output);
  apply_presence_frequency(logits, config.presence_penalty, config.frequency_penalty, output);
}

// Stage 2: the bias first, then -inf for masked ids and ids the bitmask does not allow, so a mask
// wins over any bias.
void apply_bias_and_mask(float* logits, int32_t vocab_size, const std::map<int32_t, float>& logit_bias,
                         const std::vector<int32_t>& masked, const uint32_t* allowed_bitmask) {
  constexpr float kMasked = -std::numeric_limits<float>::infinity();
  for (const auto& [token_id, bias] : logit_bias) logits[token_id] += bias;
  for (int32_t id : masked) logits[id] = kMasked;
  if (!allowed_bitmask) return;
  for (int32_t i = 0; i < vocab_size; ++i)
    if (!((allowed_bitmask[i / 32] >> (i % 32)) & 1u)) logits[i] = kMasked;
}

int32_t argmax(const float* logits, int32_t vocab_size) {
  int32_t best = 0;
  for (int32_t i = 1; i < vocab_size; ++i)
    if (logits[i] > logits[best]) best = i;  // strict: the lowest id wins ties
  return best;
}

// log_softmax of the raw logits at `token_id`, and the top `num_top` (id, logprob) pairs.
void fill_logprobs(const float* logits, int32_t vocab_size, int32_t num_top, SampledToken& out) {
  double max_logit = logits[argmax(logits, vocab_size)];
  double sum = 0.0;
  for (int32_t i = 0; i < vocab_size; ++i) sum += std::exp(logits[i] - max_logit);
  double log_sum = max_logit + std::log(sum);
  out.logprob = static_cast<float>(logits[out.token_id] - log_sum);
  if (num_top <= 0) return;
  std::vector<int32_t> ids(vocab_size);
  for (int32_t i = 0; i < vocab_size; ++i) ids[i] = i;
  int32_t n = std::min(num_top, vocab_size);
  std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  for (int32_t k = 0; k < n; ++k)
    out.top_logprobs.push_back({ids[k], static_cast<float>(logits[ids[k]] - log_sum)});
}

}  // namespace

double sampling_uniform(uint64_t seed, int64_t step) {
  return static_cast<double>(sampling::uniform_bits(seed, step)) * 0x1.0p-53;
}

void Sampler::sample(const float* logits, int32_t vocab_size, const std::vector<SamplingInput>& inputs,
                     std::vector<SampledToken>* out) {
  RTLLM_CHECK(out != nullptr, "Sampler::sample needs an output vector");
  out->assign(inputs.size(), SampledToken{});
  for (size_t s = 0; s < inputs.size(); ++s)
    if (inputs[s].config) try_sample(logits + s * static_cast<size_t>(vocab_size), vocab_size, inputs[s], (*out)[s]);
}

SampledToken Sampler::sample_one(const float* logits, int32_t vocab_size, const SamplingInput& input) {
  SampledToken out;
  RTLLM_CHECK(try_sample(logits, vocab_size, input, out), "every token of the vocabulary is masked or has logit -inf");
  return out;
}

bool Sampler::try_sample(const float* raw_logits, int32_t vocab_size, const SamplingInput& input, SampledToken& out) {
  RTLLM_CHECK(input.config != nullptr, "sampling input without a config");
  RTLLM_CHECK(vocab_size >= 1, "vocab_size must be >= 1, got ", vocab_size);
  const SamplingConfig& config = *input.config;
  const auto& prompt = or_empty(input.prompt_token_ids);
  const auto& output = or_empty(input.output_token_ids);
  const auto& masked = or_empty(input.masked_token_ids);
  check_ids(prompt, vocab_size);
  check_ids(output, vocab_size);
  check_ids(masked, vocab_size);
  for (const auto& [token_id, bias] : config.logit_bias)
    RTLLM_CHECK(token_id >= 0 && token_id < vocab_size, "logit_bias token id ", token_id, " outside [0, ",
                vocab_size, ")");

  if (input.score_token_id >= 0) {
    RTLLM_CHECK(input.score_token_id < vocab_size, "score_token_id ", input.score_token_id, " outside [0, ",
                vocab_size, ")");
    out = SampledToken{};
    out.token_id = input.score_token_id;
    fill_logprobs(raw_logits, vocab_size, std::max(config.num_logprobs, 0), out);
    return true;
  }
  logits_.assign(raw_logits, raw_logits + vocab_size);
  float* logits = logits_.data();
  apply_penalties(logits, config, prompt, output);
  apply_bias_and_mask(logits, vocab_size, config.logit_bias, masked, input.allowed_token_bitmask);
  const int32_t best = argmax(logits, vocab_size);
  if (logits[best] == -std::numeric_limits<float>::infinity()) return false;

  out = SampledToken{};
  if (config.temperature == 0.0f) {
    out.token_id = best;
  } else {
    apply_temperature(vocab_size, config.temperature, logits[best]);
    filter_candidates(config);
    out.token_id = draw_candidate(sampling::uniform_bits(input.seed, input.step));
  }
  if (config.num_logprobs >= 0) fill_logprobs(raw_logits, vocab_size, config.num_logprobs, out);
  return true;
}

// Stage 3: the integer mass of every token (sampling_math.h: floor(2^33 · exp((l - max) / T)) with
// the shared float32 exp; the most likely token weighs 2^33); the candidates are the tokens of mass
// > 0, in id order.
void Sampler::apply_temperature(int32_t vocab_size, float temperature, float max_logit) {
  const float inv_t = sampling::inverse_temperature(temperature);
  masses_.resize(vocab_size);
  candidates_.clear();
  for (int32_t i = 0; i < vocab_size; ++i) {
    masses_[i] = sampling::logit_mass(logits_[i], max_logit, inv_t);
    if (masses_[i] > 0) candidates_.push_back(i);
  }
}

// Stage 4, the rules of kernels/include/rtllm/kernels/sampling.cuh, in integers:
//   order    the candidates by (adjusted logit desc, id asc) (-0 and +0 equal);
//   top-k    when 0 < top_k < #candidates, keep the first top_k of that order;
//   top-p    when top_p < 1, with total the mass kept so far and T = ceil(top_p · total) (exact),
//            keep the shortest prefix of that order whose mass reaches T;
//   min-p    drop the candidates of mass < ceil(min_p · 2^33) (the most likely token always stays).
// Candidates end in id order (the draw's order).
void Sampler::filter_candidates(const SamplingConfig& config) {
  const float* logits = logits_.data();
  auto before = [logits](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);  // -0 == +0: id order
  };
  const int64_t num_candidates = static_cast<int64_t>(candidates_.size());
  const bool top_k = config.top_k > 0 && config.top_k < num_candidates;
  const bool top_p = config.top_p < 1.0f;
  if (top_k) {
    std::partial_sort(candidates_.begin(), candidates_.begin() + config.top_k, candidates_.end(), before);
    candidates_.resize(config.top_k);
  } else if (top_p) {
    std::sort(candidates_.begin(), candidates_.end(), before);
  }
  if (top_p) {
    uint64_t total = 0;
    for (int32_t id : candidates_) total += masses_[id];
    const uint64_t threshold = sampling::top_p_threshold(total, config.top_p);
    uint64_t mass = 0;
    size_t num_keep = 0;
    while (num_keep < candidates_.size() && mass < threshold) mass += masses_[candidates_[num_keep++]];
    candidates_.resize(std::max<size_t>(num_keep, 1));
  }
  if (top_k || top_p) std::sort(candidates_.begin(), candidates_.end());
  if (config.min_p > 0.0f) {
    const uint64_t least = sampling::min_p_threshold(config.min_p);
    candidates_.erase(std::remove_if(candidates_.begin(), candidates_.end(),
                                     [&](int32_t id) { return masses_[id] < least; }),
                      candidates_.end());
  }
}

// Stage 5: with total the kept mass and target = floor(u · total) (u = bits · 2^-53, exact), the
// first kept candidate in id order whose cumulative mass exceeds target.
int32_t Sampler::draw_candidate(uint64_t uniform_bits) const {
  uint64_t total = 0;
  for (int32_t id : candidates_) total += masses_[id];
  const uint64_t target = sampling::draw_target(total, uniform_bits);
  uint64_t mass = 0;
  for (int32_t id : candidates_) {
    mass += masses_[id];
    if (target < mass) return id;
  }
  return candidates_.back();  // not reached: target < total
}

}  // namespace rtllm
