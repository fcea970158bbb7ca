// Row-wise ops without reductions: add, mul, silu, silu_mul, embedding, gather_rows, gather_columns.
// Tasks are rows.
#include <cmath>
#include <cstring>

#include "cpu/fp8_output.h"
#include "op_registry.h"
#include "thread_pool.h"

namespace rtllm {
namespace {

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// An op whose inputs are all float32 activations.
class ActivationOp : public OpKind {
 protected:
  ActivationOp(const OpSpec& spec, size_t num_inputs, size_t num_outputs) : OpKind(spec) {
    spec.require_num_io(num_inputs, num_inputs, num_outputs);
    for (size_t i = 0; i < num_inputs; ++i) spec.require_input_dtype(i, {DataType::kFloat32});
  }
};

template <typename F>
class Binary final : public ActivationOp {
 public:
  explicit Binary(const OpSpec& spec) : ActivationOp(spec, 2, 1) {}

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const int64_t n = in[0].numel();
    RTLLM_CHECK(in[1].numel() == n && out[0].numel() == n, spec_.op(), ": operands have ", n, " and ",
                in[1].numel(), " values, output ", out[0].numel());
    const int64_t rows = in[0].rows(), cols = in[0].cols();
    const float *a = in[0].f32(), *b = in[1].f32();
    float* y = out[0].f32();
    ctx.pool->parallel_for(rows, [&](int64_t r, int) {
      for (int64_t i = r * cols; i < (r + 1) * cols; ++i) y[i] = F()(a[i], b[i]);
    }, cols);
  }
};

struct Plus {
  float operator()(float a, float b) const { return a + b; }
};
struct Times {
  float operator()(float a, float b) const { return a * b; }
};

class Silu final : public ActivationOp {
 public:
  explicit Silu(const OpSpec& spec) : ActivationOp(spec, 1, 1) {}

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    RTLLM_CHECK(out[0].numel() == in[0].numel(), "silu: output has ", out[0].numel(), " values, expected ",
                in[0].numel());
    const int64_t cols = in[0].cols();
    const float* x = in[0].f32();
    float* y = out[0].f32();
    ctx.pool->parallel_for(in[0].rows(), [&](int64_t r, int) {
      for (int64_t i = r * cols; i < (r + 1) * cols; ++i) y[i] = silu(x[i]);
    }, cols * 4);
  }
};

// x [T, 2I] (gate columns, then up columns) -> [T, I] = silu(gate) · up.
// An F8_E4M3 output (cpu::Fp8Output) is computed into the thread's float row, then quantized.
class SiluMul final : public ActivationOp {
 public:
  explicit SiluMul(const OpSpec& spec) : ActivationOp(spec, 1, 1), fp8_(spec) {}

  size_t workspace_bytes() const override {
    return fp8_.row_workspace_bytes(spec_, spec_.outputs[0].shape.back().value);
  }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const int64_t T = in[0].rows(), I = in[0].cols() / 2;
    RTLLM_CHECK(in[0].cols() % 2 == 0 && out[0].rows() == T && out[0].cols() == I, "silu_mul: x [", T, ", ",
                in[0].cols(), "] and output [", out[0].rows(), ", ", out[0].cols(), "] do not match");
    const float* x = in[0].f32();
    ctx.pool->parallel_for(T, [&](int64_t t, int thread) {
      const float* gate = x + t * 2 * I;
      const float* up = gate + I;
      float* y = fp8_.on() ? static_cast<float*>(ctx.workspace) + thread * I : out[0].f32() + t * I;
      for (int64_t i = 0; i < I; ++i) y[i] = silu(gate[i]) * up[i];
      if (fp8_.on()) fp8_.store(y, I, static_cast<uint8_t*>(out[0].data) + t * I);
    }, I * 4);
  }

 private:
  const cpu::Fp8Output fp8_;
};

