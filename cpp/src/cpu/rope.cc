// rope: rotate-half RoPE of x [T, n·head_dim] at positions [T] with inv_freq [head_dim / 2].
#include "cpu/row_ops.h"
#include "op_registry.h"
#include "thread_pool.h"

namespace rtllm {
namespace {

void rope_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  check_num_io("rope", num_in, 3, 3, num_out, 1);
  const TensorView &x = in[0], &pos = in[1], &inv_freq = in[2], &y = out[0];
  check_f32("rope", x, "x");
  check_f32("rope", inv_freq, "inv_freq");
  const int64_t T = x.rows(), D = x.cols();
  const int64_t hd = ctx.attrs->at("head_dim").as_int();
  RTLLM_CHECK(hd > 0 && hd % 2 == 0 && hd <= cpu::kMaxHeadDim && D % hd == 0, "rope: head_dim ", hd,
              " must be even, at most ", cpu::kMaxHeadDim, " and divide the row size ", D);
  RTLLM_CHECK(inv_freq.numel() == hd / 2, "rope: inv_freq has ", inv_freq.numel(), " values, expected ", hd / 2);
  RTLLM_CHECK(pos.dtype == DataType::kInt32 && pos.numel() == T, "rope: positions must be int32 [", T, "]");
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

}  // namespace

void register_cpu_rope_ops() { register_op("rope", DeviceKind::kCpu, rope_op); }

}  // namespace rtllm
