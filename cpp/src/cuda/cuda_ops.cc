// CUDA implementations of the graph ops (docs/engine_format.md): each checks its tensors and calls a
// launcher of kernels/ (or cuBLASLt for linear) on the runner's stream. Activations are in the
// compute dtype (bf16, or fp16 for fp16 engines); the LM head writes the float32 logits.
#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include "cuda/cublaslt_gemm.h"
#include "cuda/cuda_context.h"
#include "cuda/linear_path_tuner.h"
#include "op_registry.h"
#include "rtllm/kernels/attention.cuh"
#include "rtllm/kernels/elementwise.cuh"
#include "rtllm/kernels/gemv.cuh"
#include "rtllm/kernels/kv_cache.cuh"
#include "rtllm/kernels/norm.cuh"
#include "rtllm/kernels/rope.cuh"

namespace rtllm {
namespace {

constexpr int32_t kMaxGemvRows = 16;  // by default (no timed choice) decode-sized linears go to the GEMV

const CudaStep& step_of(const OpContext& ctx) { return *static_cast<const CudaStep*>(ctx.device_step); }
cudaStream_t stream_of(const OpContext& ctx) { return static_cast<cudaStream_t>(ctx.stream); }

// Launchers return cudaErrorInvalidValue for unsupported runtime values, else the launch's error.
void check_launch(const char* op, cudaError_t err) {
  RTLLM_CHECK(err == cudaSuccess, "op ", op, ": kernel launch failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

// An op on activations in the compute dtype (bf16, or fp16 for fp16 engines) whose float weights are
// placed in that dtype too. Inputs listed in `int32_inputs` are indices.
class ComputeOp : public OpKind {
 protected:
  ComputeOp(const OpSpec& spec, size_t min_inputs, size_t max_inputs, size_t num_outputs,
            std::vector<size_t> int32_inputs = {})
      : OpKind(spec), dtype_(kernel_dtype(spec.backend->activation_dtype)) {
    spec.require_num_io(min_inputs, max_inputs, num_outputs);
    for (size_t i = 0; i < spec.inputs.size(); ++i) {
      const bool index = std::find(int32_inputs.begin(), int32_inputs.end(), i) != int32_inputs.end();
      if (index) {
        spec.require_input_dtype(i, {DataType::kInt32});
      } else {
        spec.require_input_dtype(i, spec.input_is_weight[i] ? kWideFloatDtypes : std::vector<DataType>{DataType::kFloat32});
      }
    }
  }
  WeightPlacement weight_placement(size_t) const override { return in_activation_dtype(); }
  const kernels::DType dtype_;
};

// y [T, N] = x [T, K] · w [N, K]ᵀ (+ bias [N]) of a 16-bit x and w, y in their dtype or float32: the GEMV or
// cuBLASLt up to kGemvMaxM tokens, as `tuner` chooses (by default the GEMV up to kMaxGemvRows tokens),
// cuBLASLt beyond. The linear op's path, and linear_for_tests'.
//
// Rows cuBLASLt cannot take (CublasLtGemm::linear_rows_aligned: an odd vocabulary's logits) run the GEMV,
// which takes any N, on blocks of up to kGemvMaxM tokens whatever T (each block rereads the weight: slower,
// and only there). A token's row from the GEMV does not depend on the other tokens of its call, so the blocks
// change no result.
void run_linear(CublasLtGemm& gemm, LinearPathTuner& tuner, void* y, const void* x, const void* w, const void* bias,
                int64_t T, int64_t N, int64_t K, DataType x_dtype, DataType y_dtype, cudaStream_t stream) {
  const size_t x_row = K * dtype_size(x_dtype), y_row = N * dtype_size(y_dtype);
  const auto run_gemv = [&] {
    for (int64_t t0 = 0; t0 < T; t0 += kernels::kGemvMaxM) {
      const int32_t m = static_cast<int32_t>(std::min<int64_t>(kernels::kGemvMaxM, T - t0));
      check_launch("linear", kernels::gemv(static_cast<char*>(y) + t0 * y_row, static_cast<const char*>(x) + t0 * x_row,
                                           w, bias, m, static_cast<int32_t>(N), static_cast<int32_t>(K),
                                           kernel_dtype(x_dtype), kernel_dtype(y_dtype), stream));
    }
  };
  const auto run_gemm = [&] { gemm.linear(y, x, w, bias, T, N, K, x_dtype, y_dtype, stream); };
  const bool gemv_ok = kernels::gemv_supported(1, static_cast<int32_t>(K));
  const bool gemm_ok = CublasLtGemm::linear_rows_aligned(N, K, x_dtype, y_dtype);
  LinearPath path = gemv_ok && (T <= kMaxGemvRows || !gemm_ok) ? LinearPath::kGemv : LinearPath::kGemm;
  if (gemv_ok && gemm_ok && T <= kernels::kGemvMaxM) {
    const LinearPathTuner::Shape shape{LinearOp::kDense, N, K, static_cast<int>(x_dtype), static_cast<int>(y_dtype),
                                       bias != nullptr};
    path = tuner.choose(shape, T, path, stream, run_gemv, run_gemm);
  }
  if (path == LinearPath::kGemv) {
    run_gemv();
  } else {
    run_gemm();
  }
}

// x [T, K] · weight [N, K]ᵀ (+ bias [N]) -> [T, N] in the compute dtype, or float32 for the logits.
class Linear final : public ComputeOp {
 public:
  explicit Linear(const OpSpec& spec) : ComputeOp(spec, 2, 3, 1) {
    // Both of run_linear's paths read x in 16-byte rows: refused here rather than failing mid-request.
    const TensorSpec& w = spec.inputs[1];
    const bool ok = w.shape.size() == 2 && w.shape[1].kind == Dim::Kind::kFixed && w.shape[1].value % 8 == 0;
    RTLLM_CHECK(ok, "linear: weight \"", w.name, "\" must be [N, K] with K a multiple of 8 on CUDA (16-byte rows)",
                w.shape.size() == 2 ? detail::concat(", K is ", w.shape[1].value) : std::string());
  }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &w = in[1], &y = out[0];
    const int64_t T = x.rows(), K = x.cols(), N = w.shape[0];
    RTLLM_CHECK(w.ndim == 2 && w.shape[1] == K, "linear: weight [", w.shape[0], ", ", w.shape[1],
                "] does not match x with ", K, " columns");
    RTLLM_CHECK(y.rows() == T && y.cols() == N, "linear: output [", y.rows(), ", ", y.cols(), "], expected [", T,
                ", ", N, "]");
    const void* bias = nullptr;
    if (spec_.inputs.size() == 3) {
      RTLLM_CHECK(in[2].numel() == N, "linear: bias has ", in[2].numel(), " values, expected ", N);
      bias = in[2].data;
    }
    const CudaStep& step = step_of(ctx);
    run_linear(*step.gemm, *step.linear_paths, y.data, x.data, w.data, bias, T, N, K, x.dtype, y.dtype,
               stream_of(ctx));
  }
};

// x [T, D], weight [d] with d dividing D: each run of d values normalized on its own.
class RmsNorm final : public ComputeOp {
 public:
  explicit RmsNorm(const OpSpec& spec)
      : ComputeOp(spec, 2, 2, 1), eps_(static_cast<float>(spec.node->attrs.get_double("eps", 1e-6))),
        fp8_scale_(fp8_output_scale(spec)) {}

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &w = in[1], &y = out[0];
    const int64_t D = x.cols(), d = w.numel();
    RTLLM_CHECK(d > 0 && D % d == 0, "rms_norm: weight size ", d, " does not divide the row size ", D);
    RTLLM_CHECK(y.numel() == x.numel(), "rms_norm: output has ", y.numel(), " values, expected ", x.numel());
    check_launch("rms_norm",
                 kernels::rms_norm(y.data, x.data, w.data, x.rows(), D, d, eps_, dtype_, stream_of(ctx), fp8_scale_));
  }

 private:
  const float eps_;
  const float fp8_scale_;  // > 0: the output is E4M3 codes (docs/engine_format.md, "FP8 outputs")
};

// Outputs [normed, sum]: sum = x + residual, normed = rms_norm(sum).
class AddRmsNorm final : public ComputeOp {
 public:
  explicit AddRmsNorm(const OpSpec& spec)
      : ComputeOp(spec, 3, 3, 2), eps_(static_cast<float>(spec.node->attrs.get_double("eps", 1e-6))),
        fp8_scale_(fp8_output_scale(spec)) {}

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &res = in[1], &w = in[2];
    const int64_t D = x.cols();
    RTLLM_CHECK(res.numel() == x.numel() && w.numel() == D && out[0].numel() == x.numel() &&
                    out[1].numel() == x.numel(),
                "add_rms_norm: shapes do not match rows of ", D, " values");
    check_launch("add_rms_norm", kernels::add_rms_norm(out[0].data, out[1].data, x.data, res.data, w.data, x.rows(),
                                                       D, eps_, dtype_, stream_of(ctx), fp8_scale_));
  }

