// Executor: requests come in from any thread (enqueue, cancel) and responses go out through a
// queue (await_responses); one loop thread owns the scheduler and the KV-cache manager, hands each
// step to the worker (which runs the model and draws the tokens), and runs steps while there is work.
#include "rtllm/executor.h"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "request.h"

namespace rtllm {

namespace {

// The runtime config with the KV pool sized from the KV-cache config: max_tokens if set; else
// free_memory_fraction of the memory left after weights and workspace (the runner sizes it at load:
// device memory on CUDA; available host memory on the CPU, at most max_batch_size sequences of
// max_seq_len).
RuntimeConfig resolve_runtime_config(const Engine* engine, const ExecutorConfig& config) {
  RTLLM_CHECK_ARG(engine != nullptr, "engine must not be null");
  const KvCacheConfig& kv = config.kv_cache;
  const EngineLimits& limits = engine->limits();
  RTLLM_CHECK_ARG(kv.tokens_per_block >= 1, "tokens_per_block must be >= 1, got ", kv.tokens_per_block);
  RTLLM_CHECK_ARG(kv.free_memory_fraction > 0.0f && kv.free_memory_fraction <= 1.0f,
                  "free_memory_fraction must be in (0, 1], got ", kv.free_memory_fraction);
  RuntimeConfig runtime = config.runtime;
  runtime.tokens_per_block = kv.tokens_per_block;
  auto num_blocks_for = [&](int64_t num_tokens) { return (num_tokens + kv.tokens_per_block - 1) / kv.tokens_per_block; };
  int64_t num_blocks = 0;
  if (kv.max_tokens) {
    RTLLM_CHECK_ARG(*kv.max_tokens >= 1, "kv_cache max_tokens must be >= 1, got ", *kv.max_tokens);
    num_blocks = num_blocks_for(*kv.max_tokens);
  } else {
    // The runner sizes the pool from the memory left free after its weights and workspace (device
    // memory on CUDA, available host memory on the CPU, there capped by max_batch_size sequences of
    // max_seq_len) and fails naming the numbers when that cannot hold one sequence of max_seq_len.
    runtime.num_kv_blocks = 0;
    runtime.kv_free_memory_fraction = kv.free_memory_fraction;
    return runtime;
  }
  int64_t num_blocks_per_seq = num_blocks_for(limits.max_seq_len);
  if (num_blocks < num_blocks_per_seq)
    throw Error(detail::concat("the KV cache of ", num_blocks, " blocks (", num_blocks * kv.tokens_per_block,
                               " tokens) cannot hold one sequence of max_seq_len ", limits.max_seq_len,
                               " tokens, which needs ", num_blocks_per_seq, " blocks"));
  RTLLM_CHECK_ARG(num_blocks <= INT32_MAX, "the KV cache of ", num_blocks, " blocks exceeds ", INT32_MAX);
  runtime.num_kv_blocks = static_cast<int32_t>(num_blocks);
  return runtime;
}

// The scheduler config with its 0 limits set to the runtime's; it may lower them, never raise them
// (the runner's workspace is planned for the runtime's).
SchedulerConfig resolve_scheduler_config(const ExecutorConfig& config, const RuntimeConfig& runtime) {
  SchedulerConfig out = config.scheduler;
  RTLLM_CHECK_ARG(out.max_batch_size >= 0 && out.max_batch_size <= runtime.max_batch_size,
                  "scheduler max_batch_size ", out.max_batch_size, " must be in [0, ", runtime.max_batch_size,
                  "] (0: the runtime's max_batch_size)");
  RTLLM_CHECK_ARG(out.max_num_tokens >= 0 && out.max_num_tokens <= runtime.max_num_tokens,
                  "scheduler max_num_tokens ", out.max_num_tokens, " must be in [0, ", runtime.max_num_tokens,
                  "] (0: the runtime's max_num_tokens)");
  RTLLM_CHECK_ARG(config.iteration_stats_max_size >= 0, "iteration_stats_max_size must be >= 0, got ",
                  config.iteration_stats_max_size);
  if (out.max_batch_size == 0) out.max_batch_size = runtime.max_batch_size;
  if (out.max_num_tokens == 0) out.max_num_tokens = runtime.max_num_tokens;
  RTLLM_CHECK_ARG(out.max_num_logits >= 0 && out.max_num_logits <= runtime.max_num_logits,
                  "scheduler max_num_logits ", out.max_num_logits, " must be in [0, ", runtime.max_num_logits,
                  "] (0: the runtime's max_num_logits)");
  if (out.max_num_logits == 0) out.max_num_logits = runtime.max_num_logits;
  out.validate(runtime.tokens_per_block);
  return out;
}

using Clock = std::chrono::steady_clock;

// The worker an executor may run on: not null, with an engine and the KV block size its config asks for.
std::unique_ptr<Worker> checked_worker(std::unique_ptr<Worker> worker, const ExecutorConfig& config) {
  RTLLM_CHECK_ARG(worker != nullptr, "worker must not be null");
  RTLLM_CHECK_ARG(worker->engine() != nullptr, "the worker's engine must not be null");
  RTLLM_CHECK_ARG(config.kv_cache.tokens_per_block == worker->config().tokens_per_block,
                  "kv_cache tokens_per_block ", config.kv_cache.tokens_per_block, " differs from the worker's ",
                  worker->config().tokens_per_block);
  return worker;
}

}  // namespace

struct Executor::Impl {
  Impl(std::unique_ptr<Worker> checked, const ExecutorConfig& config)
      : engine(checked->engine()),
        worker(std::move(checked)),
        vocab_size(worker->vocab_size()),
        kv_cache(worker->config().num_kv_blocks, worker->config().tokens_per_block, config.kv_cache.enable_block_reuse,
                 config.kv_cache.event_buffer_max_size, config.kv_cache.enable_partial_reuse,
                 config.kv_cache.min_partial_reuse_tokens),
        scheduler(resolve_scheduler_config(config, worker->config()), kv_cache),
        seed_rng(config.seed),
        iteration_stats_max_size(config.iteration_stats_max_size),
        event_buffer_max_size(config.kv_cache.event_buffer_max_size),
        start_time(Clock::now()) {
    stats.kv_cache = kv_cache.stats();
    kv_events = kv_cache.take_events();  // the pool's kCreated event
    loop_thread = std::thread([this] { loop(); });
  }

