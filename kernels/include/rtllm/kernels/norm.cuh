// RMSNorm and fused residual-add + RMSNorm over rows of [num_rows, row_size] (T = bf16 or fp16).
//
// Math in float32 like the CPU ops: inv_rms = 1 / sqrt(mean(x²) + eps), y = weight · (x · inv_rms),
// rounded to T once. Rows must be 16-byte aligned (row_size and group_size multiples of 8).
// fp8_out_scale > 0: the normed output is E4M3 codes of y (rounded to T) / fp8_out_scale, one byte each
// (docs/engine_format.md, "FP8 outputs"), and aliases no input; 0: elements of T.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "rtllm/common.h"
#include "rtllm/kernels/common.cuh"

namespace rtllm::kernels {

// out, x [num_rows, row_size]; weight [group_size]; each run of group_size values of a row is normalized
// on its own (group_size < row_size is a per-head norm). group_size divides row_size. out may alias x.
RTLLM_API cudaError_t rms_norm(void* out, const void* x, const void* weight, int64_t num_rows, int64_t row_size,
                               int64_t group_size, float eps, DType dtype, cudaStream_t stream,
                               float fp8_out_scale = 0.0f);

// sum = x + residual (rounded to T), normed = rms_norm(sum) computed from the rounded sum.
// All [num_rows, row_size]; weight [row_size]. sum may alias residual or x; normed aliases nothing.
RTLLM_API cudaError_t add_rms_norm(void* normed, void* sum, const void* x, const void* residual,
                                   const void* weight, int64_t num_rows, int64_t row_size, float eps, DType dtype,
                                   cudaStream_t stream, float fp8_out_scale = 0.0f);

}  // namespace rtllm::kernels
