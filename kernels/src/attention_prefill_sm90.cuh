// The Hopper prefill attention kernel (attention_prefill_sm90.cu), called by attention_prefill.cu.
#pragma once

#include "dispatch.cuh"
#include "rtllm/kernels/kv_cache.cuh"

namespace rtllm::kernels {

// Whether the current device and this call take prefill_sm90: compute capability 9.0, a pool of the
// activation dtype (bf16 or fp16), head_dim 128, a GQA group dividing 128 and 8 to 128 tokens per block
// dividing 128.
bool prefill_sm90_supported(const PagedKv& kv, DType dtype, int32_t head_dim, int32_t group);

// attention_prefill's contract for such calls; scale_log2 = softmax scale · log2(e).
cudaError_t prefill_sm90(void* out, const void* q, const StepMetaDevice& meta, const PagedKv& kv,
                         int32_t max_new_tokens, int32_t num_heads, int32_t group, float scale_log2, DType dtype,
                         cudaStream_t stream);

}  // namespace rtllm::kernels
