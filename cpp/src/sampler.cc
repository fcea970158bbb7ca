#include "rtllm/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace rtllm {

void SamplingConfig::validate() const {
  RTLLM_CHECK_ARG(std::isfinite(temperature) && temperature >= 0.0f,
                  "temperature must be finite and >= 0, got ", temperature);
  RTLLM_CHECK_ARG(top_k >= 0, "top_k must be >= 0, got ", top_k);
  RTLLM_CHECK_ARG(top_p > 0.0f && top_p <= 1.0f, "top_p must be in (0, 1], got ", top_p);
  RTLLM_CHECK_ARG(min_p >= 0.0f && min_p <= 1.0f, "min_p must be in [0, 1], got ", min_p);
  RTLLM_CHECK_ARG(std::isfinite(repetition_penalty) && repetition_penalty > 0.0f,
                  "repetition_penalty must be finite and > 0, got ", repetition_penalty);
  RTLLM_CHECK_ARG(presence_penalty >= -2.0f && presence_penalty <= 2.0f,
                  "presence_penalty must be in [-2, 2], got ", presence_penalty);
  RTLLM_CHECK_ARG(frequency_penalty >= -2.0f && frequency_penalty <= 2.0f,
                  "frequency_penalty must be in [-2, 2], got ", frequency_penalty);
  RTLLM_CHECK_ARG(num_logprobs >= -1, "num_logprobs must be >= -1, got ", num_logprobs);
}

namespace {

// SplitMix64's output function: a bijective 64-bit mix.
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

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
    logits[sorted[i]] -= presence + frequency * static_cast<float>(j - i);
    i = j;
  }
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
  // Counter-based: the SplitMix64 stream of mix64(seed), read at position `step`.
  uint64_t h = mix64(mix64(seed) + static_cast<uint64_t>(step + 1) * 0x9e3779b97f4a7c15ULL);
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

std::vector<SampledToken> Sampler::sample(const float* logits, int32_t vocab_size,
                                          const std::vector<SamplingInput>& inputs) {
  std::vector<SampledToken> out;
  out.reserve(inputs.size());
  for (size_t s = 0; s < inputs.size(); ++s)
    out.push_back(sample_one(logits + s * static_cast<size_t>(vocab_size), vocab_size, inputs[s]));
  return out;
}

SampledToken Sampler::sample_one(const float* raw_logits, int32_t vocab_size, const SamplingInput& input) {
  RTLLM_CHECK(input.config != nullptr, "sampling input without a config");
  RTLLM_CHECK(vocab_size >= 1, "vocab_size must be >= 1, got ", vocab_size);
  const SamplingConfig& config = *input.config;
  const auto& prompt = or_empty(input.prompt_token_ids);
  const auto& output = or_empty(input.output_token_ids);
  const auto& masked = or_empty(input.masked_token_ids);
  check_ids(prompt, vocab_size);
  check_ids(output, vocab_size);
  check_ids(masked, vocab_size);

  logits_.assign(raw_logits, raw_logits + vocab_size);
  float* logits = logits_.data();
  apply_repetition_penalty(logits, config.repetition_penalty, prompt, output);
  apply_presence_frequency(logits, config.presence_penalty, config.frequency_penalty, output);
  for (int32_t id : masked) logits[id] = -std::numeric_limits<float>::infinity();
  float max_logit = logits[argmax(logits, vocab_size)];
  RTLLM_CHECK(max_logit > -std::numeric_limits<float>::infinity(),
              "every token of the vocabulary is masked or has logit -inf");

  SampledToken out;
  out.token_id = config.temperature == 0.0f ? argmax(logits, vocab_size)
                                            : draw(logits, vocab_size, config, sampling_uniform(input.seed, input.step));
  if (config.num_logprobs >= 0) fill_logprobs(raw_logits, vocab_size, config.num_logprobs, out);
  return out;
}

// Softmax of logits / temperature, filtered by top-k, top-p and min-p, sampled by inverse CDF with
// the uniform number u. Candidates are ordered by probability (then id) whenever a filter needs it.
int32_t Sampler::draw(const float* logits, int32_t vocab_size, const SamplingConfig& config, double u) {
  double max_logit = logits[argmax(logits, vocab_size)];
  double inv_temperature = 1.0 / config.temperature;
  probs_.resize(vocab_size);
  candidates_.clear();
  for (int32_t i = 0; i < vocab_size; ++i) {
    probs_[i] = std::exp((logits[i] - max_logit) * inv_temperature);  // unnormalized; max is 1
    if (probs_[i] > 0.0) candidates_.push_back(i);
  }
  auto more_likely = [&](int32_t a, int32_t b) { return probs_[a] > probs_[b] || (probs_[a] == probs_[b] && a < b); };
  auto num_candidates = [&]() { return static_cast<int64_t>(candidates_.size()); };

  if (config.top_k > 0 && config.top_k < num_candidates()) {
    std::partial_sort(candidates_.begin(), candidates_.begin() + config.top_k, candidates_.end(), more_likely);
    candidates_.resize(config.top_k);
  } else if (config.top_p < 1.0f) {
    std::sort(candidates_.begin(), candidates_.end(), more_likely);
  }
  if (config.top_p < 1.0f) {
    // Keep the smallest prefix whose mass reaches top_p of the mass left after top-k.
    double total = 0.0;
    for (int32_t id : candidates_) total += probs_[id];
    double mass = 0.0;
    size_t num_keep = 0;
    while (num_keep < candidates_.size() && mass < config.top_p * total) mass += probs_[candidates_[num_keep++]];
    candidates_.resize(std::max<size_t>(num_keep, 1));
  }
  if (config.min_p > 0.0f) {
    // The most likely token (p = 1 unnormalized) always passes; the ratio is scale-free.
    double threshold = static_cast<double>(config.min_p);
    candidates_.erase(std::remove_if(candidates_.begin(), candidates_.end(),
                                     [&](int32_t id) { return probs_[id] < threshold; }),
                      candidates_.end());
  }

  double total = 0.0;
  for (int32_t id : candidates_) total += probs_[id];
  double target = u * total;
  double mass = 0.0;
  for (int32_t id : candidates_) {
    mass += probs_[id];
    if (target < mass) return id;
  }
  return candidates_.back();  // u * total rounded up to the full mass
}

}  // namespace rtllm
