#include "rtllm/sampler.h"

#include <algorithm>
#include <cmath>
#include <functional>
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

// The (logit desc, id asc) order of token ids over `logits` (-0 == +0: id order), as a comparator.
auto ranks_before(const float* logits) {
  return [logits](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
}

// A token's place in that order as one integer, larger first: the logit's order key over the complement
// of the id. The top-k / top-p selections compare these instead of logits and ids.
uint64_t rank_key(float logit, int32_t id) {
  return (static_cast<uint64_t>(sampling::order_key(logit)) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(id));
}

int32_t id_of(uint64_t key) { return static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(key)); }

using KeyIt = std::vector<uint64_t>::iterator;

uint64_t mass_sum(KeyIt begin, KeyIt end, const uint64_t* masses) {
  uint64_t total = 0;
  for (auto it = begin; it != end; ++it) total += masses[id_of(*it)];
  return total;
}

// Permutes [begin, end) (rank keys) so that the keys of the shortest prefix of the rank order whose mass
// reaches `threshold` come first, the last of them at the returned position (begin when threshold is 0).
// A quickselect on mass: each round partitions the range around its middle element (std::nth_element)
// and keeps the half that holds the cut, so the expected work is linear in the number of keys, where a
// sort was n log n.
KeyIt first_reaching(KeyIt begin, KeyIt end, const uint64_t* masses, uint64_t threshold) {
  constexpr std::ptrdiff_t kSortBelow = 32;  // a short range is sorted and walked
  const std::greater<uint64_t> first;
  auto lo = begin, hi = end;
  uint64_t need = threshold;  // still to reach from lo on; the mass of [lo, hi) is at least this
  while (hi - lo > kSortBelow) {
    const auto mid = lo + (hi - lo) / 2;
    std::nth_element(lo, mid, hi, first);
    const uint64_t through_mid = mass_sum(lo, mid + 1, masses);
    if (through_mid >= need) {
      hi = mid + 1;
    } else {
      need -= through_mid;
      lo = mid + 1;
    }
  }
  std::sort(lo, hi, first);
  for (auto it = lo; it != hi; ++it) {
    if (masses[id_of(*it)] >= need) return it;
    need -= masses[id_of(*it)];
  }
  return hi - 1;  // not reached: threshold <= the total mass
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
  std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), ranks_before(logits));
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
// Top-k and top-p each keep a prefix of the order, found by selection over the candidates' rank keys (no
// sort of the vocabulary). A short prefix replaces the candidates (in id order, the draw's order);
// otherwise the draw tests each candidate where it is: rank key at least cut_, mass at least least_.
void Sampler::filter_candidates(const SamplingConfig& config) {
  const int64_t n = static_cast<int64_t>(candidates_.size()), k = config.top_k;
  const bool top_k = k > 0 && k < n, top_p = config.top_p < 1.0f;
  least_ = config.min_p > 0.0f ? sampling::min_p_threshold(config.min_p) : 0;
  cut_ = 0;  // below every rank key
  if (!top_k && !top_p) return;
  auto rank_keys = [&](std::vector<uint64_t>& keys) {
    keys.resize(candidates_.size());
    for (size_t i = 0; i < candidates_.size(); ++i) keys[i] = rank_key(logits_[candidates_[i]], candidates_[i]);
  };
  bool list_kept = false;  // whether the kept candidates are listed whatever their number
  if (top_k && k <= n / 8) {
    // A heap of k over the ids themselves (one comparison for most of them); only the k kept get keys.
    std::partial_sort(candidates_.begin(), candidates_.begin() + k, candidates_.end(), ranks_before(logits_.data()));
    candidates_.resize(k);
    rank_keys(order_);
    list_kept = true;
  } else {
    rank_keys(order_);
    if (top_k) std::nth_element(order_.begin(), order_.begin() + (k - 1), order_.end(), std::greater<uint64_t>());
  }
  auto kept_end = order_.begin() + (top_k ? k : n);  // the keys kept so far are those before it
  if (top_p) {
    const uint64_t total = mass_sum(order_.begin(), kept_end, masses_.data());
    kept_end = first_reaching(order_.begin(), kept_end, masses_.data(),
                              sampling::top_p_threshold(total, config.top_p)) + 1;
  }
  const int64_t num_kept = kept_end - order_.begin();
  if (list_kept || num_kept * 16 <= n) {  // listing costs less than testing every candidate twice in the draw
    candidates_.resize(num_kept);
    for (int64_t i = 0; i < num_kept; ++i) candidates_[i] = id_of(order_[i]);
    std::sort(candidates_.begin(), candidates_.end());
    return;
  }
  cut_ = *(kept_end - 1);
  rank_keys(keys_);
}

// Stage 5: with total the kept mass and target = floor(u · total) (u = bits · 2^-53, exact), the
// first kept candidate in id order whose cumulative mass exceeds target.
int32_t Sampler::draw_candidate(uint64_t uniform_bits) const {
  const bool cut = cut_ != 0;
  auto kept_mass = [&](size_t i) {
    const uint64_t m = masses_[candidates_[i]];
    return (!cut || keys_[i] >= cut_) && m >= least_ ? m : 0;
  };
  uint64_t total = 0;
  for (size_t i = 0; i < candidates_.size(); ++i) total += kept_mass(i);
  const uint64_t target = sampling::draw_target(total, uniform_bits);
  uint64_t mass = 0;
  for (size_t i = 0; i < candidates_.size(); ++i) {
    mass += kept_mass(i);
    if (target < mass) return candidates_[i];
  }
  return candidates_.front();  // not reached: target < total, and the most likely candidate is kept
}

}  // namespace rtllm