  using Batch = std::vector<std::shared_ptr<LlmRequest>>;

  // ---- immutable: read by any thread ----
  const std::shared_ptr<const Engine> engine;
  // ---- owned by the loop thread; shutdown() shuts the worker down (weights, KV pool, workspace)
  // once the loop has ended, so that its memory is back before the Executor object goes ----
  const std::unique_ptr<Worker> worker;
  const int32_t vocab_size;  // the worker's
  KVCacheManager kv_cache;
  Scheduler scheduler;
  std::unordered_map<RequestId, std::shared_ptr<LlmRequest>> requests;  // those in the scheduler
  StepInputs inputs;
  // This step's draws, row s for the batch's request s (reused across steps).
  std::vector<std::vector<int32_t>> masked;  // masked ids
  std::vector<uint32_t> allowed_bitmasks;    // [num_seqs, num_bitmask_words(vocab)] from LogitsProcessors
  std::vector<std::string> sampling_errors;  // a LogitsProcessor's exception: the request fails
  std::vector<SamplingInput> sampling_inputs;  // a row per sequence, then the scoring rows
  // This step's prompt-scoring rows: batch index, position scored (its next prompt token), packed
  // token index; rows batch.size() + i of the logits.
  struct ScoringRow {
    size_t seq;
    int32_t position;
    int32_t token_index;
  };
  std::vector<ScoringRow> scoring_rows;
  std::vector<SampledToken> tokens;
  std::vector<Response> outbox;          // responses of this round, published by flush()
  std::vector<RequestId> finished_ids;   // requests finished this round
  std::vector<IterationStats> new_iteration_stats;  // steps of this round, published by flush()
  int64_t num_steps = 0, num_generated_tokens = 0, num_completed = 0, num_context_tokens = 0;

