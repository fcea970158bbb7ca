// The op registry: (op name, device) -> a factory of op kinds. ModelRunner creates one OpKind per
// graph node at load (the plan/run split of FlashInfer, ggml's supports_op): the kind parses its
// attributes, checks the dtypes it is given, says where its weights live and how much scratch it
// needs; then it runs every step on tensor views over the workspace, weights and step metadata.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "rtllm/dtype.h"
#include "rtllm/engine.h"
#include "rtllm/json.h"
#include "rtllm/model_runner.h"

namespace rtllm {

class ThreadPool;

constexpr int kMaxDims = 4;

// A non-owning view of a tensor: row-major, contiguous.
struct TensorView {
  void* data = nullptr;
  DataType dtype = DataType::kFloat32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  int64_t cols() const { return ndim ? shape[ndim - 1] : 1; }  // innermost dim
  int64_t rows() const { return ndim ? numel() / cols() : 1; }  // product of the others
  float* f32() const { return static_cast<float*>(data); }
  int32_t* i32() const { return static_cast<int32_t*>(data); }
};

// The packed step as the attention op sees it (all arrays owned by the runner).
struct StepMeta {
  int32_t num_seqs = 0;
  int32_t num_tokens = 0;
  const int32_t* num_new_tokens = nullptr;     // [num_seqs]
  const int32_t* num_cached_tokens = nullptr;  // [num_seqs]
  const int32_t* seq_token_start = nullptr;    // [num_seqs + 1] first packed token of each sequence
  const int32_t* block_table = nullptr;        // [num_seqs, max_blocks_per_seq]
  int32_t max_blocks_per_seq = 0;
};

// The KV pool: per layer [num_blocks, 2 (K, V), num_kv_heads, tokens_per_block, head_dim] of dtype.
struct KvPool {
  void* const* layers = nullptr;  // [num_layers]
  DataType dtype = DataType::kFloat32;
  int32_t num_layers = 0;
  int32_t num_blocks = 0;
  int32_t num_kv_heads = 0;
  int32_t tokens_per_block = 0;
  int32_t head_dim = 0;
};

// Where a backend keeps a weight: its dtype and layout as the op kinds that read it want them.
enum class WeightLayout {
  kRowMajor,        // as stored in the engine
  kCpuGemmPanels,   // the CPU GEMM's column panels [num_panels, K, kPanelCols] (cpu/gemm_pack.h)
  kCpuAmxTiles,     // 16-bit W as AMX B tiles [num_col_blocks, num_k_steps, 32, 32] (cpu/amx_linear.h)
  kCpuAmxCodeTiles, // int8 / int4 codes as AMX B tiles [num_col_blocks, num_k_steps, 32, 32] (cpu/amx_weight_only.h)
  kCpuAmxGroupCols, // per-group float32 [N, G] as [num_col_blocks, G, 32] (cpu/amx_weight_only.h)
  kCudaInt4Mma,     // packed int4 codes in the CUDA GEMV's MMA layout (kernels::woq_pack_int4), same shape
};

struct WeightPlacement {
  DataType dtype = DataType::kFloat32;
  WeightLayout layout = WeightLayout::kRowMajor;
};

// What the runner knows of the backend and its limits when it creates the op kinds. The backend
// fills the device facts; ModelRunner the limits and the resolved KV-cache dtype.
struct BackendInfo {
  DeviceKind device = DeviceKind::kCpu;
  DataType activation_dtype = DataType::kFloat32;  // of every activation the graph declares float32
  DataType kv_cache_dtype = DataType::kFloat32;    // of the KV pool
  int32_t num_threads = 1;   // CPU worker threads
  int32_t num_sms = 0;       // CUDA multiprocessors
  int32_t max_num_tokens = 0, max_batch_size = 0, max_seq_len = 0;
  int32_t max_num_logits = 0;  // rows of the graph's num_logits dim
  int32_t tokens_per_block = 0;
  int32_t num_layers = 0;    // of the KV pool
  // Tensor parallelism: this rank of tp_size; communicator is null with one rank (RuntimeConfig's).
  int32_t tp_rank = 0, tp_size = 1;
  Communicator* communicator = nullptr;

