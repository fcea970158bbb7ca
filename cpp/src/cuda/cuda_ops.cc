// CUDA implementations of the graph ops (docs/engine_format.md): each checks its tensors and calls a
// launcher of kernels/ (or cuBLASLt for linear) on the runner's stream. Activations are in the
// compute dtype (bf16, or fp16 for fp16 engines); the LM head writes the float32 logits.
#include <cmath>
#include <mutex>

#include "cuda/cublaslt_gemm.h"
#include "cuda/cuda_context.h"
#include "op_registry.h"
#include "rtllm/kernels/attention.cuh"
#include "rtllm/kernels/elementwise.cuh"
#include "rtllm/kernels/gemv.cuh"
#include "rtllm/kernels/kv_cache.cuh"
#include "rtllm/kernels/norm.cuh"
#include "rtllm/kernels/rope.cuh"

namespace rtllm {
namespace {

constexpr int32_t kMaxGemvRows = 8;  // decode-sized linears go to the GEMV kernel

const CudaStep& step_of(const OpContext& ctx) { return *static_cast<const CudaStep*>(ctx.device_step); }
cudaStream_t stream_of(const OpContext& ctx) { return static_cast<cudaStream_t>(ctx.stream); }

// Every activation an op reads or writes has the compute dtype.
void check_compute(const char* op, const OpContext& ctx, const TensorView& t, const char* what) {
  const DataType want = step_of(ctx).compute_dtype;
  RTLLM_CHECK(t.dtype == want, "op ", op, ": ", what, " must be ", dtype_safetensors_name(want), " on CUDA, got ",
              dtype_safetensors_name(t.dtype));
}

// Launchers return cudaErrorInvalidValue for unsupported runtime values, else the launch's error.
void check_launch(const char* op, cudaError_t err) {
  RTLLM_CHECK(err == cudaSuccess, "op ", op, ": kernel launch failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

void linear_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  check_num_io("linear", num_in, 2, 3, num_out, 1);
  const TensorView &x = in[0], &w = in[1], &y = out[0];
  check_compute("linear", ctx, x, "x");
  check_compute("linear", ctx, w, "weight");
  const int64_t T = x.rows(), K = x.cols(), N = w.shape[0];
  RTLLM_CHECK(w.ndim == 2 && w.shape[1] == K, "linear: weight [", w.shape[0], ", ", w.shape[1],
              "] does not match x with ", K, " columns");
  RTLLM_CHECK(y.rows() == T && y.cols() == N, "linear: output [", y.rows(), ", ", y.cols(), "], expected [", T,
              ", ", N, "]");
  RTLLM_CHECK(y.dtype == x.dtype || y.dtype == DataType::kFloat32, "linear: output dtype ",
              dtype_safetensors_name(y.dtype), " must be ", dtype_safetensors_name(x.dtype), " or F32");
  const void* bias = nullptr;
  if (num_in == 3) {
    check_compute("linear", ctx, in[2], "bias");
    RTLLM_CHECK(in[2].numel() == N, "linear: bias has ", in[2].numel(), " values, expected ", N);
    bias = in[2].data;
  }
  const CudaStep& st = step_of(ctx);
  if (T <= kMaxGemvRows && kernels::gemv_supported(static_cast<int32_t>(T), static_cast<int32_t>(K))) {
    check_launch("linear", kernels::gemv(y.data, x.data, w.data, bias, static_cast<int32_t>(T),
                                         static_cast<int32_t>(N), static_cast<int32_t>(K), kernel_dtype(x.dtype),
                                         kernel_dtype(y.dtype), stream_of(ctx)));
    return;
  }
  st.gemm->linear(y.data, x.data, w.data, bias, T, N, K, x.dtype, y.dtype, stream_of(ctx));
}

void rms_norm_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  check_num_io("rms_norm", num_in, 2, 2, num_out, 1);
  const TensorView &x = in[0], &w = in[1], &y = out[0];
  check_compute("rms_norm", ctx, x, "x");
  check_compute("rms_norm", ctx, w, "weight");
  check_compute("rms_norm", ctx, y, "output");
  const int64_t D = x.cols(), d = w.numel();
  RTLLM_CHECK(d > 0 && D % d == 0, "rms_norm: weight size ", d, " does not divide the row size ", D);
  RTLLM_CHECK(y.numel() == x.numel(), "rms_norm: output has ", y.numel(), " values, expected ", x.numel());
  const float eps = static_cast<float>(ctx.attrs->get_double("eps", 1e-6));
  check_launch("rms_norm", kernels::rms_norm(y.data, x.data, w.data, x.rows(), D, d, eps, kernel_dtype(x.dtype),
                                             stream_of(ctx)));
}

void add_rms_norm_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  check_num_io("add_rms_norm", num_in, 3, 3, num_out, 2);
  const TensorView &x = in[0], &res = in[1], &w = in[2];
  const TensorView* tensors[] = {&x, &res, &w, &out[0], &out[1]};
  for (const TensorView* t : tensors) check_compute("add_rms_norm", ctx, *t, "tensor");
  const int64_t D = x.cols();
  RTLLM_CHECK(res.numel() == x.numel() && w.numel() == D && out[0].numel() == x.numel() &&
                  out[1].numel() == x.numel(),
              "add_rms_norm: shapes do not match rows of ", D, " values");
  const float eps = static_cast<float>(ctx.attrs->get_double("eps", 1e-6));
  check_launch("add_rms_norm", kernels::add_rms_norm(out[0].data, out[1].data, x.data, res.data, w.data, x.rows(), D,
                                                     eps, kernel_dtype(x.dtype), stream_of(ctx)));
}

using BinaryLauncher = cudaError_t (*)(void*, const void*, const void*, int64_t, kernels::DType, cudaStream_t);

void binary_op(const char* name, BinaryLauncher launch, const OpContext& ctx, const TensorView* in, int num_in,
               TensorView* out, int num_out) {
  check_num_io(name, num_in, 2, 2, num_out, 1);
  const TensorView* tensors[] = {&in[0], &in[1], &out[0]};
  for (const TensorView* t : tensors) check_compute(name, ctx, *t, "tensor");
  const int64_t n = in[0].numel();
  RTLLM_CHECK(in[1].numel() == n && out[0].numel() == n, name, ": operands have ", n, " and ", in[1].numel(),
              " values, output ", out[0].numel());
  check_launch(name, launch(out[0].data, in[0].data, in[1].data, n, kernel_dtype(in[0].dtype), stream_of(ctx)));
}

void add_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  binary_op("add", kernels::add, ctx, in, num_in, out, num_out);
}

