// The CPU backend of ModelRunner: weights placed as the op kinds ask (float32 read from the mapped
// file, other float dtypes converted once, linear weights packed into GEMM panels), host buffers for
// the workspace and the KV pool, ops run on a thread pool.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "cpu/amx_linear.h"
#include "cpu/amx_weight_only.h"
#include "cpu/gemm_pack.h"
#include "runner_backend.h"
#include "thread_pool.h"
#include "workspace.h"

namespace rtllm {

namespace {

// A value's magnitude raises amax; a NaN makes it NaN (`!(a <= m)`), so a broken run is not hidden.
void raise_amax(float a, float& amax) {
  if (!(a <= amax)) amax = a;
}

// amax |value| over a float32 activation as bound for the step (every row of it).
void observe(const TensorView& t, float& amax) {
  RTLLM_CHECK(t.dtype == DataType::kFloat32, "observe_amax reads float32 activations, got ",
              dtype_safetensors_name(t.dtype));
  const float* x = t.f32();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) raise_amax(std::fabs(x[i]), amax);
}

// amax |value| of each column over the rows of a float32 activation [rows, amax.size()].
void observe_channels(const TensorView& t, std::vector<float>& amax) {
  RTLLM_CHECK(t.dtype == DataType::kFloat32, "observe_channel_amax reads float32 activations, got ",
              dtype_safetensors_name(t.dtype));
  const int64_t cols = t.cols();
  RTLLM_CHECK(cols == static_cast<int64_t>(amax.size()), "observe_channel_amax: ", cols, " columns, expected ",
              amax.size());
  const float* x = t.f32();
  for (int64_t r = 0, rows = t.rows(); r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) raise_amax(std::fabs(x[r * cols + c]), amax[c]);
}

// A copy of a float32 activation's values as bound for the step (calibration: the buffer grows to the
// largest step seen, outside the serving path).
void capture(const TensorView& t, PlannedNode::Captured& c) {
  RTLLM_CHECK(t.dtype == DataType::kFloat32, "capture_outputs reads float32 activations, got ",
              dtype_safetensors_name(t.dtype));
  c.cols = t.ndim > 1 ? t.shape[t.ndim - 1] : 1;
  c.values.assign(t.f32(), t.f32() + t.numel());
}

size_t physical_memory_bytes() {
  long pages = sysconf(_SC_PHYS_PAGES), page_size = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page_size > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page_size) : SIZE_MAX;
}

// Host memory a new allocation can get without swapping: MemAvailable of /proc/meminfo (free memory
// plus the page cache and slabs the kernel can reclaim), else the physical memory.
size_t available_memory_bytes() {
  if (std::FILE* f = std::fopen("/proc/meminfo", "r")) {
    char line[256];
    unsigned long long kib = 0;
    bool found = false;
    while (!found && std::fgets(line, sizeof(line), f)) found = std::sscanf(line, "MemAvailable: %llu kB", &kib) == 1;
    std::fclose(f);
    if (found) return static_cast<size_t>(kib) * 1024;
  }
  return physical_memory_bytes();
}

class CpuBackend final : public RunnerBackend {
 public:
  CpuBackend(const Engine& engine, RuntimeConfig& config) : engine_(engine) {
    register_cpu_ops();
    pool_ = std::make_unique<ThreadPool>(config.num_threads);
    config.num_threads = pool_->num_threads();
    input_ids_ = HostBuffer(config.max_num_tokens * sizeof(int32_t));
    positions_ = HostBuffer(config.max_num_tokens * sizeof(int32_t));
    logits_indices_ = HostBuffer(config.max_num_logits * sizeof(int32_t));
  }

