// Rotate-half RoPE for unfused graphs (fused graphs apply it in qkv_prepare).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "rtllm/common.h"
#include "rtllm/kernels/common.cuh"

namespace rtllm::kernels {

// x, out [num_tokens, num_heads · head_dim] (T = bf16 or fp16); positions [num_tokens];
// inv_freq [head_dim / 2] float32. Per head: f_i = float(pos) · inv_freq[i] (float32),
// y[i] = x1·cos f_i − x2·sin f_i, y[i + half] = x2·cos f_i + x1·sin f_i with x1 = x[i], x2 = x[i + half].
// head_dim even and <= 256. out may alias x.
RTLLM_API cudaError_t rope(void* out, const void* x, const int32_t* positions, const float* inv_freq,
                           int64_t num_tokens, int32_t num_heads, int32_t head_dim, DType dtype,
                           cudaStream_t stream);

}  // namespace rtllm::kernels
