// Types shared by every kernel family's host-side launcher declarations.
//
// Host-side only (plain C++ + cuda_runtime_api.h), so g++ can include it from cpp/src/cuda/*.cc.
// Launchers take raw device pointers, sizes and a stream and return cudaError_t:
// cudaErrorInvalidValue for arguments they do not support (null pointers, sizes, alignment, dtype),
// otherwise cudaGetLastError() after the launch. No launcher allocates or synchronizes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "rtllm/common.h"

namespace rtllm::kernels {

// Activation / weight / KV-cache element type. Each launcher lists the ones it supports. FP8 E4M3 is
// the OCP "fn" variant (max 448, no infinities); kINT4 packs two signed values per byte, the even
// index in the low nibble (rtllm::DataType::kInt4).
enum class DType : int32_t { kBF16 = 0, kFP16 = 1, kFP32 = 2, kFP8E4M3 = 3, kFP8E5M2 = 4, kINT8 = 5, kINT4 = 6 };

inline int dtype_bits(DType dtype) {
  switch (dtype) {
    case DType::kFP32: return 32;
    case DType::kBF16:
    case DType::kFP16: return 16;
    case DType::kINT4: return 4;
    default: return 8;
  }
}
// Bytes of one element of a byte-sized or wider dtype (kINT4: use dtype_bits).
inline int64_t dtype_size(DType dtype) { return dtype_bits(dtype) / 8; }

// cudaGetErrorString of the CUDA runtime librtllm links, for callers (the Python bindings) that do not
// link one themselves.
RTLLM_API const char* error_string(cudaError_t err);

// Whether the decode-path kernels use programmatic dependent launch: on devices of compute capability
// 9.0 and later, unless the environment sets RTLLM_PDL=0. Decided once, for the device current at the
// first call.
RTLLM_API bool programmatic_launch_enabled();

}  // namespace rtllm::kernels
