// Bindings for the executor's configs, Request, Response, FinishReason, stats and Executor.
#include <pybind11/chrono.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <optional>
#include <utility>

#include "bindings.h"
#include "rtllm/executor.h"
#include "rtllm/worker.h"

namespace py = pybind11;

namespace rtllm::bindings {

namespace {

// [num_tokens][num_logprobs] -> list of lists of (token_id, logprob) tuples.
py::list top_logprobs_to_python(const std::vector<std::vector<TokenLogprob>>& top) {
  py::list out;
  for (const auto& entries : top) {
    py::list row;
    for (const TokenLogprob& e : entries) row.append(py::make_tuple(e.token_id, e.logprob));
    out.append(std::move(row));
  }
  return out;
}

void bind_configs(py::module_& m) {
  py::class_<SamplingConfig>(m, "SamplingConfig")
      .def(py::init([](float temperature, int32_t top_k, float top_p, float min_p, float repetition_penalty,
                       float presence_penalty, float frequency_penalty, std::optional<uint64_t> seed,
                       int32_t num_logprobs, std::map<int32_t, float> logit_bias, int32_t num_prompt_logprobs) {
             return SamplingConfig{temperature,       top_k, top_p,        min_p,
                                   repetition_penalty, presence_penalty, frequency_penalty, seed,
                                   num_logprobs,       std::move(logit_bias), num_prompt_logprobs};
           }),
           py::kw_only(), py::arg("temperature") = 1.0f, py::arg("top_k") = 0, py::arg("top_p") = 1.0f,
           py::arg("min_p") = 0.0f, py::arg("repetition_penalty") = 1.0f, py::arg("presence_penalty") = 0.0f,
           py::arg("frequency_penalty") = 0.0f, py::arg("seed") = py::none(), py::arg("num_logprobs") = -1,
           py::arg("logit_bias") = std::map<int32_t, float>{}, py::arg("num_prompt_logprobs") = -1)
      .def_readwrite("temperature", &SamplingConfig::temperature)
      .def_readwrite("top_k", &SamplingConfig::top_k)
      .def_readwrite("top_p", &SamplingConfig::top_p)
      .def_readwrite("min_p", &SamplingConfig::min_p)
      .def_readwrite("repetition_penalty", &SamplingConfig::repetition_penalty)
      .def_readwrite("presence_penalty", &SamplingConfig::presence_penalty)
      .def_readwrite("frequency_penalty", &SamplingConfig::frequency_penalty)
      .def_readwrite("seed", &SamplingConfig::seed)
      .def_readwrite("num_logprobs", &SamplingConfig::num_logprobs)
      .def_readwrite("logit_bias", &SamplingConfig::logit_bias)
      .def_readwrite("num_prompt_logprobs", &SamplingConfig::num_prompt_logprobs)
      .def("validate", &SamplingConfig::validate);

  py::class_<StopConfig>(m, "StopConfig")
      .def(py::init([](int32_t max_tokens, int32_t min_tokens, std::vector<int32_t> end_ids,
                       std::vector<int32_t> stop_token_ids, bool ignore_eos) {
             return StopConfig{max_tokens, min_tokens, std::move(end_ids), std::move(stop_token_ids), ignore_eos};
           }),
           py::kw_only(), py::arg("max_tokens") = 16, py::arg("min_tokens") = 0,
           py::arg("end_ids") = std::vector<int32_t>{}, py::arg("stop_token_ids") = std::vector<int32_t>{},
           py::arg("ignore_eos") = false)
      .def_readwrite("max_tokens", &StopConfig::max_tokens)
      .def_readwrite("min_tokens", &StopConfig::min_tokens)
      .def_readwrite("end_ids", &StopConfig::end_ids)
      .def_readwrite("stop_token_ids", &StopConfig::stop_token_ids)
      .def_readwrite("ignore_eos", &StopConfig::ignore_eos)
      .def("validate", &StopConfig::validate);

  py::class_<KvCacheConfig>(m, "KvCacheConfig")
      .def(py::init([](std::optional<int64_t> max_tokens, float free_memory_fraction, int32_t tokens_per_block,
                       bool enable_block_reuse, int32_t event_buffer_max_size, bool enable_partial_reuse,
                       int32_t min_partial_reuse_tokens) {
             KvCacheConfig c;
             c.max_tokens = max_tokens;
             c.free_memory_fraction = free_memory_fraction;
             c.tokens_per_block = tokens_per_block;
             c.enable_block_reuse = enable_block_reuse;
             c.event_buffer_max_size = event_buffer_max_size;
             c.enable_partial_reuse = enable_partial_reuse;
             c.min_partial_reuse_tokens = min_partial_reuse_tokens;
             return c;
           }),
           py::kw_only(), py::arg("max_tokens") = py::none(), py::arg("free_memory_fraction") = 0.9f,
           py::arg("tokens_per_block") = 32, py::arg("enable_block_reuse") = true,
           py::arg("event_buffer_max_size") = 0, py::arg("enable_partial_reuse") = true,
           py::arg("min_partial_reuse_tokens") = 1)
      .def_readwrite("max_tokens", &KvCacheConfig::max_tokens)
      .def_readwrite("free_memory_fraction", &KvCacheConfig::free_memory_fraction)
      .def_readwrite("tokens_per_block", &KvCacheConfig::tokens_per_block)
      .def_readwrite("enable_block_reuse", &KvCacheConfig::enable_block_reuse)
      .def_readwrite("event_buffer_max_size", &KvCacheConfig::event_buffer_max_size)
      .def_readwrite("enable_partial_reuse", &KvCacheConfig::enable_partial_reuse)
      .def_readwrite("min_partial_reuse_tokens", &KvCacheConfig::min_partial_reuse_tokens);

  py::enum_<CapacityPolicy>(m, "CapacityPolicy")
      .value("GUARANTEED_NO_EVICT", CapacityPolicy::kGuaranteedNoEvict)
      .value("MAX_UTILIZATION", CapacityPolicy::kMaxUtilization);

  py::class_<SchedulerConfig>(m, "SchedulerConfig")
      .def(py::init([](CapacityPolicy policy, int32_t max_batch_size, int32_t max_num_tokens,
                       bool enable_chunked_prefill) {
             return SchedulerConfig{policy, max_batch_size, max_num_tokens, enable_chunked_prefill};
           }),
           py::kw_only(), py::arg("policy") = CapacityPolicy::kGuaranteedNoEvict, py::arg("max_batch_size") = 0,
           py::arg("max_num_tokens") = 0, py::arg("enable_chunked_prefill") = false)
      .def_readwrite("policy", &SchedulerConfig::policy)
      .def_readwrite("max_batch_size", &SchedulerConfig::max_batch_size)
      .def_readwrite("max_num_tokens", &SchedulerConfig::max_num_tokens)
      .def_readwrite("enable_chunked_prefill", &SchedulerConfig::enable_chunked_prefill);

  py::class_<ExecutorConfig>(m, "ExecutorConfig")
      .def(py::init([](const RuntimeConfig& runtime, const KvCacheConfig& kv_cache,
                       std::optional<SchedulerConfig> scheduler, uint64_t seed, int32_t iteration_stats_max_size) {
             ExecutorConfig c;
             c.runtime = runtime;
             c.kv_cache = kv_cache;
             if (scheduler) c.scheduler = *scheduler;
             c.seed = seed;
             c.iteration_stats_max_size = iteration_stats_max_size;
             return c;
           }),
           py::kw_only(), py::arg("runtime") = RuntimeConfig{}, py::arg("kv_cache") = KvCacheConfig{},
           py::arg("scheduler") = py::none(), py::arg("seed") = 0, py::arg("iteration_stats_max_size") = 1000)
      .def_readwrite("runtime", &ExecutorConfig::runtime)
      .def_readwrite("kv_cache", &ExecutorConfig::kv_cache)
      .def_readwrite("scheduler", &ExecutorConfig::scheduler)
      .def_readwrite("seed", &ExecutorConfig::seed)
      .def_readwrite("iteration_stats_max_size", &ExecutorConfig::iteration_stats_max_size);
}

void bind_requests(py::module_& m) {
  py::class_<Request>(m, "Request")
      .def(py::init([](std::vector<int32_t> prompt_token_ids, const SamplingConfig& sampling, const StopConfig& stop,
                       bool streaming, std::optional<std::string> cache_salt, std::optional<uint64_t> group_id) {
             return Request{std::move(prompt_token_ids), sampling, stop, streaming, std::move(cache_salt), nullptr,
                            group_id};
           }),
           py::arg("prompt_token_ids"), py::kw_only(), py::arg("sampling") = SamplingConfig{},
           py::arg("stop") = StopConfig{}, py::arg("streaming") = false, py::arg("cache_salt") = py::none(),
           py::arg("group_id") = py::none())
      .def_readwrite("prompt_token_ids", &Request::prompt_token_ids)
      .def_readwrite("sampling", &Request::sampling)
      .def_readwrite("stop", &Request::stop)
      .def_readwrite("streaming", &Request::streaming)
      .def_readwrite("cache_salt", &Request::cache_salt)
      .def_readwrite("group_id", &Request::group_id);

  py::enum_<FinishReason>(m, "FinishReason")
      .value("NOT_FINISHED", FinishReason::kNotFinished)
      .value("END_ID", FinishReason::kEndId)
      .value("STOP_TOKEN_ID", FinishReason::kStopTokenId)
      .value("LENGTH", FinishReason::kLength)
      .value("CANCELLED", FinishReason::kCancelled)
      .value("ERROR", FinishReason::kError);

  py::class_<Response>(m, "Response")
      .def_readonly("request_id", &Response::request_id)
      .def_readonly("token_ids", &Response::token_ids)
      .def_readonly("logprobs", &Response::logprobs)
      .def_property_readonly("top_logprobs", [](const Response& r) { return top_logprobs_to_python(r.top_logprobs); })
      // [(prompt token id, logprob, [(token_id, logprob) of the top ones])] for prompt tokens 1, 2, ...
      .def_property_readonly("prompt_logprobs",
                             [](const Response& r) {
                               py::list out;
                               for (const SampledToken& t : r.prompt_logprobs) {
                                 py::list top;
                                 for (const TokenLogprob& e : t.top_logprobs) top.append(py::make_tuple(e.token_id, e.logprob));
                                 out.append(py::make_tuple(t.token_id, t.logprob, std::move(top)));
                               }
                               return out;
                             })
      .def_readonly("is_final", &Response::is_final)
      .def_readonly("finish_reason", &Response::finish_reason)
      .def_readonly("stop_token_id", &Response::stop_token_id)
      .def_readonly("error", &Response::error)
      .def("__repr__", [](const Response& r) {
        return detail::concat("Response(request_id=", r.request_id, ", num_tokens=", r.token_ids.size(),
                              ", is_final=", r.is_final ? "True" : "False", ", finish_reason=",
                              static_cast<int32_t>(r.finish_reason), ")");
      });
}

void bind_stats(py::module_& m) {
  py::class_<KvCacheStats>(m, "KvCacheStats")
      .def_readonly("num_total_blocks", &KvCacheStats::num_total_blocks)
      .def_readonly("num_free_blocks", &KvCacheStats::num_free_blocks)
      .def_readonly("num_used_blocks", &KvCacheStats::num_used_blocks)
      .def_readonly("num_reusable_blocks", &KvCacheStats::num_reusable_blocks)
      .def_readonly("tokens_per_block", &KvCacheStats::tokens_per_block)
      .def_readonly("num_reused_blocks", &KvCacheStats::num_reused_blocks)
      .def_readonly("num_missed_blocks", &KvCacheStats::num_missed_blocks)
      .def_readonly("num_reused_tokens", &KvCacheStats::num_reused_tokens)
      .def_readonly("num_partial_reused_blocks", &KvCacheStats::num_partial_reused_blocks)
      .def_readonly("num_evicted_blocks", &KvCacheStats::num_evicted_blocks)
      .def_readonly("num_touched_blocks", &KvCacheStats::num_touched_blocks)
      .def_property_readonly("hit_rate", &KvCacheStats::hit_rate);

  py::enum_<KvCacheEventKind>(m, "KvCacheEventKind")
      .value("CREATED", KvCacheEventKind::kCreated)
      .value("STORED", KvCacheEventKind::kStored)
      .value("REMOVED", KvCacheEventKind::kRemoved);

  py::class_<KvCacheEvent>(m, "KvCacheEvent")
      .def_readonly("event_id", &KvCacheEvent::event_id)
      .def_readonly("kind", &KvCacheEvent::kind)
      .def_readonly("num_blocks", &KvCacheEvent::num_blocks)
      .def_readonly("tokens_per_block", &KvCacheEvent::tokens_per_block)
      .def_readonly("block_id", &KvCacheEvent::block_id)
      .def_readonly("block_hash", &KvCacheEvent::block_hash)
      .def_readonly("parent_hash", &KvCacheEvent::parent_hash)
      .def_readonly("token_offset", &KvCacheEvent::token_offset)
      .def_readonly("token_ids", &KvCacheEvent::token_ids);

  py::class_<IterationStats>(m, "IterationStats")
      .def_readonly("iteration", &IterationStats::iteration)
      .def_readonly("timestamp_s", &IterationStats::timestamp_s)
      .def_readonly("step_time_ms", &IterationStats::step_time_ms)
      .def_readonly("schedule_time_ms", &IterationStats::schedule_time_ms)
      .def_readonly("execute_time_ms", &IterationStats::execute_time_ms)
      .def_readonly("postprocess_time_ms", &IterationStats::postprocess_time_ms)
      .def_readonly("num_context_requests", &IterationStats::num_context_requests)
      .def_readonly("num_generation_requests", &IterationStats::num_generation_requests)
      .def_readonly("num_context_tokens", &IterationStats::num_context_tokens)
      .def_readonly("num_generation_tokens", &IterationStats::num_generation_tokens)
      .def_readonly("num_running_requests", &IterationStats::num_running_requests)
      .def_readonly("num_waiting_requests", &IterationStats::num_waiting_requests)
      .def_readonly("num_preempted_requests", &IterationStats::num_preempted_requests)
      .def_readonly("kv_cache", &IterationStats::kv_cache);

  py::class_<ExecutorStats>(m, "ExecutorStats")
      .def_readonly("num_steps", &ExecutorStats::num_steps)
      .def_readonly("num_active_requests", &ExecutorStats::num_active_requests)
      .def_readonly("num_waiting_requests", &ExecutorStats::num_waiting_requests)
      .def_readonly("num_completed_requests", &ExecutorStats::num_completed_requests)
      .def_readonly("num_generated_tokens", &ExecutorStats::num_generated_tokens)
      .def_readonly("num_context_tokens", &ExecutorStats::num_context_tokens)
      .def_readonly("num_preemptions", &ExecutorStats::num_preemptions)
      .def_readonly("kv_cache", &ExecutorStats::kv_cache);
}

uint64_t colliding_hash(uint64_t, uint64_t, const int32_t*, int32_t) { return 42; }

// The KV manager alone, for property tests from Python.
void bind_kv_cache_manager(py::module_& m) {
  py::class_<PrefixMatch>(m, "PrefixMatch")
      .def(py::init<>())
      .def_readonly("block_ids", &PrefixMatch::block_ids)
      .def_readonly("num_looked_up_blocks", &PrefixMatch::num_looked_up_blocks)
      .def_readonly("partial_block_id", &PrefixMatch::partial_block_id)
      .def_readonly("num_partial_tokens", &PrefixMatch::num_partial_tokens);

  py::class_<KVCacheManager>(m, "KVCacheManager")
      .def(py::init<int32_t, int32_t, bool, int32_t, bool, int32_t>(), py::arg("num_blocks"),
           py::arg("tokens_per_block"), py::arg("enable_block_reuse") = true, py::arg("event_buffer_max_size") = 0,
           py::arg("enable_partial_reuse") = true, py::arg("min_partial_reuse_tokens") = 1)
      .def("num_blocks_for", &KVCacheManager::num_blocks_for, py::arg("num_tokens"))
      .def("match_prefix", &KVCacheManager::match_prefix, py::arg("tokens"), py::arg("num_tokens"),
           py::arg("extra_key") = 0)
      .def("num_blocks_to_take", &KVCacheManager::num_blocks_to_take, py::arg("num_tokens"),
           py::arg("prefix") = PrefixMatch{})
      .def("can_allocate", &KVCacheManager::can_allocate, py::arg("num_tokens"), py::arg("prefix") = PrefixMatch{})
      .def("allocate", &KVCacheManager::allocate, py::arg("seq"), py::arg("num_tokens"),
           py::arg("prefix") = PrefixMatch{}, py::arg("extra_key") = 0)
      .def("can_allocate_slots", &KVCacheManager::can_allocate_slots, py::arg("seq"), py::arg("num_new_tokens"),
           py::arg("num_lookahead_tokens") = 0)
      .def("allocate_slots", &KVCacheManager::allocate_slots, py::arg("seq"), py::arg("num_new_tokens"),
           py::arg("num_lookahead_tokens") = 0)
      .def("can_rewind", &KVCacheManager::can_rewind, py::arg("seq"), py::arg("num_tokens"))
      .def("rewind", &KVCacheManager::rewind, py::arg("seq"), py::arg("num_tokens"))
      .def("store", &KVCacheManager::store, py::arg("seq"), py::arg("tokens"), py::arg("num_computed_tokens"))
      .def("free", &KVCacheManager::free, py::arg("seq"))
      .def("pending_copies", &KVCacheManager::pending_copies)
      .def("finish_copies", &KVCacheManager::finish_copies)
      .def("contains", &KVCacheManager::contains, py::arg("seq"))
      .def("block_ids", &KVCacheManager::block_ids, py::arg("seq"))
      .def("num_tokens", &KVCacheManager::num_tokens, py::arg("seq"))
      .def("num_lookahead_tokens", &KVCacheManager::num_lookahead_tokens, py::arg("seq"))
      .def_property_readonly("num_total_blocks", &KVCacheManager::num_total_blocks)
      .def_property_readonly("num_free_blocks", &KVCacheManager::num_free_blocks)
      .def_property_readonly("num_reusable_blocks", &KVCacheManager::num_reusable_blocks)
      .def_property_readonly("tokens_per_block", &KVCacheManager::tokens_per_block)
      .def("stats", &KVCacheManager::stats)
      .def("take_events", &KVCacheManager::take_events)
      .def("ref_count", &KVCacheManager::ref_count, py::arg("block_id"))
      .def("is_registered", &KVCacheManager::is_registered, py::arg("block_id"))
      .def("block_tokens", &KVCacheManager::block_tokens, py::arg("block_id"))
      .def("check_invariants", &KVCacheManager::check_invariants)
      .def("use_colliding_hash_for_testing", [](KVCacheManager& kv) { kv.set_hash_function(colliding_hash); });
  m.def("cache_salt_key", &cache_salt_key, py::arg("cache_salt"));
}

}  // namespace

void bind_executor(py::module_& m) {
  bind_configs(m);
  bind_requests(m);
  bind_stats(m);
  bind_kv_cache_manager(m);

  using Release = py::call_guard<py::gil_scoped_release>;
  // A tensor-parallel follower rank: runs the steps rank 0's executor broadcasts until it stops the group.
  m.def("run_tensor_parallel_follower", &run_tensor_parallel_follower, py::arg("engine"), py::arg("runtime_config"),
        py::call_guard<py::gil_scoped_release>());
  m.def("stop_tensor_parallel_followers", &stop_tensor_parallel_followers, py::arg("group"),
        py::call_guard<py::gil_scoped_release>());
  py::class_<Executor>(m, "Executor")
      .def(py::init([](std::shared_ptr<Engine> engine, const ExecutorConfig& config) {
             return std::make_unique<Executor>(std::move(engine), config);
           }),
           py::arg("engine"), py::arg("config") = ExecutorConfig{}, Release())
      .def("enqueue", &Executor::enqueue, py::arg("request"), Release())
      .def("cancel", &Executor::cancel, py::arg("request_id"), Release())
      .def(
          "await_responses",
          [](Executor& e, int64_t timeout_ms) { return e.await_responses(std::chrono::milliseconds(timeout_ms)); },
          py::arg("timeout_ms"), Release())
      .def("get_stats", &Executor::get_stats, Release())
      .def("get_iteration_stats", &Executor::get_iteration_stats, Release())
      .def("get_kv_cache_events", &Executor::get_kv_cache_events, Release())
      .def("shutdown", &Executor::shutdown, Release())
      .def_property_readonly("is_shutdown", &Executor::is_shutdown)
      .def_static("num_live_runners", &Executor::num_live_runners);
}

}  // namespace rtllm::bindings
