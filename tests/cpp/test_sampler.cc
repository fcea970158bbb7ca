// Sampler against straightforward double-precision references: greedy choice, penalties, logit
// bias, the allowed-token bitmask, the filtered distribution (checked statistically), logprobs and
// per-sequence determinism.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>

#include "rtllm/sampler.h"

namespace rtllm {
namespace {

std::vector<float> random_logits(int32_t vocab_size, uint32_t seed, float scale = 2.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> logits(vocab_size);
  for (float& l : logits) l = normal(rng);
  return logits;
}

// Reference penalties in double: HF/vLLM repetition penalty over distinct prompt+output tokens,
// then OpenAI presence/frequency over output tokens.
std::vector<double> reference_penalized(const std::vector<float>& logits, const SamplingConfig& c,
                                        const std::vector<int32_t>& prompt, const std::vector<int32_t>& output) {
  std::vector<double> out(logits.begin(), logits.end());
  std::map<int32_t, int> output_counts;
  for (int32_t t : output) output_counts[t]++;
  std::map<int32_t, bool> seen;
  for (int32_t t : prompt) seen[t] = true;
  for (int32_t t : output) seen[t] = true;
  for (auto& [t, unused] : seen) out[t] = out[t] > 0 ? out[t] / c.repetition_penalty : out[t] * c.repetition_penalty;
  for (auto& [t, n] : output_counts) out[t] -= c.presence_penalty + c.frequency_penalty * n;
  return out;
}

// Reference target distribution: softmax(logits / T), top-k, top-p over the renormalized rest,
// min-p relative to the most likely token, renormalized.
std::vector<double> reference_distribution(const std::vector<double>& logits, const SamplingConfig& c) {
  const int n = static_cast<int>(logits.size());
  std::vector<double> p(n);
  double m = *std::max_element(logits.begin(), logits.end());
  for (int i = 0; i < n; ++i) p[i] = std::exp((logits[i] - m) / c.temperature);
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
  std::vector<bool> keep(n, true);
  if (c.top_k > 0)
    for (int r = c.top_k; r < n; ++r) keep[order[r]] = false;
  double total = 0;
  for (int i = 0; i < n; ++i) total += keep[i] ? p[i] : 0.0;
  double cum = 0;
  bool reached = false;
  for (int r = 0; r < n; ++r) {
    int i = order[r];
    if (!keep[i]) continue;
    if (reached) keep[i] = false;
    cum += p[i] / total;
    if (cum >= c.top_p) reached = true;
  }
  double p_max = p[order[0]];
  for (int i = 0; i < n; ++i)
    if (p[i] < c.min_p * p_max) keep[i] = false;
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += keep[i] ? p[i] : 0.0;
  for (int i = 0; i < n; ++i) p[i] = keep[i] ? p[i] / sum : 0.0;
  return p;
}

SamplingInput make_input(const SamplingConfig& c, uint64_t seed, int64_t step) {
  SamplingInput in;
  in.config = &c;
  in.seed = seed;
  in.step = step;
  return in;
}

TEST(Sampler, GreedyTakesArgmaxLowestIdOnTies) {
  Sampler sampler;
  SamplingConfig greedy;
  greedy.temperature = 0.0f;
  std::vector<float> logits = {0.5f, 3.0f, -1.0f, 3.0f, 2.9f};
  EXPECT_EQ(sampler.sample_one(logits.data(), 5, make_input(greedy, 1, 0)).token_id, 1);
  for (uint32_t s = 0; s < 50; ++s) {
    auto l = random_logits(97, s);
    int32_t expected = static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
    EXPECT_EQ(sampler.sample_one(l.data(), 97, make_input(greedy, s, s)).token_id, expected);
  }
}

// Greedy after penalties (stage 1) and, in odd trials, logit bias (stage 2) picks the argmax of the
// float64 reference.
TEST(Sampler, PenaltiesAndLogitBiasMatchReference) {
  Sampler sampler;
  std::mt19937 rng(7);
  const int32_t vocab_size = 40;
  int num_checked = 0;
  for (uint32_t trial = 0; trial < 500; ++trial) {
    auto logits = random_logits(vocab_size, 1000 + trial, 1.0f);
    SamplingConfig c;
    c.temperature = 0.0f;
    c.repetition_penalty = std::uniform_real_distribution<float>(0.5f, 2.0f)(rng);
    c.presence_penalty = std::uniform_real_distribution<float>(-2.0f, 2.0f)(rng);
    c.frequency_penalty = std::uniform_real_distribution<float>(-2.0f, 2.0f)(rng);
    for (int j = 0; j < (trial % 2 ? 6 : 0); ++j)
      c.logit_bias[rng() % vocab_size] = std::uniform_real_distribution<float>(-3.0f, 3.0f)(rng);
    std::vector<int32_t> prompt(rng() % 10), output(rng() % 10);
    for (auto& t : prompt) t = rng() % 10;  // few distinct ids: repeats and overlaps
    for (auto& t : output) t = rng() % 10;
    auto ref = reference_penalized(logits, c, prompt, output);
    for (const auto& [t, bias] : c.logit_bias) ref[t] += bias;
    std::vector<double> sorted(ref);
    std::sort(sorted.rbegin(), sorted.rend());
    if (sorted[0] - sorted[1] < 1e-4) continue;  // too close to call in float32
    SamplingInput in = make_input(c, trial, 0);
    in.prompt_token_ids = &prompt;
    in.output_token_ids = &output;
    int32_t expected = static_cast<int32_t>(std::max_element(ref.begin(), ref.end()) - ref.begin());
    ASSERT_EQ(sampler.sample_one(logits.data(), vocab_size, in).token_id, expected) << "trial " << trial;
    ++num_checked;
  }
  EXPECT_GT(num_checked, 450);
}

struct DistributionCase {
  const char* name;
  SamplingConfig config;
  bool with_penalties;
};

SamplingConfig config_of(float temperature, int32_t top_k, float top_p, float min_p) {
  SamplingConfig c;
  c.temperature = temperature;
  c.top_k = top_k;
  c.top_p = top_p;
  c.min_p = min_p;
  return c;
}

// Draws 20000 tokens (different seeds and steps) and compares frequencies with the exact target:
// each |freq - p| stays under 5 standard deviations, and no filtered-out token ever appears.
TEST(Sampler, FrequenciesMatchTargetDistribution) {
  std::vector<DistributionCase> cases = {
      {"t0.7", config_of(0.7f, 0, 1.0f, 0.0f), false},
      {"t1.3", config_of(1.3f, 0, 1.0f, 0.0f), false},
      {"top_k5", config_of(1.0f, 5, 1.0f, 0.0f), false},
      {"top_p0.8", config_of(1.0f, 0, 0.8f, 0.0f), false},
      {"min_p0.1", config_of(1.0f, 0, 1.0f, 0.1f), false},
      {"t0.7_top_k5_top_p0.8", config_of(0.7f, 5, 0.8f, 0.0f), false},
      {"t1.3_top_p0.9_min_p0.1", config_of(1.3f, 0, 0.9f, 0.1f), false},
      {"t1.3_top_k8_top_p0.95_min_p0.05", config_of(1.3f, 8, 0.95f, 0.05f), false},
      {"penalties_t1.0", config_of(1.0f, 0, 1.0f, 0.0f), true},
  };
  cases.back().config.repetition_penalty = 1.5f;
  cases.back().config.presence_penalty = 0.5f;
  cases.back().config.frequency_penalty = 0.3f;
  const int32_t vocab_size = 24;
  const int num_draws = 20000;
  const std::vector<int32_t> prompt = {1, 2, 3, 3}, output = {3, 4, 4, 4, 20};
  Sampler sampler;
  for (size_t k = 0; k < cases.size(); ++k) {
    const auto& tc = cases[k];
    auto logits = random_logits(vocab_size, 42 + k);
    std::vector<double> base = tc.with_penalties ? reference_penalized(logits, tc.config, prompt, output)
                                                 : std::vector<double>(logits.begin(), logits.end());
    auto target = reference_distribution(base, tc.config);
    std::vector<int> counts(vocab_size, 0);
    for (int i = 0; i < num_draws; ++i) {
      SamplingInput in = make_input(tc.config, /*seed=*/i / 100, /*step=*/i % 100);
      if (tc.with_penalties) in.prompt_token_ids = &prompt, in.output_token_ids = &output;
      counts[sampler.sample_one(logits.data(), vocab_size, in).token_id]++;
    }
    for (int32_t t = 0; t < vocab_size; ++t) {
      double freq = static_cast<double>(counts[t]) / num_draws;
      if (target[t] == 0.0) {
        EXPECT_EQ(counts[t], 0) << tc.name << ": token " << t << " is filtered out";
      } else {
        double sigma = std::sqrt(target[t] * (1 - target[t]) / num_draws);
        EXPECT_LE(std::abs(freq - target[t]), 5 * sigma + 1e-12)
            << tc.name << ": token " << t << " freq " << freq << " target " << target[t];
      }
    }
  }
}

TEST(Sampler, SameSeedAndStepGiveSameTokenWhateverTheBatch) {
  const int32_t vocab_size = 50;
  SamplingConfig a = config_of(1.0f, 0, 1.0f, 0.0f), other = config_of(0.8f, 10, 0.9f, 0.0f);
  auto logits_a = random_logits(vocab_size, 1), logits_b = random_logits(vocab_size, 2);
  for (int64_t step = 0; step < 50; ++step) {
    Sampler s1, s2;
    std::vector<float> batch1(logits_a);  // [a]
    std::vector<float> batch2(logits_b);  // [b, b, a]
    batch2.insert(batch2.end(), logits_b.begin(), logits_b.end());
    batch2.insert(batch2.end(), logits_a.begin(), logits_a.end());
    std::vector<SampledToken> r1, r2;
    s1.sample(batch1.data(), vocab_size, {make_input(a, 99, step)}, &r1);
    s2.sample(batch2.data(), vocab_size,
              {make_input(other, 5, step), make_input(other, 6, 3), make_input(a, 99, step)}, &r2);
    ASSERT_EQ(r1[0].token_id, r2[2].token_id) << "step " << step;
  }
}

TEST(Sampler, UniformNumbersAreUniformAndDistinctPerStep) {
  const int n = 100000;
  std::vector<double> u(n);
  for (int i = 0; i < n; ++i) u[i] = sampling_uniform(/*seed=*/i % 10, /*step=*/i / 10);
  for (double x : u) ASSERT_TRUE(x >= 0.0 && x < 1.0);
  std::sort(u.begin(), u.end());
  double max_gap = 0;  // Kolmogorov-Smirnov statistic; 2/sqrt(n) is far above its 99.9% quantile
  for (int i = 0; i < n; ++i) max_gap = std::max({max_gap, std::abs(u[i] - double(i) / n), std::abs(u[i] - double(i + 1) / n)});
  EXPECT_LT(max_gap, 2.0 / std::sqrt(n));
  EXPECT_NE(sampling_uniform(1, 0), sampling_uniform(1, 1));
  EXPECT_NE(sampling_uniform(1, 0), sampling_uniform(2, 0));
}

TEST(Sampler, LogprobsComeFromRawLogits) {
  const int32_t vocab_size = 30;
  auto logits = random_logits(vocab_size, 5);
  double m = *std::max_element(logits.begin(), logits.end()), sum = 0;
  for (float l : logits) sum += std::exp(l - m);
  auto ref_logprob = [&](int32_t t) { return logits[t] - m - std::log(sum); };
  SamplingConfig c = config_of(0.5f, 3, 1.0f, 0.0f);
  c.repetition_penalty = 1.7f;  // changes the draw, not the reported logprobs
  c.num_logprobs = 4;
  std::vector<int32_t> prompt = {0, 1, 2};
  Sampler sampler;
  SamplingInput in = make_input(c, 3, 4);
  in.prompt_token_ids = &prompt;
  SampledToken tok = sampler.sample_one(logits.data(), vocab_size, in);
  EXPECT_NEAR(tok.logprob, ref_logprob(tok.token_id), 1e-5);
  std::vector<int32_t> order(vocab_size);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  ASSERT_EQ(tok.top_logprobs.size(), 4u);
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(tok.top_logprobs[r].token_id, order[r]);
    EXPECT_NEAR(tok.top_logprobs[r].logprob, ref_logprob(order[r]), 1e-5);
  }
  c.num_logprobs = 0;
  tok = sampler.sample_one(logits.data(), vocab_size, in);
  EXPECT_TRUE(tok.top_logprobs.empty());
  EXPECT_NEAR(tok.logprob, ref_logprob(tok.token_id), 1e-5);
}

TEST(Sampler, MaskedTokensAreNeverDrawn) {
  const int32_t vocab_size = 6;
  std::vector<float> logits = {5.0f, 4.9f, 0.0f, -1.0f, 4.8f, 1.0f};
  std::vector<int32_t> masked = {0, 1, 4};
  SamplingConfig greedy = config_of(0.0f, 0, 1.0f, 0.0f), hot = config_of(2.0f, 0, 1.0f, 0.0f);
  Sampler sampler;
  SamplingInput in = make_input(greedy, 0, 0);
  in.masked_token_ids = &masked;
  EXPECT_EQ(sampler.sample_one(logits.data(), vocab_size, in).token_id, 5);
  in.config = &hot;
  for (int64_t step = 0; step < 2000; ++step) {
    in.step = step;
    int32_t t = sampler.sample_one(logits.data(), vocab_size, in).token_id;
    ASSERT_TRUE(t == 2 || t == 3 || t == 5) << t;
  }
  std::vector<int32_t> all = {0, 1, 2, 3, 4, 5};
  in.masked_token_ids = &all;
  EXPECT_THROW(sampler.sample_one(logits.data(), vocab_size, in), Error);
}

// Stage 2's bias: the sampled distribution follows the float64 reference of the biased logits.
TEST(Sampler, LogitBiasShiftsTheDistributionLikeTheReference) {
  Sampler sampler;
  SamplingConfig hot = config_of(1.0f, 0, 0.9f, 0.0f);
  hot.logit_bias = {{2, 3.0f}, {5, -2.0f}, {11, 1.0f}};
  auto logits = random_logits(16, 5);
  std::vector<double> biased(logits.begin(), logits.end());
  for (const auto& [t, bias] : hot.logit_bias) biased[t] += bias;
  auto target = reference_distribution(biased, hot);
  const int num_draws = 20000;
  std::vector<int> counts(16, 0);
  for (int i = 0; i < num_draws; ++i) counts[sampler.sample_one(logits.data(), 16, make_input(hot, i / 100, i % 100)).token_id]++;
  for (int32_t t = 0; t < 16; ++t) {
    const double sigma = std::sqrt(target[t] * (1 - target[t]) / num_draws);
    EXPECT_LE(std::abs(static_cast<double>(counts[t]) / num_draws - target[t]), 5 * sigma + 1e-12) << "token " << t;
  }
}

// +100 forces a token and -100 bans one, greedy and sampled; logprobs stay those of the raw logits.
TEST(Sampler, LogitBiasOfHundredForcesOrBans) {
  const int32_t vocab_size = 64;
  auto logits = random_logits(vocab_size, 9);
  const int32_t favourite = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  const int32_t unlikely = static_cast<int32_t>(std::min_element(logits.begin(), logits.end()) - logits.begin());
  Sampler sampler;
  for (float temperature : {0.0f, 0.8f}) {
    SamplingConfig force = config_of(temperature, 0, 0.95f, 0.0f), ban = force;
    force.logit_bias[unlikely] = 100.0f;
    force.num_logprobs = 0;
    ban.logit_bias[favourite] = -100.0f;
    for (int64_t step = 0; step < 200; ++step) {
      SampledToken forced = sampler.sample_one(logits.data(), vocab_size, make_input(force, 3, step));
      ASSERT_EQ(forced.token_id, unlikely) << "temperature " << temperature << " step " << step;
      double log_sum = 0.0;
      for (float l : logits) log_sum += std::exp(static_cast<double>(l));
      EXPECT_NEAR(forced.logprob, logits[unlikely] - std::log(log_sum), 1e-4);
      ASSERT_NE(sampler.sample_one(logits.data(), vocab_size, make_input(ban, 3, step)).token_id, favourite);
    }
  }
}

// A LogitsProcessor's bitmask, as the executor passes it: only allowed tokens are drawn, it wins
// over a +100 bias, and no allowed token left fails the draw (token -1 from sample()).
TEST(Sampler, AllowedTokenBitmaskForcesTheDrawToAllowedTokens) {
  // A processor that allows the tokens whose id is a multiple of 7 after an even number of outputs.
  struct MultiplesOfSeven : LogitsProcessor {
    void fill_next_token_bitmask(const std::vector<int32_t>&, const std::vector<int32_t>& output, int32_t vocab_size,
                                 uint32_t* bitmask) override {
      if (output.size() % 2) return;
      for (int32_t i = 0; i < vocab_size; ++i)
        if (i % 7) bitmask[i / 32] &= ~(1u << (i % 32));
    }
  };
  const int32_t vocab_size = 100;  // not a multiple of 32: the last word is partial
  std::vector<uint32_t> bitmask(num_bitmask_words(vocab_size));
  MultiplesOfSeven processor;
  const std::vector<int32_t> prompt = {1, 2};
  Sampler sampler;
  SamplingConfig hot = config_of(1.5f, 0, 1.0f, 0.0f), greedy = config_of(0.0f, 0, 1.0f, 0.0f);
  hot.logit_bias = {{3, 100.0f}};  // masked by the bitmask: the mask wins
  std::map<int32_t, int> drawn;
  for (int64_t step = 0; step < 400; ++step) {
    std::vector<int32_t> output(step % 2 ? 1 : 0, 5);
    std::fill(bitmask.begin(), bitmask.end(), ~0u);
    processor.fill_next_token_bitmask(prompt, output, vocab_size, bitmask.data());
    auto logits = random_logits(vocab_size, 100 + step);
    SamplingInput in = make_input(step % 3 == 0 ? greedy : hot, 8, step);
    in.allowed_token_bitmask = bitmask.data();
    const int32_t t = sampler.sample_one(logits.data(), vocab_size, in).token_id;
    if (step % 2 == 0) {
      ASSERT_EQ(t % 7, 0) << "step " << step;
      drawn[t]++;
      if (step % 3 == 0) {  // greedy: the argmax over the allowed tokens
        int32_t best = 0;
        for (int32_t i = 7; i < vocab_size; i += 7) best = logits[i] > logits[best] ? i : best;
        EXPECT_EQ(t, best);
      }
    } else if (step % 3) {
      EXPECT_EQ(t, 3) << "all tokens allowed: the +100 bias wins";
    }
  }
  EXPECT_GT(drawn.size(), 5u);  // sampling, not a constant
  std::fill(bitmask.begin(), bitmask.end(), 0u);
  SamplingInput none = make_input(hot, 1, 0);
  none.allowed_token_bitmask = bitmask.data();
  auto logits = random_logits(vocab_size, 1);
  EXPECT_THROW(sampler.sample_one(logits.data(), vocab_size, none), Error);
  std::vector<SampledToken> out;
  sampler.sample(logits.data(), vocab_size, {none}, &out);
  EXPECT_EQ(out.at(0).token_id, -1);
}

TEST(Sampler, ValidateNamesTheBadValue) {
  auto expect_invalid = [](SamplingConfig c, const char* what) {
    try {
      c.validate();
      ADD_FAILURE() << "no error for " << what;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  SamplingConfig c;
  c.validate();
  c.temperature = -0.5f, expect_invalid(c, "-0.5"), c = {};
  c.temperature = NAN, expect_invalid(c, "temperature"), c = {};
  c.top_k = -1, expect_invalid(c, "top_k"), c = {};
  c.top_p = 0.0f, expect_invalid(c, "top_p"), c = {};
  c.top_p = 1.5f, expect_invalid(c, "1.5"), c = {};
  c.min_p = -0.1f, expect_invalid(c, "min_p"), c = {};
  c.repetition_penalty = 0.0f, expect_invalid(c, "repetition_penalty"), c = {};
  c.presence_penalty = 2.5f, expect_invalid(c, "presence_penalty"), c = {};
  c.frequency_penalty = -3.0f, expect_invalid(c, "frequency_penalty"), c = {};
  c.num_logprobs = -2, expect_invalid(c, "num_logprobs"), c = {};
  c.logit_bias = {{7, INFINITY}}, expect_invalid(c, "logit_bias[7]"), c = {};
  c.logit_bias = {{3, NAN}}, expect_invalid(c, "logit_bias[3]"), c = {};
}

TEST(Sampler, ValidateErrorCarriesTheField) {
  auto field_of = [](const SamplingConfig& c) -> std::string {
    try {
      c.validate();
    } catch (const InvalidArgument& e) {
      return e.field();
    }
    return "(valid)";
  };
  SamplingConfig valid, top_p, top_k, logit_bias;
  top_p.top_p = 2.0f;
  top_k.top_k = -4;
  logit_bias.logit_bias = {{-1, 1.0f}};
  EXPECT_EQ(field_of(valid), "(valid)");
  EXPECT_EQ(field_of(top_p), "top_p");
  EXPECT_EQ(field_of(top_k), "top_k");
  EXPECT_EQ(field_of(logit_bias), "logit_bias");
}

}  // namespace
}  // namespace rtllm
