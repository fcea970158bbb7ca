// Tensor-parallel collectives on the CPU: all_reduce (the sum of the ranks' partial activations, after a
// row-parallel linear or a vocab-parallel embedding), all_reduce_add_rms_norm (that sum, the residual add
// and the RMSNorm after it in one op) and gather (a column-parallel output's shards, side by side, on one
// rank: the LM head's logits). They run on the step's thread through the runner's Communicator; with one
// rank they are copies.
#include <cstring>

#include "cpu/row_ops.h"
#include "op_registry.h"
#include "runner_backend.h"
#include "thread_pool.h"

namespace rtllm {
namespace {

// Rows of a tensor spec at the largest step: every dim but the last at its maximum.
int64_t max_rows(const TensorSpec& t, const BackendInfo& b) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < t.shape.size(); ++i) rows *= dim_size(t.shape[i], b.max_num_tokens, b.max_num_logits);
  return rows;
}

class CollectiveOp : public OpKind {
 protected:
  // num_inputs / num_outputs: x first, then the op's other inputs; the outputs.
  explicit CollectiveOp(const OpSpec& spec, size_t num_inputs = 1, size_t num_outputs = 1) : OpKind(spec) {
    spec.require_num_io(num_inputs, num_inputs, num_outputs);
    spec.require_input_dtype(0, {DataType::kFloat32});
    const BackendInfo& b = *spec.backend;
    RTLLM_CHECK(b.activation_dtype == DataType::kFloat32, spec.op(), ": float32 activations only, the backend's are ",
                dtype_safetensors_name(b.activation_dtype));
    RTLLM_CHECK(b.tp_size == 1 || b.communicator != nullptr, spec.op(), ": tp_size ", b.tp_size,
                " needs a communicator");
    RTLLM_CHECK(!spec.input_is_weight[0], spec.op(), ": input \"", spec.inputs[0].name, "\" must be an activation");
  }
  int32_t tp_size() const { return spec_.backend->tp_size; }
  Communicator* comm() const { return spec_.backend->communicator; }
};

// y = the sum over the ranks of x. The output is a tensor of its own: x is copied, then summed in place.
class AllReduce final : public CollectiveOp {
 public:
  explicit AllReduce(const OpSpec& spec) : CollectiveOp(spec) {}

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const int64_t n = in[0].numel();
    RTLLM_CHECK(out[0].numel() == n, "all_reduce: output has ", out[0].numel(), " values, x has ", n);
    if (out[0].data != in[0].data) std::memcpy(out[0].data, in[0].data, n * sizeof(float));
    if (tp_size() > 1) comm()->all_reduce_sum(out[0].f32(), n);
  }
};

// Outputs [normed, sum]: sum = (the sum over the ranks of x) + residual, normed = rms_norm(sum) · weight; the
// ops all_reduce then add_rms_norm in one, in the same float32 order (so the same bits). The sum is
// reduced in place in its output; a GPU fuses the norm into the all-reduce kernel itself.
class AllReduceAddRmsNorm final : public CollectiveOp {
 public:
  explicit AllReduceAddRmsNorm(const OpSpec& spec)
      : CollectiveOp(spec, 3, 2), eps_(static_cast<float>(spec.node->attrs.get_double("eps", 1e-6))) {
    spec.require_input_dtype(1, {DataType::kFloat32});
    spec.require_input_dtype(2, kWideFloatDtypes);
  }
  WeightPlacement weight_placement(size_t) const override { return in_activation_dtype(); }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &res = in[1], &w = in[2];
    const int64_t T = x.rows(), D = x.cols(), n = x.numel();
    RTLLM_CHECK(res.numel() == n && w.numel() == D && out[0].numel() == n && out[1].numel() == n,
                "all_reduce_add_rms_norm: shapes do not match rows of ", D, " values");
    float *normed = out[0].f32(), *sum = out[1].f32();
    std::memcpy(sum, x.data, n * sizeof(float));
    if (tp_size() > 1) comm()->all_reduce_sum(sum, n);
    const float *rp = res.f32(), *wp = w.f32();
    const float eps = eps_;
    ctx.pool->parallel_for(T, [&](int64_t t, int) {
      cpu::add_rms_norm_row(normed + t * D, sum + t * D, sum + t * D, rp + t * D, wp, D, eps);
    }, D * 3);
  }

 private:
  const float eps_;
};

// x [R, C] on each rank -> y [R, C * tp_size] on the root, rank r's x in columns [r * C, (r + 1) * C).
// MPI delivers the shards rank after rank (whole [R, C] blocks) into the workspace; the root then
// interleaves them by row. The other ranks' y is not written.
class Gather final : public CollectiveOp {
 public:
  explicit Gather(const OpSpec& spec) : CollectiveOp(spec) {
    const int64_t root = spec.node->attrs.get_int("root", 0);
    RTLLM_CHECK(root >= 0 && root < tp_size(), "gather: root ", root, " outside [0, tp_size ", tp_size(), ")");
    root_ = static_cast<int32_t>(root);
    const TensorSpec &x = spec.inputs[0], &y = spec.outputs[0];
    RTLLM_CHECK(!x.shape.empty() && x.shape.size() == y.shape.size() && x.shape.back().kind == Dim::Kind::kFixed &&
                    y.shape.back().kind == Dim::Kind::kFixed && y.shape.back().value == x.shape.back().value * tp_size(),
                "gather: output \"", y.name, "\" must have the shape of \"", x.name, "\" with its last dim times tp_size ",
                tp_size());
    max_count_ = max_rows(x, *spec.backend) * x.shape.back().value;
  }

  size_t workspace_bytes() const override {
    return tp_size() > 1 ? sizeof(float) * static_cast<size_t>(max_count_) * tp_size() : 0;
  }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &y = out[0];
    const int64_t R = x.rows(), C = x.cols(), tp = tp_size();
    RTLLM_CHECK(y.rows() == R && y.cols() == C * tp, "gather: output [", y.rows(), ", ", y.cols(), "], expected [", R,
                ", ", C * tp, "]");
    RTLLM_CHECK(R * C <= max_count_, "gather: ", R * C, " values exceed the planned ", max_count_);
    if (tp == 1) {
      std::memcpy(y.data, x.data, R * C * sizeof(float));
      return;
    }
    auto* blocks = static_cast<float*>(ctx.workspace);
    comm()->gather(x.f32(), blocks, R * C, root_);
    if (comm()->rank() != root_) return;
    float* dst = y.f32();
    ctx.pool->parallel_for(R, [&](int64_t row, int) {
      for (int64_t r = 0; r < tp; ++r)
        std::memcpy(dst + row * C * tp + r * C, blocks + (r * R + row) * C, C * sizeof(float));
    }, C * tp);
  }

 private:
  int32_t root_ = 0;
  int64_t max_count_ = 0;  // R * C at the largest step
};

}  // namespace

void register_cpu_collective_ops() {
  register_op("all_reduce", DeviceKind::kCpu, make_op<AllReduce>);
  register_op("all_reduce_add_rms_norm", DeviceKind::kCpu, make_op<AllReduceAddRmsNorm>);
  register_op("gather", DeviceKind::kCpu, make_op<Gather>);
}

}  // namespace rtllm
