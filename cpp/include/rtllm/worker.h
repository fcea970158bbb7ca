// Worker: the seam between the Executor and the model. One step in, sampled tokens out.
//
// The executor schedules, keeps the KV-cache bookkeeping and the requests, and prepares each step;
// a worker runs it on the model: the step's block copies (copy-on-write of partially reused prefix
// blocks), the forward pass, and the draw of each sequence's next token. The executor reads the
// resolved runtime config and the vocabulary from its worker once, at construction, and never
// touches a ModelRunner itself.
//
// LocalWorker runs the step on one ModelRunner on one device. A tensor-parallel group slots in as
// another Worker, in the way of nano-vllm's model_runner.py (rank 0 drives the others through
// call()) and TensorRT-LLM's executor/worker split:
//   - rank 0's worker is the one the executor holds. Its execute_step sends the step's block copies
//     and StepInputs (plain values: the "one message" of a step) to the follower ranks, then runs its
//     own shard of the same step;
//   - follower ranks run copy_blocks and forward only, in lock step; the collective nodes of the
//     sharded graph (all-reduce, all-gather) join the ranks' partial results into rank 0's logits;
//   - only rank 0 draws (the sampling inputs point into rank 0's host memory and never travel) and
//     returns the tokens; shutdown() stops the followers and frees every rank's memory.
// The executor does not change for it: it sees one worker, one step in, tokens out.
//
// Threading: a worker is not thread-safe. Its owner calls it from one thread at a time; in an
// Executor, execute_step runs on the loop thread, and shutdown() on the thread that calls
// Executor::shutdown() (or destroys the Executor), after the loop thread has ended.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "rtllm/common.h"
#include "rtllm/communicator.h"
#include "rtllm/engine.h"
#include "rtllm/kv_cache.h"
#include "rtllm/model_runner.h"
#include "rtllm/sampler.h"

namespace rtllm {

// One step as the executor hands it to its worker: a view of the executor's buffers, valid for the
// execute_step call only (no copy is made, so the step loop allocates nothing for it).
struct WorkerStep {
  // Whole KV blocks to copy, source -> destination, in every layer, before the forward reads them
  // (KVCacheManager::pending_copies). Every rank of a group runs them.
  const BlockCopies& block_copies;
  // The packed batch: every rank of a group runs the forward over it.
  const StepInputs& inputs;
  // One per row of logits (inputs.logits_indices; by default row s for sequence s): how it draws or
  // scores a token; an input without a config draws nothing. Only the rank that samples (rank 0)
  // reads them.
  const std::vector<SamplingInput>& sampling;
};

class RTLLM_API Worker {
 public:
  virtual ~Worker() = default;
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Runs the step: the block copies, the forward, and the draw. out (one per sampling input) gets
  // row r's token at out[r]; out[r].token_id is -1 for an input that draws nothing or whose draw
  // fails (every token masked or -inf), as in ModelRunner::forward_and_sample.
  // Throws when the step cannot run (inputs over the limits, a device error, a lost rank, or after
  // shutdown()): the executor then fails this step's requests with the message and goes on serving.
  virtual void execute_step(const WorkerStep& step, std::vector<SampledToken>* out) = 0;

  // Gives the device memory back now (weights, KV pool, workspace) and, in a group, stops the
  // followers. Idempotent; engine(), config() and vocab_size() stay readable; execute_step then
  // throws. Must not fail: the executor calls it from its shutdown and its destructor.
  virtual void shutdown() noexcept = 0;

  virtual std::shared_ptr<const Engine> engine() const = 0;
  // The runtime config with every 0 field resolved (limits, num_kv_blocks, tokens_per_block): the
  // executor sizes its KV-cache manager and scheduler from it.
  virtual const RuntimeConfig& config() const = 0;
  virtual int32_t vocab_size() const = 0;

 protected:
  Worker() = default;
};

// A worker on one device: one ModelRunner, which it owns from construction until shutdown().
class RTLLM_API LocalWorker final : public Worker {
 public:
  // Loads the runner: plans and allocates all its memory; throws as ModelRunner's constructor does.
  LocalWorker(std::shared_ptr<const Engine> engine, const RuntimeConfig& config);
  ~LocalWorker() override;

  void execute_step(const WorkerStep& step, std::vector<SampledToken>* out) override;
  void shutdown() noexcept override;
  std::shared_ptr<const Engine> engine() const override;
  const RuntimeConfig& config() const override;
  int32_t vocab_size() const override;

  // Runners held by LocalWorkers in this process: counted from construction to shutdown() or
  // destruction. Lets tests see that a shutdown gave a runner's memory back.
  static int64_t num_live_runners();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Rank 0 of a tensor-parallel group (config.communicator, of the engine's tp_size ranks; the engine is
// rank 0's shard): each step it broadcasts the block copies and StepInputs to the followers, then runs
// its own shard and draws (only rank 0 samples). A collective that fails or times out loses the group:
// that step and every later one throw, naming the first error. shutdown() stops the followers.
class RTLLM_API TensorParallelWorker final : public Worker {
 public:
  TensorParallelWorker(std::shared_ptr<const Engine> engine, const RuntimeConfig& config);
  ~TensorParallelWorker() override;

  void execute_step(const WorkerStep& step, std::vector<SampledToken>* out) override;
  void shutdown() noexcept override;
  std::shared_ptr<const Engine> engine() const override;
  const RuntimeConfig& config() const override;
  int32_t vocab_size() const override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A follower rank (config.communicator's rank > 0; engine: that rank's shard): takes rank 0's runtime
// config, loads the runner, then runs each step rank 0 broadcasts until rank 0 stops the
// group. Waits for the next step as long as rank 0's process lives; throws when rank 0 is gone or a
// collective fails.
// config: the communicator (the other fields come from rank 0, as its TensorParallelWorker starts).
RTLLM_API void run_tensor_parallel_follower(std::shared_ptr<const Engine> engine, const RuntimeConfig& config);

// Rank 0, when it cannot start its TensorParallelWorker after all: ends the followers' wait.
RTLLM_API void stop_tensor_parallel_followers(Communicator& group);

}  // namespace rtllm
