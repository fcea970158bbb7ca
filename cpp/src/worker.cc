// LocalWorker: the Worker over one ModelRunner on one device (see rtllm/worker.h).
#include "rtllm/worker.h"

#include <atomic>
#include <utility>

namespace rtllm {

namespace {

// Runners held by LocalWorkers: counted from construction to shutdown() or destruction.
std::atomic<int64_t> live_runner_count{0};

}  // namespace

struct LocalWorker::Impl {
  std::shared_ptr<const Engine> engine;
  std::unique_ptr<ModelRunner> runner;  // null after shutdown()
  const RuntimeConfig config;           // the runner's, kept readable after shutdown()
  const int32_t vocab_size;
};

LocalWorker::LocalWorker(std::shared_ptr<const Engine> engine, const RuntimeConfig& config) {
  RTLLM_CHECK_ARG(engine != nullptr, "engine must not be null");
  auto runner = std::make_unique<ModelRunner>(engine, config);
  const RuntimeConfig resolved = runner->config();
  const int32_t vocab_size = runner->vocab_size();
  impl_.reset(new Impl{std::move(engine), std::move(runner), resolved, vocab_size});
  live_runner_count.fetch_add(1);
}

LocalWorker::~LocalWorker() { shutdown(); }

void LocalWorker::execute_step(const WorkerStep& step, std::vector<SampledToken>* out) {
  RTLLM_CHECK(impl_->runner != nullptr, "the worker is shut down; it cannot run a step");
  if (!step.block_copies.empty()) impl_->runner->copy_blocks(step.block_copies);
  impl_->runner->forward_and_sample(step.inputs, step.sampling, out);
}

void LocalWorker::shutdown() noexcept {
  if (!impl_->runner) return;
  impl_->runner.reset();
  live_runner_count.fetch_sub(1);
}

std::shared_ptr<const Engine> LocalWorker::engine() const { return impl_->engine; }
const RuntimeConfig& LocalWorker::config() const { return impl_->config; }
int32_t LocalWorker::vocab_size() const { return impl_->vocab_size; }
int64_t LocalWorker::num_live_runners() { return live_runner_count.load(); }

}  // namespace rtllm
