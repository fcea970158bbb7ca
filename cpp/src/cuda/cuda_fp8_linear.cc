// fp8_linear on CUDA (docs/engine_format.md): y[T, N] = x[T, K] · W[N, K]ᵀ with E4M3 weights.
//   per_token (FP8_PER_CHANNEL_PER_TOKEN): weight_scale [N]; each token quantized with its own scale
//     s_t = max(amax |x[t]| / 448, FLT_MIN) by a small kernel into the workspace;
//   static (FP8): weight_scale [1], input_scale [1]; q = e4m3(x / input_scale).
// Then T <= kMaxGemvRows: the FP8 GEMV (kernels/src/fp8.cu), bound by reading the weight once, or the GEMM
// below where warm-up timed it faster (LinearPathTuner); larger T,
// per token on compute capability 9.0 where cuBLASLt cannot apply per-token scales and rtllm's GEMM
// measured ahead (fp8_gemm_preferred): rtllm's Hopper FP8 GEMM (kernels/src/fp8_gemm.cu), the scales
// applied in its epilogue; otherwise cuBLASLt's FP8
// GEMM with the scales applied in its epilogue (per-tensor scale pointers, or the outer-
// vector mode for per-token x per-channel: CUDA 12.9+). Where cuBLASLt has no such algorithm for the
// op's output and bias dtypes (asked at load), the GEMM writes unscaled float32 accumulators into the
// workspace and a kernel applies the scales and the bias in the contract's order: the same result up to
// float32 rounding of the scale products, at the cost of one more pass over [T, N] float32. (A bf16
// unscaled output would add a rounding before the scales; the FP8 output types have no room for
// accumulators.) Rows of y that are not 16-byte aligned (an odd vocabulary's LM head), which neither GEMM
// takes, run the GEMV in blocks of kFp8GemvMaxM tokens whatever T.
// Everything a step does is kernel launches on the runner's stream over fixed buffers: capturable in a
// CUDA graph.
#include <algorithm>
#include <string>

#include "cuda/cublaslt_gemm.h"
#include "cuda/cuda_context.h"
#include "cuda/linear_path_tuner.h"
#include "op_registry.h"
#include "rtllm/kernels/fp8.cuh"

