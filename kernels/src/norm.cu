// rms_norm and add_rms_norm. Rows are read with 16-byte vectors; each thread re-reads only the
// vectors it read (or wrote) itself in the first pass, so out may alias x without a barrier (a T output;
// E4M3 codes, RowOut, never alias).
#include <algorithm>
#include <cfloat>

#include "dispatch.cuh"
#include "rtllm/kernels/norm.cuh"

namespace rtllm::kernels {
namespace {

constexpr int kWarpGroupMax = 256;  // groups up to this size are normalized by one warp each
constexpr int kBlockThreads = 256;

// w · (x · inv_rms) of one 8-vector.
template <typename T>
__device__ __forceinline__ Vec8<T> scale_vec(const Vec8<T>& x, const Vec8<T>& w, float inv_rms) {
  float xf[8], wf[8];
  to_float8(x, xf);
  to_float8(w, wf);
#pragma unroll
  for (int i = 0; i < 8; ++i) xf[i] = wf[i] * (xf[i] * inv_rms);
  return from_float8<T>(xf);
}

// y[base:base + d] = w · (x · inv_rms) for the 8-vectors v = first, first + stride, ... of one group.
template <typename T>
__device__ __forceinline__ void scale_group(const RowOut<T>& y, int64_t base, const T* x, const T* w,
                                            int64_t num_vecs, int64_t first, int64_t stride, float inv_rms) {
  for (int64_t v = first; v < num_vecs; v += stride)
    y.store8(base + v * 8, scale_vec(load8(x + v * 8), load8(w + v * 8), inv_rms));
}

template <typename T>
__device__ __forceinline__ float sum_squares(const T* x, int64_t num_vecs, int64_t first, int64_t stride) {
  float ss = 0.0f;
  for (int64_t v = first; v < num_vecs; v += stride) {
    float xf[8];
    to_float8(load8(x + v * 8), xf);
#pragma unroll
    for (int i = 0; i < 8; ++i) ss += xf[i] * xf[i];
  }
  return ss;
}

// One warp per group of group_size values; groups are [num_groups, group_size] contiguous.
template <typename T>
__global__ void rms_norm_warp_kernel(RowOut<T> out, const T* x, const T* weight, int64_t num_groups, int group_size,
                                     float eps) {
  pdl_begin();
  const int64_t group = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (group >= num_groups) return;  // the whole warp leaves together
  const int lane = threadIdx.x & 31;
  const int64_t base = group * group_size, num_vecs = group_size / 8;
  const float ss = warp_sum(sum_squares(x + base, num_vecs, lane, 32));
  const float inv_rms = 1.0f / sqrtf(ss / (float)group_size + eps);
  scale_group(out, base, x + base, weight, num_vecs, lane, 32, inv_rms);
}

// One block per group (large groups).
template <typename T>
__global__ void rms_norm_block_kernel(RowOut<T> out, const T* x, const T* weight, int64_t group_size, float eps) {
  __shared__ float scratch[32];
  pdl_begin();
  const int64_t base = (int64_t)blockIdx.x * group_size, num_vecs = group_size / 8;
  const float ss = block_sum(sum_squares(x + base, num_vecs, threadIdx.x, blockDim.x), scratch);
  const float inv_rms = 1.0f / sqrtf(ss / (float)group_size + eps);
  scale_group(out, base, x + base, weight, num_vecs, threadIdx.x, blockDim.x, inv_rms);
}

// One block per row: sum = round_T(x + residual); normed = rms_norm(sum). A row of at most
// kKeptVecs · blockDim vectors (hidden sizes up to 8192 at 256 threads) keeps its sum and norm weight in
// registers across the block reduction, saving a dependent round trip through memory: at decode, one
// block per token, latency is this kernel's whole cost.
constexpr int kKeptVecs = 4;

template <typename T>
__global__ void add_rms_norm_kernel(RowOut<T> normed, T* sum, const T* x, const T* residual, const T* weight,
                                    int64_t row_size, float eps) {
  __shared__ float scratch[32];
  pdl_begin();
  const int64_t base = (int64_t)blockIdx.x * row_size, num_vecs = row_size / 8;
  auto add_row_vec = [&](int64_t v, float& ss) {
    float xf[8], rf[8];
    to_float8(load8(x + base + v * 8), xf);
    to_float8(load8(residual + base + v * 8), rf);
    Vec8<T> s;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      s.v[i] = from_float<T>(xf[i] + rf[i]);
      const float r = to_float(s.v[i]);  // the norm sees the rounded sum
      ss += r * r;
    }
    store8(sum + base + v * 8, s);
    return s;
  };
  const bool kept_in_registers = num_vecs <= kKeptVecs * (int64_t)blockDim.x;
  Vec8<T> kept[kKeptVecs], w[kKeptVecs];
  float ss = 0.0f;
  if (kept_in_registers) {
#pragma unroll
    for (int j = 0; j < kKeptVecs; ++j) {
      const int64_t v = threadIdx.x + (int64_t)j * blockDim.x;
      if (v < num_vecs) {
        kept[j] = add_row_vec(v, ss);
        w[j] = load8(weight + v * 8);
      }
    }
  } else {
    for (int64_t v = threadIdx.x; v < num_vecs; v += blockDim.x) add_row_vec(v, ss);
  }
  ss = block_sum(ss, scratch);
  const float inv_rms = 1.0f / sqrtf(ss / (float)row_size + eps);
  if (kept_in_registers) {
#pragma unroll
    for (int j = 0; j < kKeptVecs; ++j) {
      const int64_t v = threadIdx.x + (int64_t)j * blockDim.x;
      if (v < num_vecs) normed.store8(base + v * 8, scale_vec(kept[j], w[j], inv_rms));
    }
  } else {
    scale_group(normed, base, sum + base, weight, num_vecs, threadIdx.x, blockDim.x, inv_rms);
  }
}

int threads_for(int64_t num_vecs) {
  return (int)std::min<int64_t>(kBlockThreads, std::max<int64_t>(32, ceil_div(num_vecs, 32) * 32));
}

}  // namespace

