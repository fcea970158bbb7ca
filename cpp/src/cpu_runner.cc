// The CPU backend of ModelRunner: float32 weights (bf16/fp16 converted once, float32 read from the
// mapped file), host buffers for the workspace and the float32 KV pool, ops run on a thread pool.
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "cpu/gemm_pack.h"
#include "runner_backend.h"
#include "thread_pool.h"
#include "workspace.h"

namespace rtllm {

namespace {

size_t physical_memory_bytes() {
  long pages = sysconf(_SC_PHYS_PAGES), page_size = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page_size > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page_size) : SIZE_MAX;
}

class CpuBackend final : public RunnerBackend {
 public:
  CpuBackend(const Engine& engine, RuntimeConfig& config) : engine_(engine) {
    register_cpu_ops();
    pool_ = std::make_unique<ThreadPool>(config.num_threads);
    config.num_threads = pool_->num_threads();
    const EngineLimits& limits = engine.limits();
    input_ids_ = HostBuffer(config.max_num_tokens * sizeof(int32_t));
    positions_ = HostBuffer(config.max_num_tokens * sizeof(int32_t));
    last_token_ids_ = HostBuffer(config.max_batch_size * sizeof(int32_t));
    scratch_floats_per_thread_ = round_up(limits.max_seq_len, kBufferAlignment / sizeof(float));
  }

  TensorSlot place_weight(const Weight& w) override;
  bool only_linear_reads(const std::string& name) const;  // read by linear nodes only, as their W
  DataType activation_dtype(DataType dtype) const override { return dtype; }
  void* allocate_workspace(size_t num_bytes) override {
    workspace_ = HostBuffer(num_bytes);
    return workspace_.data();
  }
  void* graph_input(const std::string& name) override {
    if (name == "input_ids") return input_ids_.data();
    if (name == "positions") return positions_.data();
    RTLLM_CHECK(name == "last_token_ids", "unknown graph input \"", name, "\"");
    return last_token_ids_.data();
  }
  void allocate_kv_pool(RuntimeConfig& config) override;
  const float* forward(const HostStep& step, std::vector<PlannedNode>& nodes, const TensorSlot& logits) override;
  void copy_blocks(const std::vector<std::pair<int32_t, int32_t>>& copies) override;

