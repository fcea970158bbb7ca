// The Executor: a loop thread that runs steps (schedule -> prepare -> forward and sample ->
// postprocess) over the requests enqueued from any thread, and queues their responses. The forward
// and the draw belong to its Worker (rtllm/worker.h: one step in, sampled tokens out); the executor
// only prepares each request's SamplingInput, calling its LogitsProcessor if it has one.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "rtllm/common.h"
#include "rtllm/engine.h"
#include "rtllm/kv_cache.h"
#include "rtllm/model_runner.h"
#include "rtllm/sampler.h"
#include "rtllm/scheduler.h"
#include "rtllm/worker.h"

namespace rtllm {

struct RTLLM_API StopConfig {
  int32_t max_tokens = 16;              // >= 1
  int32_t min_tokens = 0;               // end and stop ids are ignored before this many tokens
  std::vector<int32_t> end_ids;         // end-of-sequence ids (empty: none)
  std::vector<int32_t> stop_token_ids;  // further ids that stop generation
  bool ignore_eos = false;              // ignore end_ids (stop_token_ids still stop)
  void validate() const;
};

struct Request {
  std::vector<int32_t> prompt_token_ids;
  SamplingConfig sampling;
  StopConfig stop;
  bool streaming = false;  // true: one response per step with the new tokens; false: one at the end
  // Requests share cached prefix blocks only with requests of the same salt (none: only unsalted).
  std::optional<std::string> cache_salt;
  // Called before each of this request's draws to narrow the tokens it may produce (structured
  // output); null: none. See LogitsProcessor in rtllm/sampler.h. Shared so a Request stays copyable;
  // the executor calls it from its loop thread only.
  std::shared_ptr<LogitsProcessor> logits_processor;
  // Fairness group: the scheduler admits waiting sequences of different groups in turn, so the many
  // sequences of one client request (its prompts x n samples, given one group id) cannot starve
  // other requests. Unset: a group of its own. Must be < 2^63.
  std::optional<uint64_t> group_id;
};

enum class FinishReason : int32_t { kNotFinished, kEndId, kStopTokenId, kLength, kCancelled, kError };

struct Response {
  RequestId request_id = 0;
  std::vector<int32_t> token_ids;  // streaming: the tokens new since the last response; else all
  std::vector<float> logprobs;     // per token in token_ids, if num_logprobs >= 0
  std::vector<std::vector<TokenLogprob>> top_logprobs;  // per token, if num_logprobs > 0
  // With num_prompt_logprobs >= 0: prompt tokens 1, 2, ... scored (token_id: the prompt token; its
  // logprob; the top ones), new since the last response. Complete before the first output token.
  std::vector<SampledToken> prompt_logprobs;
  bool is_final = false;
  FinishReason finish_reason = FinishReason::kNotFinished;
  int32_t stop_token_id = -1;  // the end/stop id that finished the request (kEndId/kStopTokenId)
  std::string error;           // set with kError: the request failed, others go on
};

struct KvCacheConfig {
  std::optional<int64_t> max_tokens;         // pool size in tokens; unset: by memory fraction
  float free_memory_fraction = 0.9f;         // of the memory free after weights and workspace
  int32_t tokens_per_block = 32;
  bool enable_block_reuse = true;     // share cached prefix blocks between requests
  // Also take the leading tokens of a cached block that continues the shared prefix, by copying it
  // into a private block (copy-on-write); needs enable_block_reuse.
  bool enable_partial_reuse = true;
  // Fewest shared tokens for which a partial block is copied (>= 1). The copy is one memory copy of
  // the block per layer (K and V); that is cheaper than the prefill of even one token through every
  // layer's weights, so 1 pays.
  int32_t min_partial_reuse_tokens = 1;
  int32_t event_buffer_max_size = 0;  // KV-cache events kept for get_kv_cache_events(); 0: none
};

struct ExecutorConfig {
  RuntimeConfig runtime;  // device, limits and threads (num_kv_blocks is derived from kv_cache)
  KvCacheConfig kv_cache;
  // Capacity policy, chunked prefill and step limits; max_batch_size / max_num_tokens 0: the
  // runtime's (else they lower it).
  SchedulerConfig scheduler{CapacityPolicy::kGuaranteedNoEvict, 0, 0, false};
  uint64_t seed = 0;      // seeds the RNG that draws seeds for requests without one
  int32_t iteration_stats_max_size = 1000;  // IterationStats kept for get_iteration_stats()
};

struct ExecutorStats {
  int64_t num_steps = 0;
  int64_t num_active_requests = 0;   // scheduled or waiting
  int64_t num_waiting_requests = 0;
  int64_t num_completed_requests = 0;
  int64_t num_generated_tokens = 0;
  int64_t num_context_tokens = 0;  // prompt (and recompute) tokens fed through the model
  int64_t num_preemptions = 0;
  KvCacheStats kv_cache;
};

// One step of the loop, as get_iteration_stats() reports it.
struct IterationStats {
  int64_t iteration = 0;              // step index from 0
  double timestamp_s = 0.0;           // end of the step, seconds since the executor started
  double step_time_ms = 0.0;          // schedule -> postprocess: the sum of the three below
  // Host work of the loop thread before the worker runs the step: scheduling, the packed inputs and the
  // sampling inputs (logits processors' bitmasks included).
  double schedule_time_ms = 0.0;
  // The worker's step: the runner's host work, the block copies, the forward and the draw on the device,
  // and the wait for the sampled tokens.
  double execute_time_ms = 0.0;
  // Host work after the tokens arrive: checks, prompt logprobs, appending tokens, stop conditions,
  // responses, the prefix cache's bookkeeping.
  double postprocess_time_ms = 0.0;
  int32_t num_context_requests = 0;   // sequences feeding prompt tokens (whole or a chunk)
  int32_t num_generation_requests = 0;
  int32_t num_context_tokens = 0;
  int32_t num_generation_tokens = 0;
  int32_t num_running_requests = 0;   // after the step
  int32_t num_waiting_requests = 0;   // after the step
  int32_t num_preempted_requests = 0;
  KvCacheStats kv_cache;              // after the step
};

class RTLLM_API Executor {
 public:
  // Runs on make_worker(engine, config).
  Executor(std::shared_ptr<const Engine> engine, const ExecutorConfig& config);
  // Runs on `worker` (e.g. a tensor-parallel group, or a test's), which it owns from now on: its
  // loop thread calls execute_step, shutdown() calls the worker's shutdown(). The worker's resolved
  // config() replaces config.runtime and the KV pool sizing of config.kv_cache; the rest of config
  // applies. Throws InvalidArgument for a null worker or when config.kv_cache.tokens_per_block
  // differs from the worker's.
  Executor(std::unique_ptr<Worker> worker, const ExecutorConfig& config);
  ~Executor();  // shuts down
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Validates the request against the engine limits and the vocabulary (prompt, end, stop and
  // logit_bias ids; throws InvalidArgument naming the value and the limit) and queues it. Thread-safe.
  RequestId enqueue(Request request);
  // Cancels a queued or running request: it ends with kCancelled and frees its blocks.
  // Throws InvalidArgument for an id that was never returned by enqueue; false if already finished.
  bool cancel(RequestId id);
  // Waits up to `timeout` for responses and returns all that are ready (possibly none).
  std::vector<Response> await_responses(std::chrono::milliseconds timeout);
  ExecutorStats get_stats() const;
  // Steps since the last call, oldest first (at most iteration_stats_max_size; older ones dropped).
  std::vector<IterationStats> get_iteration_stats();
  // KV-cache events since the last call (kv_cache.event_buffer_max_size bounds the buffer).
  std::vector<KvCacheEvent> get_kv_cache_events();
  // Stops the loop thread (pending requests end with kCancelled), then shuts the worker down: the
  // weights, KV pool and workspace are given back before shutdown returns, not when the Executor is
  // destroyed. Stats, iteration stats, events and engine() stay readable; enqueue then throws.
  // Idempotent.
  void shutdown();
  bool is_shutdown() const;

  const Engine& engine() const;

  // The worker Executor(engine, config) runs on: a LocalWorker on config.runtime.device with the KV
  // pool sized from config.kv_cache (max_tokens; else free_memory_fraction of the memory left after
  // weights and workspace: device memory on CUDA, available host memory on the CPU, there at most
  // room for max_batch_size sequences of max_seq_len), or with config.runtime.communicator of more
  // than one rank, the TensorParallelWorker of rank 0 (the pool: the least every rank can hold).
  // Throws InvalidArgument for a bad KV-cache config, Error when the pool cannot hold one sequence.
  static std::unique_ptr<Worker> make_worker(std::shared_ptr<const Engine> engine, const ExecutorConfig& config);

  // Model runners alive in this process (LocalWorker::num_live_runners): an executor's worker
  // holds one from construction until shutdown(). Lets tests see that shutdown gave its memory back.
  static int64_t num_live_runners();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace rtllm