  BackendInfo info() const override {
    BackendInfo b;
    b.device = DeviceKind::kCpu;
    b.activation_dtype = b.kv_cache_dtype = DataType::kFloat32;
    b.num_threads = pool_->num_threads();
    return b;
  }
  TensorSlot place_weight(const Weight& w, const WeightPlacement& placement) override;
  TensorSlot place_amx_weight_only(const Weight& w, const WeightPlacement& placement, TensorSlot slot);
  void* allocate_workspace(size_t num_bytes) override {
    workspace_ = HostBuffer(num_bytes);
    workspace_bytes_ = num_bytes;
    return workspace_.data();
  }
  void* allocate_op_workspace(size_t num_bytes) override {
    op_workspace_ = HostBuffer(num_bytes);
    op_workspace_bytes_ = num_bytes;
    return op_workspace_.data();
  }
  void* graph_input(const std::string& name) override {
    if (name == "input_ids") return input_ids_.data();
    if (name == "positions") return positions_.data();
    RTLLM_CHECK(name == "logits_indices", "unknown graph input \"", name, "\"");
    return logits_indices_.data();
  }
  void allocate_kv_pool(RuntimeConfig& config) override;
  void size_kv_pool(RuntimeConfig& config, size_t block_bytes);
  size_t kv_pool_bytes() const override { return kv_bytes_; }
  const float* forward(const HostStep& step, std::vector<PlannedNode>& nodes, const TensorSlot& logits) override;
  void copy_blocks(const std::vector<std::pair<int32_t, int32_t>>& copies) override;
  bool can_observe() const override { return true; }
  bool can_observe_channels() const override { return true; }
  void kv_cache_amax(const int32_t* block_table, int32_t num_tokens, std::array<float, 2>* out) const override;

 private:
  const Engine& engine_;
  std::unique_ptr<ThreadPool> pool_;
  std::vector<HostBuffer> owned_weights_;  // converted (bf16/fp16 -> float32) or packed weights
  size_t weight_bytes_ = 0, kv_bytes_ = 0, workspace_bytes_ = 0, op_workspace_bytes_ = 0;
  size_t mapped_weight_bytes_ = 0;  // weights read in place from the engine file
  HostBuffer kv_buffer_, workspace_, op_workspace_;
  std::vector<void*> kv_layers_;
  KvPool kv_;
  HostBuffer input_ids_, positions_, logits_indices_;
};