 private:
  const Engine& engine_;
  std::unique_ptr<ThreadPool> pool_;
  std::vector<HostBuffer> owned_weights_;  // converted (bf16/fp16 -> float32) or packed weights
  size_t weight_bytes_ = 0;
  HostBuffer kv_buffer_, workspace_, scratch_;
  std::vector<float*> kv_layers_;
  KvPool kv_;
  int64_t scratch_floats_per_thread_ = 0;
  HostBuffer input_ids_, positions_, last_token_ids_;
};

// Weights become float32 views: float32 data stays in the mapped file, bf16/fp16 are converted once.
// A 2-d weight that only linear reads (as its W) is re-laid into the GEMM's column panels
// [num_panels, K, kPanelCols] (cpu/gemm_pack.h), the shape by which the linear op knows it.
TensorSlot CpuBackend::place_weight(const Weight& w) {
  TensorSlot slot;
  for (int64_t d : w.shape) slot.dims.push_back(Dim{Dim::Kind::kFixed, d});
  int64_t n = w.numel();
  const bool half = w.dtype == DataType::kBFloat16 || w.dtype == DataType::kFloat16;
  const bool aligned = reinterpret_cast<uintptr_t>(w.data) % dtype_size(w.dtype) == 0;
  const bool pack = (half || w.dtype == DataType::kFloat32) && w.shape.size() == 2 && only_linear_reads(w.name);
  if (!half && aligned && !pack) {
    slot.data = const_cast<void*>(w.data);  // read-only mapping; ops never write weights
    slot.dtype = w.dtype;
    return slot;
  }
  const DataType dtype = half ? DataType::kFloat32 : w.dtype;
  HostBuffer buf(n * dtype_size(dtype));
  const auto* src = static_cast<const uint8_t*>(w.data);
  if (dtype == w.dtype) {
    std::memcpy(buf.data(), src, w.num_bytes);
  } else {
    float* dst = static_cast<float*>(buf.data());
    for (int64_t i = 0; i < n; ++i) {
      uint16_t bits;
      std::memcpy(&bits, src + 2 * i, 2);
      dst[i] = w.dtype == DataType::kBFloat16 ? bf16_to_float(bits) : fp16_to_float(bits);
    }
  }
  if (pack) {
    const int64_t N = w.shape[0], K = w.shape[1], num_panels = cpu::num_panels(N);
    HostBuffer panels(num_panels * K * cpu::kPanelCols * sizeof(float));
    cpu::pack_linear_weight(static_cast<const float*>(buf.data()), N, K, static_cast<float*>(panels.data()));
    buf = std::move(panels);
    n = num_panels * K * cpu::kPanelCols;
    slot.dims = {Dim{Dim::Kind::kFixed, num_panels}, Dim{Dim::Kind::kFixed, K},
                 Dim{Dim::Kind::kFixed, cpu::kPanelCols}};
  }
  weight_bytes_ += n * dtype_size(dtype);
  slot.data = buf.data();
  slot.dtype = dtype;
  owned_weights_.push_back(std::move(buf));
  return slot;
}

bool CpuBackend::only_linear_reads(const std::string& name) const {
  bool read = false;
  for (const GraphNode& node : engine_.graph().nodes) {
    for (size_t i = 0; i < node.inputs.size(); ++i) {
      if (node.inputs[i] != name) continue;
      if (node.op != "linear" || i != 1) return false;
      read = true;
    }
  }
  return read;
}

void CpuBackend::allocate_kv_pool(RuntimeConfig& config) {
  const ModelConfig& m = engine_.model_config();
  const size_t kv_bytes =
      ModelRunner::kv_bytes_per_block(m, config.tokens_per_block, DeviceKind::kCpu) * config.num_kv_blocks;
  const size_t scratch_bytes = scratch_floats_per_thread_ * sizeof(float) * config.num_threads;
  const size_t num_bytes = weight_bytes_ + kv_bytes + scratch_bytes;
  const size_t available = physical_memory_bytes();
  RTLLM_CHECK(num_bytes <= available, "the model needs ", num_bytes, " bytes of host memory (weights, KV pool of ",
              config.num_kv_blocks, " blocks), the machine has ", available);
  const size_t layer_floats = static_cast<size_t>(config.num_kv_blocks) * 2 * m.num_kv_heads *
                              config.tokens_per_block * m.head_dim;
  kv_buffer_ = HostBuffer(kv_bytes);
  for (int32_t l = 0; l < m.num_layers; ++l)
    kv_layers_.push_back(static_cast<float*>(kv_buffer_.data()) + l * layer_floats);
  kv_.layers = kv_layers_.data();
  kv_.num_layers = m.num_layers;
  kv_.num_blocks = config.num_kv_blocks;
  kv_.num_kv_heads = m.num_kv_heads;
  kv_.tokens_per_block = config.tokens_per_block;
  kv_.head_dim = m.head_dim;
  scratch_ = HostBuffer(scratch_bytes);
}

const float* CpuBackend::forward(const HostStep& st, std::vector<PlannedNode>& nodes, const TensorSlot& logits) {
  const StepInputs& in = *st.inputs;
  std::copy(in.input_ids.begin(), in.input_ids.end(), static_cast<int32_t*>(input_ids_.data()));
  std::copy(st.positions.begin(), st.positions.end(), static_cast<int32_t*>(positions_.data()));
  std::copy(st.last_token_ids.begin(), st.last_token_ids.end(), static_cast<int32_t*>(last_token_ids_.data()));

  StepMeta meta;
  meta.num_seqs = st.num_seqs;
  meta.num_tokens = st.num_tokens;
  meta.num_new_tokens = in.num_new_tokens.data();
  meta.num_cached_tokens = in.num_cached_tokens.data();
  meta.seq_token_start = st.seq_token_start.data();
  meta.block_table = in.block_table.data();
  meta.max_blocks_per_seq = in.max_blocks_per_seq;

  OpContext ctx;
  ctx.pool = pool_.get();
  ctx.step = &meta;
  ctx.kv = &kv_;
  ctx.scratch = static_cast<float*>(scratch_.data());
  ctx.scratch_floats_per_thread = scratch_floats_per_thread_;
  for (PlannedNode& node : nodes) node.run(ctx, st.num_tokens, st.num_seqs);
  return static_cast<const float*>(logits.data);
}

// A block is [2, num_kv_heads, tokens_per_block, head_dim] floats, contiguous in each layer.
void CpuBackend::copy_blocks(const std::vector<std::pair<int32_t, int32_t>>& copies) {
  const size_t block_floats = size_t{2} * kv_.num_kv_heads * kv_.tokens_per_block * kv_.head_dim;
  for (int32_t l = 0; l < kv_.num_layers; ++l)
    for (const auto& [src, dst] : copies)
      std::memcpy(kv_.layers[l] + dst * block_floats, kv_.layers[l] + src * block_floats,
                  block_floats * sizeof(float));
}

}  // namespace

std::unique_ptr<RunnerBackend> make_cpu_backend(const Engine& engine, RuntimeConfig& config) {
  return std::make_unique<CpuBackend>(engine, config);
}

}  // namespace rtllm
