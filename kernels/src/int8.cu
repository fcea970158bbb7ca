// INT8 linears (int8_linear): per-token activation quantization and the scale epilogue of cuBLASLt's
// int8 GEMM (rtllm/kernels/int8.cuh states the arithmetic).
#include <algorithm>

#include "dispatch.cuh"
#include "rtllm/kernels/int8.cuh"

namespace rtllm::kernels {
namespace {

constexpr int kQuantThreads = 256;
constexpr float kInt8Max = 127.0f;

template <typename T>
__device__ __forceinline__ void smoothed8(const Vec8<T>& xv, const float* pqs, int64_t k0, float* xs) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float v = to_float(xv.v[i]);
    xs[i] = pqs ? __fmul_rn(v, pqs[k0 + i]) : v;
  }
}

// One block per row: amax of the smoothed row, then its codes (the row is read twice; the second read
// hits L1/L2).
template <typename T>
__global__ void __launch_bounds__(kQuantThreads) int8_quantize_kernel(int8_t* q, float* a_scale, const T* x,
                                                                      const float* pqs, int64_t k) {
  __shared__ float scratch[32];
  pdl_begin();
  const int64_t row = blockIdx.x, num_vecs = k / 8;
  const T* xr = x + row * k;
  float amax = 0.0f;
  for (int64_t v = threadIdx.x; v < num_vecs; v += blockDim.x) {
    float xs[8];
    smoothed8(load8(xr + v * 8), pqs, v * 8, xs);
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(xs[i]));
  }
  amax = block_max(amax, scratch);
  const float scale = amax > 0.0f ? __fdiv_rn(amax, kInt8Max) : 1.0f;
  if (threadIdx.x == 0) a_scale[row] = scale;
  int8_t* qr = q + row * k;
  for (int64_t v = threadIdx.x; v < num_vecs; v += blockDim.x) {
    float xs[8];
    smoothed8(load8(xr + v * 8), pqs, v * 8, xs);
    uint32_t packed[2] = {0, 0};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      // rintf: round half to even; the clamp keeps -128 out (codes are symmetric)
      const float c = fminf(fmaxf(rintf(__fdiv_rn(xs[i], scale)), -kInt8Max), kInt8Max);
      packed[i / 4] |= (uint32_t(static_cast<int32_t>(c)) & 0xffu) << (8 * (i % 4));
    }
    *reinterpret_cast<uint2*>(qr + v * 8) = make_uint2(packed[0], packed[1]);
  }
}

template <typename TB, typename TY>
__global__ void int8_epilogue_kernel(TY* y, const int32_t* acc, const float* a_scale, const float* w_scale,
                                     const TB* bias, int64_t m, int64_t n) {
  pdl_begin();
  const int64_t total = m * n;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = i / n, col = i % n;
    float v = __fmul_rn(__fmul_rn(__int2float_rn(acc[i]), a_scale[row]), w_scale[col]);
    if (bias) v = __fadd_rn(v, to_float(bias[col]));
    y[i] = from_float<TY>(v);
  }
}

unsigned grid_for(int64_t items, int threads) {
  return (unsigned)std::min<int64_t>(std::max<int64_t>(ceil_div(items, threads), 1), 65535);
}

}  // namespace

cudaError_t int8_quantize_per_token(int8_t* q, float* a_scale, const void* x, const float* pre_quant_scale,
                                    int64_t m, int64_t k, DType dtype, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(q && a_scale && x && m >= 0 && k > 0 && k % 8 == 0 && aligned16(x) && aligned16(q));
  RTLLM_KERNEL_CHECK(m <= INT32_MAX);
  if (m == 0) return cudaSuccess;
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    launch_pdl(int8_quantize_kernel<T>, (unsigned)m, kQuantThreads, 0, stream, q, a_scale, static_cast<const T*>(x),
               pre_quant_scale, k);
  });
  return cudaGetLastError();
}

cudaError_t int8_scale_epilogue(void* y, const int32_t* acc, const float* a_scale, const float* w_scale,
                                const void* bias, int64_t m, int64_t n, DType bias_dtype, DType y_dtype,
                                cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(y && acc && a_scale && w_scale && m >= 0 && n >= 0);
  RTLLM_KERNEL_CHECK(y_dtype == bias_dtype || y_dtype == DType::kFP32);
  if (m == 0 || n == 0) return cudaSuccess;
  const unsigned grid = grid_for(m * n, 256);
  RTLLM_DISPATCH_DTYPE(bias_dtype, TB, {
    if (y_dtype == DType::kFP32)
      launch_pdl(int8_epilogue_kernel<TB, float>, grid, 256, 0, stream, static_cast<float*>(y), acc, a_scale, w_scale,
                 static_cast<const TB*>(bias), m, n);
    else
      launch_pdl(int8_epilogue_kernel<TB, TB>, grid, 256, 0, stream, static_cast<TB*>(y), acc, a_scale, w_scale,
                 static_cast<const TB*>(bias), m, n);
  });
  return cudaGetLastError();
}

}  // namespace rtllm::kernels