namespace rtllm {

// Why a GPU of this compute capability cannot run FP8 linears, or "" when it can: E4M3 tensor-core
// GEMMs and the e4m3 conversion instructions need compute capability 8.9 (Ada) or later.
RTLLM_API std::string fp8_linear_unsupported_reason(int major, int minor) {
  if (major > 8 || (major == 8 && minor >= 9)) return "";
  return detail::concat("FP8 linears (fp8_linear) need a GPU of compute capability 8.9 or later; this GPU has ",
                        major, ".", minor);
}

namespace {

// Up to kMaxGemvRows rows go to the FP8 GEMV (tensor-core MMAs bound by reading the weight once, meant
// to stream it at >= 85% of the copy bandwidth for M = 1..16), more to cuBLASLt's FP8 GEMM. The GEMV takes
// up to kernels::kFp8GemvMaxM = 16 rows; 16 is the expected crossover with cuBLASLt (10-26 us at M = 4..16
// on the H200 for Llama-3-8B's shapes), to be confirmed by benchmarks/bench_fp8_gemm.py's crossover rows.
// In an engine the backend's warm-up times both paths for each shape (LinearPathTuner) and keeps the faster;
// this is the default where it did not (tests/gpu/test_fp8_gpu.py's gemv_taken, through the test hook,
// follows it).
constexpr int64_t kMaxGemvRows = 16;
constexpr size_t kAlign = 256;

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

enum class Fp8Path { kAuto = 0, kGemv = 1, kGemm = 2, kHopperGemm = 3 };

// rtllm's Hopper FP8 GEMM computes one output tile (kernels::kFp8GemmTileM x kFp8GemmTileN) per CTA. Per
// token on an H100 (benchmarks/bench_fp8_gemm.py --only gemm, Llama-3-8B shapes) it ran 0.99-1.18x the
// cuBLASLt path (GEMM, then the scales in a second pass over float32 accumulators) from 256 to 1,023 tiles;
// below that too few tiles keep the SMs busy (0.3-0.9x under 128 tiles), and above it cuBLASLt's larger
// tiles pull ahead (0.83-1.0x). Per tensor, cuBLASLt applies the scales itself and stays faster (0.7-0.9x).
constexpr int64_t kHopperGemmMinTiles = 256, kHopperGemmMaxTiles = 1023;

bool fp8_gemm_preferred(int64_t T, int64_t N) {
  const int64_t tiles = ((T + kernels::kFp8GemmTileM - 1) / kernels::kFp8GemmTileM) *
                        ((N + kernels::kFp8GemmTileN - 1) / kernels::kFp8GemmTileN);
  return tiles >= kHopperGemmMinTiles && tiles <= kHopperGemmMaxTiles;
}

// One fp8_linear call on device pointers; shared by the op kind and the test hook below.
struct Fp8LinearCall {
  void* y = nullptr;
  const void* x = nullptr;
  const void* w = nullptr;
  const float* w_scale = nullptr;
  const float* input_scale = nullptr;  // static only
  const void* bias = nullptr;
  int64_t T = 0, N = 0, K = 0;
  DataType x_dtype = DataType::kBFloat16;  // also the bias dtype
  bool x_codes = false;  // static only: x holds the E4M3 codes already (docs/engine_format.md, "FP8 outputs")
  DataType y_dtype = DataType::kBFloat16;
  bool per_token = true;
  bool scaled_gemm = true;  // cuBLASLt applies the scales (and bias) itself
  bool hopper_gemm = false;  // the device runs rtllm's Hopper FP8 GEMM (kernels::fp8_gemm_supported)
};

// Workspace: q [T, K] E4M3, token scales [T], and for the unscaled GEMM fallback accumulators [T, N].
size_t fp8_workspace_bytes(int64_t max_rows, int64_t N, int64_t K, bool scaled_gemm) {
  size_t bytes = align_up(static_cast<size_t>(max_rows) * K) + align_up(sizeof(float) * max_rows);
  if (!scaled_gemm) bytes += align_up(sizeof(float) * max_rows * N);
  return bytes;
}

void check_launch(cudaError_t err) {
  RTLLM_CHECK(err == cudaSuccess, "op fp8_linear: kernel launch failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

CublasLtGemm::Fp8Scaling gemm_scaling(bool per_token) {
  return per_token ? CublasLtGemm::Fp8Scaling::kOuterVector : CublasLtGemm::Fp8Scaling::kPerTensor;
}

// `tuner` (null: the default rule) chooses between the GEMV and the GEMMs for kAuto calls the GEMV takes.
void run_fp8_linear(const Fp8LinearCall& c, CublasLtGemm& gemm, LinearPathTuner* tuner, void* workspace, Fp8Path path,
                    cudaStream_t stream) {
  uint8_t* ws = static_cast<uint8_t*>(workspace);
  void* q = ws;
  float* token_scale = reinterpret_cast<float*>(ws + align_up(static_cast<size_t>(c.T) * c.K));
  float* acc = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(token_scale) + align_up(sizeof(float) * c.T));
  const kernels::DType x_kind = kernel_dtype(c.x_dtype), y_kind = kernel_dtype(c.y_dtype);
  const float* x_scale = c.per_token ? token_scale : c.input_scale;
  if (c.x_codes) {
    q = const_cast<void*>(c.x);  // read only
  } else if (c.per_token) {
    check_launch(kernels::fp8_quantize_per_token(q, token_scale, c.x, c.T, c.K, x_kind, stream));
  } else {
    check_launch(kernels::fp8_quantize_static(q, c.x, c.input_scale, c.T, c.K, x_kind, stream));
  }
  // In blocks of kFp8GemvMaxM tokens (more only where cuBLASLt cannot take the rows, below): a token's row
  // does not depend on the other tokens of the call, so the blocks change no result.
  const size_t y_row = static_cast<size_t>(c.N) * dtype_size(c.y_dtype);
  const auto run_gemv = [&] {
    for (int64_t t0 = 0; t0 < c.T; t0 += kernels::kFp8GemvMaxM) {
      const int32_t m = static_cast<int32_t>(std::min<int64_t>(kernels::kFp8GemvMaxM, c.T - t0));
      check_launch(kernels::fp8_gemv(static_cast<char*>(c.y) + t0 * y_row, static_cast<const uint8_t*>(q) + t0 * c.K,
                                     c.per_token ? x_scale + t0 : x_scale, c.per_token, c.w, c.w_scale, c.per_token,
                                     c.bias, m, static_cast<int32_t>(c.N), static_cast<int32_t>(c.K), x_kind, y_kind,
                                     stream));
    }
  };
  const auto run_gemm = [&] {
    // rtllm's Hopper GEMM only stands in for cuBLASLt's unscaled GEMM + scale pass: where cuBLASLt applies
    // the per-token scales itself (outer-vector mode) its GEMM runs at the per-tensor rate.
    const bool hopper = path == Fp8Path::kHopperGemm || (path == Fp8Path::kAuto && c.hopper_gemm && c.per_token &&
                                                         !c.scaled_gemm && fp8_gemm_preferred(c.T, c.N));
    if (hopper) {
      check_launch(kernels::fp8_gemm(c.y, q, x_scale, c.per_token, c.w, c.w_scale, c.per_token, c.bias, c.T, c.N,
                                     c.K, x_kind, y_kind, stream));
    } else if (c.scaled_gemm) {
      gemm.fp8_linear(c.y, q, c.w, x_scale, c.w_scale, gemm_scaling(c.per_token), c.bias, c.T, c.N, c.K, c.x_dtype,
                      c.y_dtype, stream);
    } else {
      gemm.fp8_linear(acc, q, c.w, nullptr, nullptr, CublasLtGemm::Fp8Scaling::kNone, nullptr, c.T, c.N, c.K,
                      c.x_dtype, DataType::kFloat32, stream);
      check_launch(kernels::fp8_scale_epilogue(c.y, acc, x_scale, c.per_token, c.w_scale, c.per_token, c.bias, c.T,
                                               c.N, x_kind, y_kind, stream));
    }
  };
  // cuBLASLt and rtllm's GEMM need 16-byte rows of y, which the GEMV does not (an odd vocabulary's LM head):
  // such linears run the GEMV in blocks whatever T.
  const bool gemm_ok = CublasLtGemm::linear_rows_aligned(c.N, c.K, DataType::kFloat8E4M3, c.y_dtype);
  LinearPath chosen = path == Fp8Path::kGemv || (path == Fp8Path::kAuto && (c.T <= kMaxGemvRows || !gemm_ok))
                          ? LinearPath::kGemv
                          : LinearPath::kGemm;
  if (chosen == LinearPath::kGemv)
    RTLLM_CHECK(kernels::fp8_gemv_supported(static_cast<int32_t>(std::min<int64_t>(c.T, kernels::kFp8GemvMaxM)),
                                            static_cast<int32_t>(c.K)),
                "fp8_linear: the FP8 GEMV does not take ", c.T, " rows of ", c.K, " columns");
  if (tuner && path == Fp8Path::kAuto && c.T <= kMaxGemvRows && gemm_ok) {
    const LinearPathTuner::Shape shape{c.per_token ? LinearOp::kFp8PerToken : LinearOp::kFp8Static, c.N, c.K,
                                       static_cast<int>(c.x_dtype), static_cast<int>(c.y_dtype), c.bias != nullptr};
    chosen = tuner->choose(shape, c.T, chosen, stream, run_gemv, run_gemm);
  }
  if (chosen == LinearPath::kGemv) {
    run_gemv();
  } else {
    run_gemm();
  }
}

// The current device's compute capability, refused when it cannot run FP8 linears.
ComputeCapability require_fp8_device() {
  const ComputeCapability cc = current_compute_capability();
  const std::string why = fp8_linear_unsupported_reason(cc.major, cc.minor);
  RTLLM_CHECK_ARG(why.empty(), why, " (CUDA device ", cc.device, ")");
  return cc;
}

// Inputs: x [T, K] (compute dtype, or static: E4M3 codes from its producer), weight [N, K] F8_E4M3, weight_scale F32 ([N] per_token, [1] static),
// static: input_scale [1] F32; optional bias [N] (placed in the compute dtype).
class CudaFp8Linear final : public OpKind {
 public:
  explicit CudaFp8Linear(const OpSpec& spec) : OpKind(spec) {
    const std::string scaling = spec.node->attrs.get_string("activation_scaling", "per_token");
    RTLLM_CHECK(scaling == "per_token" || scaling == "static", "fp8_linear: activation_scaling \"", scaling,
                "\" is not \"per_token\" or \"static\"");
    per_token_ = scaling == "per_token";
    const size_t num_scales = per_token_ ? 1 : 2;
    spec.require_num_io(2 + num_scales, 3 + num_scales, 1);
    spec.require_input_dtype(0, {DataType::kFloat32, DataType::kFloat8E4M3});
    x_codes_ = spec.inputs[0].dtype == DataType::kFloat8E4M3;
    RTLLM_CHECK(!x_codes_ || !per_token_, "fp8_linear: x \"", spec.inputs[0].name, "\" is F8_E4M3, which only "
                "activation_scaling \"static\" reads (per token, x must be a float activation)");
    spec.require_input_dtype(1, {DataType::kFloat8E4M3});
    for (size_t i = 2; i < 2 + num_scales; ++i) spec.require_input_dtype(i, {DataType::kFloat32});
    has_bias_ = spec.inputs.size() == 3 + num_scales;
    if (has_bias_) spec.require_input_dtype(2 + num_scales, kWideFloatDtypes);
    const auto& w = spec.inputs[1].shape;
    RTLLM_CHECK(w.size() == 2, "fp8_linear: weight \"", spec.inputs[1].name, "\" has ", w.size(),
                " dims, expected 2 ([N, K])");
    num_outputs_ = w[0].value;
    num_cols_ = w[1].value;
    // 16-byte rows of E4M3 codes: the GEMV's vector loads and cuBLASLt's FP8 layouts need them.
    RTLLM_CHECK(num_cols_ % 16 == 0, "fp8_linear: weight \"", spec.inputs[1].name, "\" has K = ", num_cols_,
                " columns; the CUDA backend needs a multiple of 16");
    max_rows_ = spec.backend->max_size(spec.inputs[0].shape.at(0));
    const ComputeCapability cc = require_fp8_device();
    hopper_gemm_ = kernels::fp8_gemm_supported(cc.major, cc.minor, 1, num_outputs_, num_cols_);
    // Decided at load so that workspace_bytes() covers the fallback's accumulators when it is taken. The
    // output is in the compute dtype, or float32 for the logits: both must have the scaled GEMM.
    const CublasLtGemm::Fp8Scaling gemm_scales = gemm_scaling(per_token_);
    const DataType act = spec.backend->activation_dtype;
    scaled_gemm_ = CublasLtGemm::fp8_scaled_gemm_supported(gemm_scales, act, has_bias_, act) &&
                   CublasLtGemm::fp8_scaled_gemm_supported(gemm_scales, DataType::kFloat32, has_bias_, act);
  }

  WeightPlacement weight_placement(size_t input) const override {
    if (has_bias_ && input == spec_.inputs.size() - 1) return in_activation_dtype();  // bias
    return OpKind::weight_placement(input);  // FP8 weight and float32 scales as stored
  }

  size_t workspace_bytes() const override {
    return fp8_workspace_bytes(max_rows_, num_outputs_, num_cols_, scaled_gemm_);
  }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &w = in[1], &w_scale = in[2], &y = out[0];
    Fp8LinearCall c;
    c.T = x.rows();
    c.K = x.cols();
    c.N = y.cols();
    RTLLM_CHECK(y.rows() == c.T, "fp8_linear: output has ", y.rows(), " rows, x has ", c.T);
    RTLLM_CHECK(w.ndim == 2 && w.shape[0] == c.N && w.shape[1] == c.K, "fp8_linear: weight [", w.shape[0], ", ",
                w.shape[1], "] does not match x with ", c.K, " columns and ", c.N, " outputs");
    RTLLM_CHECK(c.T <= max_rows_, "fp8_linear: x has ", c.T, " rows, more than the ", max_rows_, " planned at load");
    const int64_t num_w_scales = per_token_ ? c.N : 1;
    RTLLM_CHECK(w_scale.numel() == num_w_scales, "fp8_linear: weight_scale has ", w_scale.numel(),
                " values, expected ", num_w_scales);
    if (!per_token_) {
      RTLLM_CHECK(in[3].numel() == 1, "fp8_linear: input_scale has ", in[3].numel(), " values, expected 1");
      c.input_scale = in[3].f32();
    }
    if (has_bias_) {
      const TensorView& bias = in[spec_.inputs.size() - 1];
      RTLLM_CHECK(bias.numel() == c.N, "fp8_linear: bias has ", bias.numel(), " values, expected ", c.N);
      c.bias = bias.data;
    }
    c.y = y.data;
    c.x = x.data;
    c.w = w.data;
    c.w_scale = w_scale.f32();
    c.x_dtype = x_codes_ ? spec_.backend->activation_dtype : x.dtype;
    c.x_codes = x_codes_;
    c.y_dtype = y.dtype;
    c.per_token = per_token_;
    c.scaled_gemm = scaled_gemm_;
    c.hopper_gemm = hopper_gemm_;
    const CudaStep& step = *static_cast<const CudaStep*>(ctx.device_step);
    run_fp8_linear(c, *step.gemm, step.linear_paths, ctx.workspace, Fp8Path::kAuto,
                   static_cast<cudaStream_t>(ctx.stream));
  }

 private:
  bool per_token_ = true, has_bias_ = false, scaled_gemm_ = true, hopper_gemm_ = false;
  bool x_codes_ = false;  // x is E4M3 codes from its producer (static)
  int64_t num_outputs_ = 0, num_cols_ = 0;  // N, K
  int64_t max_rows_ = 0;  // of x, at the largest step
};

}  // namespace

void register_cuda_fp8_linear_op() { register_op("fp8_linear", DeviceKind::kCuda, make_op<CudaFp8Linear>); }

// Test and benchmark hooks (rtllm._core.kernels.fp8_linear): one fp8_linear on device pointers through
// the op's code paths, with its own cuBLASLt instance. path: 0 as the op chooses, 1 the GEMV, 2 cuBLASLt's
// GEMM, 3 rtllm's Hopper GEMM; scaled_gemm false takes the unscaled-GEMM fallback. workspace of fp8_linear_workspace_bytes().
RTLLM_API size_t fp8_linear_workspace_bytes(int64_t T, int64_t N, int64_t K, bool scaled_gemm) {
  return fp8_workspace_bytes(T, N, K, scaled_gemm);
}

RTLLM_API bool fp8_scaled_gemm_supported(bool per_token, DataType y_dtype, bool has_bias, DataType bias_dtype) {
  return CublasLtGemm::fp8_scaled_gemm_supported(gemm_scaling(per_token), y_dtype, has_bias, bias_dtype);
}

RTLLM_API void fp8_linear_for_tests(void* y, const void* x, const void* w, const void* w_scale,
                                    const void* input_scale, const void* bias, int64_t T, int64_t N, int64_t K,
                                    DataType x_dtype, DataType y_dtype, bool per_token, int path, bool scaled_gemm,
                                    void* workspace, void* stream) {
  RTLLM_CHECK_ARG(K > 0 && K % 16 == 0, "fp8_linear: K = ", K, " is not a positive multiple of 16");
  RTLLM_CHECK_ARG(path >= 0 && path <= 3, "fp8_linear: path ", path, " is not 0, 1, 2 or 3");
  // x as E4M3 codes (a producer's FP8 output): static scales only, and the bias in y's 16-bit dtype, the
  // activation dtype of such a model.
  const bool x_codes = x_dtype == DataType::kFloat8E4M3;
  if (x_codes) {
    RTLLM_CHECK_ARG(!per_token, "fp8_linear: x as F8_E4M3 codes needs static scales (per_token false)");
    RTLLM_CHECK_ARG(y_dtype == DataType::kBFloat16 || y_dtype == DataType::kFloat16,
                    "fp8_linear: x as F8_E4M3 codes needs y_dtype BF16 or F16, not ", dtype_safetensors_name(y_dtype));
    x_dtype = y_dtype;
  }
  const ComputeCapability cc = require_fp8_device();
  const bool hopper_gemm = kernels::fp8_gemm_supported(cc.major, cc.minor, T, N, K);
  RTLLM_CHECK_ARG(hopper_gemm || path != static_cast<int>(Fp8Path::kHopperGemm),
                  "fp8_linear: rtllm's Hopper FP8 GEMM needs compute capability 9.0 (this device has ", cc.major, ".",
                  cc.minor, ")");
  RTLLM_CHECK_ARG(!scaled_gemm || path == static_cast<int>(Fp8Path::kGemv) ||
                      path == static_cast<int>(Fp8Path::kHopperGemm) ||
                      fp8_scaled_gemm_supported(per_token, y_dtype, bias != nullptr, x_dtype),
                  "fp8_linear: cuBLASLt has no FP8 GEMM applying these scales here");
  // Kept for the process (never destroyed: the CUDA context may be gone at exit); its plans are cached
  // like the runner's.
  static CublasLtGemm* gemm = new CublasLtGemm(32u << 20);
  Fp8LinearCall c;
  c.y = y;
  c.x = x;
  c.w = w;
  c.w_scale = static_cast<const float*>(w_scale);
  c.input_scale = static_cast<const float*>(input_scale);
  c.bias = bias;
  c.T = T;
  c.N = N;
  c.K = K;
  c.x_dtype = x_dtype;
  c.x_codes = x_codes;
  c.y_dtype = y_dtype;
  c.per_token = per_token;
  c.scaled_gemm = scaled_gemm;
  c.hopper_gemm = hopper_gemm;
  run_fp8_linear(c, *gemm, nullptr, workspace, static_cast<Fp8Path>(path), static_cast<cudaStream_t>(stream));
}

}  // namespace rtllm
