// rtllm._core.kernels entries of the linear ops: the linear, fp8_linear and weight_only_linear ops' code paths on
// device pointers (tests, benchmarks).
#ifdef RTLLM_WITH_CUDA

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings.h"
#include "rtllm/common.h"
#include "rtllm/dtype.h"

namespace py = pybind11;

namespace rtllm {
// cpp/src/cuda/cuda_ops.cc
RTLLM_API void linear_for_tests(void* y, const void* x, const void* w, const void* bias, int64_t T, int64_t N,
                                int64_t K, DataType dtype, DataType y_dtype, void* stream);
// cpp/src/cuda/cuda_fp8_linear.cc
RTLLM_API std::string fp8_linear_unsupported_reason(int major, int minor);
RTLLM_API size_t fp8_linear_workspace_bytes(int64_t T, int64_t N, int64_t K, bool scaled_gemm);
RTLLM_API void fp8_linear_for_tests(void* y, const void* x, const void* w, const void* w_scale, const void* input_scale,
                                    const void* bias, int64_t T, int64_t N, int64_t K, DataType x_dtype,
                                    DataType y_dtype, bool per_token, int path, bool scaled_gemm, void* workspace,
                                    void* stream);
RTLLM_API bool fp8_scaled_gemm_supported(bool per_token, DataType y_dtype, bool has_bias, DataType bias_dtype);
// cpp/src/cuda/cuda_weight_only_linear.cc
RTLLM_API size_t weight_only_linear_workspace_bytes(int64_t N, int64_t K, int64_t T);
RTLLM_API bool weight_only_gemv_supported(int64_t K, int64_t group_size, bool int4);
RTLLM_API void weight_only_linear_for_tests(void* y, const void* x, const void* codes, const void* scale,
                                            const void* offset, const void* bias, int64_t T, int64_t N, int64_t K,
                                            int64_t group_size, bool int4, DataType x_dtype, DataType y_dtype,
                                            int path, int gemv_k_splits, void* workspace, void* stream);
RTLLM_API int32_t weight_only_gemv_k_splits(int64_t N, int64_t K);
RTLLM_API void weight_only_pack_int4(void* codes, int64_t num_bytes, void* stream);
}  // namespace rtllm

