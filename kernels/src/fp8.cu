// FP8 (E4M3) linears: activation quantization, the small-M GEMV over FP8 weights (on tensor cores), and
// the scale epilogue of an unscaled cuBLASLt FP8 GEMM (docs/engine_format.md, fp8_linear).
#include <cfloat>

#include "mma_gemv.cuh"
#include "rtllm/kernels/fp8.cuh"

namespace rtllm::kernels {
namespace {

constexpr int kQuantThreads = 256;

// One block per row: amax, then the row's codes.
template <typename T>
__global__ void __launch_bounds__(kQuantThreads) quantize_per_token_kernel(uint8_t* q, float* s, const T* x,
                                                                           int64_t k) {
  __shared__ float scratch[32];
  pdl_begin();
  const int64_t row = blockIdx.x, num_vecs = k / 8;
  const T* xr = x + row * k;
  float amax = 0.0f;
  for (int64_t v = threadIdx.x; v < num_vecs; v += blockDim.x) {
    const Vec8<T> xv = load8(xr + v * 8);
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(to_float(xv.v[i])));
  }
  amax = block_max(amax, scratch);
  // FLT_MIN keeps a row of zeros finite: its codes are zeros and its output the bias.
  const float scale = fmaxf(__fdiv_rn(amax, kFp8E4M3Max), FLT_MIN);
  if (threadIdx.x == 0) s[row] = scale;
  uint8_t* qr = q + row * k;
  for (int64_t v = threadIdx.x; v < num_vecs; v += blockDim.x)
    *reinterpret_cast<uint2*>(qr + v * 8) = quantize8(load8(xr + v * 8), scale);
}

template <typename T>
__global__ void __launch_bounds__(kQuantThreads) quantize_static_kernel(uint8_t* q, const T* x, const float* input_scale,
                                                                        int64_t num_vecs) {
  pdl_begin();
  const float scale = *input_scale;
  for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < num_vecs; v += (int64_t)gridDim.x * blockDim.x)
    *reinterpret_cast<uint2*>(q + v * 8) = quantize8(load8(x + v * 8), scale);
}

template <typename TY, typename TB>
__device__ __forceinline__ TY scale_output(float acc, const float* a_scale, bool a_per_row, const float* w_scale,
                                           bool w_per_channel, const TB* bias, int64_t row, int64_t col) {
  float v = acc * a_scale[a_per_row ? row : 0];
  v = v * w_scale[w_per_channel ? col : 0];
  if (bias) v += to_float(bias[col]);
  return from_float<TY>(v);
}

// ---- GEMV on tensor cores (mma_gemv.cuh) ----
//
// A lane's 16-byte load of weight row g holds the 16 codes k0 + 16t .. k0 + 16t + 15 of a 64-code step, and
// its activation load of token g the same k. Both are converted to f16 pairs (cvt.rn.f16x2.e4m3x2: every
// E4M3 value is exact in f16) and fed to four f16 MMAs, MMA i taking word i (codes 4i .. 4i+3):
//   b0 = W[g][4i, 4i+1], b1 = W[g][4i+2, 4i+3]  (slots 2t, 2t+1 and 2t+8, 2t+9), a0 / a2 likewise of x.
// (ptxas lowers the E4M3 MMA, m16n8k32, for sm_90a to such conversions and f16 MMAs too; in this kernel
// that version spilled 76 to 160 bytes per thread at the 128 registers two CTAs of 256 threads leave.)
//
// Numerics: each product of two E4M3 values is exact in the f16 MMA, whose float32 sums keep fewer guard
// bits than a chain of float32 FMAs; acc is within 2^-9 of Σ_k |q·w| of the exact sum, as cuBLASLt's FP8
// GEMM (tests/gpu/test_fp8_gpu.py). The summation order is fixed: results are deterministic.
__device__ __forceinline__ uint32_t e4m3x2_to_half2(uint32_t pair) {
  uint32_t h2 = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(static_cast<uint16_t>(pair)));
#else
  __trap();  // E4M3 conversions need compute capability 8.9; fp8_linear refuses older devices at load
#endif
  return h2;
}

struct E4m3Codes : NoSideData {
  using Act = uint8_t;
  static constexpr int kCodes = 16;
  static __device__ __forceinline__ void mmas(float (&acc)[2][4], const uint4& wv, Side, const uint32_t* xg,
                                              const uint32_t* xh) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = word(wv, i);
      mma_16x8x16<__half>(acc[i & 1], e4m3x2_to_half2(xg[i]), e4m3x2_to_half2(xh[i]), e4m3x2_to_half2(xg[i] >> 16),
                          e4m3x2_to_half2(xh[i] >> 16), e4m3x2_to_half2(w), e4m3x2_to_half2(w >> 16));
    }
  }
};

template <typename TB, typename TY>
struct Fp8Output {
  TY* y;
  const float* a_scale;
  bool a_per_row;
  const float* w_scale;
  bool w_per_channel;
  const TB* bias;
  int32_t n;
  __device__ __forceinline__ void operator()(float sum, int32_t row, int32_t col) const {
    y[(int64_t)row * n + col] = scale_output<TY>(sum, a_scale, a_per_row, w_scale, w_per_channel, bias, row, col);
  }
};

