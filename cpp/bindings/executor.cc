// Bindings for the executor's configs, Request, Response, FinishReason, stats and Executor.
#include <pybind11/chrono.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <utility>

#include "bindings.h"
#include "rtllm/executor.h"

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
                       int32_t num_logprobs) {
             return SamplingConfig{temperature,      top_k,             top_p, min_p, repetition_penalty,
                                   presence_penalty, frequency_penalty, seed,  num_logprobs};
           }),
           py::kw_only(), py::arg("temperature") = 1.0f, py::arg("top_k") = 0, py::arg("top_p") = 1.0f,
           py::arg("min_p") = 0.0f, py::arg("repetition_penalty") = 1.0f, py::arg("presence_penalty") = 0.0f,
           py::arg("frequency_penalty") = 0.0f, py::arg("seed") = py::none(), py::arg("num_logprobs") = -1)
      .def_readwrite("temperature", &SamplingConfig::temperature)
      .def_readwrite("top_k", &SamplingConfig::top_k)
      .def_readwrite("top_p", &SamplingConfig::top_p)
      .def_readwrite("min_p", &SamplingConfig::min_p)
      .def_readwrite("repetition_penalty", &SamplingConfig::repetition_penalty)
      .def_readwrite("presence_penalty", &SamplingConfig::presence_penalty)
      .def_readwrite("frequency_penalty", &SamplingConfig::frequency_penalty)
      .def_readwrite("seed", &SamplingConfig::seed)
      .def_readwrite("num_logprobs", &SamplingConfig::num_logprobs)
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
      .def(py::init([](std::optional<int64_t> max_tokens, float free_memory_fraction, int32_t tokens_per_block) {
             return KvCacheConfig{max_tokens, free_memory_fraction, tokens_per_block};
           }),
           py::kw_only(), py::arg("max_tokens") = py::none(), py::arg("free_memory_fraction") = 0.9f,
           py::arg("tokens_per_block") = 32)
      .def_readwrite("max_tokens", &KvCacheConfig::max_tokens)
      .def_readwrite("free_memory_fraction", &KvCacheConfig::free_memory_fraction)
      .def_readwrite("tokens_per_block", &KvCacheConfig::tokens_per_block);

  py::class_<ExecutorConfig>(m, "ExecutorConfig")
      .def(py::init([](const RuntimeConfig& runtime, const KvCacheConfig& kv_cache, uint64_t seed) {
             return ExecutorConfig{runtime, kv_cache, seed};
           }),
           py::kw_only(), py::arg("runtime") = RuntimeConfig{}, py::arg("kv_cache") = KvCacheConfig{},
           py::arg("seed") = 0)
      .def_readwrite("runtime", &ExecutorConfig::runtime)
      .def_readwrite("kv_cache", &ExecutorConfig::kv_cache)
      .def_readwrite("seed", &ExecutorConfig::seed);
}

void bind_requests(py::module_& m) {
  py::class_<Request>(m, "Request")
      .def(py::init([](std::vector<int32_t> prompt_token_ids, const SamplingConfig& sampling, const StopConfig& stop,
                       bool streaming) { return Request{std::move(prompt_token_ids), sampling, stop, streaming}; }),
           py::arg("prompt_token_ids"), py::kw_only(), py::arg("sampling") = SamplingConfig{},
           py::arg("stop") = StopConfig{}, py::arg("streaming") = false)
      .def_readwrite("prompt_token_ids", &Request::prompt_token_ids)
      .def_readwrite("sampling", &Request::sampling)
      .def_readwrite("stop", &Request::stop)
      .def_readwrite("streaming", &Request::streaming);

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
      .def_readonly("tokens_per_block", &KvCacheStats::tokens_per_block);

  py::class_<ExecutorStats>(m, "ExecutorStats")
      .def_readonly("num_steps", &ExecutorStats::num_steps)
      .def_readonly("num_active_requests", &ExecutorStats::num_active_requests)
      .def_readonly("num_waiting_requests", &ExecutorStats::num_waiting_requests)
      .def_readonly("num_completed_requests", &ExecutorStats::num_completed_requests)
      .def_readonly("num_generated_tokens", &ExecutorStats::num_generated_tokens)
      .def_readonly("kv_cache", &ExecutorStats::kv_cache);
}

}  // namespace

void bind_executor(py::module_& m) {
  bind_configs(m);
  bind_requests(m);
  bind_stats(m);

  using Release = py::call_guard<py::gil_scoped_release>;
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
      .def("shutdown", &Executor::shutdown, Release())
      .def_property_readonly("is_shutdown", &Executor::is_shutdown);
}

}  // namespace rtllm::bindings
