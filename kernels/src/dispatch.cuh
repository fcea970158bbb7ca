// Private device-side helpers of the kernel families: dtype / head_dim dispatch, 16-byte vectors,
// float conversions, warp and block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "rtllm/kernels/common.cuh"

// Runs the statements with `T` bound to the element type of a 16-bit activation dtype; any other dtype
// makes the enclosing launcher return cudaErrorInvalidValue.
#define RTLLM_DISPATCH_DTYPE(dtype, T, ...)                  \
  switch (dtype) {                                           \
    case ::rtllm::kernels::DType::kBF16: {                   \
      using T = __nv_bfloat16;                               \
      __VA_ARGS__;                                           \
    } break;                                                 \
    case ::rtllm::kernels::DType::kFP16: {                   \
      using T = __half;                                      \
      __VA_ARGS__;                                           \
    } break;                                                 \
    default: return cudaErrorInvalidValue;                   \
  }

// Runs the statements with `T` bound to the element type of any float dtype (FP32, BF16, FP16 and both
// FP8 formats); any other dtype makes the enclosing launcher return cudaErrorInvalidValue.
#define RTLLM_DISPATCH_FLOAT_DTYPE(dtype, T, ...)            \
  switch (dtype) {                                           \
    case ::rtllm::kernels::DType::kFP32: {                   \
      using T = float;                                       \
      __VA_ARGS__;                                           \
    } break;                                                 \
    case ::rtllm::kernels::DType::kFP8E4M3: {                \
      using T = __nv_fp8_e4m3;                               \
      __VA_ARGS__;                                           \
    } break;                                                 \
    case ::rtllm::kernels::DType::kFP8E5M2: {                \
      using T = __nv_fp8_e5m2;                               \
      __VA_ARGS__;                                           \
    } break;                                                 \
    default: RTLLM_DISPATCH_DTYPE(dtype, T, __VA_ARGS__);    \
  }

// Binds `KV` to the element type of a KV pool of dtype kv_dtype holding activations of type T: T itself,
// an FP8 (E4M3) or an INT8 pool; any other pool dtype makes the enclosing launcher return
// cudaErrorInvalidValue.
#define RTLLM_DISPATCH_KV(kv_dtype, T, KV, ...)                                                     \
  if ((kv_dtype) == ::rtllm::kernels::DType::kFP8E4M3) {                                            \
    using KV = __nv_fp8_e4m3;                                                                       \
    __VA_ARGS__;                                                                                    \
  } else if ((kv_dtype) == ::rtllm::kernels::DType::kINT8) {                                        \
    using KV = int8_t;                                                                              \
    __VA_ARGS__;                                                                                    \
  } else if ((kv_dtype) == ::rtllm::kernels::dtype_of<T>()) {                                       \
    using KV = T;                                                                                   \
    __VA_ARGS__;                                                                                    \
  } else {                                                                                          \
    return cudaErrorInvalidValue;                                                                   \
  }

// Binds the compile-time constant HEAD_DIM to hd for the head sizes the kernels are built for. 80 and 96 run
// in the lane layout of 128 with the lanes past HEAD_DIM idle where a kernel splits a head over lanes
// (head_dim_layout).
#define RTLLM_DISPATCH_HEAD_DIM(hd, HEAD_DIM, ...)               \
  switch (hd) {                                                  \
    case 16: { constexpr int HEAD_DIM = 16; __VA_ARGS__; } break;   \
    case 32: { constexpr int HEAD_DIM = 32; __VA_ARGS__; } break;   \
    case 64: { constexpr int HEAD_DIM = 64; __VA_ARGS__; } break;   \
    case 80: { constexpr int HEAD_DIM = 80; __VA_ARGS__; } break;   \
    case 96: { constexpr int HEAD_DIM = 96; __VA_ARGS__; } break;   \
    case 128: { constexpr int HEAD_DIM = 128; __VA_ARGS__; } break; \
    case 256: { constexpr int HEAD_DIM = 256; __VA_ARGS__; } break; \
    default: return cudaErrorInvalidValue;                       \
  }

// Returns cudaErrorInvalidValue from the launcher when `cond` does not hold.
#define RTLLM_KERNEL_CHECK(cond) \
  do {                           \
    if (!(cond)) return cudaErrorInvalidValue; \
  } while (0)

namespace rtllm::kernels {

// Whether the environment variable `name` is set to exactly `value`: the launchers' switches for same-build
// comparisons (RTLLM_DECODE_MMA=0, RTLLM_PREFILL_SM90=0, RTLLM_HOPPER_GEMM=0, RTLLM_PDL=0, ...), each read
// once into a static by its caller.
inline bool env_is(const char* name, const char* value) {
  const char* env = std::getenv(name);
  return env && std::strcmp(env, value) == 0;
}

// Programmatic dependent launch (sm_90 and later). A kernel started by launch_pdl may begin while the
// kernel before it in the stream is still running, which hides the launch and ramp-up gap between the
// many short kernels of a decode step. Such a kernel calls pdl_begin() in every block before it reads
// anything an earlier kernel wrote and before it writes anything; only constant data (weights) may be
// read before it. pdl_begin() first lets the next kernel launch (it may only start once every block of
// this one has started, and waits in its own pdl_begin() for this one to complete), then waits for the
// previous kernel to complete with its writes visible. Completion is transitive: this kernel completes
// only after its wait, so the kernel after it also sees every earlier kernel's writes.
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n\tgriddepcontrol.wait;" ::: "memory");
#endif
}

// Launches `kernel` with programmatic stream serialization when programmatic_launch_enabled(), as a
// plain launch otherwise; the error is left for the launcher's cudaGetLastError().
template <typename... KernelArgs, typename... Args>
void launch_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                Args... args) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = programmatic_launch_enabled() ? 1 : 0;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  (void)cudaLaunchKernelEx(&config, kernel, static_cast<KernelArgs>(args)...);
}

