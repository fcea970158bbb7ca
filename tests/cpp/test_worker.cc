// The worker seam: an Executor over a recording Worker that wraps a LocalWorker. Each step the
// executor hands over must feed every request its tokens at the right positions (block copies
// included), and each sampled token must come back to the request it was drawn for. A step that
// throws fails its requests and the executor goes on; shutdown shuts the worker down. Needs the
// tiny engine of test_cpp_suite.py (RTLLM_TEST_ENGINE_DIR).
#include <gtest/gtest.h>

#include <algorithm>
#include <future>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "executor_test_util.h"
#include "rtllm/executor.h"
#include "rtllm/worker.h"

namespace rtllm {
namespace {

struct RecordedStep {
  BlockCopies block_copies;
  StepInputs inputs;
  std::vector<bool> draws;      // [num_seqs] whether the sampling input has a config
  std::vector<int32_t> tokens;  // [num_seqs] what the inner worker sampled
};

// Wraps a worker: records every step and its tokens, can hold its first step until the test lets it
// go, and throws instead of running a step that feeds `poison_token`.
class RecordingWorker final : public Worker {
 public:
  explicit RecordingWorker(std::unique_ptr<Worker> inner) : inner_(std::move(inner)) {}

  void execute_step(const WorkerStep& step, std::vector<SampledToken>* out) override {
    if (hold_first_step && steps.empty()) {
      first_step_entered.set_value();
      release_first_step.get_future().wait();
    }
    for (int32_t id : step.inputs.input_ids)
      if (id == poison_token) throw std::runtime_error("rank 1 stopped answering");
    inner_->execute_step(step, out);
    RecordedStep recorded{step.block_copies, step.inputs, {}, {}};
    for (size_t s = 0; s < step.sampling.size(); ++s) {
      recorded.draws.push_back(step.sampling[s].config != nullptr);
      recorded.tokens.push_back((*out)[s].token_id);
    }
    steps.push_back(std::move(recorded));
  }
  void shutdown() noexcept override {
    ++num_shutdowns;
    inner_->shutdown();
  }
  std::shared_ptr<const Engine> engine() const override { return inner_->engine(); }
  const RuntimeConfig& config() const override { return inner_->config(); }
  int32_t vocab_size() const override { return inner_->vocab_size(); }

  // Read by the test once the executor is shut down (its loop thread has ended).
  std::vector<RecordedStep> steps;
  int32_t num_shutdowns = 0;
  bool hold_first_step = false;
  std::promise<void> first_step_entered, release_first_step;
  int32_t poison_token = -1;

 private:
  std::unique_ptr<Worker> inner_;
};

Request make_request(std::vector<int32_t> prompt, int32_t max_tokens, float temperature) {
  Request r;
  r.prompt_token_ids = std::move(prompt);
  r.sampling.temperature = temperature;
  r.sampling.seed = 5;
  r.stop.max_tokens = max_tokens;
  r.stop.ignore_eos = true;
  return r;
}

std::vector<int32_t> iota_tokens(int32_t first, int32_t count) {
  std::vector<int32_t> out;
  for (int32_t i = 0; i < count; ++i) out.push_back(first + i);
  return out;
}

// A sequence as the recorded steps build it up.
struct Replayed {
  size_t request;               // index into the test's requests
  std::vector<int32_t> tokens;  // prompt, then every token sampled for it
  int32_t num_computed = 0;     // tokens the steps have fed
};

// Replays the steps: sequences are told apart by their first block, which no two live sequences
// share here. Checks each row's positions and tokens against its request and returns the tokens
// sampled for each request, in the requests' order.
std::vector<std::vector<int32_t>> replay(const std::vector<RecordedStep>& steps, const std::vector<Request>& requests) {
  std::vector<std::vector<int32_t>> outputs(requests.size());
  std::vector<bool> started(requests.size(), false);
  std::map<int32_t, Replayed> live;  // by first block id
  for (size_t i = 0; i < steps.size(); ++i) {
    const StepInputs& in = steps[i].inputs;
    int32_t offset = 0;
    for (int32_t s = 0; s < in.num_seqs(); ++s) {
      const int32_t num_new = in.num_new_tokens[s], num_cached = in.num_cached_tokens[s];
      const auto fed = in.input_ids.begin() + offset;
      offset += num_new;
      const int32_t first_block = in.block_table[s * in.max_blocks_per_seq];
      if (!live.count(first_block)) {  // a new sequence: its whole prompt past its cached prefix
        size_t r = 0;
        while (r < requests.size() && (started[r] || requests[r].prompt_token_ids.size() != size_t(num_cached + num_new) ||
                                       !std::equal(fed, fed + num_new, requests[r].prompt_token_ids.begin() + num_cached)))
          ++r;
        if (r == requests.size()) {
          ADD_FAILURE() << "step " << i << " row " << s << " starts no request";
          return outputs;
        }
        started[r] = true;
        live[first_block] = Replayed{r, requests[r].prompt_token_ids, num_cached};
      }
      Replayed& seq = live[first_block];
      EXPECT_EQ(num_cached, seq.num_computed) << "step " << i << " row " << s;
      EXPECT_TRUE(std::equal(fed, fed + num_new, seq.tokens.begin() + seq.num_computed)) << "step " << i << " row " << s;
      seq.num_computed += num_new;
      EXPECT_TRUE(steps[i].draws[s]) << "without chunked prefill every row draws";
      EXPECT_GE(steps[i].tokens[s], 0);
      seq.tokens.push_back(steps[i].tokens[s]);
      const Request& request = requests[seq.request];
      if (seq.tokens.size() == request.prompt_token_ids.size() + request.stop.max_tokens) {
        outputs[seq.request].assign(seq.tokens.begin() + request.prompt_token_ids.size(), seq.tokens.end());
        live.erase(first_block);
      }
    }
    EXPECT_EQ(offset, in.num_tokens());
  }
  EXPECT_TRUE(live.empty()) << live.size() << " sequences never finished";
  return outputs;
}

class WorkerSeam : public ::testing::Test {
 protected:
  void SetUp() override {
    engine = test_engine();
    if (!engine) GTEST_SKIP() << "RTLLM_TEST_ENGINE_DIR is not set (test_cpp_suite.py sets it)";
    auto worker = std::make_unique<RecordingWorker>(Executor::make_worker(engine, config));
    recorder = worker.get();
    executor = std::make_unique<Executor>(std::move(worker), config);
  }

