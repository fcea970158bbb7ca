// The device-independent plan of ModelRunner (graph slots, nodes, the packed step on the host) and
// the interface each device implements: where weights, activations and graph inputs live, and how
// one step runs. model_runner.cc plans; cpu_runner.cc and cuda/cuda_runner.cc execute.
#pragma once

#include <array>
#include <memory>
#include <string>
#include <vector>

#include "op_registry.h"
#include "rtllm/engine.h"
#include "rtllm/model_runner.h"
#include "rtllm/sampler.h"

namespace rtllm {

inline int64_t dim_size(const Dim& d, int64_t num_tokens, int64_t num_logits) {
  return d.kind == Dim::Kind::kNumTokens ? num_tokens : d.kind == Dim::Kind::kNumLogits ? num_logits : d.value;
}

// A graph tensor as planned: where it lives (host or device memory) and its shape with the
// step-dependent dims.
struct TensorSlot {
  void* data = nullptr;
  DataType dtype = DataType::kFloat32;
  std::vector<Dim> dims;

  void bind(TensorView& view, int64_t num_tokens, int64_t num_logits) const {
    view.data = data;
    view.dtype = dtype;
    view.ndim = static_cast<int>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i) view.shape[i] = dim_size(dims[i], num_tokens, num_logits);
  }
};

// A graph node bound to its op kind and to the slots of its tensors.
struct PlannedNode {
  std::unique_ptr<OpKind> kind;
  std::vector<const TensorSlot*> inputs, outputs;
  std::vector<TensorView> input_views, output_views;  // refilled each step
  // (output index, running amax |value|) of the outputs ModelRunner::observe_amax asked for; the
  // backend updates them after each run.
  std::vector<std::pair<size_t, float>> observed;
  // (output index, running amax |value| of each column) of the outputs ModelRunner::observe_channel_amax
  // asked for (SmoothQuant's per-input-channel ranges); the backend updates them after each run.
  std::vector<std::pair<size_t, std::vector<float>>> observed_channels;
  // The outputs ModelRunner::capture_outputs asked for: the backend copies each one's values (float32,
  // [rows, cols]) after each run, replacing the previous step's (calibration only).
  struct Captured {
    size_t output = 0;
    int64_t cols = 0;
    std::vector<float> values;
  };
  std::vector<Captured> captured;

  // Binds the views to a step of num_tokens tokens and num_logits rows of logits and runs the op.
  void run(const OpContext& ctx, int64_t num_tokens, int64_t num_logits) {
    for (size_t i = 0; i < inputs.size(); ++i) inputs[i]->bind(input_views[i], num_tokens, num_logits);
    for (size_t i = 0; i < outputs.size(); ++i) outputs[i]->bind(output_views[i], num_tokens, num_logits);
    kind->run(ctx, input_views.data(), output_views.data());
  }
};

// The validated step, expanded on the host into the arrays the graph inputs and ops read.
struct HostStep {
  const StepInputs* inputs = nullptr;
  int32_t num_seqs = 0, num_tokens = 0;
  int32_t max_new_tokens = 0;    // over the sequences
  bool decode_only = false;      // every sequence has exactly one new token
  std::vector<int32_t> positions;        // [num_tokens]
  std::vector<int32_t> token_seq;        // [num_tokens] sequence of each packed token
  std::vector<int32_t> seq_token_start;  // [num_seqs + 1]
  std::vector<int32_t> seq_len;          // [num_seqs] cached + new
  std::vector<int32_t> logits_indices;   // [num_logits] packed tokens whose logits are computed
  int32_t num_logits = 0;
  bool one_logit_per_seq = true;         // logits_indices is each sequence's last token, in order
};