// A weight already in the placement's dtype and row-major stays in the mapped file (read-only: ops
// never write weights); otherwise it is converted once and, for GEMM panels, re-laid
// [num_panels, K, kPanelCols] (cpu/gemm_pack.h), or for AMX tiles [num_col_blocks, num_k_steps, 32, 32]
// (cpu/amx_linear.h): the shapes by which the linear op knows them.
TensorSlot CpuBackend::place_weight(const Weight& w, const WeightPlacement& placement) {
  TensorSlot slot;
  for (int64_t d : w.shape) slot.dims.push_back(Dim{Dim::Kind::kFixed, d});
  slot.dtype = placement.dtype;
  const int64_t n = w.numel();
  if (placement.layout == WeightLayout::kCpuAmxCodeTiles || placement.layout == WeightLayout::kCpuAmxGroupCols)
    return place_amx_weight_only(w, placement, std::move(slot));
  bool amx = placement.layout == WeightLayout::kCpuAmxTiles;
  const bool pack = placement.layout == WeightLayout::kCpuGemmPanels || amx;
  const bool aligned = reinterpret_cast<uintptr_t>(w.data) % std::max<size_t>(1, dtype_bits(w.dtype) / 8) == 0;
  if (w.dtype == placement.dtype && aligned && !pack) {
    mapped_weight_bytes_ += w.num_bytes;
    slot.data = const_cast<void*>(w.data);
    return slot;
  }
  HostBuffer buf;
  const void* src = w.data;  // the weight in the placement's dtype
  if (w.dtype != placement.dtype || !pack || !aligned) {
    buf = HostBuffer(dtype_num_bytes(placement.dtype, n));
    if (w.dtype == placement.dtype) {
      std::memcpy(buf.data(), w.data, w.num_bytes);
    } else {
      convert_floats(w.data, w.dtype, buf.data(), placement.dtype, n);  // throws for non-float pairs
    }
    src = buf.data();
  }
  size_t num_bytes = dtype_num_bytes(placement.dtype, n);
  if (amx) {
    RTLLM_CHECK(dtype_size(placement.dtype) == 2 && dtype_is_float(placement.dtype) && w.shape.size() == 2,
                "weight \"", w.name, "\": AMX tiles hold 2-d BF16 or F16 weights");
    const int64_t N = w.shape[0], K = w.shape[1];
    const int64_t num_blocks = cpu::amx_num_col_blocks(N), num_steps = cpu::amx_num_k_steps(K);
    num_bytes = dtype_num_bytes(placement.dtype, num_blocks * num_steps * cpu::kAmxStepK * cpu::kAmxBlockCols);
    HostBuffer tiles(num_bytes);
    // An F16 weight holding ±inf stays GEMM panels, which the linear op also reads (cpu/amx_linear.h).
    amx = cpu::pack_amx_weight(static_cast<const uint16_t*>(src), N, K, placement.dtype == DataType::kFloat16,
                               static_cast<uint16_t*>(tiles.data()));
    if (amx) {
      buf = std::move(tiles);
      slot.dims = {Dim{Dim::Kind::kFixed, num_blocks}, Dim{Dim::Kind::kFixed, num_steps},
                   Dim{Dim::Kind::kFixed, cpu::kAmxStepK}, Dim{Dim::Kind::kFixed, cpu::kAmxBlockCols}};
    }
  }
  if (pack && !amx) {
    // Float32 panels, or BF16 / F16 panels as stored (the linear op widens them as it reads).
    const bool wide = placement.dtype == DataType::kFloat32;
    RTLLM_CHECK((wide || dtype_size(placement.dtype) == 2) && dtype_is_float(placement.dtype) &&
                    w.shape.size() == 2,
                "weight \"", w.name, "\": GEMM panels hold 2-d float32, BF16 or F16 weights");
    const int64_t N = w.shape[0], K = w.shape[1], num_panels = cpu::num_panels(N);
    num_bytes = dtype_num_bytes(placement.dtype, num_panels * K * cpu::kPanelCols);
    HostBuffer panels(num_bytes);
    if (wide) {
      cpu::pack_linear_weight(static_cast<const float*>(src), N, K, static_cast<float*>(panels.data()));
    } else {
      cpu::pack_linear_weight(static_cast<const uint16_t*>(src), N, K, static_cast<uint16_t*>(panels.data()));
    }
    buf = std::move(panels);
    slot.dims = {Dim{Dim::Kind::kFixed, num_panels}, Dim{Dim::Kind::kFixed, K},
                 Dim{Dim::Kind::kFixed, cpu::kPanelCols}};
  }
  weight_bytes_ += num_bytes;
  slot.data = buf.data();
  owned_weights_.push_back(std::move(buf));
  return slot;
}

