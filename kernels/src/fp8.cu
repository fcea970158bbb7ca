// FP8 (E4M3) linears: activation quantization, the small-M GEMV over FP8 weights, and the scale
// epilogue of an unscaled cuBLASLt FP8 GEMM (docs/engine_format.md, fp8_linear).
//
// GEMV numerics: each product of two E4M3 values is exact in float32 and the products are summed in
// float32 (per lane in k order, then a warp reduction), then scaled once: (acc · a_scale) · w_scale.
// The weight bytes are widened to float with integer ops instead of cvt (the conversion would cost more
// issue slots than the FMAs at m = 1): placing an E4M3 byte's exponent and mantissa bits at the top of a
// float32's exponent/mantissa fields gives the value times 2^-120 (subnormal codes land on float
// subnormals, also exact). The activation side is widened the same way and multiplied back by 2^120
// (exact), so each product is the true product times 2^-120, and the sum is multiplied by 2^120 at the
// end. This rounds exactly like summing the unscaled products: a partial sum of normal magnitude has the
// same significand either way, and a smaller one is a multiple of 2^-18 · 2^-120 (every product is a
// multiple of 2^-9 · 2^-9 before scaling), which the float subnormal grid (2^-149) holds exactly, as
// float32 holds the unscaled one. This file is not built with fast math, so subnormals are not flushed.
#include <cfloat>

#include "dispatch.cuh"
#include "rtllm/kernels/fp8.cuh"

namespace rtllm::kernels {
namespace {

constexpr int kQuantThreads = 256;
constexpr int kWarps = 4;  // GEMV warps per block

__device__ __forceinline__ uint8_t to_e4m3(float v) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// Eight activations, divided by `scale` (float32 division), as eight E4M3 bytes.
template <typename T>
__device__ __forceinline__ uint2 quantize8(const Vec8<T>& xv, float scale) {
  uint32_t packed[2] = {0, 0};
#pragma unroll
  for (int i = 0; i < 8; ++i) packed[i / 4] |= uint32_t(to_e4m3(__fdiv_rn(to_float(xv.v[i]), scale))) << (8 * (i % 4));
  return make_uint2(packed[0], packed[1]);
}

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

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Byte i of `word` (an E4M3 code) as float32, times 2^-120 (see the top of the file).
__device__ __forceinline__ float e4m3_times_2m120(uint32_t word, int i) {
  const uint32_t t = __byte_perm(word, 0u, 0x0444u | (uint32_t(i) << 12));  // the byte at bits 24..31
  return __uint_as_float(((t >> 4) & 0x07F00000u) | (t & 0x80000000u));
}

template <typename TY, typename TB>
__device__ __forceinline__ TY scale_output(float acc, const float* a_scale, bool a_per_row, const float* w_scale,
                                           bool w_per_channel, const TB* bias, int64_t row, int64_t col) {
  float v = acc * a_scale[a_per_row ? row : 0];
  v = v * w_scale[w_per_channel ? col : 0];
  if (bias) v += to_float(bias[col]);
  return from_float<TY>(v);
}

// Shape of one warp's work: R weight rows at once (each widened activation value then serves R rows:
// at m = 1 its widening would otherwise cost as much as the weight's) and U 16-byte loads per row in
// flight per lane (R · U in all; fewer where the M accumulators and activation vectors need the
// registers).
template <int M>
__host__ __device__ constexpr int fp8_rows_per_warp() { return M <= 4 ? 4 : 2; }
template <int M>
__host__ __device__ constexpr int fp8_unroll() { return M <= 2 ? 4 : (M <= 8 ? 2 : 1); }

// M is the compile-time row capacity, m <= M the rows present.
template <typename TB, typename TY, int M>
__global__ void __launch_bounds__(kWarps * 32) fp8_gemv_kernel(TY* y, const uint8_t* q, const float* a_scale,
                                                              bool a_per_row, const uint8_t* weight,
                                                              const float* w_scale, bool w_per_channel,
                                                              const TB* bias, int32_t m, int32_t n, int32_t k) {
  constexpr int R = fp8_rows_per_warp<M>(), U = fp8_unroll<M>();
  const int lane = threadIdx.x & 31;
  const int32_t row0 = (blockIdx.x * kWarps + threadIdx.x / 32) * R;
  const int32_t num_vecs = k / 16;
  uint4 wv[U][R];
  auto load_weights = [&](int32_t base) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int32_t v = base + u * 32 + lane;
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (v < num_vecs && row0 + r < n)
          wv[u][r] = __ldcs(reinterpret_cast<const uint4*>(weight + (int64_t)(row0 + r) * k + (int64_t)v * 16));
    }
  };
  load_weights(0);  // constant data: read before waiting for the kernel that wrote q
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
      if (v >= num_vecs) continue;
      uint4 qv[M];  // rows m..M-1 of the template's capacity: zeros, adding nothing
#pragma unroll
      for (int mi = 0; mi < M; ++mi)
        qv[mi] = mi < m ? __ldg(reinterpret_cast<const uint4*>(q + (int64_t)mi * k + (int64_t)v * 16))
                        : make_uint4(0, 0, 0, 0);
      // One k at a time: each activation value is widened once for the R rows, each weight value once
      // for the M rows; few registers live beyond the loads in flight.
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        float qf[M];
#pragma unroll
        for (int mi = 0; mi < M; ++mi) qf[mi] = e4m3_times_2m120(word_of(qv[mi], j / 4), j % 4) * 0x1p120f;  // exact
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float wf = e4m3_times_2m120(word_of(wv[u][r], j / 4), j % 4);  // rows past n: unused
#pragma unroll
          for (int mi = 0; mi < M; ++mi) acc[r][mi] = fmaf(qf[mi], wf, acc[r][mi]);
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
#pragma unroll
      for (int mi = 0; mi < M; ++mi) {
        if (mi >= m) break;
        y[(int64_t)mi * n + row0 + r] = scale_output<TY>(acc[r][mi] * 0x1p120f, a_scale, a_per_row, w_scale,
                                                         w_per_channel, bias, mi, row0 + r);
      }
    }
  }
}

