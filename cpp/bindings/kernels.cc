// rtllm._core.kernels: the CUDA launchers, one Python function each, for the GPU tests and the kernel
// benchmark. Device memory is passed as integer addresses (torch's tensor.data_ptr()), a null pointer
// as 0; `stream` is a cudaStream_t as an integer (0: the legacy default stream). A launcher's error
// raises RuntimeError with the CUDA error string. Built only with the CUDA backend.
#ifdef RTLLM_WITH_CUDA

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "rtllm/kernels/elementwise.cuh"
#include "rtllm/kernels/gemv.cuh"
#include "rtllm/kernels/kv_cache.cuh"
#include "rtllm/kernels/norm.cuh"
#include "rtllm/kernels/rope.cuh"
#include "rtllm/kernels/sampling.cuh"
#include "rtllm/sampler.h"

namespace py = pybind11;

namespace rtllm::bindings {
namespace {

using kernels::DType;

template <typename T = void>
T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }
cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
DType as_dtype(int d) { return static_cast<DType>(d); }

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + " failed: " + kernels::error_string(err));
}

// The CPU sampler on one row of logits, for comparing the device sampler with it.
py::tuple cpu_sample(py::array_t<float, py::array::c_style | py::array::forcecast> logits, float temperature,
                     int32_t top_k, float top_p, float min_p, float repetition_penalty, float presence_penalty,
                     float frequency_penalty, uint64_t seed, int64_t step, std::vector<int32_t> prompt,
                     std::vector<int32_t> output, std::vector<int32_t> masked, int32_t num_logprobs,
                     std::map<int32_t, float> logit_bias) {
  SamplingConfig config;
  config.logit_bias = std::move(logit_bias);
  config.temperature = temperature;
  config.top_k = top_k;
  config.top_p = top_p;
  config.min_p = min_p;
  config.repetition_penalty = repetition_penalty;
  config.presence_penalty = presence_penalty;
  config.frequency_penalty = frequency_penalty;
  config.num_logprobs = num_logprobs;
  SamplingInput input;
  input.config = &config;
  input.seed = seed;
  input.step = step;
  input.prompt_token_ids = &prompt;
  input.output_token_ids = &output;
  input.masked_token_ids = &masked;
  Sampler sampler;
  const SampledToken t = sampler.sample_one(logits.data(), static_cast<int32_t>(logits.size()), input);
  std::vector<std::pair<int32_t, float>> top;
  for (const auto& lp : t.top_logprobs) top.emplace_back(lp.token_id, lp.logprob);
  return py::make_tuple(t.token_id, t.logprob, top);
}

}  // namespace