// weight_only_linear's codes as AMX tiles (by their dtype, int8 or int4), or a per-group scale or offset
// [N, G] as [num_col_blocks, G, 32] float32 (cpu/amx_weight_only.h).
TensorSlot CpuBackend::place_amx_weight_only(const Weight& w, const WeightPlacement& placement, TensorSlot slot) {
  RTLLM_CHECK(w.shape.size() == 2, "weight \"", w.name, "\": AMX weight-only layouts hold 2-d tensors");
  const int64_t N = w.shape[0], C = w.shape[1], num_blocks = cpu::amx_num_col_blocks(N);
  HostBuffer buf;
  size_t num_bytes = 0;
  if (placement.layout == WeightLayout::kCpuAmxCodeTiles) {
    const bool int4 = w.dtype == DataType::kInt4;
    RTLLM_CHECK(int4 || w.dtype == DataType::kInt8, "weight \"", w.name, "\": AMX code tiles hold I8 or I4 codes, not ",
                dtype_safetensors_name(w.dtype));
    const int64_t num_steps = cpu::amx_num_k_steps(C);
    num_bytes = dtype_num_bytes(w.dtype, num_blocks * num_steps * cpu::kAmxStepK * cpu::kAmxBlockCols);
    buf = HostBuffer(num_bytes);
    cpu::pack_amx_codes(static_cast<const uint8_t*>(w.data), int4, N, C, static_cast<uint8_t*>(buf.data()));
    slot.dims = {Dim{Dim::Kind::kFixed, num_blocks}, Dim{Dim::Kind::kFixed, num_steps},
                 Dim{Dim::Kind::kFixed, cpu::kAmxStepK}, Dim{Dim::Kind::kFixed, cpu::kAmxBlockCols}};
    slot.dtype = w.dtype;
  } else {
    std::vector<float> wide(static_cast<size_t>(N * C));
    convert_floats(w.data, w.dtype, wide.data(), DataType::kFloat32, N * C);  // throws for non-float dtypes
    num_bytes = sizeof(float) * static_cast<size_t>(num_blocks * C * cpu::kAmxBlockCols);
    buf = HostBuffer(num_bytes);
    cpu::pack_amx_group_cols(wide.data(), N, C, static_cast<float*>(buf.data()));
    slot.dims = {Dim{Dim::Kind::kFixed, num_blocks}, Dim{Dim::Kind::kFixed, C},
                 Dim{Dim::Kind::kFixed, cpu::kAmxBlockCols}};
    slot.dtype = DataType::kFloat32;
  }
  weight_bytes_ += num_bytes;
  slot.data = buf.data();
  owned_weights_.push_back(std::move(buf));
  return slot;
}

void CpuBackend::allocate_kv_pool(RuntimeConfig& config) {
  const ModelConfig& m = engine_.model_config();
  const DataType kv_dtype = *config.kv_cache_dtype;
  const size_t block_bytes = ModelRunner::kv_bytes_per_block(m, config.tokens_per_block, kv_dtype);
  if (config.num_kv_blocks == 0) size_kv_pool(config, block_bytes);
  kv_bytes_ = block_bytes * config.num_kv_blocks;
  const size_t num_bytes = weight_bytes_ + kv_bytes_ + op_workspace_bytes_;
  const size_t available = physical_memory_bytes();
  RTLLM_CHECK(num_bytes <= available, "the model needs ", num_bytes, " bytes of host memory (weights, KV pool of ",
              config.num_kv_blocks, " blocks), the machine has ", available);
  kv_buffer_ = HostBuffer(kv_bytes_);
  const size_t layer_bytes = kv_bytes_ / m.num_layers;
  for (int32_t l = 0; l < m.num_layers; ++l)
    kv_layers_.push_back(static_cast<uint8_t*>(kv_buffer_.data()) + l * layer_bytes);
  kv_.layers = kv_layers_.data();
  kv_.dtype = kv_dtype;
  kv_.num_layers = m.num_layers;
  kv_.num_blocks = config.num_kv_blocks;
  kv_.num_kv_heads = m.num_kv_heads;
  kv_.tokens_per_block = config.tokens_per_block;
  kv_.head_dim = m.head_dim;
}