template <typename TB, typename TY, int M>
void launch_gemv(void* y, const void* q, const float* a_scale, bool a_per_row, const void* weight,
                 const float* w_scale, bool w_per_channel, const void* bias, int32_t m, int32_t n, int32_t k,
                 cudaStream_t stream) {
  const int64_t rows_per_block = (int64_t)kWarps * fp8_rows_per_warp<M>();
  launch_pdl(fp8_gemv_kernel<TB, TY, M>, (unsigned)ceil_div(n, rows_per_block), kWarps * 32, 0, stream,
             static_cast<TY*>(y), static_cast<const uint8_t*>(q), a_scale, a_per_row,
             static_cast<const uint8_t*>(weight), w_scale, w_per_channel, static_cast<const TB*>(bias), m, n, k);
}

template <typename TB, typename TY>
void gemv_for_m(void* y, const void* q, const float* a_scale, bool a_per_row, const void* weight,
                const float* w_scale, bool w_per_channel, const void* bias, int32_t m, int32_t n, int32_t k,
                cudaStream_t stream) {
#define RTLLM_FP8_GEMV(M) \
  launch_gemv<TB, TY, M>(y, q, a_scale, a_per_row, weight, w_scale, w_per_channel, bias, m, n, k, stream)
  if (m <= 1) RTLLM_FP8_GEMV(1);
  else if (m <= 2) RTLLM_FP8_GEMV(2);
  else if (m <= 4) RTLLM_FP8_GEMV(4);
  else if (m <= 8) RTLLM_FP8_GEMV(8);
  else RTLLM_FP8_GEMV(16);
#undef RTLLM_FP8_GEMV
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
  RTLLM_KERNEL_CHECK(aligned16(q) && aligned16(weight));
  RTLLM_KERNEL_CHECK(y_dtype == bias_dtype || y_dtype == DType::kFP32);
  if (n == 0) return cudaSuccess;
  RTLLM_DISPATCH_DTYPE(bias_dtype, TB, {
    if (y_dtype == DType::kFP32)
      gemv_for_m<TB, float>(y, q, a_scale, a_per_row, weight, w_scale, w_per_channel, bias, m, n, k, stream);
    else
      gemv_for_m<TB, TB>(y, q, a_scale, a_per_row, weight, w_scale, w_per_channel, bias, m, n, k, stream);
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