  // ---- shared, guarded by mutex ----
  mutable std::mutex mutex;
  std::condition_variable work_cv;      // the loop waits here for requests, cancels or stop
  std::condition_variable response_cv;  // await_responses waits here
  Batch incoming;
  std::vector<RequestId> cancelled;
  std::unordered_set<RequestId> unfinished_ids;
  std::deque<Response> responses;
  RequestId next_id = 1;
  std::mt19937_64 seed_rng;
  bool stopping = false;
  bool loop_done = false;  // the loop has published its last response
  ExecutorStats stats;
  const int32_t iteration_stats_max_size;
  const int32_t event_buffer_max_size;
  std::deque<IterationStats> iteration_stats;
  std::vector<KvCacheEvent> kv_events;  // bounded by the KV manager's event_buffer_max_size
  const Clock::time_point start_time;
  std::mutex join_mutex;  // shutdown may be called from several threads at once
  std::thread loop_thread;

  // callers' side
  void validate(const Request& request) const;
  RequestId enqueue(Request request);
  bool cancel(RequestId id);
  std::vector<Response> await_responses(std::chrono::milliseconds timeout);
  ExecutorStats get_stats() const;
  std::vector<IterationStats> take_iteration_stats();
  std::vector<KvCacheEvent> take_kv_events();
  void shutdown();