void mul_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  binary_op("mul", kernels::mul, ctx, in, num_in, out, num_out);
}

void silu_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  check_num_io("silu", num_in, 1, 1, num_out, 1);
  check_compute("silu", ctx, in[0], "x");
  check_compute("silu", ctx, out[0], "output");
  RTLLM_CHECK(out[0].numel() == in[0].numel(), "silu: output has ", out[0].numel(), " values, expected ",
              in[0].numel());
  check_launch("silu", kernels::silu(out[0].data, in[0].data, in[0].numel(), kernel_dtype(in[0].dtype),
                                     stream_of(ctx)));
}

void silu_mul_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  check_num_io("silu_mul", num_in, 1, 1, num_out, 1);
  check_compute("silu_mul", ctx, in[0], "x");
  check_compute("silu_mul", ctx, out[0], "output");
  const int64_t T = in[0].rows(), I = in[0].cols() / 2;
  RTLLM_CHECK(in[0].cols() % 2 == 0 && out[0].rows() == T && out[0].cols() == I, "silu_mul: x [", T, ", ",
              in[0].cols(), "] and output [", out[0].rows(), ", ", out[0].cols(), "] do not match");
  check_launch("silu_mul", kernels::silu_mul(out[0].data, in[0].data, T, I, kernel_dtype(in[0].dtype),
                                             stream_of(ctx)));
}

