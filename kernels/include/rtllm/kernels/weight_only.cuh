// Weight-only integer linears (docs/engine_format.md, weight_only_linear): y[m, n] = x[m, k] · W[n, k]ᵀ
// (+ bias[n]) with W[n, k] = q[n, k] · scale[n, k / G] + offset[n, k / G], the codes q int8 or packed
// signed int4 (two per byte, the even k in the low nibble) in the engine's row-major [n, k] layout.
//
// On CUDA scale and offset arrive in the activation dtype T (bf16 or fp16: the op places them so). The
// dequantize + GEMM path and the GEMV for groups smaller than 128 use each weight as W = fma(q, scale,
// offset) rounded once to T (q is exact in T), the same W in both. The int4 GEMV for groups of a multiple
// of 128 codes (per channel included) applies scale and offset to float32 sums of the codes instead: its
// weights are q · scale + offset unrounded (kernels/src/weight_only.cu, int4_gemv_kernel).
//
// int4 codes of the shapes the GEMV takes (woq_gemv_supported) are kept in the MMA layout, made once at load
// by woq_pack_int4: in each 32-bit word of a row (codes 8i .. 8i+7), the nibbles hold q + 8 (0 .. 15) of
// the codes 8i, 8i+2, 8i+4, 8i+6, 8i+1, 8i+3, 8i+5, 8i+7, so that one AND/OR yields codes (2j, 2j+1) as a
// pair of T values in k order, the order of the activations. int8 codes and int4 codes of other shapes stay
// as stored.
#pragma once

#include "rtllm/kernels/common.cuh"

namespace rtllm::kernels {

// Whether the GEMV takes this shape: rows of codes a whole number of 16-byte vectors (k % 16 == 0 for
// int8, k % 32 == 0 for int4) and groups a whole number of a lane's codes (16 int8 or 32 int4 codes); int4
// rows below 2^21 codes.
RTLLM_API bool woq_gemv_supported(int64_t k, int64_t group_size, bool int4);

// The engine's packed int4 codes (two per byte, the even k in the low nibble) -> the MMA layout, in place:
// num_bytes a multiple of 4, codes 4-byte aligned. Rows of the GEMV's shapes are whole 16-byte vectors, so
// a whole weight is packed at once.
RTLLM_API cudaError_t woq_pack_int4(void* codes, int64_t num_bytes, cudaStream_t stream);

// y [m, n] (dtype, or kFP32) = x [m, k] (dtype) · Wᵀ + bias [n] (dtype, may be null). codes: [n, k] int8 or
// [n, k / 2] int4 bytes in the MMA layout, 16-byte aligned; scale, offset (may be null): [n, k / group_size] in
// dtype; n <= 1048560. Any m (CTAs of 16 tokens, each rereading the weight tile, mostly from L2); fp32
// accumulation on tensor cores (mma.sync m16n8k16), a fixed summation order: deterministic. k_splits: the warps that split K (1, 2, 4 or 8; the
// order of the sums, and so the result's last bits, depends on it), 0 for woq_gemv_k_splits(n, k).
RTLLM_API cudaError_t woq_gemv(void* y, const void* x, const void* codes, const void* scale, const void* offset,
                               const void* bias, int32_t m, int32_t n, int32_t k, int32_t group_size, bool int4,
                               DType dtype, DType y_dtype, cudaStream_t stream, int32_t k_splits = 0);

// The GEMV's own choice of k_splits for an [n, k] weight: a function of the shape alone, so a token's
// result does not depend on the other tokens of the call.
RTLLM_API int32_t woq_gemv_k_splits(int32_t n, int32_t k);

// w [n, k] (dtype) = the dequantized weight W = fma(q, scale, offset) rounded to dtype; any k and group_size
// (even k and group_size for int4; int4 codes of the GEMV's shapes in the MMA layout, w and codes then
// 16-byte aligned), for cuBLASLt's GEMM on larger batches.
RTLLM_API cudaError_t woq_dequantize(void* w, const void* codes, const void* scale, const void* offset, int32_t n,
                                     int32_t k, int32_t group_size, bool int4, DType dtype, cudaStream_t stream);

// The int4 GEMM on Hopper (kernels/src/weight_only_gemm.cu): y [m, n] (dtype, or kFP32) = x [m, k] (dtype) ·
// Wᵀ + bias [n] (dtype, may be null), W = fma(q, scale, offset) rounded to dtype as woq_dequantize's, float32
// sums rounded once. codes in the MMA layout (woq_pack_int4); x_perm: woq_gemm_int4_workspace_bytes(m, k) of
// workspace (the activations re-ordered for the MMAs). Needs compute capability 9.0 (an sm_90a build),
// k % 128 == 0 and group_size a multiple of 32 dividing k (woq_gemm_int4_supported).
RTLLM_API cudaError_t woq_gemm_int4(void* y, const void* x, void* x_perm, const void* codes, const void* scale,
                                    const void* offset, const void* bias, int32_t m, int32_t n, int32_t k,
                                    int32_t group_size, DType dtype, DType y_dtype, cudaStream_t stream);
RTLLM_API bool woq_gemm_int4_supported(int cc_major, int cc_minor, int64_t k, int64_t group_size);
RTLLM_API size_t woq_gemm_int4_workspace_bytes(int64_t m, int64_t k);

// y [m, n] (dtype, or kFP32) = acc [m, n] (float32) + bias [n] (dtype), rounded once; acc may be y when y is
// float32. The bias of the GEMM path: cuBLASLt's bias epilogue takes the bias only in the output type, and
// for 16-bit outputs it may round the product to the output type before adding the bias.
RTLLM_API cudaError_t woq_add_bias(void* y, const float* acc, const void* bias, int32_t m, int32_t n, DType dtype,
                                   DType y_dtype, cudaStream_t stream);

}  // namespace rtllm::kernels