void bind_kernels(py::module_& parent) {
  py::module_ m = parent.def_submodule("kernels", "CUDA kernel launchers (test and benchmark use only)");
  m.attr("BF16") = static_cast<int>(DType::kBF16);
  m.attr("FP16") = static_cast<int>(DType::kFP16);
  m.attr("FP8_E4M3") = static_cast<int>(DType::kFP8E4M3);
  m.attr("FP8_E5M2") = static_cast<int>(DType::kFP8E5M2);
  m.attr("INT8") = static_cast<int>(DType::kINT8);
  m.attr("FP32") = static_cast<int>(DType::kFP32);
  const auto s0 = py::arg("stream") = uintptr_t{0};

  // fp8_out_scale > 0: the (normed) output is E4M3 codes (docs/engine_format.md, "FP8 outputs")
  const auto fp8_out = py::arg("fp8_out_scale") = 0.0f;
  m.def("rms_norm", [](uintptr_t out, uintptr_t x, uintptr_t w, int64_t rows, int64_t row_size, int64_t group,
                       float eps, int dtype, uintptr_t stream, float fp8_out_scale) {
    check(kernels::rms_norm(ptr(out), ptr(x), ptr(w), rows, row_size, group, eps, as_dtype(dtype), as_stream(stream),
                            fp8_out_scale),
          "rms_norm");
  }, py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("num_rows"), py::arg("row_size"),
     py::arg("group_size"), py::arg("eps"), py::arg("dtype"), s0, fp8_out);
  m.def("add_rms_norm", [](uintptr_t normed, uintptr_t sum, uintptr_t x, uintptr_t res, uintptr_t w, int64_t rows,
                           int64_t row_size, float eps, int dtype, uintptr_t stream, float fp8_out_scale) {
    check(kernels::add_rms_norm(ptr(normed), ptr(sum), ptr(x), ptr(res), ptr(w), rows, row_size, eps,
                                as_dtype(dtype), as_stream(stream), fp8_out_scale), "add_rms_norm");
  }, py::arg("normed"), py::arg("sum"), py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("num_rows"),
     py::arg("row_size"), py::arg("eps"), py::arg("dtype"), s0, fp8_out);
  m.def("embedding", [](uintptr_t out, uintptr_t ids, uintptr_t table, int64_t num_tokens, int64_t hidden,
                        int64_t num_table_rows, int dtype, uintptr_t stream) {
    check(kernels::embedding(ptr(out), ptr<const int32_t>(ids), ptr(table), num_tokens, hidden, num_table_rows,
                             as_dtype(dtype), as_stream(stream)), "embedding");
  }, py::arg("out"), py::arg("ids"), py::arg("table"), py::arg("num_tokens"), py::arg("hidden"),
     py::arg("num_table_rows"), py::arg("dtype"), s0);
  m.def("gather_rows", [](uintptr_t out, uintptr_t x, uintptr_t index, int64_t rows, int64_t row_size,
                          int64_t num_src_rows, int dtype, uintptr_t stream) {
    check(kernels::gather_rows(ptr(out), ptr(x), ptr<const int32_t>(index), rows, row_size, num_src_rows,
                               as_dtype(dtype), as_stream(stream)), "gather_rows");
  }, py::arg("out"), py::arg("x"), py::arg("index"), py::arg("num_rows"), py::arg("row_size"),
     py::arg("num_src_rows"), py::arg("dtype"), s0);
  m.def("add", [](uintptr_t out, uintptr_t a, uintptr_t b, int64_t n, int dtype, uintptr_t stream) {
    check(kernels::add(ptr(out), ptr(a), ptr(b), n, as_dtype(dtype), as_stream(stream)), "add");
  }, py::arg("out"), py::arg("a"), py::arg("b"), py::arg("n"), py::arg("dtype"), s0);
  m.def("mul", [](uintptr_t out, uintptr_t a, uintptr_t b, int64_t n, int dtype, uintptr_t stream) {
    check(kernels::mul(ptr(out), ptr(a), ptr(b), n, as_dtype(dtype), as_stream(stream)), "mul");
  }, py::arg("out"), py::arg("a"), py::arg("b"), py::arg("n"), py::arg("dtype"), s0);
  m.def("silu", [](uintptr_t out, uintptr_t x, int64_t n, int dtype, uintptr_t stream) {
    check(kernels::silu(ptr(out), ptr(x), n, as_dtype(dtype), as_stream(stream)), "silu");
  }, py::arg("out"), py::arg("x"), py::arg("n"), py::arg("dtype"), s0);
  m.def("silu_mul", [](uintptr_t out, uintptr_t x, int64_t rows, int64_t inter, int dtype, uintptr_t stream,
                       float fp8_out_scale) {
    check(kernels::silu_mul(ptr(out), ptr(x), rows, inter, as_dtype(dtype), as_stream(stream), fp8_out_scale),
          "silu_mul");
  }, py::arg("out"), py::arg("x"), py::arg("num_rows"), py::arg("inter"), py::arg("dtype"), s0, fp8_out);
  m.def("convert", [](uintptr_t out, int out_dtype, uintptr_t x, int x_dtype, int64_t n, uintptr_t stream) {
    check(kernels::convert(ptr(out), as_dtype(out_dtype), ptr(x), as_dtype(x_dtype), n, as_stream(stream)),
          "convert");
  });
  m.def("cast_to_float", [](uintptr_t out, uintptr_t x, int64_t n, int dtype, uintptr_t stream) {
    check(kernels::cast_to_float(ptr<float>(out), ptr(x), n, as_dtype(dtype), as_stream(stream)), "cast_to_float");
  }, py::arg("out"), py::arg("x"), py::arg("n"), py::arg("dtype"), s0);
  m.def("rope", [](uintptr_t out, uintptr_t x, uintptr_t positions, uintptr_t inv_freq, int64_t num_tokens,
                   int32_t num_heads, int32_t head_dim, int dtype, uintptr_t stream) {
    check(kernels::rope(ptr(out), ptr(x), ptr<const int32_t>(positions), ptr<const float>(inv_freq), num_tokens,
                        num_heads, head_dim, as_dtype(dtype), as_stream(stream)), "rope");
  }, py::arg("out"), py::arg("x"), py::arg("positions"), py::arg("inv_freq"), py::arg("num_tokens"),
     py::arg("num_heads"), py::arg("head_dim"), py::arg("dtype"), s0);
  m.def("qkv_prepare", [](uintptr_t q_out, uintptr_t qkv, int64_t row_stride, int64_t q_col, int64_t k_col,
                          int64_t v_col, uintptr_t inv_freq, uintptr_t q_norm, uintptr_t k_norm, float eps,
                          uintptr_t token_seq, uintptr_t positions, int32_t num_tokens, int32_t num_seqs,
                          uintptr_t kv_data, int32_t num_blocks, int32_t tokens_per_block, uintptr_t block_table,
                          int32_t max_blocks_per_seq, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim,
                          int dtype, int kv_dtype, float k_scale, float v_scale, uintptr_t stream) {
    kernels::StepMetaDevice meta{ptr<const int32_t>(token_seq), ptr<const int32_t>(positions), nullptr, nullptr,
                                 nullptr, num_tokens, num_seqs};
    kernels::PagedKv kv{ptr(kv_data), num_blocks, num_kv_heads, tokens_per_block, head_dim,
                        ptr<const int32_t>(block_table), max_blocks_per_seq,
                        as_dtype(kv_dtype < 0 ? dtype : kv_dtype), k_scale, v_scale};
    check(kernels::qkv_prepare(ptr(q_out), ptr(qkv), row_stride, q_col, k_col, v_col, ptr<const float>(inv_freq),
                               ptr(q_norm), ptr(k_norm), eps, meta, kv, num_heads, num_kv_heads, head_dim,
                               as_dtype(dtype), as_stream(stream)), "qkv_prepare");
  }, py::arg("q_out"), py::arg("qkv"), py::arg("qkv_row_stride"), py::arg("q_col"), py::arg("k_col"),
     py::arg("v_col"), py::arg("inv_freq"), py::arg("q_norm_weight"), py::arg("k_norm_weight"),
     py::arg("qk_norm_eps"), py::kw_only(), py::arg("token_seq"), py::arg("positions"), py::arg("num_tokens"),
     py::arg("num_seqs"), py::arg("kv_data"), py::arg("num_blocks"), py::arg("tokens_per_block"),
     py::arg("block_table"), py::arg("max_blocks_per_seq"), py::arg("num_heads"), py::arg("num_kv_heads"),
     py::arg("head_dim"), py::arg("dtype"), py::arg("kv_dtype") = -1, py::arg("k_scale") = 1.0f,
     py::arg("v_scale") = 1.0f, s0);
  m.def("gemv", [](uintptr_t y, uintptr_t x, uintptr_t w, uintptr_t bias, int32_t m_, int32_t n, int32_t k, int dtype,
                   uintptr_t stream, int y_dtype) {
    check(kernels::gemv(ptr(y), ptr(x), ptr(w), ptr(bias), m_, n, k, as_dtype(dtype),
                        as_dtype(y_dtype < 0 ? dtype : y_dtype), as_stream(stream)), "gemv");
  }, py::arg("y"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("m"), py::arg("n"), py::arg("k"),
     py::arg("dtype"), s0, py::arg("y_dtype") = -1);
  m.def("gemv_supported", &kernels::gemv_supported, py::arg("m"), py::arg("k"));

  m.def("sample", [](uintptr_t out_ids, uintptr_t out_logprobs, uintptr_t out_top_ids, uintptr_t logits,
                     uintptr_t params, uintptr_t prompt_ids, uintptr_t prompt_offsets, uintptr_t output_ids,
                     uintptr_t output_offsets, uintptr_t masked_ids, uintptr_t masked_offsets, uintptr_t bias_ids,
                     uintptr_t bias_values, uintptr_t bias_offsets, uintptr_t allowed_bitmask, int32_t num_seqs,
                     int32_t vocab_size, int32_t max_top, uintptr_t workspace, uintptr_t stream) {
    check(kernels::sample(ptr<int32_t>(out_ids), ptr<float>(out_logprobs), ptr<int32_t>(out_top_ids),
                          ptr<const float>(logits), ptr<const kernels::SamplingParamsDevice>(params),
                          ptr<const int32_t>(prompt_ids), ptr<const int32_t>(prompt_offsets),
                          ptr<const int32_t>(output_ids), ptr<const int32_t>(output_offsets),
                          ptr<const int32_t>(masked_ids), ptr<const int32_t>(masked_offsets),
                          ptr<const int32_t>(bias_ids), ptr<const float>(bias_values), ptr<const int32_t>(bias_offsets),
                          ptr<const uint32_t>(allowed_bitmask), num_seqs, vocab_size, max_top, ptr(workspace),
                          as_stream(stream)), "sample");
  }, py::arg("out_ids"), py::arg("out_logprobs"), py::arg("out_top_ids"), py::arg("logits"), py::arg("params"),
     py::kw_only(), py::arg("prompt_ids") = 0, py::arg("prompt_offsets") = 0, py::arg("output_ids") = 0,
     py::arg("output_offsets") = 0, py::arg("masked_ids") = 0, py::arg("masked_offsets") = 0,
     py::arg("bias_ids") = 0, py::arg("bias_values") = 0, py::arg("bias_offsets") = 0, py::arg("allowed_bitmask") = 0,
     py::arg("num_seqs"), py::arg("vocab_size"), py::arg("max_top"), py::arg("workspace") = 0, s0);
  m.def("sample_workspace_bytes", &kernels::sample_workspace_bytes, py::arg("max_num_seqs"), py::arg("vocab_size"));
  m.attr("MAX_TOP_LOGPROBS") = kernels::kMaxTopLogprobs;
  // Byte layout of SamplingParamsDevice, so tests can pack it with a numpy structured dtype.
  using P = kernels::SamplingParamsDevice;
  py::dict layout;
  layout["temperature"] = offsetof(P, temperature);
  layout["top_p"] = offsetof(P, top_p);
  layout["min_p"] = offsetof(P, min_p);
  layout["repetition_penalty"] = offsetof(P, repetition_penalty);
  layout["presence_penalty"] = offsetof(P, presence_penalty);
  layout["frequency_penalty"] = offsetof(P, frequency_penalty);
  layout["top_k"] = offsetof(P, top_k);
  layout["num_logprobs"] = offsetof(P, num_logprobs);
  layout["seed"] = offsetof(P, seed);
  layout["step"] = offsetof(P, step);
  m.attr("SAMPLING_PARAMS_OFFSETS") = layout;
  m.attr("SAMPLING_PARAMS_SIZE") = sizeof(P);

  m.def("cpu_sample", &cpu_sample, py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("min_p"), py::arg("repetition_penalty"), py::arg("presence_penalty"), py::arg("frequency_penalty"),
        py::arg("seed"), py::arg("step"), py::arg("prompt"), py::arg("output"), py::arg("masked"),
        py::arg("num_logprobs"), py::arg("logit_bias") = std::map<int32_t, float>{});
  m.def("sampling_uniform", &sampling_uniform, py::arg("seed"), py::arg("step"));
  bind_attention_kernels(m);  // cpp/bindings/kernels_attention.cc
  bind_fp8_kernels(m);        // cpp/bindings/kernels_fp8.cc
  bind_int8_kernels(m);       // cpp/bindings/kernels_int8.cc
}

}  // namespace rtllm::bindings

#endif  // RTLLM_WITH_CUDA
