// A request's LogitsProcessor through the whole Executor on the CPU: the executor calls it before
// every draw with the tokens so far, the draw keeps to the allowed tokens, and a processor that
// throws or allows nothing fails its own request only. Needs an engine: test_cpp_suite.py builds a
// tiny one and names it in RTLLM_TEST_ENGINE_DIR.
#include <gtest/gtest.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "executor_test_util.h"
#include "rtllm/executor.h"

namespace rtllm {
namespace {

// Allows the tokens whose id is a multiple of `divisor`; records the outputs it was called with.
struct MultiplesOf : LogitsProcessor {
  explicit MultiplesOf(int32_t divisor) : divisor(divisor) {}
  void fill_next_token_bitmask(const std::vector<int32_t>& prompt, const std::vector<int32_t>& output,
                               int32_t vocab_size, uint32_t* bitmask) override {
    EXPECT_FALSE(prompt.empty());
    num_outputs_seen.push_back(static_cast<int32_t>(output.size()));
    for (int32_t i = 0; i < vocab_size; ++i)
      if (i % divisor) bitmask[i / 32] &= ~(1u << (i % 32));
  }
  int32_t divisor;
  std::vector<int32_t> num_outputs_seen;
};

struct Throws : LogitsProcessor {
  void fill_next_token_bitmask(const std::vector<int32_t>&, const std::vector<int32_t>&, int32_t,
                               uint32_t*) override {
    throw std::runtime_error("grammar rejected the prefix");
  }
};

struct AllowsNothing : LogitsProcessor {
  void fill_next_token_bitmask(const std::vector<int32_t>&, const std::vector<int32_t>&, int32_t vocab_size,
                               uint32_t* bitmask) override {
    std::fill(bitmask, bitmask + num_bitmask_words(vocab_size), 0u);
  }
};

Request request_with(std::shared_ptr<LogitsProcessor> processor, float temperature, int32_t max_tokens) {
  Request r;
  r.prompt_token_ids = {1, 17, 42, 9, 5, 77, 3};
  r.sampling.temperature = temperature;
  r.sampling.seed = 11;
  r.stop.max_tokens = max_tokens;
  r.stop.ignore_eos = true;
  r.logits_processor = std::move(processor);
  return r;
}

TEST(ExecutorLogitsProcessor, DrawsOnlyAllowedTokensAndFailsOnlyItsOwnRequest) {
  auto engine = test_engine();
  if (!engine) GTEST_SKIP() << "RTLLM_TEST_ENGINE_DIR is not set (test_cpp_suite.py sets it)";
  Executor executor(engine, ExecutorConfig{});
  auto greedy = std::make_shared<MultiplesOf>(7), sampled = std::make_shared<MultiplesOf>(5);
  auto finals = run(executor, {request_with(greedy, 0.0f, 6), request_with(sampled, 1.0f, 6),
                               request_with(std::make_shared<Throws>(), 1.0f, 6),
                               request_with(std::make_shared<AllowsNothing>(), 0.0f, 6), request_with(nullptr, 0.0f, 6)});
  ASSERT_EQ(finals.size(), 5u);
  auto it = finals.begin();
  const Response &by_sevens = (it++)->second, &by_fives = (it++)->second, &thrown = (it++)->second,
                 &nothing = (it++)->second, &unconstrained = (it++)->second;
  for (const auto* r : {&by_sevens, &by_fives, &unconstrained}) {
    EXPECT_EQ(r->finish_reason, FinishReason::kLength) << r->error;
    EXPECT_EQ(r->token_ids.size(), 6u);
  }
  for (int32_t t : by_sevens.token_ids) EXPECT_EQ(t % 7, 0) << t;
  for (int32_t t : by_fives.token_ids) EXPECT_EQ(t % 5, 0) << t;
  // Called once per draw, with the outputs so far.
  EXPECT_EQ(greedy->num_outputs_seen, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(sampled->num_outputs_seen, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  // The unconstrained greedy request is not all multiples of 7 (else the test could not tell).
  bool leaves_sevens = false;
  for (int32_t t : unconstrained.token_ids) leaves_sevens |= t % 7 != 0;
  EXPECT_TRUE(leaves_sevens);
  EXPECT_EQ(thrown.finish_reason, FinishReason::kError);
  EXPECT_NE(thrown.error.find("grammar rejected the prefix"), std::string::npos) << thrown.error;
  EXPECT_EQ(nothing.finish_reason, FinishReason::kError);
  EXPECT_NE(nothing.error.find("masked"), std::string::npos) << nothing.error;
  EXPECT_TRUE(thrown.token_ids.empty() && nothing.token_ids.empty());
}

}  // namespace
}  // namespace rtllm
