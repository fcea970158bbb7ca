// Bandwidth-bound small-M linear for decode: y = x · Wᵀ (+ bias) with the weight streamed once.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "rtllm/common.h"
#include "rtllm/kernels/common.cuh"

namespace rtllm::kernels {

constexpr int32_t kGemvMaxM = 64;

// y [m, n], x [m, k], weight [n, k] (row-major, one output feature per row), bias [n] or null; x, weight
// and bias of `dtype` (bf16 or fp16), float32 accumulation; y of y_dtype (`dtype`, rounded once, or
// kFP32: the logits of an LM head). m in [1, kGemvMaxM]; k % 8 == 0; n <= 1048560; x, weight 16-byte
// aligned. Tensor-core MMAs on 16-byte weight loads, several in flight per lane, K split across the warps
// of a CTA; a fixed summation order that depends on n and k only (deterministic, and a token's result
// does not depend on the others of the call).
RTLLM_API cudaError_t gemv(void* y, const void* x, const void* weight, const void* bias, int32_t m, int32_t n,
                           int32_t k, DType dtype, DType y_dtype, cudaStream_t stream);

// Whether gemv takes this shape (the runtime falls back to cuBLASLt otherwise).
RTLLM_API bool gemv_supported(int32_t m, int32_t k);

}  // namespace rtllm::kernels
