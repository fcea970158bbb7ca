// Shared by the CUDA backend files: the error-check macro and the per-step device state that the
// runner hands to the CUDA ops through OpContext::device_step.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "rtllm/common.h"
#include "rtllm/dtype.h"
#include "rtllm/kernels/common.cuh"
#include "rtllm/kernels/kv_cache.cuh"

// Throws rtllm::Error naming the call, the CUDA error, file and line.
#define RTLLM_CUDA_CHECK(expr)                                                                        \
  do {                                                                                                \
    const cudaError_t rtllm_cuda_err_ = (expr);                                                       \
    if (rtllm_cuda_err_ != cudaSuccess)                                                               \
      ::rtllm::detail::throw_error(__FILE__, __LINE__, __func__,                                      \
                                   ::rtllm::detail::concat(#expr, " failed: ", cudaGetErrorName(rtllm_cuda_err_), \
                                                           " (", cudaGetErrorString(rtllm_cuda_err_), ")")); \
  } while (0)

namespace rtllm {

class CublasLtGemm;
class LinearPathTuner;

inline kernels::DType kernel_dtype(DataType dtype) {
  switch (dtype) {
    case DataType::kBFloat16: return kernels::DType::kBF16;
    case DataType::kFloat16: return kernels::DType::kFP16;
    case DataType::kFloat32: return kernels::DType::kFP32;
    case DataType::kFloat8E4M3: return kernels::DType::kFP8E4M3;
    case DataType::kFloat8E5M2: return kernels::DType::kFP8E5M2;
    case DataType::kInt8: return kernels::DType::kINT8;
    case DataType::kInt4: return kernels::DType::kINT4;
    default: RTLLM_CHECK(false, "no CUDA kernel dtype for ", dtype_safetensors_name(dtype));
  }
}

struct ComputeCapability {
  int device = 0, major = 0, minor = 0;
};

// The current device and its compute capability.
inline ComputeCapability current_compute_capability() {
  ComputeCapability cc;
  RTLLM_CUDA_CHECK(cudaGetDevice(&cc.device));
  RTLLM_CUDA_CHECK(cudaDeviceGetAttribute(&cc.major, cudaDevAttrComputeCapabilityMajor, cc.device));
  RTLLM_CUDA_CHECK(cudaDeviceGetAttribute(&cc.minor, cudaDevAttrComputeCapabilityMinor, cc.device));
  return cc;
}

// What the CUDA ops need beyond their tensors and workspace, for the current step (valid during
// forward()).
struct CudaStep {
  kernels::StepMetaDevice meta;      // device arrays + num_tokens / num_seqs of the step
  const int32_t* block_table = nullptr;  // device [num_seqs, max_blocks_per_seq]
  int32_t max_blocks_per_seq = 0;
  void* const* kv_layers = nullptr;  // [num_layers] device pointers, each [num_blocks, 2, nkv, tpb, hd]
  DataType kv_cache_dtype = DataType::kBFloat16;
  int32_t num_layers = 0;
  int32_t num_kv_blocks = 0;         // blocks in each layer's pool (the scratch block included)
  int32_t tokens_per_block = 0;
  int32_t max_new_tokens = 0;        // over the step's sequences
  bool decode_only = false;          // every sequence has one new token
  int32_t decode_splits = 1;         // attention_decode split count for this step (fixed per graph)
  bool decode_fuse_prepare = false;  // a split decode step runs attention_decode_qkv (kernels::DecodePlan)
  CublasLtGemm* gemm = nullptr;
  LinearPathTuner* linear_paths = nullptr;  // the GEMV-or-cuBLASLt choice of decode-sized linears
};

}  // namespace rtllm
