// Bindings of the attention launchers (kernels/include/rtllm/kernels/attention.cuh) into
// rtllm._core.kernels, for the GPU tests and benchmarks. Pointers are device addresses passed as ints
// (e.g. torch's tensor.data_ptr()); `stream` is a cudaStream_t as an int (0: the legacy default stream).
#ifdef RTLLM_WITH_CUDA

#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings.h"
#include "rtllm/common.h"
#include "rtllm/kernels/attention.cuh"

namespace py = pybind11;

namespace rtllm::bindings {
namespace {

using kernels::DType;
using kernels::PagedKv;
using kernels::StepMetaDevice;

template <typename P>
P ptr(uintptr_t address) {
  return reinterpret_cast<P>(address);
}

void check_launch(cudaError_t err, const char* name) {
  RTLLM_CHECK_ARG(err != cudaErrorInvalidValue, name,
                  ": unsupported arguments (dtype, head_dim, head counts, pool shape or num_splits)");
  RTLLM_CHECK(err == cudaSuccess, name, ": ", kernels::error_string(err));
}

StepMetaDevice make_meta(uintptr_t token_seq, uintptr_t positions, uintptr_t seq_token_start, uintptr_t num_cached,
                         uintptr_t seq_len, int32_t num_tokens, int32_t num_seqs) {
  return StepMetaDevice{ptr<const int32_t*>(token_seq), ptr<const int32_t*>(positions),
                        ptr<const int32_t*>(seq_token_start), ptr<const int32_t*>(num_cached),
                        ptr<const int32_t*>(seq_len), num_tokens, num_seqs};
}

// kv_dtype -1: the pool in the activation dtype; else FP8_E4M3 (3) or INT8 (5) with k_scale / v_scale.
PagedKv make_kv(uintptr_t data, int32_t num_blocks, int32_t num_kv_heads, int32_t tokens_per_block,
                int32_t head_dim, uintptr_t block_table, int32_t max_blocks_per_seq, DType dtype, int32_t kv_dtype,
                float k_scale, float v_scale) {
  RTLLM_CHECK_ARG(kv_dtype == -1 || kv_dtype == static_cast<int32_t>(DType::kFP8E4M3) ||
                      kv_dtype == static_cast<int32_t>(DType::kINT8) || kv_dtype == static_cast<int32_t>(dtype),
                  "attention: kv_dtype ", kv_dtype, " is not -1 (the activation dtype), FP8_E4M3 (3) or INT8 (5)");
  return PagedKv{ptr<void*>(data), num_blocks, num_kv_heads, tokens_per_block, head_dim,
                 ptr<const int32_t*>(block_table), max_blocks_per_seq,
                 kv_dtype < 0 ? dtype : static_cast<DType>(kv_dtype), k_scale, v_scale};
}

DType to_dtype(int32_t dtype) {
  RTLLM_CHECK_ARG(dtype == static_cast<int32_t>(DType::kBF16) || dtype == static_cast<int32_t>(DType::kFP16),
                  "attention: dtype ", dtype, " is not bf16 (0) or fp16 (1)");
  return static_cast<DType>(dtype);
}

}  // namespace

void bind_attention_kernels(py::module_& m) {
  // Meta arrays: token_seq [num_tokens], positions [num_tokens], seq_token_start [num_seqs + 1],
  // num_cached [num_seqs], seq_len [num_seqs] (int32). Pool: [num_blocks, 2, num_kv_heads, tpb, head_dim].
  m.def(
      "attention_prefill",
      [](uintptr_t out, uintptr_t q, uintptr_t token_seq, uintptr_t positions, uintptr_t seq_token_start,
         uintptr_t num_cached, uintptr_t seq_len, int32_t num_tokens, int32_t num_seqs, uintptr_t kv_data,
         int32_t num_blocks, int32_t tokens_per_block, uintptr_t block_table, int32_t max_blocks_per_seq,
         int32_t max_new_tokens, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, float scale,
         int32_t dtype, int32_t kv_dtype, float k_scale, float v_scale, uintptr_t stream) {
        const StepMetaDevice meta =
            make_meta(token_seq, positions, seq_token_start, num_cached, seq_len, num_tokens, num_seqs);
        const PagedKv kv =
            make_kv(kv_data, num_blocks, num_kv_heads, tokens_per_block, head_dim, block_table, max_blocks_per_seq,
                    to_dtype(dtype), kv_dtype, k_scale, v_scale);
        check_launch(kernels::attention_prefill(ptr<void*>(out), ptr<const void*>(q), meta, kv, max_new_tokens,
                                                num_heads, num_kv_heads, head_dim, scale, to_dtype(dtype),
                                                ptr<cudaStream_t>(stream)),
                     "attention_prefill");
      },
      py::kw_only(), py::arg("out"), py::arg("q"), py::arg("token_seq"), py::arg("positions"),
      py::arg("seq_token_start"), py::arg("num_cached"), py::arg("seq_len"), py::arg("num_tokens"),
      py::arg("num_seqs"), py::arg("kv_data"), py::arg("num_blocks"), py::arg("tokens_per_block"),
      py::arg("block_table"), py::arg("max_blocks_per_seq"), py::arg("max_new_tokens"), py::arg("num_heads"),
      py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("scale"), py::arg("dtype"), py::arg("kv_dtype") = -1,
      py::arg("k_scale") = 1.0f, py::arg("v_scale") = 1.0f, py::arg("stream") = 0);

  m.def(
      "attention_decode",
      [](uintptr_t out, uintptr_t q, uintptr_t seq_len, int32_t num_seqs, uintptr_t kv_data, int32_t num_blocks,
         int32_t tokens_per_block, uintptr_t block_table, int32_t max_blocks_per_seq, int32_t num_heads,
         int32_t num_kv_heads, int32_t head_dim, float scale, int32_t num_splits, uintptr_t workspace,
         int32_t dtype, int32_t kv_dtype, float k_scale, float v_scale, uintptr_t stream) {
        // Decode reads only seq_len; one token per sequence.
        const StepMetaDevice meta = make_meta(0, 0, 0, 0, seq_len, num_seqs, num_seqs);
        const PagedKv kv =
            make_kv(kv_data, num_blocks, num_kv_heads, tokens_per_block, head_dim, block_table, max_blocks_per_seq,
                    to_dtype(dtype), kv_dtype, k_scale, v_scale);
        check_launch(kernels::attention_decode(ptr<void*>(out), ptr<const void*>(q), meta, kv, num_heads,
                                               num_kv_heads, head_dim, scale, num_splits, ptr<float*>(workspace),
                                               to_dtype(dtype), ptr<cudaStream_t>(stream)),
                     "attention_decode");
      },
      py::kw_only(), py::arg("out"), py::arg("q"), py::arg("seq_len"), py::arg("num_seqs"), py::arg("kv_data"),
      py::arg("num_blocks"), py::arg("tokens_per_block"), py::arg("block_table"), py::arg("max_blocks_per_seq"),
      py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("scale"), py::arg("num_splits"),
      py::arg("workspace"), py::arg("dtype"), py::arg("kv_dtype") = -1, py::arg("k_scale") = 1.0f,
      py::arg("v_scale") = 1.0f, py::arg("stream") = 0);

  m.def(
      "attention_decode_qkv",
      [](uintptr_t out, uintptr_t qkv, int64_t qkv_row_stride, int64_t q_col, int64_t k_col, int64_t v_col,
         uintptr_t inv_freq, uintptr_t q_norm_weight, uintptr_t k_norm_weight, float qk_norm_eps,
         uintptr_t positions, uintptr_t seq_len, int32_t num_seqs, uintptr_t kv_data, int32_t num_blocks,
         int32_t tokens_per_block, uintptr_t block_table, int32_t max_blocks_per_seq, int32_t num_heads,
         int32_t num_kv_heads, int32_t head_dim, float scale, int32_t num_splits, uintptr_t workspace,
         int32_t dtype, int32_t kv_dtype, float k_scale, float v_scale, uintptr_t stream) {
        const StepMetaDevice meta = make_meta(0, positions, 0, 0, seq_len, num_seqs, num_seqs);
        const PagedKv kv =
            make_kv(kv_data, num_blocks, num_kv_heads, tokens_per_block, head_dim, block_table, max_blocks_per_seq,
                    to_dtype(dtype), kv_dtype, k_scale, v_scale);
        check_launch(kernels::attention_decode_qkv(
                         ptr<void*>(out), ptr<const void*>(qkv), qkv_row_stride, q_col, k_col, v_col,
                         ptr<const float*>(inv_freq), ptr<const void*>(q_norm_weight),
                         ptr<const void*>(k_norm_weight), qk_norm_eps, meta, kv, num_heads, num_kv_heads, head_dim,
                         scale, num_splits, ptr<float*>(workspace), to_dtype(dtype), ptr<cudaStream_t>(stream)),
                     "attention_decode_qkv");
      },
      py::kw_only(), py::arg("out"), py::arg("qkv"), py::arg("qkv_row_stride"), py::arg("q_col"), py::arg("k_col"),
      py::arg("v_col"), py::arg("inv_freq"), py::arg("q_norm_weight"), py::arg("k_norm_weight"),
      py::arg("qk_norm_eps"), py::arg("positions"), py::arg("seq_len"), py::arg("num_seqs"), py::arg("kv_data"),
      py::arg("num_blocks"), py::arg("tokens_per_block"), py::arg("block_table"), py::arg("max_blocks_per_seq"),
      py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("scale"), py::arg("num_splits"),
      py::arg("workspace"), py::arg("dtype"), py::arg("kv_dtype") = -1, py::arg("k_scale") = 1.0f,
      py::arg("v_scale") = 1.0f, py::arg("stream") = 0);

  m.def("attention_decode_workspace_bytes", &kernels::attention_decode_workspace_bytes, py::arg("max_num_seqs"),
        py::arg("num_heads"), py::arg("head_dim"), py::arg("max_splits"));
  // (num_splits, fuse_prepare) for a pool of kv_dtype (BF16 0, FP16 1, FP8_E4M3 3, INT8 5).
  m.def(
      "attention_decode_plan",
      [](int32_t num_seqs, int32_t num_kv_heads, int32_t head_dim, int32_t max_seq_len, int32_t num_sms,
         int32_t kv_dtype) {
        RTLLM_CHECK_ARG(kv_dtype == static_cast<int32_t>(DType::kBF16) ||
                            kv_dtype == static_cast<int32_t>(DType::kFP16) ||
                            kv_dtype == static_cast<int32_t>(DType::kFP8E4M3) ||
                            kv_dtype == static_cast<int32_t>(DType::kINT8),
                        "attention_decode_plan: kv_dtype ", kv_dtype,
                        " is not BF16 (0), FP16 (1), FP8_E4M3 (3) or INT8 (5)");
        const kernels::DecodePlan plan = kernels::attention_decode_plan(num_seqs, num_kv_heads, head_dim, max_seq_len,
                                                                        num_sms, static_cast<DType>(kv_dtype));
        return py::make_tuple(plan.num_splits, plan.fuse_prepare);
      },
      py::arg("num_seqs"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("max_seq_len"), py::arg("num_sms"),
      py::arg("kv_dtype") = static_cast<int32_t>(DType::kBF16));
}

}  // namespace rtllm::bindings

#endif  // RTLLM_WITH_CUDA