  // The largest size of a graph dim at any step: max_num_tokens, max_num_logits or the fixed value.
  int64_t max_size(const Dim& d) const {
    if (d.kind == Dim::Kind::kNumLogits) return max_num_logits;
    return d.kind == Dim::Kind::kNumTokens ? max_num_tokens : d.value;
  }
};

// A graph tensor's shape for error messages: "[num_tokens, 4096]".
std::string shape_string(const TensorSpec& t);

// Weights a kind converts to its compute dtype when it places them.
inline const std::vector<DataType> kWideFloatDtypes = {DataType::kFloat32, DataType::kBFloat16, DataType::kFloat16};

// What an op kind is created from: its node, the graph specs of its inputs and outputs (weights with
// their stored dtype and shape), and the backend.
struct OpSpec {
  const GraphNode* node = nullptr;
  std::vector<TensorSpec> inputs, outputs;
  std::vector<bool> input_is_weight;  // [inputs.size()]
  const BackendInfo* backend = nullptr;

  const std::string& op() const { return node->op; }
  // The dtype input i has when the op runs: a weight's as the kind places it, an activation's on
  // this backend (graph inputs are int32).
  DataType activation_dtype(size_t i) const;
  // Throws Error naming the op, the input, its dtype, the backend and the dtypes it supports.
  void require_input_dtype(size_t i, const std::vector<DataType>& supported) const;
  // Throws Error unless the node has min..max inputs and exactly num_outputs outputs.
  void require_num_io(size_t min_inputs, size_t max_inputs, size_t num_outputs) const;
};

// The attr output_scale of a node whose first output the graph declares F8_E4M3 (docs/engine_format.md,
// "FP8 outputs": the op writes e4m3(y / output_scale)), checked finite and > 0 (Error naming it); 0 when
// that output is a float.
float fp8_output_scale(const OpSpec& spec);

// Per-step state every op reads.
struct OpContext {
  ThreadPool* pool = nullptr;
  const StepMeta* step = nullptr;
  const KvPool* kv = nullptr;
  // The op's workspace (workspace_bytes() of it, host or device memory): shared by all ops, valid
  // during run() only.
  void* workspace = nullptr;
  // CUDA ops only: the runner's cudaStream_t and its per-step device state (cuda/cuda_context.h).
  void* stream = nullptr;
  const void* device_step = nullptr;
};

// An op of the graph, bound to a backend: created once at engine load (attributes parsed and dtypes
// checked there), then run every step with views of the step's concrete shapes.
class OpKind {
 public:
  virtual ~OpKind() = default;
  // Where weight input i lives on this backend. The default keeps it as stored (FP8 and integer
  // weights, float32 scales); kinds that compute with a weight in the activation dtype (linear, norms,
  // embedding) override it.
  virtual WeightPlacement weight_placement(size_t input) const;
  // Scratch bytes the op needs at the largest step (max_num_tokens tokens, max_batch_size sequences).
  virtual size_t workspace_bytes() const { return 0; }
  // Reads `inputs`, writes `outputs`. Throws Error on shapes that do not fit the op.
  virtual void run(const OpContext& ctx, const TensorView* inputs, TensorView* outputs) = 0;

 protected:
  explicit OpKind(const OpSpec& spec) : spec_(spec) {}
  // Weight input i converted to the activation dtype, row-major.
  WeightPlacement in_activation_dtype() const { return {spec_.backend->activation_dtype, WeightLayout::kRowMajor}; }
  const OpSpec spec_;  // the node outlives the kind (the engine owns it)
};

// Creates the kind of spec.op() on spec.backend->device; throws Error naming the op and the backend
// when there is none, or the kind's own error for attributes or dtypes it does not support.
using OpFactory = std::unique_ptr<OpKind> (*)(const OpSpec& spec);

void register_op(const std::string& name, DeviceKind device, OpFactory factory);
std::unique_ptr<OpKind> create_op(const OpSpec& spec);
const char* device_name(DeviceKind device);  // "CPU", "CUDA"

// Registers every CPU op once (explicit, so that no registration depends on static initializers).
void register_cpu_ops();

// Op families, one per cpu/*.cc file; called by register_cpu_ops().
void register_cpu_linear_ops();
void register_cpu_fp8_linear_ops();
void register_cpu_weight_only_linear_ops();
void register_cpu_int8_linear_ops();
void register_cpu_norm_ops();
void register_cpu_elementwise_ops();
void register_cpu_rope_ops();
void register_cpu_attention_ops();
void register_cpu_collective_ops();
// Registers every CUDA op once (cuda/cuda_ops.cc; only in builds with the CUDA backend).
void register_cuda_ops();

// A factory for a kind whose constructor takes the spec.
template <typename Kind>
std::unique_ptr<OpKind> make_op(const OpSpec& spec) {
  return std::make_unique<Kind>(spec);
}

}  // namespace rtllm
