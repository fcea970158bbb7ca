// rtllm._core.kernels INT8 entries: the int8_linear op's code path on device pointers (tests).
#ifdef RTLLM_WITH_CUDA

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings.h"
#include "rtllm/common.h"
#include "rtllm/dtype.h"

namespace py = pybind11;

namespace rtllm {
// cpp/src/cuda/cuda_int8_linear.cc
RTLLM_API size_t int8_linear_workspace_bytes(int64_t T, int64_t N, int64_t K);
RTLLM_API void int8_linear_for_tests(void* y, const void* x, const void* w, const void* w_scale,
                                     const void* pre_quant_scale, const void* bias, int64_t T, int64_t N, int64_t K,
                                     DataType x_dtype, DataType y_dtype, void* workspace, void* stream);
}  // namespace rtllm

namespace rtllm::bindings {

void bind_int8_kernels(py::module_& m) {
  auto p = [](uintptr_t a) { return reinterpret_cast<void*>(a); };
  m.def("int8_linear_workspace_bytes", &int8_linear_workspace_bytes, py::arg("num_rows"), py::arg("n"), py::arg("k"));
  // Dtypes by safetensors name ("BF16", "F16", "F32"); pre_quant_scale and bias 0: none.
  m.def("int8_linear", [p](uintptr_t y, uintptr_t x, uintptr_t w, uintptr_t w_scale, uintptr_t pre_quant_scale,
                           uintptr_t bias, int64_t T, int64_t N, int64_t K, const std::string& x_dtype,
                           const std::string& y_dtype, uintptr_t workspace, uintptr_t stream) {
    int8_linear_for_tests(p(y), p(x), p(w), p(w_scale), p(pre_quant_scale), p(bias), T, N, K, parse_dtype(x_dtype),
                          parse_dtype(y_dtype), p(workspace), p(stream));
  }, py::arg("y"), py::arg("x"), py::arg("weight"), py::arg("weight_scale"), py::arg("pre_quant_scale"),
     py::arg("bias"), py::arg("num_rows"), py::arg("n"), py::arg("k"), py::arg("x_dtype"), py::arg("y_dtype"),
     py::arg("workspace"), py::arg("stream") = uintptr_t{0});
}

}  // namespace rtllm::bindings

#endif  // RTLLM_WITH_CUDA