cudaError_t rms_norm(void* out, const void* x, const void* weight, int64_t num_rows, int64_t row_size,
                     int64_t group_size, float eps, DType dtype, cudaStream_t stream, float fp8_out_scale) {
  RTLLM_KERNEL_CHECK(out && x && weight && num_rows >= 0 && row_size > 0 && group_size > 0);
  RTLLM_KERNEL_CHECK(fp8_out_scale >= 0.0f && fp8_out_scale <= FLT_MAX && (fp8_out_scale == 0.0f || out != x));
  RTLLM_KERNEL_CHECK(group_size % 8 == 0 && row_size % group_size == 0);
  RTLLM_KERNEL_CHECK(aligned16(out) && aligned16(x) && aligned16(weight));
  if (num_rows == 0) return cudaSuccess;
  const int64_t num_groups = num_rows * (row_size / group_size);
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    if (group_size <= kWarpGroupMax) {
      constexpr int kWarps = kBlockThreads / 32;
      launch_pdl(rms_norm_warp_kernel<T>, (unsigned)ceil_div(num_groups, kWarps), kBlockThreads, 0, stream,
          RowOut<T>{out, fp8_out_scale}, static_cast<const T*>(x), static_cast<const T*>(weight), num_groups,
          (int)group_size, eps);
    } else {
      RTLLM_KERNEL_CHECK(num_groups < (int64_t(1) << 31));
      launch_pdl(rms_norm_block_kernel<T>, (unsigned)num_groups, threads_for(group_size / 8), 0, stream,
          RowOut<T>{out, fp8_out_scale}, static_cast<const T*>(x), static_cast<const T*>(weight), group_size, eps);
    }
  });
  return cudaGetLastError();
}

cudaError_t add_rms_norm(void* normed, void* sum, const void* x, const void* residual, const void* weight,
                         int64_t num_rows, int64_t row_size, float eps, DType dtype, cudaStream_t stream,
                         float fp8_out_scale) {
  RTLLM_KERNEL_CHECK(normed && sum && x && residual && weight && num_rows >= 0 && row_size > 0);
  RTLLM_KERNEL_CHECK(fp8_out_scale >= 0.0f && fp8_out_scale <= FLT_MAX);
  RTLLM_KERNEL_CHECK(row_size % 8 == 0 && num_rows < (int64_t(1) << 31));
  RTLLM_KERNEL_CHECK(aligned16(normed) && aligned16(sum) && aligned16(x) && aligned16(residual) &&
                     aligned16(weight));
  if (num_rows == 0) return cudaSuccess;
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    launch_pdl(add_rms_norm_kernel<T>, (unsigned)num_rows, threads_for(row_size / 8), 0, stream,
        RowOut<T>{normed, fp8_out_scale}, static_cast<T*>(sum), static_cast<const T*>(x),
        static_cast<const T*>(residual),
        static_cast<const T*>(weight), row_size, eps);
  });
  return cudaGetLastError();
}

}  // namespace rtllm::kernels
