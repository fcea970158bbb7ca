// Row-wise and elementwise ops without reductions (T = bf16 or fp16, row-major contiguous).
//
// Every value is computed in float32 and rounded to T once. Sizes that are multiples of 8 with
// 16-byte aligned pointers take 16-byte vector paths; other sizes fall back to scalar code.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "rtllm/common.h"
#include "rtllm/kernels/common.cuh"

namespace rtllm::kernels {

// out [num_tokens, hidden] = table[ids[t]], table [num_table_rows, hidden]. An id outside
// [0, num_table_rows) is a caller error the launcher cannot see (ids live on the device): it is clamped
// into the table rather than read out of bounds.
RTLLM_API cudaError_t embedding(void* out, const int32_t* ids, const void* table, int64_t num_tokens,
                                int64_t hidden, int64_t num_table_rows, DType dtype, cudaStream_t stream);

// out[i] = a[i] + b[i] / a[i] · b[i] for i < n. out may alias a or b.
RTLLM_API cudaError_t add(void* out, const void* a, const void* b, int64_t n, DType dtype, cudaStream_t stream);
RTLLM_API cudaError_t mul(void* out, const void* a, const void* b, int64_t n, DType dtype, cudaStream_t stream);

// out[i] = x[i] / (1 + exp(-x[i])). out may alias x.
RTLLM_API cudaError_t silu(void* out, const void* x, int64_t n, DType dtype, cudaStream_t stream);

// x [num_rows, 2 · inter] (gate columns, then up columns) -> out [num_rows, inter] = silu(gate) · up.
// fp8_out_scale > 0: out is E4M3 codes of that product (rounded to T) / fp8_out_scale, one byte each
// (docs/engine_format.md, "FP8 outputs"; inter a multiple of 8, 16-byte aligned rows); 0: elements of T.
RTLLM_API cudaError_t silu_mul(void* out, const void* x, int64_t num_rows, int64_t inter, DType dtype,
                               cudaStream_t stream, float fp8_out_scale = 0.0f);

// out [num_rows, row_size] = x[index[r]] (x has num_src_rows rows; indices are clamped like embedding).
RTLLM_API cudaError_t gather_rows(void* out, const void* x, const int32_t* index, int64_t num_rows,
                                  int64_t row_size, int64_t num_src_rows, DType dtype, cudaStream_t stream);

// out[i] = float(x[i]) for i < n (logits to float32 for the sampler). kFP32 input is copied.
RTLLM_API cudaError_t cast_to_float(float* out, const void* x, int64_t n, DType dtype, cudaStream_t stream);

// out[i] = x[i] converted between float dtypes (FP32, BF16, FP16, FP8 E4M3/E5M2): widening is exact,
// narrowing rounds to nearest even once; FP8 saturates finite values (rtllm::convert_floats on the host
// gives the same bits). The reference for quantized weights and caches; not on a hot path.
RTLLM_API cudaError_t convert(void* out, DType out_dtype, const void* x, DType x_dtype, int64_t n,
                              cudaStream_t stream);

// *amax = max(*amax, max_i |x[i]|) for i < n, x of a float dtype (FP32, BF16, FP16); a NaN in x makes
// *amax NaN. Calibration's observer of activation ranges, not on a hot path.
RTLLM_API cudaError_t amax(float* out, const void* x, int64_t n, DType dtype, cudaStream_t stream);

}  // namespace rtllm::kernels