  // loop thread
  void loop();
  bool wait_for_work(Batch& new_requests, std::vector<RequestId>& cancels);
  void admit(const Batch& new_requests);
  void cancel_now(const std::vector<RequestId>& ids);
  void step_or_fail_all();
  void step();
  Batch requests_of(const ScheduledBatch& scheduled) const;
  void prepare_inputs(const Batch& batch);
  void add_prompt_scoring_rows(const Batch& batch);
  void prepare_sampling(const Batch& batch);
  void check_sampled(const Batch& batch);
  void postprocess(const Batch& batch, const std::vector<SampledToken>& tokens);
  // When a step started, and when its worker call began and returned.
  struct StepTimes {
    Clock::time_point start, execute_start, execute_end;
  };
  void record_iteration(const ScheduledBatch& scheduled, const StepTimes& times);
  void finish(LlmRequest& request, FinishReason reason, const std::string& message = {});
  void emit(LlmRequest& request);
  void flush();
};

// ---------------------------------------------------------------- callers' side

void Executor::Impl::validate(const Request& request) const {
  const EngineLimits& limits = engine->limits();
  const int64_t num_prompt_tokens = static_cast<int64_t>(request.prompt_token_ids.size());
  RTLLM_CHECK_FIELD(num_prompt_tokens >= 1, "prompt_token_ids", "prompt_token_ids is empty");
  RTLLM_CHECK_FIELD(num_prompt_tokens <= limits.max_input_len, "prompt_token_ids", "prompt of ", num_prompt_tokens,
                    " tokens exceeds max_input_len ", limits.max_input_len);
  RTLLM_CHECK_FIELD(num_prompt_tokens < limits.max_seq_len, "prompt_token_ids", "prompt of ", num_prompt_tokens,
                    " tokens leaves no room to generate within max_seq_len ", limits.max_seq_len);
  const SchedulerConfig& scheduling = scheduler.config();
  RTLLM_CHECK_FIELD(scheduling.enable_chunked_prefill || num_prompt_tokens <= scheduling.max_num_tokens,
                    "prompt_token_ids", "prompt of ", num_prompt_tokens, " tokens exceeds max_num_tokens ",
                    scheduling.max_num_tokens, " (enable chunked prefill to run longer prompts)");
  auto check_ids = [&](const std::vector<int32_t>& ids, const char* field) {
    for (size_t i = 0; i < ids.size(); ++i)
      RTLLM_CHECK_FIELD(ids[i] >= 0 && ids[i] < vocab_size, field, field, "[", i, "] = ", ids[i],
                        " is outside the vocabulary [0, ", vocab_size, ")");
  };
  check_ids(request.prompt_token_ids, "prompt_token_ids");
  check_ids(request.stop.end_ids, "end_ids");
  check_ids(request.stop.stop_token_ids, "stop_token_ids");
  for (const auto& [token_id, bias] : request.sampling.logit_bias)
    RTLLM_CHECK_FIELD(token_id >= 0 && token_id < vocab_size, "logit_bias", "logit_bias token id ", token_id,
                      " is outside the vocabulary [0, ", vocab_size, ")");
  request.sampling.validate();
  request.stop.validate();
  RTLLM_CHECK_FIELD(!request.group_id || *request.group_id < (uint64_t{1} << 63), "group_id", "group_id ",
                    request.group_id.value_or(0), " must be < 2^63");
  RTLLM_CHECK_FIELD(request.sampling.num_prompt_logprobs < 0 || scheduling.max_num_logits > scheduling.max_batch_size,
                    "prompt_logprobs", "prompt_logprobs needs rows of logits beyond one per sequence: max_num_logits ",
                    scheduling.max_num_logits, " must exceed max_batch_size ", scheduling.max_batch_size);
}

RequestId Executor::Impl::enqueue(Request request) {
  validate(request);
  std::lock_guard<std::mutex> lock(mutex);
  if (stopping) throw Error("the executor is shut down; no request can be enqueued");
  RequestId id = next_id++;
  uint64_t seed = request.sampling.seed ? *request.sampling.seed : seed_rng();
  int32_t max_seq_len = engine->limits().max_seq_len;
  incoming.push_back(std::make_shared<LlmRequest>(id, std::move(request), seed, max_seq_len));
  unfinished_ids.insert(id);
  work_cv.notify_one();
  return id;
}

// The loop finishes the request at its next round; a request that finishes on its own before
// then keeps its own finish reason.
bool Executor::Impl::cancel(RequestId id) {
  std::lock_guard<std::mutex> lock(mutex);
  RTLLM_CHECK_ARG(id >= 1 && id < next_id, "unknown request id ", id);
  if (!unfinished_ids.count(id)) return false;
  cancelled.push_back(id);
  work_cv.notify_one();
  return true;
}

std::vector<Response> Executor::Impl::await_responses(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex);
  response_cv.wait_for(lock, timeout, [&] { return !responses.empty() || loop_done; });
  std::vector<Response> out(std::make_move_iterator(responses.begin()), std::make_move_iterator(responses.end()));
  responses.clear();
  return out;
}

ExecutorStats Executor::Impl::get_stats() const {
  std::lock_guard<std::mutex> lock(mutex);
  ExecutorStats out = stats;
  out.num_waiting_requests += static_cast<int64_t>(incoming.size());
  out.num_active_requests += static_cast<int64_t>(incoming.size());
  return out;
}

std::vector<IterationStats> Executor::Impl::take_iteration_stats() {
  std::lock_guard<std::mutex> lock(mutex);
  std::vector<IterationStats> out(iteration_stats.begin(), iteration_stats.end());
  iteration_stats.clear();
  return out;
}

std::vector<KvCacheEvent> Executor::Impl::take_kv_events() {
  std::lock_guard<std::mutex> lock(mutex);
  return std::exchange(kv_events, {});
}

