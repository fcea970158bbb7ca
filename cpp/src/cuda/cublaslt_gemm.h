// Dense linear layers through cuBLASLt: y[T, N] = x[T, K] · W[N, K]ᵀ (+ bias[N]), bf16/fp16 operands,
// float32 accumulation, y in the operand dtype or float32. One handle and one workspace allocated at
// load; the plan (descriptors + heuristic algorithm) of each distinct shape is built once and cached.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <map>
#include <memory>
#include <tuple>

#include "rtllm/dtype.h"

namespace rtllm {

class CublasLtGemm {
 public:
  explicit CublasLtGemm(size_t workspace_bytes);
  ~CublasLtGemm();
  CublasLtGemm(const CublasLtGemm&) = delete;
  CublasLtGemm& operator=(const CublasLtGemm&) = delete;

  // x [T, K] and w [N, K] of dtype ab_dtype, y [T, N] of y_dtype, bias [N] of ab_dtype or null.
  // Throws Error on a cuBLASLt failure or when no algorithm supports the shape.
  void linear(void* y, const void* x, const void* w, const void* bias, int64_t T, int64_t N, int64_t K,
              DataType ab_dtype, DataType y_dtype, cudaStream_t stream);

 private:
  struct Plan;
  using Key = std::tuple<int64_t, int64_t, int64_t, int, int, bool>;  // T, N, K, ab, y, bias
  Plan& plan(const Key& key);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

}  // namespace rtllm
