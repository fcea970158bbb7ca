// FP8 (E4M3) linears: activation quantization, the small-M GEMV over FP8 weights (on tensor cores), and
// the scale epilogue of an unscaled cuBLASLt FP8 GEMM (docs/engine_format.md, fp8_linear).
#include <cfloat>

#include "dispatch.cuh"
#include "rtllm/kernels/fp8.cuh"

namespace rtllm::kernels {
namespace {

constexpr int kQuantThreads = 256;

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

template <typename TY, typename TB>
__device__ __forceinline__ TY scale_output(float acc, const float* a_scale, bool a_per_row, const float* w_scale,
                                           bool w_per_channel, const TB* bias, int64_t row, int64_t col) {
  float v = acc * a_scale[a_per_row ? row : 0];
  v = v * w_scale[w_per_channel ? col : 0];
  if (bias) v += to_float(bias[col]);
  return from_float<TY>(v);
}

// ---- GEMV on tensor cores ----
//
// mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 (sm_89+): D[16x8] += A[16x32] · B[32x8]. With
// g = lane / 4 and t = lane % 4, the PTX ISA's fragment layouts ("Matrix Fragments for mma.m16n8k32",
// 8-bit types; element i of a register is its byte i, from the low end) are:
//   A regs a0..a3: a0 = A[g][4t..4t+3], a1 = A[g+8][4t..4t+3], a2 = A[g][16+4t..], a3 = A[g+8][16+4t..]
//   B regs b0, b1: b0 = B[4t..4t+3][g],  b1 = B[16+4t..16+4t+3][g]
//   D regs d0..d3: d0, d1 = D[g][2t], D[g][2t+1];  d2, d3 = D[g+8][2t], D[g+8][2t+1]
// The 32 k slots of one MMA only need to hold the same k in A and B, so each lane feeds both from one
// 16-byte load: lane (g, t) reads bytes [16t, 16t + 16) of a 64-byte step of activation row g (and g+8)
// and of weight row g, and the step's two MMAs take words (x, y) and (z, w):
//   MMA 0: a = {q[g].x, q[g+8].x, q[g].y, q[g+8].y}, b = {w[g].x, w[g].y}  (slot 4t+i <-> k = 16t+i,
//                                                                            slot 16+4t+i <-> 16t+4+i)
//   MMA 1: a = {q[g].z, q[g+8].z, q[g].w, q[g+8].w}, b = {w[g].z, w[g].w}  (the same, k + 8)
// Together they cover the step's 64 k for 16 activation rows and 8 weight rows (weight row-major [N, K]
// is B in the "col" layout: K contiguous), with plain coalesced 16-byte loads and no shuffles. Rows
// m..15 of A are zeros (up to 8 rows: the g+8 registers are the constant 0).
//
// Work split: a CTA owns kGemvTiles · 8 output channels and its kGemvWarps warps split K, warp w taking
// the 64-byte steps w, w + kGemvWarps, ...; a batch of kGemvUnroll steps is loaded (kGemvUnroll ·
// kGemvTiles streaming weight loads of 16 bytes per lane in flight) before its MMAs run. The warps'
// partial sums meet in shared memory and are added in warp order. Llama-3-8B's N = 4096 gives 256 CTAs
// of 8 warps, about two per SM; at 126-128 registers two fit, with 8 KB of weight loads in flight each.
//
// Numerics: each product of two E4M3 values is exact; the tensor cores sum an MMA's 32 products with
// fewer guard bits than a chain of float32 FMAs. sm_89 runs the instruction natively (Ada's FP8 MMAs,
// like Hopper's wgmma, keep about 13 bits of the partial sum aligned to its largest term); for sm_90a
// ptxas lowers it to exact E4M3 -> f16 conversions and two f16 MMAs with float32 accumulation, added to
// the accumulator. Either way acc is within 2^-9 of Σ_k |q·w| of the exact sum, as cuBLASLt's FP8 GEMM
// (tests/gpu/test_fp8_gpu.py). The summation order is fixed (steps in order within a warp, two
// alternating accumulators, then warps in order): results are deterministic.
constexpr int kGemvWarps = 8;
constexpr int kGemvTiles = 2;  // 8-channel tiles per CTA: each activation fragment serves both
constexpr int kGemvUnroll = 4;

__device__ __forceinline__ void mma_e4m3_16x8x32(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // E4M3 MMAs need compute capability 8.9; fp8_linear refuses older devices at load
#endif
}

// 16 weight bytes, read once: not kept in L1.
__device__ __forceinline__ uint4 load_stream16(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// MA: blocks of 8 activation rows, 1 for m <= 8 and 2 for m <= 16.
template <typename TB, typename TY, int MA>
__global__ void __launch_bounds__(kGemvWarps * 32, 2)
    fp8_gemv_kernel(TY* y, const uint8_t* q, const float* a_scale, bool a_per_row, const uint8_t* weight,
                    const float* w_scale, bool w_per_channel, const TB* bias, int32_t m, int32_t n, int32_t k) {
  constexpr int T = kGemvTiles, U = kGemvUnroll, kCols = 8 * T;
  __shared__ float partial[kGemvWarps][8 * MA][kCols];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int32_t n0 = blockIdx.x * kCols;
  const int32_t num_vecs = k / 16, num_steps = (num_vecs + 3) / 4;  // 16-byte vectors; 64-byte steps
  // Channels past n read row n - 1 (their sums are never stored); k past the end reads zeros.
  const uint8_t* w_lane[T];
#pragma unroll
  for (int r = 0; r < T; ++r) w_lane[r] = weight + (int64_t)min(n0 + 8 * r + g, n - 1) * k + 16 * t;
  const uint8_t* q_lane[MA];
  bool q_row[MA];
#pragma unroll
  for (int i = 0; i < MA; ++i) {
    q_row[i] = 8 * i + g < m;
    q_lane[i] = q + (int64_t)(8 * i + g) * k + 16 * t;  // read only for rows < m
  }
  const uint4 zero = make_uint4(0, 0, 0, 0);
  uint4 wv[U][T];
  auto load_weights = [&](int32_t s0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int32_t s = s0 + u * kGemvWarps;
      const bool in_k = 4 * s + t < num_vecs;
#pragma unroll
      for (int r = 0; r < T; ++r) wv[u][r] = in_k ? load_stream16(w_lane[r] + 64 * (int64_t)s) : zero;
    }
  };
  load_weights(warp);  // constant data: read before waiting for the kernel that wrote q
  pdl_begin();
  float acc[T][2][4];  // [tile][even/odd MMA of a step][d0..d3]
#pragma unroll
  for (int r = 0; r < T; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[r][h][j] = 0.0f;

  // The bounds are the same for the whole warp, as mma.sync requires.
  for (int32_t s0 = warp; s0 < num_steps; s0 += U * kGemvWarps) {
    if (s0 != warp) load_weights(s0);
    uint4 av[U][MA];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int32_t s = s0 + u * kGemvWarps;
      const bool in_k = 4 * s + t < num_vecs;
#pragma unroll
      for (int i = 0; i < MA; ++i)
        av[u][i] = in_k && q_row[i] ? __ldg(reinterpret_cast<const uint4*>(q_lane[i] + 64 * (int64_t)s)) : zero;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint4 lo = av[u][0], hi = MA == 2 ? av[u][MA - 1] : zero;
#pragma unroll
      for (int r = 0; r < T; ++r) {
        mma_e4m3_16x8x32(acc[r][0], lo.x, hi.x, lo.y, hi.y, wv[u][r].x, wv[u][r].y);
        mma_e4m3_16x8x32(acc[r][1], lo.z, hi.z, lo.w, hi.w, wv[u][r].z, wv[u][r].w);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < T; ++r)
#pragma unroll
    for (int i = 0; i < MA; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        partial[warp][8 * i + g][8 * r + 2 * t + j] = acc[r][0][2 * i + j] + acc[r][1][2 * i + j];
  __syncthreads();
  for (int e = threadIdx.x; e < 8 * MA * kCols; e += blockDim.x) {
    const int row = e / kCols, col = e % kCols;
    if (row >= m || n0 + col >= n) continue;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kGemvWarps; ++w) sum += partial[w][row][col];
    y[(int64_t)row * n + n0 + col] =
        scale_output<TY>(sum, a_scale, a_per_row, w_scale, w_per_channel, bias, row, n0 + col);
  }
}

template <typename TB, typename TY>
void launch_gemv(void* y, const void* q, const float* a_scale, bool a_per_row, const void* weight,
                 const float* w_scale, bool w_per_channel, const void* bias, int32_t m, int32_t n, int32_t k,
                 cudaStream_t stream) {
  const unsigned grid = (unsigned)ceil_div(n, 8 * kGemvTiles);
  auto* kernel = m <= 8 ? fp8_gemv_kernel<TB, TY, 1> : fp8_gemv_kernel<TB, TY, 2>;
  launch_pdl(kernel, grid, kGemvWarps * 32, 0, stream, static_cast<TY*>(y), static_cast<const uint8_t*>(q), a_scale,
             a_per_row, static_cast<const uint8_t*>(weight), w_scale, w_per_channel, static_cast<const TB*>(bias), m,
             n, k);
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