// The pool takes kv_free_memory_fraction of the host memory available now, less what is placed but
// not yet resident (weights read from the mapped file, workspaces written at the first step), and
// no more than max_batch_size sequences of max_seq_len can use. Its pages are committed when first
// written; KVCacheManager's LIFO free list keeps that to the blocks traffic actually needs.
void CpuBackend::size_kv_pool(RuntimeConfig& config, size_t block_bytes) {
  const int64_t max_seq_len = engine_.limits().max_seq_len;
  const int64_t blocks_per_seq = (max_seq_len + config.tokens_per_block - 1) / config.tokens_per_block;
  const int64_t max_blocks = blocks_per_seq * config.max_batch_size;
  const size_t available = available_memory_bytes();
  const size_t pending = mapped_weight_bytes_ + workspace_bytes_ + op_workspace_bytes_;
  const size_t free_bytes = available > pending ? available - pending : 0;
  const double budget = static_cast<double>(free_bytes) * static_cast<double>(config.kv_free_memory_fraction);
  int64_t blocks = std::min<int64_t>(static_cast<int64_t>(budget / static_cast<double>(block_bytes)), max_blocks);
  // Every rank of a tensor-parallel group holds the same blocks: the least any of them can.
  if (config.communicator && config.communicator->size() > 1) blocks = config.communicator->all_reduce_min(blocks);
  RTLLM_CHECK(blocks >= blocks_per_seq, "the KV pool of ", blocks, " blocks (", blocks * config.tokens_per_block,
              " tokens in ", config.kv_free_memory_fraction, " of the ", free_bytes, " bytes of host memory "
              "available after ", pending, " bytes of mapped weights and workspace) cannot hold one sequence of "
              "max_seq_len ", max_seq_len, " tokens, which needs ", blocks_per_seq,
              " blocks: raise the KV-cache memory fraction or lower max_seq_len");
  config.num_kv_blocks = static_cast<int32_t>(std::min<int64_t>(blocks, INT32_MAX));
}

const float* CpuBackend::forward(const HostStep& st, std::vector<PlannedNode>& nodes, const TensorSlot& logits) {
  const StepInputs& in = *st.inputs;
  std::copy(in.input_ids.begin(), in.input_ids.end(), static_cast<int32_t*>(input_ids_.data()));
  std::copy(st.positions.begin(), st.positions.end(), static_cast<int32_t*>(positions_.data()));
  std::copy(st.logits_indices.begin(), st.logits_indices.end(), static_cast<int32_t*>(logits_indices_.data()));

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
  ctx.workspace = op_workspace_.data();
  for (PlannedNode& node : nodes) {
    node.run(ctx, st.num_tokens, st.num_logits);
    for (auto& [o, amax] : node.observed) observe(node.output_views[o], amax);
    for (auto& [o, amax] : node.observed_channels) observe_channels(node.output_views[o], amax);
    for (auto& c : node.captured) capture(node.output_views[c.output], c);
  }
  return static_cast<const float*>(logits.data);
}

// A block is [2, num_kv_heads, tokens_per_block, head_dim] of the KV dtype, contiguous in each layer.
void CpuBackend::copy_blocks(const std::vector<std::pair<int32_t, int32_t>>& copies) {
  const size_t block_bytes = kv_bytes_ / kv_.num_layers / kv_.num_blocks;
  for (int32_t l = 0; l < kv_.num_layers; ++l) {
    auto* layer = static_cast<uint8_t*>(kv_.layers[l]);
    for (const auto& [src, dst] : copies) std::memcpy(layer + dst * block_bytes, layer + src * block_bytes, block_bytes);
  }
}

// Token t of the sequence is in block block_table[t / tpb], slot t % tpb; K then V of every kv head.
void CpuBackend::kv_cache_amax(const int32_t* block_table, int32_t num_tokens, std::array<float, 2>* out) const {
  RTLLM_CHECK(kv_.dtype == DataType::kFloat32, "kv_cache_amax reads a float32 KV cache");
  const int64_t tpb = kv_.tokens_per_block, nkv = kv_.num_kv_heads, hd = kv_.head_dim;
  for (int32_t l = 0; l < kv_.num_layers; ++l) {
    const float* layer = static_cast<const float*>(kv_.layers[l]);
    for (int64_t t = 0; t < num_tokens; ++t)
      for (int64_t which = 0; which < 2; ++which)
        for (int64_t kh = 0; kh < nkv; ++kh) {
          const float* row = layer + (((block_table[t / tpb] * 2 + which) * nkv + kh) * tpb + t % tpb) * hd;
          for (int64_t d = 0; d < hd; ++d) raise_amax(std::fabs(row[d]), out[l][which]);
        }
  }
}

}  // namespace

std::unique_ptr<RunnerBackend> make_cpu_backend(const Engine& engine, RuntimeConfig& config) {
  return std::make_unique<CpuBackend>(engine, config);
}

}  // namespace rtllm