 private:
  const float eps_;
  const float fp8_scale_;  // > 0: the normed output is E4M3 codes
};

using BinaryLauncher = cudaError_t (*)(void*, const void*, const void*, int64_t, kernels::DType, cudaStream_t);

template <BinaryLauncher kLaunch>
class Binary final : public ComputeOp {
 public:
  explicit Binary(const OpSpec& spec) : ComputeOp(spec, 2, 2, 1) {}

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const int64_t n = in[0].numel();
    RTLLM_CHECK(in[1].numel() == n && out[0].numel() == n, spec_.op(), ": operands have ", n, " and ",
                in[1].numel(), " values, output ", out[0].numel());
    check_launch(spec_.op().c_str(), kLaunch(out[0].data, in[0].data, in[1].data, n, dtype_, stream_of(ctx)));
  }
};

class Silu final : public ComputeOp {
 public:
  explicit Silu(const OpSpec& spec) : ComputeOp(spec, 1, 1, 1) {}

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    RTLLM_CHECK(out[0].numel() == in[0].numel(), "silu: output has ", out[0].numel(), " values, expected ",
                in[0].numel());
    check_launch("silu", kernels::silu(out[0].data, in[0].data, in[0].numel(), dtype_, stream_of(ctx)));
  }
};

class SiluMul final : public ComputeOp {
 public:
  explicit SiluMul(const OpSpec& spec) : ComputeOp(spec, 1, 1, 1), fp8_scale_(fp8_output_scale(spec)) {}

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const int64_t T = in[0].rows(), I = in[0].cols() / 2;
    RTLLM_CHECK(in[0].cols() % 2 == 0 && out[0].rows() == T && out[0].cols() == I, "silu_mul: x [", T, ", ",
                in[0].cols(), "] and output [", out[0].rows(), ", ", out[0].cols(), "] do not match");
    check_launch("silu_mul", kernels::silu_mul(out[0].data, in[0].data, T, I, dtype_, stream_of(ctx), fp8_scale_));
  }

 private:
  const float fp8_scale_;  // > 0: the output is E4M3 codes
};