void Executor::Impl::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mutex);
    stopping = true;
    work_cv.notify_one();
  }
  std::lock_guard<std::mutex> lock(join_mutex);
  if (loop_thread.joinable()) loop_thread.join();
  worker->shutdown();  // the loop is over: nothing steps any more
}

// ---------------------------------------------------------------- the loop thread

void Executor::Impl::loop() {
  Batch new_requests;
  std::vector<RequestId> cancels;
  while (wait_for_work(new_requests, cancels)) {
    admit(new_requests);
    cancel_now(cancels);
    if (scheduler.has_work()) step_or_fail_all();
    flush();
  }
  // Shutting down: requests not yet admitted and those in the scheduler end cancelled.
  {
    std::lock_guard<std::mutex> lock(mutex);
    new_requests.swap(incoming);
  }
  admit(new_requests);
  std::vector<RequestId> left;
  for (const auto& [id, request] : requests) left.push_back(id);
  cancel_now(left);
  flush();
  std::lock_guard<std::mutex> lock(mutex);
  loop_done = true;
  response_cv.notify_all();
}

// Sleeps until there is something to do; false when the executor is stopping.
bool Executor::Impl::wait_for_work(Batch& new_requests, std::vector<RequestId>& cancels) {
  std::unique_lock<std::mutex> lock(mutex);
  work_cv.wait(lock, [&] { return stopping || !incoming.empty() || !cancelled.empty() || scheduler.has_work(); });
  new_requests.clear();
  cancels.clear();
  if (stopping) return false;
  new_requests.swap(incoming);
  cancels.swap(cancelled);
  return true;
}

void Executor::Impl::admit(const Batch& new_requests) {
  for (const auto& request : new_requests) {
    requests[request->id] = request;
    try {
      scheduler.add(request);
    } catch (const std::exception& e) {
      finish(*request, FinishReason::kError, e.what());
    }
  }
}

void Executor::Impl::cancel_now(const std::vector<RequestId>& ids) {
  for (RequestId id : ids) {
    auto it = requests.find(id);
    if (it == requests.end()) continue;  // finished before the cancel was seen
    std::shared_ptr<LlmRequest> request = it->second;
    finish(*request, FinishReason::kCancelled);
  }
}

// An exception out of a step is a broken invariant of the loop's own state: the requests it holds
// end with kError rather than the process.
void Executor::Impl::step_or_fail_all() {
  try {
    step();
  } catch (const std::exception& e) {
    kv_cache.finish_copies();  // copies recorded by a step that broke before its copy stage
    std::vector<std::shared_ptr<LlmRequest>> left;
    for (const auto& [id, request] : requests) left.push_back(request);
    for (const auto& request : left) finish(*request, FinishReason::kError, e.what());
  }
}

// One step: schedule -> prepare -> execute on the worker -> postprocess. The worker first runs the
// block copies that fill the private blocks of partially reused prefixes (copy-on-write), then the
// forward, and draws the tokens where the logits are. A failure of the model fails this batch's
// requests; a failure to sample fails that request alone.
void Executor::Impl::step() {
  StepTimes times;
  times.start = Clock::now();
  ScheduledBatch scheduled = scheduler.schedule();
  Batch batch = requests_of(scheduled);
  RTLLM_CHECK(!batch.empty(), "the scheduler has work but scheduled nothing");
  try {
    prepare_inputs(batch);
    prepare_sampling(batch);
    times.execute_start = Clock::now();
    worker->execute_step(WorkerStep{kv_cache.pending_copies(), inputs, sampling_inputs}, &tokens);
    times.execute_end = Clock::now();
    kv_cache.finish_copies();
  } catch (const std::exception& e) {
    kv_cache.finish_copies();  // unpins the sources whatever ran
    for (const auto& request : batch) finish(*request, FinishReason::kError, e.what());
    return;
  }
  check_sampled(batch);
  for (size_t r = 0; r < scoring_rows.size(); ++r) {  // scored in position order, once each
    LlmRequest& request = *batch[scoring_rows[r].seq];
    request.prompt_logprobs.push_back(tokens[batch.size() + r]);
    request.num_scored_positions = scoring_rows[r].position + 1;
  }
  postprocess(batch, tokens);
  record_iteration(scheduled, times);
  ++num_steps;
}