template <typename TB, typename TY>
void launch_gemv(void* y, const void* q, const float* a_scale, bool a_per_row, const void* weight,
                 const float* w_scale, bool w_per_channel, const void* bias, int32_t m, int32_t n, int32_t k,
                 cudaStream_t stream) {
  const Fp8Output<TB, TY> out{static_cast<TY*>(y), a_scale, a_per_row, w_scale, w_per_channel,
                              static_cast<const TB*>(bias), n};
  launch_mma_gemv<E4m3Codes>(mma_gemv_k_splits(n), out, q, weight, {}, m, n, k, stream);
}

template <typename TB, typename TY>
__global__ void scale_epilogue_kernel(TY* y, const float* acc, const float* a_scale, bool a_per_row,
                                      const float* w_scale, bool w_per_channel, const TB* bias, int64_t m,
                                      int64_t n) {
  pdl_begin();
  const int64_t total = m * n;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = scale_output<TY>(acc[i], a_scale, a_per_row, w_scale, w_per_channel, bias, i / n, i % n);
}

unsigned grid_for(int64_t items, int threads) {
  return (unsigned)std::min<int64_t>(std::max<int64_t>(ceil_div(items, threads), 1), 65535);
}

}  // namespace

cudaError_t fp8_quantize_per_token(void* q, float* s, const void* x, int64_t m, int64_t k, DType dtype,
                                   cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(q && s && x && m >= 0 && k > 0 && k % 8 == 0 && aligned16(x) && aligned16(q));
  RTLLM_KERNEL_CHECK(m <= INT32_MAX);
  if (m == 0) return cudaSuccess;
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    launch_pdl(quantize_per_token_kernel<T>, (unsigned)m, kQuantThreads, 0, stream, static_cast<uint8_t*>(q), s,
               static_cast<const T*>(x), k);
  });
  return cudaGetLastError();
}

cudaError_t fp8_quantize_static(void* q, const void* x, const float* input_scale, int64_t m, int64_t k, DType dtype,
                                cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(q && x && input_scale && m >= 0 && k > 0 && k % 8 == 0 && aligned16(x) && aligned16(q));
  if (m == 0) return cudaSuccess;
  const int64_t num_vecs = m * k / 8;
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    launch_pdl(quantize_static_kernel<T>, grid_for(num_vecs, kQuantThreads), kQuantThreads, 0, stream,
               static_cast<uint8_t*>(q), static_cast<const T*>(x), input_scale, num_vecs);
  });
  return cudaGetLastError();
}

bool fp8_gemv_supported(int32_t m, int32_t k) { return m >= 1 && m <= kFp8GemvMaxM && k > 0 && k % 16 == 0; }

cudaError_t fp8_gemv(void* y, const void* q, const float* a_scale, bool a_per_row, const void* weight,
                     const float* w_scale, bool w_per_channel, const void* bias, int32_t m, int32_t n, int32_t k,
                     DType bias_dtype, DType y_dtype, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(y && q && a_scale && weight && w_scale && n >= 0 && fp8_gemv_supported(m, k));
  RTLLM_KERNEL_CHECK(mma_gemv_rows_ok(n));
  RTLLM_KERNEL_CHECK(aligned16(q) && aligned16(weight));
  RTLLM_KERNEL_CHECK(y_dtype == bias_dtype || y_dtype == DType::kFP32);
  if (n == 0) return cudaSuccess;
  RTLLM_DISPATCH_DTYPE(bias_dtype, TB, {
    if (y_dtype == DType::kFP32)
      launch_gemv<TB, float>(y, q, a_scale, a_per_row, weight, w_scale, w_per_channel, bias, m, n, k, stream);
    else
      launch_gemv<TB, TB>(y, q, a_scale, a_per_row, weight, w_scale, w_per_channel, bias, m, n, k, stream);
  });
  return cudaGetLastError();
}

cudaError_t fp8_scale_epilogue(void* y, const float* acc, const float* a_scale, bool a_per_row, const float* w_scale,
                               bool w_per_channel, const void* bias, int64_t m, int64_t n, DType bias_dtype,
                               DType y_dtype, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(y && acc && a_scale && w_scale && m >= 0 && n >= 0);
  RTLLM_KERNEL_CHECK(y_dtype == bias_dtype || y_dtype == DType::kFP32);
  if (m == 0 || n == 0) return cudaSuccess;
  const unsigned grid = grid_for(m * n, 256);
  RTLLM_DISPATCH_DTYPE(bias_dtype, TB, {
    if (y_dtype == DType::kFP32)
      launch_pdl(scale_epilogue_kernel<TB, float>, grid, 256, 0, stream, static_cast<float*>(y), acc, a_scale,
                 a_per_row, w_scale, w_per_channel, static_cast<const TB*>(bias), m, n);
    else
      launch_pdl(scale_epilogue_kernel<TB, TB>, grid, 256, 0, stream, static_cast<TB*>(y), acc, a_scale, a_per_row,
                 w_scale, w_per_channel, static_cast<const TB*>(bias), m, n);
  });
  return cudaGetLastError();
}

}  // namespace rtllm::kernels
