// fp8_linear: y[T, N] = x[T, K] · W[N, K]ᵀ with FP8 E4M3 weights scaled per output channel and the
// activations quantized to FP8 E4M3 per token at run time (FP8_PER_CHANNEL_PER_TOKEN). The CPU
// reference of the semantics in docs/engine_format.md:
//   s_t = max(amax_k |x[t, k]| / 448, FLT_MIN)          (float32)
//   q[t, k] = e4m3(x[t, k] / s_t)                      (float32 division, round to nearest even, saturate)
//   y[t, n] = (sum_k q[t, k] · w[n, k]) · s_t · weight_scale[n] (+ bias[n])
// Each product of two E4M3 values is exact in float32; the sum is accumulated in float32 in one fixed
// order (8-lane FMA chunks over k, a fixed horizontal sum, then the k tail: cpu::dot), then multiplied
// by s_t, then by weight_scale[n], then the bias is added. A token's result does not depend on its batch.
//
// attr activation_scaling "static" (FP8: per-tensor scales from calibration): weight_scale [1] and
// input_scale [1]; s_t = input_scale for every token (an input beyond the calibrated range saturates to
// +-448 · input_scale), then the same product, y = dot · input_scale · weight_scale (+ bias).
//
// x may be E4M3 codes already (static only): the output of a norm or silu_mul that quantized it with this
// linear's input_scale (docs/engine_format.md, "FP8 outputs"); the codes are then decoded, not quantized.
//
// Workspace: the quantized activations as float32 [T, K] (E4M3 values, exact), their scales [T], and
// one decoded weight row [K] per thread.
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "cpu/fp8.h"
#include "cpu/simd.h"
#include "op_registry.h"
#include "thread_pool.h"

namespace rtllm {
namespace {

using cpu::e4m3_table;

constexpr float kFp8E4M3Max = 448.0f;
constexpr int64_t kBlockRows = 64;  // tokens per task: one decoded weight row serves all of them
constexpr int64_t kBlockCols = 16;  // weight rows per task

// x [T, K] float32; weight [N, K] F8_E4M3 and weight_scale [N] F32 kept as stored; optional bias [N]
// converted to float32. Static: weight_scale [1] and input_scale [1] F32, then the optional bias.
class Fp8Linear final : public OpKind {
 public:
  explicit Fp8Linear(const OpSpec& spec) : OpKind(spec) {
    const std::string scaling = spec.node->attrs.get_string("activation_scaling", "per_token");
    RTLLM_CHECK(scaling == "per_token" || scaling == "static", "fp8_linear: activation_scaling \"", scaling,
                "\" is not one of \"per_token\", \"static\"");
    static_ = scaling == "static";
    bias_input_ = static_ ? 4 : 3;
    spec.require_num_io(bias_input_, bias_input_ + 1, 1);
    spec.require_input_dtype(0, {DataType::kFloat32, DataType::kFloat8E4M3});
    codes_in_ = spec.inputs[0].dtype == DataType::kFloat8E4M3;
    RTLLM_CHECK(!codes_in_ || static_, "fp8_linear: x \"", spec.inputs[0].name, "\" is F8_E4M3, which only "
                "activation_scaling \"static\" reads (per token, x must be a float activation)");
    spec.require_input_dtype(1, {DataType::kFloat8E4M3});
    spec.require_input_dtype(2, {DataType::kFloat32});
    if (static_) spec.require_input_dtype(3, {DataType::kFloat32});
    if (has_bias()) spec.require_input_dtype(bias_input_, kWideFloatDtypes);
    const auto& w = spec.inputs[1].shape;
    RTLLM_CHECK(w.size() == 2, "fp8_linear: weight \"", spec.inputs[1].name, "\" has ", w.size(),
                " dims, expected 2 ([N, K])");
    num_cols_ = w[1].value;
    // x is [num_tokens, K], or [num_logits, K] for an LM head
    max_rows_ = spec.backend->max_size(spec.inputs[0].shape.at(0));
    e4m3_table();  // built once here, not inside the first step
  }

  WeightPlacement weight_placement(size_t input) const override {
    if (static_cast<int>(input) == bias_input_) return {DataType::kFloat32, WeightLayout::kRowMajor};
    return OpKind::weight_placement(input);  // FP8 weight and float32 scales as stored
  }

