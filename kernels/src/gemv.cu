// gemv: y [m, n] = x [m, k] · W [n, k]ᵀ (+ bias) for m <= 8, bound by reading W once.
//
// Each warp owns R consecutive weight rows (output features): lane l reads the 16-byte vectors
// l, l + 32, ... of each, U of them per row issued before the first is used. The weight is streamed
// (__ldcs: not kept in L1); x (m · k · 2 bytes, shared by every warp) is read through the read-only
// cache. Accumulation in float32, one warp reduction per output. Launched as a programmatic dependent
// launch, each warp starts reading its weights while the kernel before it is still finishing.
//
// The RMSNorm before the product and the SiLU gate after the gate/up product stay separate kernels:
// the extra loads and arithmetic per weight vector, or fewer loads in flight, cost more than the launch
// they would save (docs/performance.md, "Design decisions and their measurements").
#include "dispatch.cuh"
#include "rtllm/kernels/gemv.cuh"

namespace rtllm::kernels {
namespace {

constexpr int kWarps = 4;  // warps per block
// Shape of one warp's work: R weight rows at once (each x vector read from L1 then serves R rows, which
// matters for larger m) and U 16-byte loads per row in flight per lane (R · U loads in all).
// m <= 2: R = 1, U = 4, 8 resident blocks (64 registers) so one wave holds 4096 rows on 132 SMs.
// (U = 8 at m = 1 spills at that 64-register cap; see docs/performance.md, "Design decisions and their
// measurements".)
template <int M>
__host__ __device__ constexpr int rows_per_warp() { return M <= 2 ? 1 : 4; }
template <int M>
__host__ __device__ constexpr int unroll_for() { return M <= 2 ? 4 : 2; }

template <typename T, typename TY, int M>
__global__ void __launch_bounds__(kWarps * 32, M <= 2 ? 8 : 1) gemv_kernel(TY* y, const T* x, const T* weight,
                                                                          const T* bias, int32_t n, int32_t k) {
  constexpr int R = rows_per_warp<M>(), U = unroll_for<M>();
  const int lane = threadIdx.x & 31;
  const int32_t row0 = (blockIdx.x * kWarps + threadIdx.x / 32) * R;
  const int32_t num_vecs = k / 8;
  Vec8<T> wv[U][R];
  auto load_weights = [&](int32_t base) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int32_t v = base + u * 32 + lane;
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (v < num_vecs && row0 + r < n) wv[u][r] = load8_stream(weight + (int64_t)(row0 + r) * k + (int64_t)v * 8);
    }
  };
  // The weights do not depend on earlier kernels: the first loads are issued before waiting for them.
  load_weights(0);
  pdl_begin();
  if (row0 >= n) return;  // the whole warp
  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int mi = 0; mi < M; ++mi) acc[r][mi] = 0.0f;

  for (int32_t base = 0; base < num_vecs; base += 32 * U) {
    if (base > 0) load_weights(base);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int32_t v = base + u * 32 + lane;
      if (v < num_vecs) {
        float wf[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r) to_float8(wv[u][r], wf[r]);  // rows past n: unused garbage
#pragma unroll
        for (int mi = 0; mi < M; ++mi) {
          Vec8<T> xv;
          *reinterpret_cast<uint4*>(&xv) = __ldg(reinterpret_cast<const uint4*>(x + (int64_t)mi * k + (int64_t)v * 8));
          float xf[8];
          to_float8(xv, xf);
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[r][mi] += wf[r][i] * xf[i];
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int mi = 0; mi < M; ++mi) acc[r][mi] = warp_sum(acc[r][mi]);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (row0 + r >= n) break;
      const float b = bias ? to_float(bias[row0 + r]) : 0.0f;
#pragma unroll
      for (int mi = 0; mi < M; ++mi) y[(int64_t)mi * n + row0 + r] = from_float<TY>(acc[r][mi] + b);
    }
  }
}

template <typename T, typename TY, int M>
void launch(void* y, const void* x, const void* weight, const void* bias, int32_t n, int32_t k, cudaStream_t stream) {
  const int64_t rows_per_block = (int64_t)kWarps * rows_per_warp<M>();
  launch_pdl(gemv_kernel<T, TY, M>, (unsigned)ceil_div(n, rows_per_block), kWarps * 32, 0, stream,
      static_cast<TY*>(y), static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias), n, k);
}

template <typename T, typename TY>
void launch_for_m(void* y, const void* x, const void* weight, const void* bias, int32_t m, int32_t n, int32_t k,
                  cudaStream_t stream) {
  switch (m) {
    case 1: launch<T, TY, 1>(y, x, weight, bias, n, k, stream); break;
    case 2: launch<T, TY, 2>(y, x, weight, bias, n, k, stream); break;
    case 3: launch<T, TY, 3>(y, x, weight, bias, n, k, stream); break;
    case 4: launch<T, TY, 4>(y, x, weight, bias, n, k, stream); break;
    case 5: launch<T, TY, 5>(y, x, weight, bias, n, k, stream); break;
    case 6: launch<T, TY, 6>(y, x, weight, bias, n, k, stream); break;
    case 7: launch<T, TY, 7>(y, x, weight, bias, n, k, stream); break;
    default: launch<T, TY, 8>(y, x, weight, bias, n, k, stream); break;
  }
}

}  // namespace

bool gemv_supported(int32_t m, int32_t k) { return m >= 1 && m <= kGemvMaxM && k > 0 && k % 8 == 0; }

cudaError_t gemv(void* y, const void* x, const void* weight, const void* bias, int32_t m, int32_t n, int32_t k,
                 DType dtype, DType y_dtype, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(y && x && weight && n >= 0 && gemv_supported(m, k));
  RTLLM_KERNEL_CHECK(aligned16(x) && aligned16(weight));
  RTLLM_KERNEL_CHECK(y_dtype == dtype || y_dtype == DType::kFP32);
  if (n == 0) return cudaSuccess;
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    if (y_dtype == DType::kFP32) launch_for_m<T, float>(y, x, weight, bias, m, n, k, stream);
    else launch_for_m<T, T>(y, x, weight, bias, m, n, k, stream);
  });
  return cudaGetLastError();
}

}  // namespace rtllm::kernels