namespace rtllm::bindings {

void bind_fp8_kernels(py::module_& m) {
  auto p = [](uintptr_t a) { return reinterpret_cast<void*>(a); };
  auto dtype = [](const std::string& name) { return parse_dtype(name); };
  // The linear op: up to 64 tokens the GEMV or cuBLASLt as timed on a shape's first call, cuBLASLt beyond;
  // dtype "BF16" or "F16", y_dtype that or "F32", bias (0: none) of dtype.
  m.def("linear", [p, dtype](uintptr_t y, uintptr_t x, uintptr_t w, uintptr_t bias, int64_t T, int64_t N, int64_t K,
                             const std::string& x_dtype, const std::string& y_dtype, uintptr_t stream) {
    linear_for_tests(p(y), p(x), p(w), p(bias), T, N, K, dtype(x_dtype), dtype(y_dtype), p(stream));
  }, py::arg("y"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("num_rows"), py::arg("n"), py::arg("k"),
     py::arg("dtype"), py::arg("y_dtype"), py::arg("stream") = uintptr_t{0});
  m.def("fp8_linear_unsupported_reason", &fp8_linear_unsupported_reason, py::arg("major"), py::arg("minor"));
  m.def("fp8_linear_workspace_bytes", &fp8_linear_workspace_bytes, py::arg("num_rows"), py::arg("n"), py::arg("k"),
        py::arg("scaled_gemm") = true);
  // bias_dtype "": no bias
  m.def("fp8_scaled_gemm_supported", [dtype](bool per_token, const std::string& y_dtype, const std::string& bias_dtype) {
    return fp8_scaled_gemm_supported(per_token, dtype(y_dtype), !bias_dtype.empty(),
                                     bias_dtype.empty() ? DataType::kBFloat16 : dtype(bias_dtype));
  }, py::arg("per_token"), py::arg("y_dtype"), py::arg("bias_dtype") = "");
  // Dtypes by safetensors name ("BF16", "F16", "F32"; x_dtype "F8_E4M3": x holds E4M3 codes, static scales and
  // y BF16 / F16 only, as a producer's FP8 output reaches the op); path 0: as the op, 1: GEMV, 2: cuBLASLt GEMM, 3: rtllm's
  // Hopper GEMM (compute capability 9.0); scaled_gemm false: the unscaled GEMM + scale kernel fallback.
  m.def("fp8_linear", [p, dtype](uintptr_t y, uintptr_t x, uintptr_t w, uintptr_t w_scale, uintptr_t input_scale,
                                 uintptr_t bias, int64_t T, int64_t N, int64_t K, const std::string& x_dtype,
                                 const std::string& y_dtype, bool per_token, uintptr_t workspace, uintptr_t stream,
                                 int path, bool scaled_gemm) {
    fp8_linear_for_tests(p(y), p(x), p(w), p(w_scale), p(input_scale), p(bias), T, N, K, dtype(x_dtype),
                         dtype(y_dtype), per_token, path, scaled_gemm, p(workspace), p(stream));
  }, py::arg("y"), py::arg("x"), py::arg("weight"), py::arg("weight_scale"), py::arg("input_scale"), py::arg("bias"),
     py::arg("num_rows"), py::arg("n"), py::arg("k"), py::arg("x_dtype"), py::arg("y_dtype"), py::arg("per_token"),
     py::arg("workspace"), py::arg("stream") = uintptr_t{0}, py::kw_only(), py::arg("path") = 0,
     py::arg("scaled_gemm") = true);

  // weight_only_linear: codes [N, K] int8 or [N, K / 2] packed int4 bytes, int4 codes of the GEMV's shapes
  // (weight_only_gemv_supported) in the MMA layout (weight_only_pack_int4, in place); scale, offset (0: none)
  // and bias (0: none) in x_dtype: as the op places them. path 0: as the op, 1: GEMV, 2: dequantize + GEMM, 3: the
  // Hopper int4 GEMM (workspace for num_rows rows);
  // gemv_k_splits: the GEMV's warps splitting K (0: its own choice, weight_only_gemv_k_splits).
  m.def("weight_only_linear_workspace_bytes", &weight_only_linear_workspace_bytes, py::arg("n"), py::arg("k"),
        py::arg("num_rows") = 0);
  m.def("weight_only_gemv_supported", &weight_only_gemv_supported, py::arg("k"), py::arg("group_size"),
        py::arg("int4"));
  m.def("weight_only_gemv_k_splits", &weight_only_gemv_k_splits, py::arg("n"), py::arg("k"));
  m.def("weight_only_pack_int4", [p](uintptr_t codes, int64_t num_bytes, uintptr_t stream) {
    weight_only_pack_int4(p(codes), num_bytes, p(stream));
  }, py::arg("codes"), py::arg("num_bytes"), py::arg("stream") = uintptr_t{0});
  m.def("weight_only_linear", [p, dtype](uintptr_t y, uintptr_t x, uintptr_t codes, uintptr_t scale, uintptr_t offset,
                                         uintptr_t bias, int64_t T, int64_t N, int64_t K, int64_t group_size, bool int4,
                                         const std::string& x_dtype, const std::string& y_dtype, uintptr_t workspace,
                                         uintptr_t stream, int path, int gemv_k_splits) {
    weight_only_linear_for_tests(p(y), p(x), p(codes), p(scale), p(offset), p(bias), T, N, K, group_size, int4,
                                 dtype(x_dtype), dtype(y_dtype), path, gemv_k_splits, p(workspace), p(stream));
  }, py::arg("y"), py::arg("x"), py::arg("codes"), py::arg("scale"), py::arg("offset"), py::arg("bias"),
     py::arg("num_rows"), py::arg("n"), py::arg("k"), py::arg("group_size"), py::arg("int4"), py::arg("x_dtype"),
     py::arg("y_dtype"), py::arg("workspace"), py::arg("stream") = uintptr_t{0}, py::kw_only(), py::arg("path") = 0,
     py::arg("gemv_k_splits") = 0);
}

}  // namespace rtllm::bindings

#endif  // RTLLM_WITH_CUDA