// The scheduled requests in packing order (context requests first), the order of StepInputs.
Executor::Impl::Batch Executor::Impl::requests_of(const ScheduledBatch& scheduled) const {
  Batch batch;
  for (const auto& seq : scheduled.seqs) batch.push_back(requests.at(seq->id));
  return batch;
}

void Executor::Impl::prepare_inputs(const Batch& batch) {
  inputs.clear();
  inputs.max_blocks_per_seq = 0;
  for (const auto& request : batch)
    inputs.max_blocks_per_seq =
        std::max(inputs.max_blocks_per_seq, static_cast<int32_t>(kv_cache.block_ids(request->id).size()));
  inputs.block_table.assign(batch.size() * inputs.max_blocks_per_seq, -1);  // [num_seqs, max_blocks_per_seq]
  for (size_t s = 0; s < batch.size(); ++s) {
    const LlmRequest& request = *batch[s];
    const int32_t end = request.num_cached_tokens + request.num_scheduled_tokens;
    inputs.input_ids.insert(inputs.input_ids.end(), request.token_ids.begin() + request.num_cached_tokens,
                            request.token_ids.begin() + end);
    inputs.num_new_tokens.push_back(request.num_scheduled_tokens);
    inputs.num_cached_tokens.push_back(request.num_cached_tokens);
    const std::vector<int32_t>& blocks = kv_cache.block_ids(request.id);
    std::copy(blocks.begin(), blocks.end(), inputs.block_table.begin() + s * inputs.max_blocks_per_seq);
  }
  add_prompt_scoring_rows(batch);
}

// Sequences scoring their prompt get a row of logits for each scheduled position whose next token is
// a prompt token, after the one row per sequence (row s: sequence s's last token) that draws. The
// scheduler left room for them (Sequence::prompt_rows).
void Executor::Impl::add_prompt_scoring_rows(const Batch& batch) {
  scoring_rows.clear();
  int32_t start = 0;
  for (size_t s = 0; s < batch.size(); ++s) {
    const LlmRequest& request = *batch[s];
    const int32_t first = std::max(request.num_cached_tokens, request.num_scored_positions);
    const int32_t end = request.num_cached_tokens + request.prompt_rows(request.num_scheduled_tokens);
    for (int32_t position = first; position < end; ++position)
      scoring_rows.push_back({s, position, start + position - request.num_cached_tokens});
    start += request.num_scheduled_tokens;
  }
  if (scoring_rows.empty()) return;  // the default: a row per sequence
  inputs.logits_indices.clear();
  int32_t last = -1;
  for (const auto& request : batch) inputs.logits_indices.push_back(last += request->num_scheduled_tokens);
  for (const ScoringRow& row : scoring_rows) inputs.logits_indices.push_back(row.token_index);
}

