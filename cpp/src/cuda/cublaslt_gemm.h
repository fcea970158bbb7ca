// Dense linear layers through cuBLASLt: y[T, N] = x[T, K] · W[N, K]ᵀ (+ bias[N]), bf16/fp16 operands,
// float32 accumulation, y in the operand dtype or float32. One handle and one workspace allocated at
// load; the plan (descriptors + heuristic algorithm) of each distinct shape is built once and cached
// (with RTLLM_CUBLASLT_BUCKETS=1, the heuristic's answer for a bucket of row counts: cublaslt_gemm.cc).
// FP8 linears (fp8_linear): E4M3 operands, float32 accumulation, scales applied by cuBLASLt. INT8 linears
// (int8_linear): int8 operands, exact int32 accumulators.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "rtllm/dtype.h"

namespace rtllm {

class CublasLtGemm {
 public:
  // How fp8_linear scales the accumulators: one scale per operand (w_scale[0], x_scale[0]),
  // per output channel and per token (w_scale[N], x_scale[T]: cuBLASLt's outer-vector mode), or none
  // (unit scales, float32 output: the caller applies them).
  enum class Fp8Scaling { kPerTensor, kOuterVector, kNone };
  struct Plan;  // descriptors and algorithm of one shape

  explicit CublasLtGemm(size_t workspace_bytes);
  ~CublasLtGemm();
  CublasLtGemm(const CublasLtGemm&) = delete;
  CublasLtGemm& operator=(const CublasLtGemm&) = delete;

  // Whether linear() takes rows of K ab_dtype and N y_dtype elements: cuBLASLt needs every row of x and y
  // to start kMinAlignment-aligned, which an odd N (an odd vocabulary's logits) breaks.
  static bool linear_rows_aligned(int64_t N, int64_t K, DataType ab_dtype, DataType y_dtype);

  // x [T, K] and w [N, K] of dtype ab_dtype, y [T, N] of y_dtype, bias [N] of ab_dtype or null.
  // Throws Error on a cuBLASLt failure or when no algorithm supports the shape.
  void linear(void* y, const void* x, const void* w, const void* bias, int64_t T, int64_t N, int64_t K,
              DataType ab_dtype, DataType y_dtype, cudaStream_t stream);

  // y [T, N] = (q [T, K] · w [N, K]ᵀ) scaled by x_scale and w_scale (device float32 pointers, see
  // Fp8Scaling) (+ bias [N] of bias_dtype); q and w E4M3, y of y_dtype (bf16, fp16 or float32; float32
  // with kNone). K % 16 == 0. Throws Error on a cuBLASLt failure or when no algorithm supports the shape.
  void fp8_linear(void* y, const void* q, const void* w, const float* x_scale, const float* w_scale,
                  Fp8Scaling scaling, const void* bias, int64_t T, int64_t N, int64_t K, DataType bias_dtype,
                  DataType y_dtype, cudaStream_t stream);

  // acc [T, N] int32 = q [T, K] · w [N, K]ᵀ, int8 operands summed exactly in int32 (int8_linear; the
  // caller applies the scales). K % 16 == 0, operands 16-byte aligned. Throws Error on a cuBLASLt failure
  // or when no algorithm supports the shape.
  void int8_gemm(int32_t* acc, const int8_t* q, const int8_t* w, int64_t T, int64_t N, int64_t K, cudaStream_t stream);

  // Whether cuBLASLt on the current device has an FP8 GEMM that applies `scaling` itself, for output
  // y_dtype and a bias of bias_dtype (has_bias false: none). Asked once per combination, with a
  // temporary handle, at load.
  static bool fp8_scaled_gemm_supported(Fp8Scaling scaling, DataType y_dtype, bool has_bias, DataType bias_dtype);

  // With bucketed plans (RTLLM_CUBLASLT_BUCKETS=1): asks the heuristic now for every bucket of row counts up
  // to max_rows of every shape met so far, so that no later step stops for it. Nothing otherwise.
  void warm_buckets(int64_t max_rows);

 private:
  using Key = std::tuple<int64_t, int64_t, int64_t, int, int, bool>;  // T, N, K, ab, y, bias
  Plan& plan(const Key& key);
  // T, N, K, y dtype, bias dtype (-1: none), scaling
  using Fp8Key = std::tuple<int64_t, int64_t, int64_t, int, int, int>;
  Plan& fp8_plan(const Fp8Key& key, const float* x_scale, const float* w_scale);
  std::map<Fp8Key, std::unique_ptr<Plan>> fp8_plans_;
  using Int8Key = std::tuple<int64_t, int64_t, int64_t>;  // T, N, K
  std::map<Int8Key, std::unique_ptr<Plan>> int8_plans_;

  // The algorithm of each bucket of row counts: {rows, {plan kind, N, K, three of the plan's key}}; none
  // when the heuristic had none for the bucket.
  using AlgoKeyRest = std::tuple<int, int64_t, int64_t, int, int, int>;
  using AlgoKey = std::tuple<int64_t, AlgoKeyRest>;
  using BucketAlgos = std::map<AlgoKey, std::optional<cublasLtMatmulAlgo_t>>;
  BucketAlgos bucket_algos_;
  std::map<AlgoKeyRest, std::function<void(Plan&, int64_t)>> describers_;  // of every shape met, by rows
  bool choose_algo(Plan& p, int64_t T, const AlgoKeyRest& rest, const std::function<void(Plan&, int64_t)>& describe);
  BucketAlgos::iterator bucket_algo(int64_t rows, const AlgoKeyRest& rest,
                                    const std::function<void(Plan&, int64_t)>& describe);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  bool bucket_plans_ = false;  // RTLLM_CUBLASLT_BUCKETS=1: one heuristic answer per bucket of row counts
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

}  // namespace rtllm