template <typename T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<__nv_bfloat16>() { return DType::kBF16; }
template <>
constexpr DType dtype_of<__half>() { return DType::kFP16; }

template <typename KV>
constexpr bool is_fp8_kv() { return std::is_same_v<KV, __nv_fp8_e4m3>; }
template <typename KV>
constexpr bool is_int8_kv() { return std::is_same_v<KV, int8_t>; }
// A pool of codes (FP8 or INT8): it holds code(x / scale) and is read as code · scale, with k_scale folded
// into the softmax scale and v_scale into the output.
template <typename KV>
constexpr bool is_quantized_kv() { return is_fp8_kv<KV>() || is_int8_kv<KV>(); }

// The launchers' check of a pool's scales: finite and > 0 for a quantized pool (ignored otherwise).
inline bool kv_scales_valid(DType kv_dtype, float k_scale, float v_scale) {
  const bool quantized = kv_dtype == DType::kFP8E4M3 || kv_dtype == DType::kINT8;
  return !quantized || (k_scale > 0.0f && v_scale > 0.0f && std::isfinite(k_scale) && std::isfinite(v_scale));
}

// The power of two a head of HEAD_DIM dims is laid out as where a kernel splits it over lanes (or shared-memory
// chunks): HEAD_DIM itself, 128 for 80 and 96.
template <int HEAD_DIM>
constexpr int head_dim_layout() {
  int layout = 1;
  while (layout < HEAD_DIM) layout *= 2;
  return layout;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float(float x) { return x; }
template <>
__device__ __forceinline__ float to_float(__nv_fp8_e4m3 x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float to_float(__nv_fp8_e5m2 x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float to_float(int8_t x) { return static_cast<float>(x); }  // an INT8 pool's code

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ float from_float(float x) { return x; }
// FP8 narrowing rounds to nearest even and saturates finite values (cvt.rn.satfinite); NaN stays NaN.
template <>
__device__ __forceinline__ __nv_fp8_e4m3 from_float(float x) { return __nv_fp8_e4m3(x); }
template <>
__device__ __forceinline__ __nv_fp8_e5m2 from_float(float x) { return __nv_fp8_e5m2(x); }

// A key or value element as the pool of element type KV stores it: an FP8 pool holds e4m3(x / scale), an
// INT8 pool clamp(round_half_even(x / scale), -127, 127) (float32 division, docs/engine_format.md "KV cache
// layout"; cvt.rni.s32.f32 turns NaN into 0 and saturates infinities); a 16-bit pool holds x rounded to KV.
template <typename KV>
__device__ __forceinline__ KV encode_kv(float x, float scale) {
  if constexpr (is_fp8_kv<KV>()) return from_float<KV>(x / scale);
  else if constexpr (is_int8_kv<KV>()) return static_cast<int8_t>(min(127, max(-127, __float2int_rn(x / scale))));
  else return from_float<KV>(x);
}

// Eight 16-bit elements in one 16-byte register quad.
template <typename T>
struct alignas(16) Vec8 {
  T v[8];
};

template <typename T>
__device__ __forceinline__ Vec8<T> load8(const T* p) {  // p 16-byte aligned
  Vec8<T> r;
  *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
  return r;
}

// Read-only, streamed once: bypass L1 allocation.
template <typename T>
__device__ __forceinline__ Vec8<T> load8_stream(const T* p) {
  Vec8<T> r;
  *reinterpret_cast<uint4*>(&r) = __ldcs(reinterpret_cast<const uint4*>(p));
  return r;
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const Vec8<T>& r) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
}

template <typename T>
__device__ __forceinline__ void to_float8(const Vec8<T>& r, float* f) {
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_float(r.v[i]);
}

template <typename T>
__device__ __forceinline__ Vec8<T> from_float8(const float* f) {
  Vec8<T> r;
#pragma unroll
  for (int i = 0; i < 8; ++i) r.v[i] = from_float<T>(f[i]);
  return r;
}

__device__ __forceinline__ uint8_t to_e4m3(float v) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// Eight activations, divided by `scale` (float32 division), as eight E4M3 bytes: fp8_linear's static and
// per-token quantization (docs/engine_format.md).
template <typename T>
__device__ __forceinline__ uint2 quantize8(const Vec8<T>& xv, float scale) {
  uint32_t packed[2] = {0, 0};
#pragma unroll
  for (int i = 0; i < 8; ++i) packed[i / 4] |= uint32_t(to_e4m3(__fdiv_rn(to_float(xv.v[i]), scale))) << (8 * (i % 4));
  return make_uint2(packed[0], packed[1]);
}

// The output rows of a norm or silu_mul: elements of T, or, with fp8_scale > 0, the E4M3 codes of those T
// values divided by fp8_scale (docs/engine_format.md, "FP8 outputs": the quantization of the static
// fp8_linear that reads them, done where they are produced). Element offsets are multiples of 8.
template <typename T>
struct RowOut {
  void* data;
  float fp8_scale;  // 0: T elements

  __device__ __forceinline__ void store8(int64_t i, const Vec8<T>& v) const {
    if (fp8_scale > 0.0f) {
      *reinterpret_cast<uint2*>(static_cast<uint8_t*>(data) + i) = quantize8(v, fp8_scale);
    } else {
      kernels::store8(static_cast<T*>(data) + i, v);
    }
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 values; blockDim.x is a
// multiple of 32. Contains two barriers, so every thread of the block must call it.
template <typename V>
__device__ __forceinline__ V block_sum(V v, V* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : V(0);
  return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

}  // namespace rtllm::kernels
