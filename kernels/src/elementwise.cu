// Elementwise and row-gather ops. 16-byte vector paths when every pointer is 16-byte aligned and the
// sizes are multiples of 8 elements, scalar grid-stride loops otherwise.
#include <algorithm>
#include <cfloat>
#include <cstdlib>

#include "dispatch.cuh"
#include "rtllm/kernels/elementwise.cuh"

namespace rtllm::kernels {
namespace {

constexpr int kThreads = 256;

// Enough blocks to cover `work` items with kThreads each, capped (the kernels are grid-stride).
unsigned grid_for(int64_t work) { return (unsigned)std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kThreads), 65536)); }

__device__ __forceinline__ float silu_f(float v) { return v / (1.0f + expf(-v)); }

struct AddOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct MulOp {
  __device__ float operator()(float a, float b) const { return a * b; }
};

template <typename T, typename Op>
__global__ void binary_vec_kernel(T* out, const T* a, const T* b, int64_t num_vecs, Op op) {
  pdl_begin();
  for (int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; v < num_vecs; v += (int64_t)gridDim.x * blockDim.x) {
    float af[8], bf[8];
    to_float8(load8(a + v * 8), af);
    to_float8(load8(b + v * 8), bf);
#pragma unroll
    for (int i = 0; i < 8; ++i) af[i] = op(af[i], bf[i]);
    store8(out + v * 8, from_float8<T>(af));
  }
}

template <typename T, typename Op>
__global__ void binary_scalar_kernel(T* out, const T* a, const T* b, int64_t n, Op op) {
  pdl_begin();
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = from_float<T>(op(to_float(a[i]), to_float(b[i])));
}

template <typename T>
__global__ void silu_kernel(T* out, const T* x, int64_t n, bool vec) {
  pdl_begin();
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  if (vec) {
    for (int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; v < n / 8; v += stride) {
      float f[8];
      to_float8(load8(x + v * 8), f);
#pragma unroll
      for (int i = 0; i < 8; ++i) f[i] = silu_f(f[i]);
      store8(out + v * 8, from_float8<T>(f));
    }
  } else {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
      out[i] = from_float<T>(silu_f(to_float(x[i])));
  }
}

// out [rows, inter] = silu(x[:, :inter]) · x[:, inter:], x [rows, 2·inter].
template <typename T>
__global__ void silu_mul_kernel(RowOut<T> out, const T* x, int64_t num_rows, int64_t inter, bool vec) {
  pdl_begin();
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  if (vec) {
    const int64_t vecs_per_row = inter / 8;
    for (int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; v < num_rows * vecs_per_row; v += stride) {
      const int64_t r = v / vecs_per_row, c = (v % vecs_per_row) * 8;
      float g[8], u[8];
      to_float8(load8(x + r * 2 * inter + c), g);
      to_float8(load8(x + r * 2 * inter + inter + c), u);
#pragma unroll
      for (int i = 0; i < 8; ++i) g[i] = silu_f(g[i]) * u[i];
      out.store8(r * inter + c, from_float8<T>(g));
    }
  } else {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < num_rows * inter; i += stride) {
      const int64_t r = i / inter, c = i % inter;
      static_cast<T*>(out.data)[i] =  // a T output (E4M3 codes take the vector path)
          from_float<T>(silu_f(to_float(x[r * 2 * inter + c])) * to_float(x[r * 2 * inter + inter + c]));
    }
  }
}

// out [num_rows, row_size] = src[clamp(index[r])]; `index` null means row r (a plain copy).
template <typename T>
__global__ void gather_kernel(T* out, const T* src, const int32_t* index, int64_t num_rows, int64_t row_size,
                              int64_t num_src_rows, bool vec) {
  pdl_begin();
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const int w = vec ? 8 : 1;
  const int64_t units_per_row = row_size / w;
  for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < num_rows * units_per_row; u += stride) {
    const int64_t r = u / units_per_row, c = (u % units_per_row) * w;
    const int64_t s = min(max((int64_t)index[r], (int64_t)0), num_src_rows - 1);
    if (vec)
      store8(out + r * row_size + c, load8(src + s * row_size + c));
    else
      out[r * row_size + c] = src[s * row_size + c];
  }
}

template <typename T>
__global__ void cast_to_float_kernel(float* out, const T* x, int64_t n) {
  pdl_begin();
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = to_float(x[i]);
}

template <typename Out, typename In>
__global__ void convert_kernel(Out* out, const In* x, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = from_float<Out>(to_float(x[i]));
}

template <typename Op>
cudaError_t binary(void* out, const void* a, const void* b, int64_t n, DType dtype, cudaStream_t stream, Op op) {
  RTLLM_KERNEL_CHECK(out && a && b && n >= 0);
  if (n == 0) return cudaSuccess;
  const bool vec = n % 8 == 0 && aligned16(out) && aligned16(a) && aligned16(b);
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    if (vec)
      launch_pdl(binary_vec_kernel<T, Op>, grid_for(n / 8), kThreads, 0, stream, static_cast<T*>(out),
                 static_cast<const T*>(a), static_cast<const T*>(b), n / 8, op);
    else
      launch_pdl(binary_scalar_kernel<T, Op>, grid_for(n), kThreads, 0, stream, static_cast<T*>(out),
                 static_cast<const T*>(a), static_cast<const T*>(b), n, op);
  });
  return cudaGetLastError();
}

