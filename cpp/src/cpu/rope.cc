// rope: rotate-half RoPE of x [T, n·head_dim] at positions [T] with inv_freq [head_dim / 2].
#include "cpu/row_ops.h"
#include "op_registry.h"
#include "thread_pool.h"

namespace rtllm {
namespace {

class Rope final : public OpKind {
 public:
  explicit Rope(const OpSpec& spec) : OpKind(spec), head_dim_(spec.node->attrs.at("head_dim").as_int()) {
    spec.require_num_io(3, 3, 1);
    spec.require_input_dtype(0, {DataType::kFloat32});
    spec.require_input_dtype(1, {DataType::kInt32});
    spec.require_input_dtype(2, {DataType::kFloat32});
    RTLLM_CHECK(head_dim_ > 0 && head_dim_ % 2 == 0 && head_dim_ <= cpu::kMaxHeadDim, "rope: head_dim ", head_dim_,
                " must be even and at most ", cpu::kMaxHeadDim);
  }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &pos = in[1], &inv_freq = in[2], &y = out[0];
    const int64_t T = x.rows(), D = x.cols(), hd = head_dim_;
    RTLLM_CHECK(D % hd == 0, "rope: head_dim ", hd, " does not divide the row size ", D);
    RTLLM_CHECK(inv_freq.numel() == hd / 2, "rope: inv_freq has ", inv_freq.numel(), " values, expected ", hd / 2);
    RTLLM_CHECK(pos.numel() == T, "rope: positions have ", pos.numel(), " values, expected ", T);
    RTLLM_CHECK(y.numel() == x.numel(), "rope: output has ", y.numel(), " values, expected ", x.numel());
    const int64_t half = hd / 2;
    ctx.pool->parallel_for(T, [&](int64_t t, int) {
      float cos_v[cpu::kMaxHeadDim / 2], sin_v[cpu::kMaxHeadDim / 2];
      cpu::rope_cos_sin(pos.i32()[t], inv_freq.f32(), half, cos_v, sin_v);
      float* row = y.f32() + t * D;
      if (row != x.f32() + t * D)
        for (int64_t i = 0; i < D; ++i) row[i] = x.f32()[t * D + i];
      for (int64_t off = 0; off < D; off += hd) cpu::rope_head(row + off, cos_v, sin_v, half);
    }, D * 4);
  }

 private:
  const int64_t head_dim_;
};

}  // namespace

void register_cpu_rope_ops() { register_op("rope", DeviceKind::kCpu, make_op<Rope>); }

}  // namespace rtllm