// Rows of a table [num_rows, H] at int32 indices [R] -> [R, H]. Indices come from the runtime (input
// ids are validated on the host, last_token_ids are built by the runner); the kernels clamp anyway.
void gather(const char* name, const OpContext& ctx, const TensorView& src, const TensorView& index,
            const TensorView& dst, bool embedding) {
  check_compute(name, ctx, src, "table");
  check_compute(name, ctx, dst, "output");
  RTLLM_CHECK(index.dtype == DataType::kInt32, name, ": indices must be int32");
  const int64_t H = src.cols(), R = index.numel();
  RTLLM_CHECK(dst.rows() == R && dst.cols() == H, name, ": output [", dst.rows(), ", ", dst.cols(),
              "], expected [", R, ", ", H, "]");
  const auto dtype = kernel_dtype(src.dtype);
  const int64_t num_src_rows = src.rows();
  check_launch(name, embedding ? kernels::embedding(dst.data, index.i32(), src.data, R, H, num_src_rows, dtype,
                                                    stream_of(ctx))
                               : kernels::gather_rows(dst.data, src.data, index.i32(), R, H, num_src_rows, dtype,
                                                      stream_of(ctx)));
}

void embedding_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  check_num_io("embedding", num_in, 2, 2, num_out, 1);
  gather("embedding", ctx, in[1], in[0], out[0], true);
}

void gather_rows_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  check_num_io("gather_rows", num_in, 2, 2, num_out, 1);
  gather("gather_rows", ctx, in[0], in[1], out[0], false);
}

void rope_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  check_num_io("rope", num_in, 3, 3, num_out, 1);
  const TensorView &x = in[0], &pos = in[1], &inv_freq = in[2], &y = out[0];
  check_compute("rope", ctx, x, "x");
  check_compute("rope", ctx, y, "output");
  const int64_t T = x.rows(), D = x.cols();
  const int64_t hd = ctx.attrs->at("head_dim").as_int();
  RTLLM_CHECK(hd > 0 && hd % 2 == 0 && D % hd == 0, "rope: head_dim ", hd, " must be even and divide the row size ",
              D);
  RTLLM_CHECK(inv_freq.dtype == DataType::kFloat32 && inv_freq.numel() == hd / 2, "rope: inv_freq must be F32 [",
              hd / 2, "]");
  RTLLM_CHECK(pos.dtype == DataType::kInt32 && pos.numel() == T, "rope: positions must be int32 [", T, "]");
  RTLLM_CHECK(y.numel() == x.numel(), "rope: output has ", y.numel(), " values, expected ", x.numel());
  check_launch("rope", kernels::rope(y.data, x.data, pos.i32(), inv_freq.f32(), T, static_cast<int32_t>(D / hd),
                                     static_cast<int32_t>(hd), kernel_dtype(x.dtype), stream_of(ctx)));
}

}  // namespace

void register_cuda_attention_op();  // cuda_attention.cc

void register_cuda_ops() {
  static std::once_flag once;
  std::call_once(once, [] {
    register_op("linear", DeviceKind::kCuda, linear_op);
    register_op("rms_norm", DeviceKind::kCuda, rms_norm_op);
    register_op("add_rms_norm", DeviceKind::kCuda, add_rms_norm_op);
    register_op("add", DeviceKind::kCuda, add_op);
    register_op("mul", DeviceKind::kCuda, mul_op);
    register_op("silu", DeviceKind::kCuda, silu_op);
    register_op("silu_mul", DeviceKind::kCuda, silu_mul_op);
    register_op("embedding", DeviceKind::kCuda, embedding_op);
    register_op("gather_rows", DeviceKind::kCuda, gather_rows_op);
    register_op("rope", DeviceKind::kCuda, rope_op);
    register_cuda_attention_op();
  });
}

}  // namespace rtllm
