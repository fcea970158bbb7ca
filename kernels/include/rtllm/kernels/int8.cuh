// INT8 linears (docs/engine_format.md, int8_linear: W8A8_SQ_PER_CHANNEL): per-token activation
// quantization and the epilogue of an int8 x int8 -> int32 GEMM (cuBLASLt's, cpp/src/cuda/cublaslt_gemm.cc).
//
//   xs[i, k] = x[i, k] · pre_quant_scale[k]          (float32; x itself when pre_quant_scale is null)
//   a_scale[i] = amax_k |xs[i, k]| / 127             (1 for a row of zeros)
//   q[i, k] = clamp(round_half_even(xs[i, k] / a_scale[i]), -127, 127)
//   y[i, j] = float(acc[i, j]) · a_scale[i] · w_scale[j] (+ bias[j]), rounded once to y's dtype,
// every float32 step rounded to nearest (no contraction), as the CPU kernel computes it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "rtllm/common.h"
#include "rtllm/kernels/common.cuh"

namespace rtllm::kernels {

// x [m, k] of dtype (bf16 or fp16), pre_quant_scale [k] float32 or null -> q [m, k] int8, a_scale [m]
// float32. One block per row (amax, then the codes). k % 8 == 0; x and q 16-byte aligned.
RTLLM_API cudaError_t int8_quantize_per_token(int8_t* q, float* a_scale, const void* x, const float* pre_quant_scale,
                                              int64_t m, int64_t k, DType dtype, cudaStream_t stream);

// y [m, n] of y_dtype (bias_dtype, or fp32) from the int32 accumulators acc [m, n], a_scale [m], w_scale [n]
// and bias [n] of bias_dtype (bf16 or fp16) or null.
RTLLM_API cudaError_t int8_scale_epilogue(void* y, const int32_t* acc, const float* a_scale, const float* w_scale,
                                          const void* bias, int64_t m, int64_t n, DType bias_dtype, DType y_dtype,
                                          cudaStream_t stream);

}  // namespace rtllm::kernels