// What differs per device. ModelRunner calls, in order: info to create the op kinds, place_weight for
// each weight, allocate_workspace for the activation arena and the ops' shared scratch, graph_input
// for the three graph inputs, allocate_kv_pool (which may size the pool), then forward_and_sample (or
// forward, for logits alone) per step, after copy_blocks if any.
class RunnerBackend {
 public:
  virtual ~RunnerBackend() = default;
  // The device facts op kinds are created with; kv_cache_dtype is the backend's default for the pool.
  virtual BackendInfo info() const = 0;
  // The weight in the dtype and layout `placement` asks for (converted or packed as needed); the
  // backend owns any copy. Throws Error for a conversion it cannot make.
  virtual TensorSlot place_weight(const Weight& w, const WeightPlacement& placement) = 0;
  // The dtype of an activation the graph declares as `dtype` (graph outputs keep theirs).
  DataType activation_dtype(DataType dtype) const {
    return dtype == DataType::kFloat32 ? info().activation_dtype : dtype;
  }
  // Memory for the activation arena and for the ops' scratch (shared: ops run one at a time).
  virtual void* allocate_workspace(size_t num_bytes) = 0;
  virtual void* allocate_op_workspace(size_t num_bytes) = 0;
  // int32 memory for "input_ids", "positions" ([max_num_tokens]) or "logits_indices" ([max_num_logits]).
  virtual void* graph_input(const std::string& name) = 0;
  // Allocates the KV pool of config.kv_cache_dtype (and per-step buffers). With config.num_kv_blocks 0
  // the backend sizes the pool itself and writes the count back. Throws Error when memory does not suffice, naming both sizes.
  virtual void allocate_kv_pool(RuntimeConfig& config) = 0;
  virtual size_t kv_pool_bytes() const = 0;  // as allocated
  // Runs the nodes for one step; returns [num_logits, vocab] float32 logits on the host.
  virtual const float* forward(const HostStep& step, std::vector<PlannedNode>& nodes, const TensorSlot& logits) = 0;
  // Runs the nodes for one step and draws from each row of logits: out[r] for inputs[r], token_id -1
  // for an input without a config and for a draw with every token masked or -inf. The one place a
  // step's tokens are drawn. This default samples forward()'s host logits with the CPU Sampler; a
  // backend that can draw where the logits are overrides it and calls it back for the inputs its
  // kernel cannot draw.
  virtual void forward_and_sample(const HostStep& step, std::vector<PlannedNode>& nodes, const TensorSlot& logits,
                                  const std::vector<SamplingInput>& inputs, std::vector<SampledToken>* out) {
    const float* host_logits = forward(step, nodes, logits);
    host_sampler_.sample(host_logits, static_cast<int32_t>(logits.dims[1].value), inputs, out);
  }
  // Called once after the nodes are bound, before the first step: a backend prepares here what it
  // would otherwise prepare lazily inside the first steps (CUDA captures every decode graph bucket).
  virtual void warm_up(std::vector<PlannedNode>& nodes) {}
  // Copies KV blocks (source, destination; validated ids), every layer, in order, ahead of the next
  // forward (on the CUDA stream: ordered before it, no host wait).
  virtual void copy_blocks(const std::vector<std::pair<int32_t, int32_t>>& copies) = 0;
  // Calibration: whether forward updates PlannedNode::observed, and the per-layer {amax |K|, amax |V|}
  // of a sequence's first num_tokens pool slots (validated block ids) into out[num_layers][2].
  virtual bool can_observe() const { return false; }
  // Whether forward updates PlannedNode::observed_channels.
  virtual bool can_observe_channels() const { return false; }
  virtual void kv_cache_amax(const int32_t* block_table, int32_t num_tokens, std::array<float, 2>* out) const {
    (void)block_table, (void)num_tokens, (void)out;
    RTLLM_CHECK_ARG(false, "kv_cache_amax is not implemented on this backend yet (available on the CPU)");
  }

 private:
  Sampler host_sampler_;  // the host draw of forward_and_sample; its buffers are reused across steps
};

std::unique_ptr<RunnerBackend> make_cpu_backend(const Engine& engine, RuntimeConfig& config);
#ifdef RTLLM_WITH_CUDA
std::unique_ptr<RunnerBackend> make_cuda_backend(const Engine& engine, const RuntimeConfig& config);
#endif

}  // namespace rtllm