  std::shared_ptr<const Engine> engine;
  ExecutorConfig config;
  RecordingWorker* recorder = nullptr;  // owned by executor
  std::unique_ptr<Executor> executor;
};

TEST_F(WorkerSeam, StepsFeedEachRequestAndTokensComeBackToIt) {
  // The first step runs requests[0] alone; the second adds requests[1], whose first 20 tokens start
  // the block requests[0] stored (partial reuse: a block copy in that step), and requests[2].
  recorder->hold_first_step = true;
  std::future<void> entered = recorder->first_step_entered.get_future();
  std::vector<int32_t> shared_start = iota_tokens(100, 40);
  std::vector<int32_t> partial(shared_start.begin(), shared_start.begin() + 20);
  for (int32_t t : iota_tokens(200, 6)) partial.push_back(t);
  std::vector<Request> requests = {make_request(shared_start, 6, 0.0f), make_request(partial, 8, 0.8f),
                                   make_request(iota_tokens(10, 9), 10, 0.0f)};
  std::vector<RequestId> ids = {executor->enqueue(requests[0])};
  entered.wait();
  ids.push_back(executor->enqueue(requests[1]));
  ids.push_back(executor->enqueue(requests[2]));
  recorder->release_first_step.set_value();
  std::map<RequestId, Response> finals = await_finals(*executor, ids);
  executor->shutdown();

  const std::vector<RecordedStep>& steps = recorder->steps;
  ASSERT_GE(steps.size(), 2u);
  EXPECT_EQ(steps[0].inputs.num_seqs(), 1);
  // Step 2: the two new prompts first, then the first request's decode token.
  const StepInputs& second = steps[1].inputs;
  ASSERT_EQ(second.num_seqs(), 3);
  EXPECT_EQ(second.num_new_tokens, (std::vector<int32_t>{6, 9, 1}));
  EXPECT_EQ(second.num_cached_tokens, (std::vector<int32_t>{20, 0, 40}));
  // The copy fills requests[1]'s private first block from the block requests[0] stored.
  const BlockCopies expected_copy = {{steps[0].inputs.block_table[0], second.block_table[0]}};
  EXPECT_EQ(steps[1].block_copies, expected_copy);
  for (size_t i = 2; i < steps.size(); ++i) EXPECT_TRUE(steps[i].block_copies.empty()) << "step " << i;

  std::vector<std::vector<int32_t>> sampled = replay(steps, requests);
  for (size_t r = 0; r < requests.size(); ++r) {
    const Response& response = finals[ids[r]];
    EXPECT_EQ(response.finish_reason, FinishReason::kLength) << response.error;
    EXPECT_EQ(response.token_ids, sampled[r]) << "request " << r;
  }
}

TEST_F(WorkerSeam, AStepThatThrowsFailsItsRequestsAndTheExecutorGoesOn) {
  recorder->poison_token = 66;
  std::map<RequestId, Response> failed = run(*executor, {make_request({1, 2, 66, 4}, 5, 0.0f)});
  ASSERT_EQ(failed.size(), 1u);
  const Response& response = failed.begin()->second;
  EXPECT_EQ(response.finish_reason, FinishReason::kError);
  EXPECT_NE(response.error.find("rank 1 stopped answering"), std::string::npos) << response.error;
  EXPECT_TRUE(response.token_ids.empty());

  std::map<RequestId, Response> served = run(*executor, {make_request({1, 2, 3, 4}, 5, 0.0f)});
  ASSERT_EQ(served.size(), 1u);
  EXPECT_EQ(served.begin()->second.finish_reason, FinishReason::kLength) << served.begin()->second.error;
  EXPECT_EQ(served.begin()->second.token_ids.size(), 5u);
  EXPECT_EQ(executor->get_stats().kv_cache.num_used_blocks, 0) << "the failed request's blocks were freed";
  executor->shutdown();
  EXPECT_EQ(recorder->steps.size(), 5u) << "the failed step is not recorded; the served request took 5";
}

TEST_F(WorkerSeam, ShutdownShutsTheWorkerDownOnceTheLoopHasEnded) {
  const int64_t live = Executor::num_live_runners();
  ASSERT_GE(live, 1);
  // The request is in its first step when shutdown begins: that step ends, the request is
  // cancelled, and only then is the worker shut down.
  recorder->hold_first_step = true;
  std::future<void> entered = recorder->first_step_entered.get_future();
  RequestId id = executor->enqueue(make_request({1, 2, 3}, 100, 0.0f));
  entered.wait();
  std::future<void> shut = std::async(std::launch::async, [&] { executor->shutdown(); });
  while (!executor->is_shutdown()) std::this_thread::yield();
  EXPECT_EQ(recorder->num_shutdowns, 0) << "shut down during a step";
  recorder->release_first_step.set_value();
  shut.get();
  EXPECT_EQ(Executor::num_live_runners(), live - 1);
  EXPECT_EQ(recorder->num_shutdowns, 1);
  EXPECT_EQ(recorder->steps.size(), 1u);
  std::map<RequestId, Response> finals = await_finals(*executor, {id});
  EXPECT_EQ(finals[id].finish_reason, FinishReason::kCancelled);
  EXPECT_EQ(finals[id].token_ids.size(), 1u);
  EXPECT_EQ(executor->engine().limits().max_seq_len, engine->limits().max_seq_len);
  EXPECT_THROW(executor->enqueue(make_request({1, 2, 3}, 4, 0.0f)), Error);
}

TEST_F(WorkerSeam, ALocalWorkerRefusesStepsAfterShutdownAndKeepsItsConfig) {
  std::unique_ptr<Worker> worker = Executor::make_worker(engine, config);
  const int64_t live = LocalWorker::num_live_runners();
  const int32_t num_kv_blocks = worker->config().num_kv_blocks;
  EXPECT_GT(num_kv_blocks, 0);
  worker->shutdown();
  worker->shutdown();  // idempotent
  EXPECT_EQ(LocalWorker::num_live_runners(), live - 1);
  EXPECT_EQ(worker->config().num_kv_blocks, num_kv_blocks);
  EXPECT_EQ(worker->vocab_size(), executor->engine().model_config().vocab_size);
  StepInputs inputs;
  inputs.input_ids = {1};
  inputs.num_new_tokens = {1};
  inputs.num_cached_tokens = {0};
  inputs.block_table = {0};
  inputs.max_blocks_per_seq = 1;
  const BlockCopies no_copies;
  const std::vector<SamplingInput> sampling(1);
  std::vector<SampledToken> out;
  EXPECT_THROW(worker->execute_step(WorkerStep{no_copies, inputs, sampling}, &out), Error);
}

TEST_F(WorkerSeam, TheExecutorRefusesANullWorkerOrAnotherBlockSize) {
  auto expect_refused = [&](std::unique_ptr<Worker> worker, const ExecutorConfig& with, const std::string& message) {
    try {
      Executor refused{std::move(worker), with};
      ADD_FAILURE() << "accepted; expected: " << message;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(message), std::string::npos) << e.what();
    }
  };
  expect_refused(nullptr, config, "worker must not be null");
  ExecutorConfig other = config;
  other.kv_cache.tokens_per_block = 16;
  expect_refused(Executor::make_worker(engine, config), other,
                 "kv_cache tokens_per_block 16 differs from the worker's 32");
}

}  // namespace
}  // namespace rtllm
