// The op registry: (op name, device) -> implementation. ModelRunner resolves every graph node to
// an OpFn at load and calls it with tensor views over its workspace, weights and the step metadata.
#pragma once

#include <cstdint>
#include <string>

#include "rtllm/dtype.h"
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

// The KV pool: per layer [num_blocks, 2 (K, V), num_kv_heads, tokens_per_block, head_dim] float32.
struct KvPool {
  float* const* layers = nullptr;  // [num_layers]
  int32_t num_layers = 0;
  int32_t num_blocks = 0;
  int32_t num_kv_heads = 0;
  int32_t tokens_per_block = 0;
  int32_t head_dim = 0;
};

struct OpContext {
  ThreadPool* pool = nullptr;
  const StepMeta* step = nullptr;
  const KvPool* kv = nullptr;
  const Json* attrs = nullptr;               // the node's attrs (an object)
  float* scratch = nullptr;                  // [num_threads, scratch_floats_per_thread]
  int64_t scratch_floats_per_thread = 0;     // >= max_seq_len
  float* thread_scratch(int thread) const { return scratch + thread * scratch_floats_per_thread; }
  // CUDA ops only: the runner's cudaStream_t and its per-step device state (cuda/cuda_context.h).
  void* stream = nullptr;
  const void* device_step = nullptr;
};

// Reads `inputs` and writes `outputs` (views with the step's concrete shapes). Throws Error on
// shapes that do not fit the op.
using OpFn = void (*)(const OpContext& ctx, const TensorView* inputs, int num_inputs, TensorView* outputs,
                      int num_outputs);

void register_op(const std::string& name, DeviceKind device, OpFn fn);
OpFn find_op(const std::string& name, DeviceKind device);  // nullptr when there is none
// Registers every CPU op once (explicit, so that no registration depends on static initializers).
void register_cpu_ops();

// Op families, one per cpu/*.cc file; called by register_cpu_ops().
void register_cpu_linear_ops();
void register_cpu_norm_ops();
void register_cpu_elementwise_ops();
void register_cpu_rope_ops();
void register_cpu_attention_ops();
// Registers every CUDA op once (cuda/cuda_ops.cc; only in builds with the CUDA backend).
void register_cuda_ops();

// Shared checks for op implementations.
void check_num_io(const char* op, int num_inputs, int min_inputs, int max_inputs, int num_outputs,
                  int expected_outputs);
void check_f32(const char* op, const TensorView& t, const char* what);

}  // namespace rtllm
