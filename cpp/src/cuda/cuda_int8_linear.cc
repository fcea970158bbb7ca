// int8_linear on CUDA (docs/engine_format.md, W8A8_SQ_PER_CHANNEL): y[T, N] = x[T, K] · W[N, K]ᵀ with int8
// weights scaled per output channel and activations quantized to int8 per token:
//   1. a kernel quantizes each row of x (times pre_quant_scale) into int8 codes and its scale;
//   2. cuBLASLt's int8 GEMM sums the code products exactly into int32 accumulators;
//   3. a kernel applies a_scale[t] · w_scale[n] and the bias in the contract's order into y's dtype.
// Everything a step does is kernel launches on the runner's stream over the workspace sized at load:
// capturable in a CUDA graph.
#include <string>

#include "cuda/cublaslt_gemm.h"
#include "cuda/cuda_context.h"
#include "int8_linear_spec.h"
#include "op_registry.h"
#include "rtllm/kernels/int8.cuh"

namespace rtllm {
namespace {

constexpr size_t kAlign = 256;

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Workspace: codes [T, K] int8, token scales [T] float32, accumulators [T, N] int32.
size_t int8_workspace_bytes(int64_t max_rows, int64_t N, int64_t K) {
  return align_up(static_cast<size_t>(max_rows) * K) + align_up(sizeof(float) * max_rows) +
         align_up(sizeof(int32_t) * static_cast<size_t>(max_rows) * N);
}

void check_launch(const char* what, cudaError_t err) {
  RTLLM_CHECK(err == cudaSuccess, "op int8_linear: ", what, " failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

// One int8_linear call on device pointers; shared by the op kind and the test hook below.
struct Int8LinearCall {
  void* y = nullptr;
  const void* x = nullptr;
  const int8_t* w = nullptr;
  const float* w_scale = nullptr;
  const float* pre_quant_scale = nullptr;  // null: none
  const void* bias = nullptr;              // null: none; x's dtype
  int64_t T = 0, N = 0, K = 0;
  DataType x_dtype = DataType::kBFloat16;
  DataType y_dtype = DataType::kBFloat16;
};

void run_int8_linear(const Int8LinearCall& c, CublasLtGemm& gemm, void* workspace, cudaStream_t stream) {
  if (c.T == 0) return;
  auto* ws = static_cast<uint8_t*>(workspace);
  auto* q = reinterpret_cast<int8_t*>(ws);
  auto* a_scale = reinterpret_cast<float*>(ws + align_up(static_cast<size_t>(c.T) * c.K));
  auto* acc = reinterpret_cast<int32_t*>(reinterpret_cast<uint8_t*>(a_scale) + align_up(sizeof(float) * c.T));
  const kernels::DType x_kind = kernel_dtype(c.x_dtype), y_kind = kernel_dtype(c.y_dtype);
  check_launch("int8_quantize_per_token",
               kernels::int8_quantize_per_token(q, a_scale, c.x, c.pre_quant_scale, c.T, c.K, x_kind, stream));
  gemm.int8_gemm(acc, q, c.w, c.T, c.N, c.K, stream);
  check_launch("int8_scale_epilogue", kernels::int8_scale_epilogue(c.y, acc, a_scale, c.w_scale, c.bias, c.T, c.N,
                                                                   x_kind, y_kind, stream));
}

// The K cuBLASLt's int8 GEMM and the quantize kernel's 16-byte rows take: a multiple of 16.
void require_k(const std::string& weight, int64_t K) {
  RTLLM_CHECK(K % 16 == 0, "int8_linear: weight \"", weight, "\" has K = ", K,
              " columns; the CUDA backend needs a multiple of 16 (cuBLASLt's int8 GEMM)");
}

// Inputs as Int8LinearShape; the optional bias placed in the compute dtype.
class CudaInt8Linear final : public OpKind {
 public:
  explicit CudaInt8Linear(const OpSpec& spec) : OpKind(spec), s_(Int8LinearShape::parse(spec, {DataType::kFloat32})) {
    require_k(spec.inputs[1].name, s_.K);
  }

  WeightPlacement weight_placement(size_t input) const override {
    if (s_.has_bias && input == s_.bias_input) return in_activation_dtype();
    return OpKind::weight_placement(input);  // codes and float32 scales as stored
  }

  size_t workspace_bytes() const override { return int8_workspace_bytes(s_.max_rows, s_.N, s_.K); }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &y = out[0];
    Int8LinearCall c;
    c.T = x.rows();
    c.K = x.cols();
    c.N = y.cols();
    RTLLM_CHECK(c.K == s_.K && c.N == s_.N && y.rows() == c.T, "int8_linear: x [", c.T, ", ", c.K, "] -> y [",
                y.rows(), ", ", c.N, "] does not match the weight [", s_.N, ", ", s_.K, "]");
    RTLLM_CHECK(c.T <= s_.max_rows, "int8_linear: x has ", c.T, " rows, more than the ", s_.max_rows,
                " planned at load");
    c.y = y.data;
    c.x = x.data;
    c.w = static_cast<const int8_t*>(in[1].data);
    c.w_scale = in[2].f32();
    c.pre_quant_scale = s_.has_pre_quant_scale ? in[s_.pre_quant_scale_input].f32() : nullptr;
    c.bias = s_.has_bias ? in[s_.bias_input].data : nullptr;
    c.x_dtype = x.dtype;
    c.y_dtype = y.dtype;
    const CudaStep& step = *static_cast<const CudaStep*>(ctx.device_step);
    run_int8_linear(c, *step.gemm, ctx.workspace, static_cast<cudaStream_t>(ctx.stream));
  }

 private:
  const Int8LinearShape s_;
};

}  // namespace

void register_cuda_int8_linear_op() { register_op("int8_linear", DeviceKind::kCuda, make_op<CudaInt8Linear>); }

// Test hook (rtllm._core.kernels.int8_linear): one int8_linear on device pointers through the op's code path,
// with its own cuBLASLt instance. workspace of int8_linear_workspace_bytes().
RTLLM_API size_t int8_linear_workspace_bytes(int64_t T, int64_t N, int64_t K) { return int8_workspace_bytes(T, N, K); }

RTLLM_API void int8_linear_for_tests(void* y, const void* x, const void* w, const void* w_scale,
                                     const void* pre_quant_scale, const void* bias, int64_t T, int64_t N, int64_t K,
                                     DataType x_dtype, DataType y_dtype, void* workspace, void* stream) {
  RTLLM_CHECK_ARG(T >= 0 && N > 0 && K > 0 && K <= kInt8LinearMaxK, "int8_linear: T = ", T, ", N = ", N, ", K = ", K,
                  " (need T >= 0, N > 0, 0 < K <= ", kInt8LinearMaxK, ")");
  RTLLM_CHECK_ARG(K % 16 == 0, "int8_linear: K = ", K, " columns; the CUDA backend needs a multiple of 16 "
                  "(cuBLASLt's int8 GEMM)");
  RTLLM_CHECK_ARG(x_dtype == DataType::kBFloat16 || x_dtype == DataType::kFloat16, "int8_linear: x dtype ",
                  dtype_safetensors_name(x_dtype), " is not BF16 or F16");
  RTLLM_CHECK_ARG(y_dtype == x_dtype || y_dtype == DataType::kFloat32, "int8_linear: y dtype ",
                  dtype_safetensors_name(y_dtype), " is not x's or F32");
  // Kept for the process (never destroyed: the CUDA context may be gone at exit).
  static CublasLtGemm* gemm = new CublasLtGemm(32u << 20);
  Int8LinearCall c;
  c.y = y;
  c.x = x;
  c.w = static_cast<const int8_t*>(w);
  c.w_scale = static_cast<const float*>(w_scale);
  c.pre_quant_scale = static_cast<const float*>(pre_quant_scale);
  c.bias = bias;
  c.T = T;
  c.N = N;
  c.K = K;
  c.x_dtype = x_dtype;
  c.y_dtype = y_dtype;
  run_int8_linear(c, *gemm, workspace, static_cast<cudaStream_t>(stream));
}

}  // namespace rtllm
