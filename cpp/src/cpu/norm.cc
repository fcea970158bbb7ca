// rms_norm and add_rms_norm over rows of [T, D]; tasks are rows.
#include "cpu/row_ops.h"
#include "op_registry.h"
#include "thread_pool.h"

namespace rtllm {
namespace {

// x [T, D], weight [d] with d dividing D: each run of d values is normalized on its own
// (d < D is a per-head norm).
void rms_norm_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  check_num_io("rms_norm", num_in, 2, 2, num_out, 1);
  const TensorView &x = in[0], &w = in[1], &y = out[0];
  check_f32("rms_norm", x, "x");
  check_f32("rms_norm", w, "weight");
  const int64_t T = x.rows(), D = x.cols(), d = w.numel();
  RTLLM_CHECK(d > 0 && D % d == 0, "rms_norm: weight size ", d, " does not divide the row size ", D);
  RTLLM_CHECK(y.numel() == x.numel(), "rms_norm: output has ", y.numel(), " values, expected ", x.numel());
  const float eps = static_cast<float>(ctx.attrs->get_double("eps", 1e-6));
  const float *xp = x.f32(), *wp = w.f32();
  float* yp = y.f32();
  ctx.pool->parallel_for(T, [&](int64_t t, int) {
    for (int64_t off = 0; off < D; off += d) cpu::rms_norm_row(yp + t * D + off, xp + t * D + off, wp, d, eps);
  }, D * 2);
}

// Outputs [normed, sum]: sum = x + residual, normed = rms_norm(sum).
void add_rms_norm_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  check_num_io("add_rms_norm", num_in, 3, 3, num_out, 2);
  const TensorView &x = in[0], &res = in[1], &w = in[2];
  check_f32("add_rms_norm", x, "x");
  check_f32("add_rms_norm", res, "residual");
  check_f32("add_rms_norm", w, "weight");
  const int64_t T = x.rows(), D = x.cols();
  RTLLM_CHECK(res.numel() == x.numel() && w.numel() == D && out[0].numel() == x.numel() &&
                  out[1].numel() == x.numel(),
              "add_rms_norm: shapes do not match rows of ", D, " values");
  const float eps = static_cast<float>(ctx.attrs->get_double("eps", 1e-6));
  const float *xp = x.f32(), *rp = res.f32(), *wp = w.f32();
  float *normed = out[0].f32(), *sum = out[1].f32();
  ctx.pool->parallel_for(T, [&](int64_t t, int) {
    float* s = sum + t * D;
    for (int64_t i = 0; i < D; ++i) s[i] = xp[t * D + i] + rp[t * D + i];
    cpu::rms_norm_row(normed + t * D, s, wp, D, eps);
  }, D * 3);
}

}  // namespace

void register_cpu_norm_ops() {
  register_op("rms_norm", DeviceKind::kCpu, rms_norm_op);
  register_op("add_rms_norm", DeviceKind::kCpu, add_rms_norm_op);
}

}  // namespace rtllm