  size_t workspace_bytes() const override {
    return sizeof(float) * (static_cast<size_t>(max_rows_) * (num_cols_ + 1) +
                            static_cast<size_t>(spec_.backend->num_threads) * num_cols_);
  }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &w = in[1], &w_scale = in[2], &y = out[0];
    const int64_t T = x.rows(), K = x.cols(), N = y.cols();
    RTLLM_CHECK(y.rows() == T, "fp8_linear: output has ", y.rows(), " rows, x has ", T);
    RTLLM_CHECK(w.ndim == 2 && w.shape[0] == N && w.shape[1] == K, "fp8_linear: weight [", w.shape[0], ", ",
                w.shape[1], "] does not match x with ", K, " columns and ", N, " outputs");
    const int64_t num_w_scales = static_ ? 1 : N;
    RTLLM_CHECK(w_scale.numel() == num_w_scales, "fp8_linear: weight_scale has ", w_scale.numel(),
                " values, expected ", num_w_scales);
    RTLLM_CHECK(T <= max_rows_, "fp8_linear: x has ", T, " rows, more than the ", max_rows_, " planned at load");
    const float* bias = nullptr;
    if (has_bias()) {
      const TensorView& b = in[bias_input_];
      RTLLM_CHECK(b.numel() == N, "fp8_linear: bias has ", b.numel(), " values, expected ", N);
      bias = b.f32();
    }
    float* q = static_cast<float*>(ctx.workspace);  // [T, K]
    float* x_scale = q + T * K;                      // [T]
    float* w_rows = x_scale + T;                     // [num_threads, K]
    if (static_) {
      RTLLM_CHECK(in[3].numel() == 1, "fp8_linear: input_scale has ", in[3].numel(), " values, expected 1");
      const float s = in[3].f32()[0];
      RTLLM_CHECK(std::isfinite(s) && s > 0.0f, "fp8_linear: input_scale ", s, " must be finite and > 0");
      if (codes_in_) {
        decode_codes(*ctx.pool, static_cast<const uint8_t*>(x.data), T, K, s, q, x_scale);
      } else {
        quantize_static(*ctx.pool, x.f32(), T, K, s, q, x_scale);
      }
    } else {
      quantize_tokens(*ctx.pool, x.f32(), T, K, q, x_scale);
    }
    gemm(*ctx.pool, q, x_scale, static_cast<const uint8_t*>(w.data), w_scale.f32(), static_ ? 0 : 1, bias, w_rows,
         y.f32(), T, K, N);
  }

 private:
  // q[t] = E4M3 values of x[t] / s_t (as floats), x_scale[t] = s_t.
  static void quantize_tokens(ThreadPool& pool, const float* x, int64_t T, int64_t K, float* q, float* x_scale) {
    const auto& table = e4m3_table();
    pool.parallel_for(T, [&](int64_t t, int) {
      const float* row = x + t * K;
      float amax = 0.0f;
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
      // FLT_MIN keeps a row of zeros (amax 0) finite: its q is all zeros, so y is the bias.
      const float s = std::max(amax / kFp8E4M3Max, std::numeric_limits<float>::min());
      x_scale[t] = s;
      for (int64_t k = 0; k < K; ++k) q[t * K + k] = table[float_to_fp8_e4m3(row[k] / s)];
    }, 4 * K);
  }

  // q[t] = E4M3 values of x[t] / input_scale, x_scale[t] = input_scale (so the GEMM is shared).
  static void quantize_static(ThreadPool& pool, const float* x, int64_t T, int64_t K, float s, float* q,
                              float* x_scale) {
    const auto& table = e4m3_table();
    pool.parallel_for(T, [&](int64_t t, int) {
      const float* row = x + t * K;
      x_scale[t] = s;
      for (int64_t k = 0; k < K; ++k) q[t * K + k] = table[float_to_fp8_e4m3(row[k] / s)];
    }, 2 * K);
  }

  // q[t] = the E4M3 values of codes x[t], x_scale[t] = input_scale: the producer quantized x already.
  static void decode_codes(ThreadPool& pool, const uint8_t* x, int64_t T, int64_t K, float s, float* q,
                           float* x_scale) {
    const auto& table = e4m3_table();
    pool.parallel_for(T, [&](int64_t t, int) {
      x_scale[t] = s;
      for (int64_t k = 0; k < K; ++k) q[t * K + k] = table[x[t * K + k]];
    }, K);
  }

  // Task = (block of tokens, block of weight rows); each weight row is decoded once per task into the
  // thread's row buffer and dotted with every token of the block.
  static void gemm(ThreadPool& pool, const float* q, const float* x_scale, const uint8_t* w, const float* w_scale,
                   int64_t w_scale_stride, const float* bias, float* w_rows, float* y, int64_t T, int64_t K,
                   int64_t N) {
    const auto& table = e4m3_table();
    const int64_t num_row_tasks = (T + kBlockRows - 1) / kBlockRows;
    const int64_t num_col_tasks = (N + kBlockCols - 1) / kBlockCols;
    pool.parallel_for(num_row_tasks * num_col_tasks, [&](int64_t task, int thread) {
      const int64_t t0 = (task / num_col_tasks) * kBlockRows, t1 = std::min(T, t0 + kBlockRows);
      const int64_t n0 = (task % num_col_tasks) * kBlockCols, n1 = std::min(N, n0 + kBlockCols);
      float* w_row = w_rows + thread * K;
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* codes = w + n * K;
        for (int64_t k = 0; k < K; ++k) w_row[k] = table[codes[k]];
        for (int64_t t = t0; t < t1; ++t) {
          float v = cpu::dot(q + t * K, w_row, K) * x_scale[t] * w_scale[n * w_scale_stride];
          if (bias) v += bias[n];
          y[t * N + n] = v;
        }
      }
    }, std::min(T, kBlockRows) * std::min(N, kBlockCols) * K);
  }

  bool has_bias() const { return static_cast<int>(spec_.inputs.size()) > bias_input_; }

  bool static_ = false;   // activation_scaling "static": per-tensor weight and input scales
  bool codes_in_ = false;  // x holds E4M3 codes (static only)
  int bias_input_ = 3;    // index of the optional bias
  int64_t num_cols_ = 0;  // K
  int64_t max_rows_ = 0;  // of x, at the largest step
};

}  // namespace

void register_cpu_fp8_linear_ops() { register_op("fp8_linear", DeviceKind::kCpu, make_op<Fp8Linear>); }

}  // namespace rtllm
