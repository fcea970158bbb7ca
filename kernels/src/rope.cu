// Rotate-half RoPE for unfused graphs: one thread per (token, head, pair i < head_dim / 2).
#include <algorithm>

#include "dispatch.cuh"
#include "rtllm/kernels/rope.cuh"

namespace rtllm::kernels {
namespace {

template <typename T>
__global__ void rope_kernel(T* out, const T* x, const int32_t* positions, const float* inv_freq,
                            int64_t num_tokens, int32_t num_heads, int32_t head_dim) {
  pdl_begin();
  const int32_t half = head_dim / 2;
  const int64_t total = num_tokens * num_heads * half;
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int32_t i = (int32_t)(idx % half);
    const int64_t head = idx / half;  // token * num_heads + h
    const int64_t t = head / num_heads;
    const float f = (float)positions[t] * inv_freq[i];
    float s, c;
    sincosf(f, &s, &c);
    const int64_t base = head * head_dim;
    const float x1 = to_float(x[base + i]), x2 = to_float(x[base + i + half]);
    out[base + i] = from_float<T>(x1 * c - x2 * s);
    out[base + i + half] = from_float<T>(x2 * c + x1 * s);
  }
}

}  // namespace

cudaError_t rope(void* out, const void* x, const int32_t* positions, const float* inv_freq, int64_t num_tokens,
                 int32_t num_heads, int32_t head_dim, DType dtype, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(out && x && positions && inv_freq && num_tokens >= 0 && num_heads > 0);
  RTLLM_KERNEL_CHECK(head_dim > 0 && head_dim % 2 == 0 && head_dim <= 256);
  const int64_t total = num_tokens * num_heads * (head_dim / 2);
  if (total == 0) return cudaSuccess;
  const unsigned blocks = (unsigned)std::min<int64_t>(ceil_div(total, 256), 65536);
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    launch_pdl(rope_kernel<T>, blocks, 256, 0, stream, static_cast<T*>(out), static_cast<const T*>(x), positions,
               inv_freq, num_tokens, num_heads, head_dim);
  });
  return cudaGetLastError();
}

}  // namespace rtllm::kernels