// Rows of a table [num_rows, H] at int32 indices [R] -> [R, H]; embedding: (ids, table), gather_rows:
// (x, index). Indices come from the runtime (input ids are validated on the host, last_token_ids are
// built by the runner); the kernels clamp anyway.
class Gather final : public ComputeOp {
 public:
  explicit Gather(const OpSpec& spec)
      : ComputeOp(spec, 2, 2, 1, {spec.op() == "embedding" ? size_t{0} : size_t{1}}),
        embedding_(spec.op() == "embedding") {
    RTLLM_CHECK(!spec.node->attrs.get_bool("vocab_parallel", false), spec.op(), ": vocab_parallel (tensor "
                "parallelism) is not supported on the CUDA backend yet (it needs the NCCL communicator)");
  }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &src = in[embedding_ ? 1 : 0], &index = in[embedding_ ? 0 : 1], &dst = out[0];
    const int64_t H = src.cols(), R = index.numel(), num_src_rows = src.rows();
    RTLLM_CHECK(dst.rows() == R && dst.cols() == H, spec_.op(), ": output [", dst.rows(), ", ", dst.cols(),
                "], expected [", R, ", ", H, "]");
    check_launch(spec_.op().c_str(),
                 embedding_ ? kernels::embedding(dst.data, index.i32(), src.data, R, H, num_src_rows, dtype_,
                                                 stream_of(ctx))
                            : kernels::gather_rows(dst.data, src.data, index.i32(), R, H, num_src_rows, dtype_,
                                                   stream_of(ctx)));
  }

 private:
  const bool embedding_;
};