// The sampling inputs of forward_and_sample, row s for batch[s]; a request that draws nothing this
// step (a prompt chunk before the last) gets an input without a config. A request's LogitsProcessor
// fills its row of allowed_bitmasks here; if it throws, the request draws nothing and fails after
// the step (finishing it now would free blocks the step still writes).
void Executor::Impl::prepare_sampling(const Batch& batch) {
  const size_t num_words = static_cast<size_t>(num_bitmask_words(vocab_size));
  masked.resize(batch.size());
  sampling_errors.assign(batch.size(), std::string{});
  sampling_inputs.assign(batch.size(), SamplingInput{});
  const bool any_processor = std::any_of(batch.begin(), batch.end(), [](const auto& r) {
    return r->completes_step() && r->request.logits_processor;
  });
  if (any_processor && allowed_bitmasks.size() < batch.size() * num_words)
    allowed_bitmasks.resize(batch.size() * num_words);
  for (size_t s = 0; s < batch.size(); ++s) {
    const LlmRequest& request = *batch[s];
    if (!request.completes_step()) continue;
    masked[s] = request.masked_token_ids();
    SamplingInput input = request.sampling_input(&masked[s]);
    if (LogitsProcessor* processor = request.request.logits_processor.get()) {
      uint32_t* bitmask = allowed_bitmasks.data() + s * num_words;
      std::fill(bitmask, bitmask + num_words, ~0u);
      try {
        processor->fill_next_token_bitmask(request.request.prompt_token_ids, request.output_token_ids, vocab_size,
                                           bitmask);
      } catch (const std::exception& e) {
        sampling_errors[s] = detail::concat("the logits processor failed: ", e.what());
        continue;
      }
      input.allowed_token_bitmask = bitmask;
    }
    sampling_inputs[s] = input;
  }
  for (const ScoringRow& row : scoring_rows) sampling_inputs.push_back(batch[row.seq]->prompt_scoring_input(row.position));
}

// A request whose draw failed (token -1: every token masked or -inf) or whose logits processor
// threw ends with kError; the others go on.
void Executor::Impl::check_sampled(const Batch& batch) {
  for (size_t s = 0; s < batch.size(); ++s) {
    LlmRequest& request = *batch[s];
    if (!sampling_errors[s].empty()) {
      finish(request, FinishReason::kError, sampling_errors[s]);
    } else if (request.completes_step() && tokens[s].token_id < 0) {
      finish(request, FinishReason::kError, "every token of the vocabulary is masked or has logit -inf");
    }
  }
}

void Executor::Impl::postprocess(const Batch& batch, const std::vector<SampledToken>& tokens) {
  for (size_t s = 0; s < batch.size(); ++s) {
    LlmRequest& request = *batch[s];
    if (request.is_finished()) continue;  // failed to sample
    const bool has_token = request.completes_step();
    request.num_cached_tokens += request.num_scheduled_tokens;
    // Blocks filled by this step now hold computed K/V: later requests may share them.
    kv_cache.store(request.id, request.token_ids, request.num_cached_tokens);
    if (!has_token) continue;
    request.add_token(tokens[s]);
    ++num_generated_tokens;
    if (request.is_finished()) {
      finish(request, request.finish_reason);
    } else {
      emit(request);
    }
  }
}

void Executor::Impl::record_iteration(const ScheduledBatch& scheduled, const StepTimes& times) {
  const Clock::time_point now = Clock::now();
  const auto ms = [](Clock::time_point from, Clock::time_point to) {
    return std::chrono::duration<double, std::milli>(to - from).count();
  };
  IterationStats it;
  it.iteration = num_steps;
  it.timestamp_s = std::chrono::duration<double>(now - start_time).count();
  it.schedule_time_ms = ms(times.start, times.execute_start);
  it.execute_time_ms = ms(times.execute_start, times.execute_end);
  it.postprocess_time_ms = ms(times.execute_end, now);
  it.step_time_ms = ms(times.start, now);
  it.num_context_requests = scheduled.num_context_seqs;
  it.num_generation_requests = scheduled.num_generation_seqs();
  for (size_t s = 0; s < scheduled.seqs.size(); ++s) {
    int32_t& num_tokens = scheduled.is_context(s) ? it.num_context_tokens : it.num_generation_tokens;
    num_tokens += scheduled.seqs[s]->num_scheduled_tokens;
  }
  it.num_running_requests = scheduler.num_running();
  it.num_waiting_requests = scheduler.num_waiting();
  it.num_preempted_requests = scheduled.num_preempted;
  it.kv_cache = kv_cache.stats();
  num_context_tokens += it.num_context_tokens;
  if (iteration_stats_max_size > 0) new_iteration_stats.push_back(it);
}

