// FP8 (E4M3) linears (docs/engine_format.md, fp8_linear): activation quantization, a bandwidth-bound
// small-M GEMV over FP8 weights, and the scale epilogue of an unscaled FP8 GEMM.
//
// Scales: `a_scale` is the activation scale, per row ([m], a_per_row) or one value ([1]); `w_scale` the
// weight scale, per output channel ([n], w_per_channel) or one value. Every output is
//   y[i, j] = (acc[i, j] · a_scale) · w_scale (+ bias[j]),  acc = Σ_k q[i, k] · w[j, k] in float32,
// rounded once to y's dtype. Scales are device pointers (they may be written by an earlier kernel).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "rtllm/common.h"
#include "rtllm/kernels/common.cuh"

namespace rtllm::kernels {

constexpr int32_t kFp8GemvMaxM = 16;
// fp8_gemm's output tile per CTA: rows (tokens) x columns (output channels).
constexpr int32_t kFp8GemmTileM = 128, kFp8GemmTileN = 256;
constexpr float kFp8E4M3Max = 448.0f;

// Per token: s[i] = max(amax_k |x[i, k]| / 448, FLT_MIN), q[i, k] = e4m3(x[i, k] / s[i]) (float32
// division, round to nearest even, saturating). x [m, k] of dtype (bf16 or fp16), q [m, k] bytes, s [m].
// k % 8 == 0; x and q 16-byte aligned.
RTLLM_API cudaError_t fp8_quantize_per_token(void* q, float* s, const void* x, int64_t m, int64_t k, DType dtype,
                                             cudaStream_t stream);

// Static: q[i, k] = e4m3(x[i, k] / *input_scale). Same layout requirements.
RTLLM_API cudaError_t fp8_quantize_static(void* q, const void* x, const float* input_scale, int64_t m, int64_t k,
                                          DType dtype, cudaStream_t stream);

// y [m, n] from q [m, k] and weight [n, k] (E4M3 bytes, row-major), bias [n] of bias_dtype (bf16/fp16)
// or null; y of y_dtype (bf16, fp16 or fp32). 1 <= m <= kFp8GemvMaxM, k % 16 == 0, q and weight 16-byte
// aligned. Bound by streaming the weight once: E4M3 tensor-core MMAs (compute capability 8.9+) on 16-byte
// loads (kernels/src/mma_gemv.cuh), K split across the warps of a CTA. acc is the tensor cores' float32 sum:
// within 2^-9 of Σ_k |q·w| of the exact one, as cuBLASLt's FP8 GEMM.
RTLLM_API cudaError_t fp8_gemv(void* y, const void* q, const float* a_scale, bool a_per_row, const void* weight,
                               const float* w_scale, bool w_per_channel, const void* bias, int32_t m, int32_t n,
                               int32_t k, DType bias_dtype, DType y_dtype, cudaStream_t stream);

// Whether fp8_gemv takes this shape.
RTLLM_API bool fp8_gemv_supported(int32_t m, int32_t k);

// y [m, n] from q [m, k] and weight [n, k] (E4M3 bytes, row-major) with the scales and bias above: the
// Hopper GEMM (wgmma fed by TMA, the scales applied to the float32 accumulators in its epilogue). Needs
// compute capability 9.0 (an sm_90a build), k % 16 == 0, q and weight 16-byte aligned (fp8_gemm_supported).
RTLLM_API cudaError_t fp8_gemm(void* y, const void* q, const float* a_scale, bool a_per_row, const void* weight,
                               const float* w_scale, bool w_per_channel, const void* bias, int64_t m, int64_t n,
                               int64_t k, DType bias_dtype, DType y_dtype, cudaStream_t stream);

// Whether fp8_gemm runs on a device of this compute capability and takes this shape.
RTLLM_API bool fp8_gemm_supported(int cc_major, int cc_minor, int64_t m, int64_t n, int64_t k);

// y [m, n] from the float32 accumulators acc [m, n] of an unscaled FP8 GEMM, with the scales and bias above.
RTLLM_API cudaError_t fp8_scale_epilogue(void* y, const float* acc, const float* a_scale, bool a_per_row,
                                         const float* w_scale, bool w_per_channel, const void* bias, int64_t m,
                                         int64_t n, DType bias_dtype, DType y_dtype, cudaStream_t stream);

}  // namespace rtllm::kernels