// x [T, n·hd] rotated per head at positions [T] int32 with inv_freq [hd/2], kept float32.
class Rope final : public ComputeOp {
 public:
  explicit Rope(const OpSpec& spec)
      : ComputeOp(spec, 3, 3, 1, {1}), head_dim_(static_cast<int32_t>(spec.node->attrs.at("head_dim").as_int())) {
    spec.require_input_dtype(2, {DataType::kFloat32});
    RTLLM_CHECK(head_dim_ > 0 && head_dim_ % 2 == 0, "rope: head_dim ", head_dim_, " must be even");
  }
  WeightPlacement weight_placement(size_t input) const override { return OpKind::weight_placement(input); }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &pos = in[1], &inv_freq = in[2], &y = out[0];
    const int64_t T = x.rows(), D = x.cols(), hd = head_dim_;
    RTLLM_CHECK(D % hd == 0, "rope: head_dim ", hd, " does not divide the row size ", D);
    RTLLM_CHECK(inv_freq.numel() == hd / 2, "rope: inv_freq must have ", hd / 2, " values");
    RTLLM_CHECK(pos.numel() == T, "rope: positions must be int32 [", T, "]");
    RTLLM_CHECK(y.numel() == x.numel(), "rope: output has ", y.numel(), " values, expected ", x.numel());
    check_launch("rope", kernels::rope(y.data, x.data, pos.i32(), inv_freq.f32(), T, static_cast<int32_t>(D / hd),
                                       head_dim_, dtype_, stream_of(ctx)));
  }

 private:
  const int32_t head_dim_;
};

}  // namespace

// The linear op's path on device pointers (tests, benchmarks): x and w of dtype (BF16 or F16), y of y_dtype
// (that or F32), bias of dtype or null.
RTLLM_API void linear_for_tests(void* y, const void* x, const void* w, const void* bias, int64_t T, int64_t N,
                                int64_t K, DataType dtype, DataType y_dtype, void* stream) {
  RTLLM_CHECK_ARG(T > 0 && N > 0 && K > 0, "linear: T, N, K = ", T, ", ", N, ", ", K, " must be positive");
  RTLLM_CHECK_ARG(dtype == DataType::kBFloat16 || dtype == DataType::kFloat16, "linear: dtype ",
                  dtype_safetensors_name(dtype), " is not BF16 or F16");
  RTLLM_CHECK_ARG(y_dtype == dtype || y_dtype == DataType::kFloat32, "linear: y_dtype ",
                  dtype_safetensors_name(y_dtype), " is neither x's dtype nor F32");
  // Kept for the process (never destroyed: the CUDA context may be gone at exit); its plans are cached
  // like the runner's.
  static CublasLtGemm* gemm = new CublasLtGemm(32u << 20);
  // Tuning always on: each shape's first call (a benchmark's eager warm-up call) times both paths.
  static LinearPathTuner* tuner = [] {
    auto* t = new LinearPathTuner;
    t->set_tuning(true);
    return t;
  }();
  run_linear(*gemm, *tuner, y, x, w, bias, T, N, K, dtype, y_dtype, static_cast<cudaStream_t>(stream));
}

void register_cuda_attention_op();  // cuda_attention.cc
void register_cuda_fp8_linear_op();  // cuda_fp8_linear.cc
void register_cuda_weight_only_linear_op();  // cuda_weight_only_linear.cc
void register_cuda_int8_linear_op();  // cuda_int8_linear.cc

void register_cuda_ops() {
  static std::once_flag once;
  std::call_once(once, [] {
    register_op("linear", DeviceKind::kCuda, make_op<Linear>);
    register_cuda_fp8_linear_op();
    register_cuda_weight_only_linear_op();
    register_cuda_int8_linear_op();
    register_op("rms_norm", DeviceKind::kCuda, make_op<RmsNorm>);
    register_op("add_rms_norm", DeviceKind::kCuda, make_op<AddRmsNorm>);
    register_op("add", DeviceKind::kCuda, make_op<Binary<kernels::add>>);
    register_op("mul", DeviceKind::kCuda, make_op<Binary<kernels::mul>>);
    register_op("silu", DeviceKind::kCuda, make_op<Silu>);
    register_op("silu_mul", DeviceKind::kCuda, make_op<SiluMul>);
    register_op("embedding", DeviceKind::kCuda, make_op<Gather>);
    register_op("gather_rows", DeviceKind::kCuda, make_op<Gather>);
    register_op("rope", DeviceKind::kCuda, make_op<Rope>);
    register_cuda_attention_op();
  });
}

}  // namespace rtllm