// Copies rows `index[r]` of a table [num_src_rows, H] into dst [R, H]. embedding: (ids, table);
// gather_rows: (x, index). A vocab-parallel embedding's table is this rank's rows [tp_rank * V_shard,
// (tp_rank + 1) * V_shard) of the vocabulary: another rank's id gives a zero row, and the all_reduce
// that follows sums the ranks into the full embedding.
class Gather final : public OpKind {
 public:
  explicit Gather(const OpSpec& spec)
      : OpKind(spec), table_(spec.op() == "embedding" ? 1 : 0), index_(1 - table_),
        vocab_parallel_(spec.node->attrs.get_bool("vocab_parallel", false)) {
    spec.require_num_io(2, 2, 1);
    spec.require_input_dtype(index_, {DataType::kInt32});
    spec.require_input_dtype(table_, kWideFloatDtypes);
    RTLLM_CHECK(!vocab_parallel_ || spec.op() == "embedding", spec.op(), ": vocab_parallel is an attribute of "
                "embedding only");
  }
  // A BF16 / F16 table stays 16-bit (it may also be the LM head's weight, which linear keeps 16-bit);
  // its rows are widened as they are gathered.
  WeightPlacement weight_placement(size_t input) const override {
    const DataType d = spec_.inputs[input].dtype;
    if (d == DataType::kBFloat16 || d == DataType::kFloat16) return {d, WeightLayout::kRowMajor};
    return in_activation_dtype();
  }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &src = in[table_], &index = in[index_], &dst = out[0];
    const size_t row_bytes = dtype_size(src.dtype) * src.cols();
    const int64_t num_src_rows = src.rows(), H = src.cols(), R = index.numel();
    RTLLM_CHECK(dst.rows() == R && dst.cols() == H, spec_.op(), ": output [", dst.rows(), ", ", dst.cols(),
                "], expected [", R, ", ", H, "]");
    const int32_t* idx = index.i32();
    // Ids index the whole vocabulary; this rank holds rows [first, first + num_src_rows) of it.
    const int64_t first = vocab_parallel_ ? spec_.backend->tp_rank * num_src_rows : 0;
    const int64_t num_ids = vocab_parallel_ ? spec_.backend->tp_size * num_src_rows : num_src_rows;
    ctx.pool->parallel_for(R, [&](int64_t r, int) {
      const int64_t id = idx[r];
      RTLLM_CHECK(id >= 0 && id < num_ids, spec_.op(), ": index ", id, " outside [0, ", num_ids, ")");
      const int64_t i = id - first;
      if (i < 0 || i >= num_src_rows) {  // another rank's row
        std::memset(dst.f32() + r * H, 0, H * sizeof(float));
        return;
      }
      const void* row = static_cast<const uint8_t*>(src.data) + i * row_bytes;
      if (src.dtype == DataType::kFloat32) {
        std::memcpy(dst.f32() + r * H, row, H * sizeof(float));
      } else {
        convert_floats(row, src.dtype, dst.f32() + r * H, DataType::kFloat32, H);
      }
    }, H);
  }

 private:
  const size_t table_, index_;  // input positions
  const bool vocab_parallel_;
};

// gather_columns: (x [T, K], index [C] int32) -> [T, C] = x[:, index]. The input order of a linear whose
// weight columns the builder reordered (GPTQ act-order checkpoints: each quantization group's columns made
// contiguous); the index is a weight, checked whole each run (C values against a GEMM of T x C x N).
class GatherColumns final : public OpKind {
 public:
  explicit GatherColumns(const OpSpec& spec) : OpKind(spec) {
    spec.require_num_io(2, 2, 1);
    spec.require_input_dtype(0, {DataType::kFloat32});
    spec.require_input_dtype(1, {DataType::kInt32});
  }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &index = in[1], &dst = out[0];
    const int64_t T = x.rows(), K = x.cols(), C = index.numel();
    RTLLM_CHECK(dst.rows() == T && dst.cols() == C, "gather_columns: output [", dst.rows(), ", ", dst.cols(),
                "], expected [", T, ", ", C, "]");
    const int32_t* idx = index.i32();
    for (int64_t c = 0; c < C; ++c) {
      RTLLM_CHECK(idx[c] >= 0 && idx[c] < K, "gather_columns: index ", idx[c], " (at ", c, ") outside [0, ", K,
                  ")");
    }
    ctx.pool->parallel_for(T, [&](int64_t t, int) {
      const float* src = x.f32() + t * K;
      float* row = dst.f32() + t * C;
      for (int64_t c = 0; c < C; ++c) row[c] = src[idx[c]];
    }, C);
  }
};

}  // namespace

void register_cpu_elementwise_ops() {
  register_op("add", DeviceKind::kCpu, make_op<Binary<Plus>>);
  register_op("mul", DeviceKind::kCpu, make_op<Binary<Times>>);
  register_op("silu", DeviceKind::kCpu, make_op<Silu>);
  register_op("silu_mul", DeviceKind::kCpu, make_op<SiluMul>);
  register_op("embedding", DeviceKind::kCpu, make_op<Gather>);
  register_op("gather_rows", DeviceKind::kCpu, make_op<Gather>);
  register_op("gather_columns", DeviceKind::kCpu, make_op<GatherColumns>);
}

}  // namespace rtllm