cudaError_t gather(void* out, const void* src, const int32_t* index, int64_t num_rows, int64_t row_size,
                   int64_t num_src_rows, DType dtype, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(out && src && index && num_rows >= 0 && row_size > 0 && num_src_rows > 0);
  if (num_rows == 0) return cudaSuccess;
  const bool vec = row_size % 8 == 0 && aligned16(out) && aligned16(src);
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    launch_pdl(gather_kernel<T>, grid_for(num_rows * row_size / (vec ? 8 : 1)), kThreads, 0, stream,
        static_cast<T*>(out), static_cast<const T*>(src), index, num_rows, row_size, num_src_rows, vec);
  });
  return cudaGetLastError();
}

// |x| of a float (NaN included: its bits exceed +inf's) orders like its bits as an unsigned integer, so
// one atomicMax on the bits keeps the running maximum.
template <typename T>
__global__ void amax_kernel(unsigned int* out, const T* x, int64_t n) {
  float m = 0.0f;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float a = fabsf(static_cast<float>(x[i]));
    m = __float_as_uint(a) > __float_as_uint(m) ? a : m;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(0xffffffffu, m, offset);
    m = __float_as_uint(other) > __float_as_uint(m) ? other : m;
  }
  if ((threadIdx.x & 31) == 0) atomicMax(out, __float_as_uint(m));
}

}  // namespace

const char* error_string(cudaError_t err) { return cudaGetErrorString(err); }

bool programmatic_launch_enabled() {
  static const bool enabled = [] {
    if (env_is("RTLLM_PDL", "0")) return false;
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
      cudaGetLastError();  // leave no error behind for the launcher that asked
      return false;
    }
    return major >= 9;
  }();
  return enabled;
}

cudaError_t embedding(void* out, const int32_t* ids, const void* table, int64_t num_tokens, int64_t hidden,
                      int64_t num_table_rows, DType dtype, cudaStream_t stream) {
  return gather(out, table, ids, num_tokens, hidden, num_table_rows, dtype, stream);
}

cudaError_t gather_rows(void* out, const void* x, const int32_t* index, int64_t num_rows, int64_t row_size,
                        int64_t num_src_rows, DType dtype, cudaStream_t stream) {
  return gather(out, x, index, num_rows, row_size, num_src_rows, dtype, stream);
}

cudaError_t add(void* out, const void* a, const void* b, int64_t n, DType dtype, cudaStream_t stream) {
  return binary(out, a, b, n, dtype, stream, AddOp{});
}

cudaError_t mul(void* out, const void* a, const void* b, int64_t n, DType dtype, cudaStream_t stream) {
  return binary(out, a, b, n, dtype, stream, MulOp{});
}

cudaError_t silu(void* out, const void* x, int64_t n, DType dtype, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(out && x && n >= 0);
  if (n == 0) return cudaSuccess;
  const bool vec = n % 8 == 0 && aligned16(out) && aligned16(x);
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    launch_pdl(silu_kernel<T>, grid_for(vec ? n / 8 : n), kThreads, 0, stream, static_cast<T*>(out),
               static_cast<const T*>(x), n, vec);
  });
  return cudaGetLastError();
}

cudaError_t silu_mul(void* out, const void* x, int64_t num_rows, int64_t inter, DType dtype, cudaStream_t stream,
                     float fp8_out_scale) {
  RTLLM_KERNEL_CHECK(out && x && num_rows >= 0 && inter > 0);
  const bool vec = inter % 8 == 0 && aligned16(out) && aligned16(x);
  RTLLM_KERNEL_CHECK(fp8_out_scale >= 0.0f && fp8_out_scale <= FLT_MAX && (fp8_out_scale == 0.0f || vec));
  if (num_rows == 0) return cudaSuccess;
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    launch_pdl(silu_mul_kernel<T>, grid_for(num_rows * inter / (vec ? 8 : 1)), kThreads, 0, stream,
        RowOut<T>{out, fp8_out_scale}, static_cast<const T*>(x), num_rows, inter, vec);
  });
  return cudaGetLastError();
}

cudaError_t cast_to_float(float* out, const void* x, int64_t n, DType dtype, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(out && x && n >= 0);
  if (n == 0) return cudaSuccess;
  if (dtype == DType::kFP32) return cudaMemcpyAsync(out, x, n * sizeof(float), cudaMemcpyDeviceToDevice, stream);
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    launch_pdl(cast_to_float_kernel<T>, grid_for(n), kThreads, 0, stream, out, static_cast<const T*>(x), n);
  });
  return cudaGetLastError();
}

cudaError_t convert(void* out, DType out_dtype, const void* x, DType x_dtype, int64_t n, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(out && x && n >= 0);
  if (n == 0) return cudaSuccess;
  RTLLM_DISPATCH_FLOAT_DTYPE(out_dtype, Out, {
    RTLLM_DISPATCH_FLOAT_DTYPE(x_dtype, In, {
      convert_kernel<Out, In><<<grid_for(n), kThreads, 0, stream>>>(static_cast<Out*>(out),
                                                                    static_cast<const In*>(x), n);
    });
  });
  return cudaGetLastError();
}

cudaError_t amax(float* out, const void* x, int64_t n, DType dtype, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(out && x && n >= 0);
  if (n == 0) return cudaSuccess;
  auto* bits = reinterpret_cast<unsigned int*>(out);
  RTLLM_DISPATCH_FLOAT_DTYPE(dtype, T, {
    amax_kernel<T><<<std::min(grid_for(n), 1024u), kThreads, 0, stream>>>(bits, static_cast<const T*>(x), n);
  });
  return cudaGetLastError();
}

}  // namespace rtllm::kernels