// Ends a request: its final response goes out, its blocks are freed and the loop forgets it.
void Executor::Impl::finish(LlmRequest& request, FinishReason reason, const std::string& message) {
  RequestId id = request.id;
  if (!request.is_finished()) request.finish(reason, message);
  emit(request);
  scheduler.remove(id);
  finished_ids.push_back(id);
  ++num_completed;
  requests.erase(id);  // last: may destroy `request`
}

void Executor::Impl::emit(LlmRequest& request) {
  Response response;
  if (request.take_response(response)) outbox.push_back(std::move(response));
}

// Publishes this round's responses and statistics.
void Executor::Impl::flush() {
  std::lock_guard<std::mutex> lock(mutex);
  for (RequestId id : finished_ids) unfinished_ids.erase(id);
  finished_ids.clear();
  for (Response& response : outbox) responses.push_back(std::move(response));
  if (!outbox.empty()) response_cv.notify_all();
  outbox.clear();
  stats.num_steps = num_steps;
  stats.num_waiting_requests = scheduler.num_waiting();
  stats.num_active_requests = scheduler.num_waiting() + scheduler.num_running();
  stats.num_completed_requests = num_completed;
  stats.num_generated_tokens = num_generated_tokens;
  stats.num_context_tokens = num_context_tokens;
  stats.num_preemptions = scheduler.num_preemptions();
  stats.kv_cache = kv_cache.stats();
  for (IterationStats& it : new_iteration_stats) iteration_stats.push_back(it);
  new_iteration_stats.clear();
  while (static_cast<int32_t>(iteration_stats.size()) > iteration_stats_max_size) iteration_stats.pop_front();
  std::vector<KvCacheEvent> events = kv_cache.take_events();
  kv_events.insert(kv_events.end(), std::make_move_iterator(events.begin()), std::make_move_iterator(events.end()));
  const size_t max_events = static_cast<size_t>(std::max(0, event_buffer_max_size));
  if (kv_events.size() > max_events) kv_events.erase(kv_events.begin(), kv_events.end() - max_events);
}

// ---------------------------------------------------------------- Executor

Executor::Executor(std::shared_ptr<const Engine> engine, const ExecutorConfig& config)
    : Executor(make_worker(std::move(engine), config), config) {}

Executor::Executor(std::unique_ptr<Worker> worker, const ExecutorConfig& config)
    : impl_(std::make_unique<Impl>(checked_worker(std::move(worker), config), config)) {}

Executor::~Executor() { shutdown(); }

RequestId Executor::enqueue(Request request) { return impl_->enqueue(std::move(request)); }
bool Executor::cancel(RequestId id) { return impl_->cancel(id); }
std::vector<Response> Executor::await_responses(std::chrono::milliseconds timeout) {
  return impl_->await_responses(timeout);
}
ExecutorStats Executor::get_stats() const { return impl_->get_stats(); }
std::vector<IterationStats> Executor::get_iteration_stats() { return impl_->take_iteration_stats(); }
std::vector<KvCacheEvent> Executor::get_kv_cache_events() { return impl_->take_kv_events(); }
void Executor::shutdown() { impl_->shutdown(); }
bool Executor::is_shutdown() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->stopping;
}
const Engine& Executor::engine() const { return *impl_->engine; }
std::unique_ptr<Worker> Executor::make_worker(std::shared_ptr<const Engine> engine,
                                                   const ExecutorConfig& config) {
  RuntimeConfig runtime = resolve_runtime_config(engine.get(), config);
  if (runtime.communicator && runtime.communicator->size() > 1)  // rank 0 of a tensor-parallel group
    return std::make_unique<TensorParallelWorker>(std::move(engine), runtime);
  return std::make_unique<LocalWorker>(std::move(engine), runtime);
}

int64_t Executor::num_live_runners() { return LocalWorker::num_live_runners(); }

}  // namespace rtllm
