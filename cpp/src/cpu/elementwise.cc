// Row-wise ops without reductions: add, mul, silu, silu_mul, embedding, gather_rows. Tasks are rows.
#include <cmath>
#include <cstring>

#include "op_registry.h"
#include "thread_pool.h"

namespace rtllm {
namespace {

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

template <typename F>
void binary_op(const char* name, const OpContext& ctx, const TensorView* in, int num_in, TensorView* out,
               int num_out, F f) {
  check_num_io(name, num_in, 2, 2, num_out, 1);
  check_f32(name, in[0], "a");
  check_f32(name, in[1], "b");
  const int64_t n = in[0].numel();
  RTLLM_CHECK(in[1].numel() == n && out[0].numel() == n, name, ": operands have ", n, " and ", in[1].numel(),
              " values, output ", out[0].numel());
  const int64_t rows = in[0].rows(), cols = in[0].cols();
  const float *a = in[0].f32(), *b = in[1].f32();
  float* y = out[0].f32();
  ctx.pool->parallel_for(rows, [&](int64_t r, int) {
    for (int64_t i = r * cols; i < (r + 1) * cols; ++i) y[i] = f(a[i], b[i]);
  }, cols);
}

void add_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  binary_op("add", ctx, in, num_in, out, num_out, [](float a, float b) { return a + b; });
}

void mul_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  binary_op("mul", ctx, in, num_in, out, num_out, [](float a, float b) { return a * b; });
}

void silu_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  check_num_io("silu", num_in, 1, 1, num_out, 1);
  check_f32("silu", in[0], "x");
  RTLLM_CHECK(out[0].numel() == in[0].numel(), "silu: output has ", out[0].numel(), " values, expected ",
              in[0].numel());
  const int64_t cols = in[0].cols();
  const float* x = in[0].f32();
  float* y = out[0].f32();
  ctx.pool->parallel_for(in[0].rows(), [&](int64_t r, int) {
    for (int64_t i = r * cols; i < (r + 1) * cols; ++i) y[i] = silu(x[i]);
  }, cols * 4);
}

// x [T, 2I] (gate columns, then up columns) -> [T, I] = silu(gate) · up.
void silu_mul_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  check_num_io("silu_mul", num_in, 1, 1, num_out, 1);
  check_f32("silu_mul", in[0], "x");
  const int64_t T = in[0].rows(), I = in[0].cols() / 2;
  RTLLM_CHECK(in[0].cols() % 2 == 0 && out[0].rows() == T && out[0].cols() == I, "silu_mul: x [", T, ", ",
              in[0].cols(), "] and output [", out[0].rows(), ", ", out[0].cols(), "] do not match");
  const float* x = in[0].f32();
  float* y = out[0].f32();
  ctx.pool->parallel_for(T, [&](int64_t t, int) {
    const float* gate = x + t * 2 * I;
    const float* up = gate + I;
    for (int64_t i = 0; i < I; ++i) y[t * I + i] = silu(gate[i]) * up[i];
  }, I * 4);
}

// Copies rows `index[r]` of src [num_src_rows, H] into dst [R, H].
void gather(const char* name, const OpContext& ctx, const TensorView& src, const TensorView& index,
            const TensorView& dst) {
  check_f32(name, src, "table");
  RTLLM_CHECK(index.dtype == DataType::kInt32, name, ": indices must be int32");
  const int64_t num_src_rows = src.rows(), H = src.cols(), R = index.numel();
  RTLLM_CHECK(dst.rows() == R && dst.cols() == H, name, ": output [", dst.rows(), ", ", dst.cols(),
              "], expected [", R, ", ", H, "]");
  const int32_t* idx = index.i32();
  ctx.pool->parallel_for(R, [&](int64_t r, int) {
    const int32_t i = idx[r];
    RTLLM_CHECK(i >= 0 && i < num_src_rows, name, ": index ", i, " outside [0, ", num_src_rows, ")");
    std::memcpy(dst.f32() + r * H, src.f32() + i * H, H * sizeof(float));
  }, H);
}

void embedding_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  check_num_io("embedding", num_in, 2, 2, num_out, 1);
  gather("embedding", ctx, in[1], in[0], out[0]);
}

void gather_rows_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  check_num_io("gather_rows", num_in, 2, 2, num_out, 1);
  gather("gather_rows", ctx, in[0], in[1], out[0]);
}

}  // namespace

void register_cpu_elementwise_ops() {
  register_op("add", DeviceKind::kCpu, add_op);
  register_op("mul", DeviceKind::kCpu, mul_op);
  register_op("silu", DeviceKind::kCpu, silu_op);
  register_op("silu_mul", DeviceKind::kCpu, silu_mul_op);
  register_op("embedding", DeviceKind::kCpu, embedding_op);
  register_op("gather_rows", DeviceKind::kCpu, gather_rows_op);
}

}  // namespace rtllm
