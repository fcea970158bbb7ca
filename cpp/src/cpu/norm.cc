// rms_norm and add_rms_norm over rows of [T, D]; tasks are rows. An F8_E4M3 normed output (cpu::Fp8Output)
// is computed into the thread's float row, then quantized.
#include "cpu/fp8_output.h"
#include "cpu/row_ops.h"
#include "op_registry.h"
#include "thread_pool.h"

namespace rtllm {
namespace {

// x [T, D], weight [d] with d dividing D: each run of d values is normalized on its own
// (d < D is a per-head norm).
class RmsNorm final : public OpKind {
 public:
  explicit RmsNorm(const OpSpec& spec)
      : OpKind(spec), eps_(static_cast<float>(spec.node->attrs.get_double("eps", 1e-6))), fp8_(spec) {
    spec.require_num_io(2, 2, 1);
    spec.require_input_dtype(0, {DataType::kFloat32});
    spec.require_input_dtype(1, kWideFloatDtypes);
  }
  WeightPlacement weight_placement(size_t) const override { return in_activation_dtype(); }
  size_t workspace_bytes() const override {
    return fp8_.row_workspace_bytes(spec_, spec_.inputs[0].shape.back().value);
  }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &w = in[1], &y = out[0];
    const int64_t T = x.rows(), D = x.cols(), d = w.numel();
    RTLLM_CHECK(d > 0 && D % d == 0, "rms_norm: weight size ", d, " does not divide the row size ", D);
    RTLLM_CHECK(y.numel() == x.numel(), "rms_norm: output has ", y.numel(), " values, expected ", x.numel());
    const float* xp = x.f32();
    const float* wp = w.f32();
    const float eps = eps_;
    ctx.pool->parallel_for(T, [&](int64_t t, int thread) {
      float* row = fp8_.on() ? static_cast<float*>(ctx.workspace) + thread * D : y.f32() + t * D;
      for (int64_t off = 0; off < D; off += d) cpu::rms_norm_row(row + off, xp + t * D + off, wp, d, eps);
      if (fp8_.on()) fp8_.store(row, D, static_cast<uint8_t*>(y.data) + t * D);
    }, D * 2);
  }

 private:
  const float eps_;
  const cpu::Fp8Output fp8_;
};

// Outputs [normed, sum]: sum = x + residual, normed = rms_norm(sum).
class AddRmsNorm final : public OpKind {
 public:
  explicit AddRmsNorm(const OpSpec& spec)
      : OpKind(spec), eps_(static_cast<float>(spec.node->attrs.get_double("eps", 1e-6))), fp8_(spec) {
    spec.require_num_io(3, 3, 2);
    spec.require_input_dtype(0, {DataType::kFloat32});
    spec.require_input_dtype(1, {DataType::kFloat32});
    spec.require_input_dtype(2, kWideFloatDtypes);
  }
  WeightPlacement weight_placement(size_t) const override { return in_activation_dtype(); }
  size_t workspace_bytes() const override {
    return fp8_.row_workspace_bytes(spec_, spec_.inputs[0].shape.back().value);
  }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &res = in[1], &w = in[2];
    const int64_t T = x.rows(), D = x.cols();
    RTLLM_CHECK(res.numel() == x.numel() && w.numel() == D && out[0].numel() == x.numel() &&
                    out[1].numel() == x.numel(),
                "add_rms_norm: shapes do not match rows of ", D, " values");
    const float *xp = x.f32(), *rp = res.f32(), *wp = w.f32();
    float* sum = out[1].f32();
    const float eps = eps_;
    ctx.pool->parallel_for(T, [&](int64_t t, int thread) {
      float* normed = fp8_.on() ? static_cast<float*>(ctx.workspace) + thread * D : out[0].f32() + t * D;
      cpu::add_rms_norm_row(normed, sum + t * D, xp + t * D, rp + t * D, wp, D, eps);
      if (fp8_.on()) fp8_.store(normed, D, static_cast<uint8_t*>(out[0].data) + t * D);
    }, D * 3);
  }

 private:
  const float eps_;
  const cpu::Fp8Output fp8_;
};

}  // namespace

void register_cpu_norm_ops() {
  register_op("rms_norm", DeviceKind::kCpu, make_op<RmsNorm>);
  register_op("add_rms_norm", DeviceKind::kCpu, make_op<AddRmsNorm>);
}

}  // namespace rtllm
