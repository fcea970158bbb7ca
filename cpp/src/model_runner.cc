// ModelRunner on the CPU: plans weights, the KV pool and the activation workspace at construction,
// then runs the graph node by node through the op registry. forward() allocates nothing.
#include "rtllm/model_runner.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "op_registry.h"
#include "thread_pool.h"
#include "workspace.h"

namespace rtllm {

namespace {

int64_t dim_size(const Dim& d, int64_t num_tokens, int64_t num_seqs) {
  return d.kind == Dim::Kind::kNumTokens ? num_tokens : d.kind == Dim::Kind::kNumSeqs ? num_seqs : d.value;
}

// A graph tensor as planned: where it lives and its shape with the step-dependent dims.
struct TensorSlot {
  void* data = nullptr;
  DataType dtype = DataType::kFloat32;
  std::vector<Dim> dims;

  void bind(TensorView& view, int64_t num_tokens, int64_t num_seqs) const {
    view.data = data;
    view.dtype = dtype;
    view.ndim = static_cast<int>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i) view.shape[i] = dim_size(dims[i], num_tokens, num_seqs);
  }
};

struct PlannedNode {
  OpFn fn = nullptr;
  const GraphNode* node = nullptr;
  std::vector<const TensorSlot*> inputs, outputs;
  std::vector<TensorView> input_views, output_views;  // refilled each step
};

int64_t max_elements(const std::vector<Dim>& dims, int64_t max_num_tokens, int64_t max_num_seqs) {
  int64_t n = 1;
  for (const Dim& d : dims) n *= dim_size(d, max_num_tokens, max_num_seqs);
  return n;
}

size_t physical_memory_bytes() {
  long pages = sysconf(_SC_PHYS_PAGES), page_size = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page_size > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page_size) : SIZE_MAX;
}

const char* device_name(DeviceKind d) { return d == DeviceKind::kCpu ? "CPU" : "CUDA"; }

}  // namespace

void StepInputs::clear() {
  input_ids.clear();
  num_new_tokens.clear();
  num_cached_tokens.clear();
  block_table.clear();
  max_blocks_per_seq = 0;
}

struct ModelRunner::Impl {
  std::shared_ptr<const Engine> engine;
  RuntimeConfig config;
  std::unique_ptr<ThreadPool> pool;
  std::mutex forward_mutex;  // one step at a time

  std::vector<HostBuffer> owned_weights;  // bf16/fp16 weights converted to float32
  HostBuffer kv_buffer;
  std::vector<float*> kv_layers;
  KvPool kv;
  HostBuffer workspace;
  HostBuffer scratch;
  int64_t scratch_floats_per_thread = 0;

  std::unordered_map<std::string, TensorSlot> slots;  // weights, graph inputs and node outputs
  std::vector<PlannedNode> nodes;
  const TensorSlot* logits = nullptr;
  // Graph inputs, [max_num_tokens] or [max_batch_size].
  HostBuffer input_ids, positions, last_token_ids;
  std::vector<int32_t> seq_token_start;  // [max_batch_size + 1]

  void resolve_config(const RuntimeConfig& requested);
  size_t plan_weights();
  size_t plan_kv_pool();
  size_t plan_workspace();
  void plan_nodes();
  void validate(const StepInputs& in) const;
};

void ModelRunner::Impl::resolve_config(const RuntimeConfig& requested) {
  const EngineLimits& limits = engine->limits();
  config = requested;
  RTLLM_CHECK_ARG(config.device == DeviceKind::kCpu, "device ", device_name(config.device),
                  " has no ModelRunner backend in this build (available: CPU)");
  auto resolve = [](int32_t& value, int32_t limit, const char* name) {
    RTLLM_CHECK_ARG(value >= 0, name, " ", value, " must be >= 0");
    RTLLM_CHECK_ARG(value <= limit, name, " ", value, " exceeds the engine's limit ", limit);
    if (value == 0) value = limit;
  };
  resolve(config.max_num_tokens, limits.max_num_tokens, "max_num_tokens");
  resolve(config.max_batch_size, limits.max_batch_size, "max_batch_size");
  RTLLM_CHECK_ARG(config.tokens_per_block > 0, "tokens_per_block ", config.tokens_per_block, " must be > 0");
  RTLLM_CHECK_ARG(config.num_kv_blocks >= 0, "num_kv_blocks ", config.num_kv_blocks, " must be >= 0");
  if (config.num_kv_blocks == 0) {
    // Enough for every sequence of a full batch at the longest length.
    const int64_t per_seq = (limits.max_seq_len + config.tokens_per_block - 1) / config.tokens_per_block;
    config.num_kv_blocks = static_cast<int32_t>(per_seq * config.max_batch_size);
  }
  RTLLM_CHECK_ARG(config.num_threads >= 0, "num_threads ", config.num_threads, " must be >= 0");
  pool = std::make_unique<ThreadPool>(config.num_threads);
  config.num_threads = pool->num_threads();
}

// Weights become float32 views: float32 data stays in the mapped file, bf16/fp16 are converted once.
size_t ModelRunner::Impl::plan_weights() {
  size_t num_bytes = 0;
  for (const GraphNode& node : engine->graph().nodes) {
    for (const std::string& name : node.inputs) {
      if (slots.count(name) || !engine->has_weight(name)) continue;
      const Weight& w = engine->weight(name);
      RTLLM_CHECK(w.shape.size() <= static_cast<size_t>(kMaxDims), "weight \"", name, "\" has ", w.shape.size(),
                  " dims, at most ", kMaxDims, " are supported");
      TensorSlot slot;
      for (int64_t d : w.shape) slot.dims.push_back(Dim{Dim::Kind::kFixed, d});
      const int64_t n = w.numel();
      const bool aligned = reinterpret_cast<uintptr_t>(w.data) % dtype_size(w.dtype) == 0;
      if (w.dtype == DataType::kBFloat16 || w.dtype == DataType::kFloat16 || !aligned) {
        const DataType dtype = w.dtype == DataType::kBFloat16 || w.dtype == DataType::kFloat16 ? DataType::kFloat32
                                                                                                  : w.dtype;
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
        num_bytes += n * dtype_size(dtype);
        slot.data = buf.data();
        slot.dtype = dtype;
        owned_weights.push_back(std::move(buf));
      } else {
        slot.data = const_cast<void*>(w.data);  // read-only mapping; ops never write weights
        slot.dtype = w.dtype;
      }
      slots.emplace(name, std::move(slot));
    }
  }
  return num_bytes;
}

size_t ModelRunner::Impl::plan_kv_pool() {
  const ModelConfig& m = engine->model_config();
  const size_t layer_floats = static_cast<size_t>(config.num_kv_blocks) * 2 * m.num_kv_heads *
                              config.tokens_per_block * m.head_dim;
  const size_t num_bytes = layer_floats * m.num_layers * sizeof(float);
  kv_buffer = HostBuffer(num_bytes);
  for (int32_t l = 0; l < m.num_layers; ++l) kv_layers.push_back(static_cast<float*>(kv_buffer.data()) + l * layer_floats);
  kv.layers = kv_layers.data();
  kv.num_layers = m.num_layers;
  kv.num_blocks = config.num_kv_blocks;
  kv.num_kv_heads = m.num_kv_heads;
  kv.tokens_per_block = config.tokens_per_block;
  kv.head_dim = m.head_dim;
  return num_bytes;
}

// Node outputs share one arena: a tensor lives from the node that writes it to the last node that
// reads it (graph outputs to the end of the step), and tensors alive at the same time never overlap.
size_t ModelRunner::Impl::plan_workspace() {
  const Graph& g = engine->graph();
  std::unordered_map<std::string, const TensorSpec*> specs;
  for (const TensorSpec& t : g.outputs) specs[t.name] = &t;
  for (const TensorSpec& t : g.tensors) specs[t.name] = &t;
  std::vector<const TensorSpec*> tensors;  // node outputs in order of production
  std::vector<ArenaRequest> requests;
  std::unordered_map<std::string, size_t> index;
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    for (const std::string& name : g.nodes[i].inputs)
      if (index.count(name)) requests[index[name]].last_use = i;
    for (const std::string& name : g.nodes[i].outputs) {
      RTLLM_CHECK(!index.count(name) && !slots.count(name), "tensor \"", name, "\" is written twice");
      auto it = specs.find(name);
      RTLLM_CHECK(it != specs.end(), "node output \"", name, "\" is not listed in graph.tensors");
      const TensorSpec& spec = *it->second;
      RTLLM_CHECK(spec.shape.size() <= static_cast<size_t>(kMaxDims), "tensor \"", name, "\" has too many dims");
      const int64_t n = max_elements(spec.shape, config.max_num_tokens, config.max_batch_size);
      index[name] = tensors.size();
      tensors.push_back(&spec);
      requests.push_back({n * dtype_size(spec.dtype), i, i});
    }
  }
  for (const TensorSpec& t : g.outputs) requests[index.at(t.name)].last_use = g.nodes.size();
  size_t total = 0;
  const std::vector<size_t> offsets = plan_arena(requests, &total);
  workspace = HostBuffer(total);
  for (size_t i = 0; i < tensors.size(); ++i)
    slots[tensors[i]->name] =
        TensorSlot{static_cast<uint8_t*>(workspace.data()) + offsets[i], tensors[i]->dtype, tensors[i]->shape};
  return total;
}

void ModelRunner::Impl::plan_nodes() {
  const Graph& g = engine->graph();
  const int64_t max_tokens = config.max_num_tokens, max_seqs = config.max_batch_size;
  input_ids = HostBuffer(max_tokens * sizeof(int32_t));
  positions = HostBuffer(max_tokens * sizeof(int32_t));
  last_token_ids = HostBuffer(max_seqs * sizeof(int32_t));
  seq_token_start.assign(max_seqs + 1, 0);
  const Dim tokens{Dim::Kind::kNumTokens, 0}, seqs{Dim::Kind::kNumSeqs, 0};
  slots["input_ids"] = TensorSlot{input_ids.data(), DataType::kInt32, {tokens}};
  slots["positions"] = TensorSlot{positions.data(), DataType::kInt32, {tokens}};
  slots["last_token_ids"] = TensorSlot{last_token_ids.data(), DataType::kInt32, {seqs}};
  for (const TensorSpec& t : g.inputs)
    RTLLM_CHECK(t.name == "input_ids" || t.name == "positions" || t.name == "last_token_ids",
                "unknown graph input \"", t.name, "\"");

  for (const GraphNode& node : g.nodes) {
    PlannedNode p;
    p.node = &node;
    p.fn = find_op(node.op, config.device);
    RTLLM_CHECK(p.fn, "op \"", node.op, "\" has no ", device_name(config.device), " implementation");
    for (const std::string& name : node.inputs) p.inputs.push_back(&slots.at(name));
    for (const std::string& name : node.outputs) p.outputs.push_back(&slots.at(name));
    p.input_views.resize(p.inputs.size());
    p.output_views.resize(p.outputs.size());
    nodes.push_back(std::move(p));
  }
  RTLLM_CHECK(g.outputs.size() == 1, "the graph must have one output (logits), it has ", g.outputs.size());
  logits = &slots.at(g.outputs[0].name);
  const int64_t vocab = engine->model_config().vocab_size;
  RTLLM_CHECK(logits->dtype == DataType::kFloat32 && logits->dims.size() == 2 &&
                  logits->dims[0].kind == Dim::Kind::kNumSeqs && logits->dims[1].value == vocab,
              "graph output \"", g.outputs[0].name, "\" must be float32 [num_seqs, ", vocab, "]");
}

ModelRunner::ModelRunner(std::shared_ptr<const Engine> engine, const RuntimeConfig& config)
    : impl_(std::make_unique<Impl>()) {
  RTLLM_CHECK_ARG(engine != nullptr, "engine must not be null");
  register_cpu_ops();
  Impl& im = *impl_;
  im.engine = std::move(engine);
  im.resolve_config(config);
  size_t num_bytes = im.plan_weights();
  num_bytes += kv_bytes_per_block(im.engine->model_config(), im.config.tokens_per_block, im.config.device) *
               static_cast<size_t>(im.config.num_kv_blocks);
  im.scratch_floats_per_thread = round_up(im.engine->limits().max_seq_len, kBufferAlignment / sizeof(float));
  num_bytes += im.scratch_floats_per_thread * sizeof(float) * im.config.num_threads;
  const size_t available = physical_memory_bytes();
  RTLLM_CHECK(num_bytes <= available, "the model needs ", num_bytes, " bytes of host memory (weights, KV pool of ",
              im.config.num_kv_blocks, " blocks), the machine has ", available);
  im.plan_kv_pool();
  im.plan_workspace();
  im.scratch = HostBuffer(im.scratch_floats_per_thread * sizeof(float) * im.config.num_threads);
  im.plan_nodes();
}

ModelRunner::~ModelRunner() = default;

const Engine& ModelRunner::engine() const { return *impl_->engine; }
const RuntimeConfig& ModelRunner::config() const { return impl_->config; }
int32_t ModelRunner::vocab_size() const { return impl_->engine->model_config().vocab_size; }

size_t ModelRunner::kv_bytes_per_block(const ModelConfig& model, int32_t tokens_per_block, DeviceKind device) {
  // The CPU keeps K/V in float32; the GPU in bfloat16.
  const size_t element_size = device == DeviceKind::kCpu ? sizeof(float) : 2;
  return static_cast<size_t>(model.num_layers) * 2 * model.num_kv_heads * tokens_per_block * model.head_dim *
         element_size;
}

void ModelRunner::Impl::validate(const StepInputs& in) const {
  const int32_t num_seqs = in.num_seqs(), num_tokens = in.num_tokens();
  const int32_t vocab = engine->model_config().vocab_size, max_seq_len = engine->limits().max_seq_len;
  RTLLM_CHECK_ARG(num_seqs >= 1 && num_seqs <= config.max_batch_size, "num_seqs ", num_seqs,
                  " outside [1, max_batch_size ", config.max_batch_size, "]");
  RTLLM_CHECK_ARG(num_tokens >= 1 && num_tokens <= config.max_num_tokens, "num_tokens ", num_tokens,
                  " outside [1, max_num_tokens ", config.max_num_tokens, "]");
  RTLLM_CHECK_ARG(in.num_cached_tokens.size() == in.num_new_tokens.size(), "num_cached_tokens has ",
                  in.num_cached_tokens.size(), " entries, num_new_tokens ", num_seqs);
  RTLLM_CHECK_ARG(in.max_blocks_per_seq > 0 &&
                      in.block_table.size() == static_cast<size_t>(num_seqs) * in.max_blocks_per_seq,
                  "block_table has ", in.block_table.size(), " entries, expected num_seqs ", num_seqs,
                  " x max_blocks_per_seq ", in.max_blocks_per_seq);
  int64_t total = 0;
  const int32_t tpb = config.tokens_per_block;
  for (int32_t s = 0; s < num_seqs; ++s) {
    const int32_t num_new = in.num_new_tokens[s], num_cached = in.num_cached_tokens[s];
    RTLLM_CHECK_ARG(num_new >= 1, "sequence ", s, ": num_new_tokens ", num_new, " must be >= 1");
    RTLLM_CHECK_ARG(num_cached >= 0, "sequence ", s, ": num_cached_tokens ", num_cached, " must be >= 0");
    const int64_t len = static_cast<int64_t>(num_cached) + num_new;
    RTLLM_CHECK_ARG(len <= max_seq_len, "sequence ", s, ": ", len, " tokens exceed max_seq_len ", max_seq_len);
    const int64_t num_blocks = (len + tpb - 1) / tpb;
    RTLLM_CHECK_ARG(num_blocks <= in.max_blocks_per_seq, "sequence ", s, ": ", len, " tokens need ", num_blocks,
                    " blocks, the block table has ", in.max_blocks_per_seq);
    for (int64_t b = 0; b < num_blocks; ++b) {
      const int32_t id = in.block_table[s * in.max_blocks_per_seq + b];
      RTLLM_CHECK_ARG(id >= 0 && id < config.num_kv_blocks, "sequence ", s, ": block id ", id, " outside [0, ",
                      config.num_kv_blocks, ")");
    }
    total += num_new;
  }
  RTLLM_CHECK_ARG(total == num_tokens, "num_new_tokens sum to ", total, " but input_ids has ", num_tokens, " tokens");
  for (int32_t t = 0; t < num_tokens; ++t)
    RTLLM_CHECK_ARG(in.input_ids[t] >= 0 && in.input_ids[t] < vocab, "token id ", in.input_ids[t], " at index ", t,
                    " outside [0, vocab_size ", vocab, ")");
}

const float* ModelRunner::forward(const StepInputs& inputs) {
  Impl& im = *impl_;
  std::lock_guard<std::mutex> lock(im.forward_mutex);
  im.validate(inputs);
  const int32_t num_seqs = inputs.num_seqs(), num_tokens = inputs.num_tokens();

  auto* ids = static_cast<int32_t*>(im.input_ids.data());
  auto* pos = static_cast<int32_t*>(im.positions.data());
  auto* last = static_cast<int32_t*>(im.last_token_ids.data());
  std::copy(inputs.input_ids.begin(), inputs.input_ids.end(), ids);
  int32_t start = 0;
  for (int32_t s = 0; s < num_seqs; ++s) {
    im.seq_token_start[s] = start;
    for (int32_t i = 0; i < inputs.num_new_tokens[s]; ++i) pos[start + i] = inputs.num_cached_tokens[s] + i;
    start += inputs.num_new_tokens[s];
    last[s] = start - 1;
  }
  im.seq_token_start[num_seqs] = start;

  StepMeta step;
  step.num_seqs = num_seqs;
  step.num_tokens = num_tokens;
  step.num_new_tokens = inputs.num_new_tokens.data();
  step.num_cached_tokens = inputs.num_cached_tokens.data();
  step.seq_token_start = im.seq_token_start.data();
  step.block_table = inputs.block_table.data();
  step.max_blocks_per_seq = inputs.max_blocks_per_seq;

  OpContext ctx;
  ctx.pool = im.pool.get();
  ctx.step = &step;
  ctx.kv = &im.kv;
  ctx.scratch = static_cast<float*>(im.scratch.data());
  ctx.scratch_floats_per_thread = im.scratch_floats_per_thread;
  for (PlannedNode& node : im.nodes) {
    for (size_t i = 0; i < node.inputs.size(); ++i) node.inputs[i]->bind(node.input_views[i], num_tokens, num_seqs);
    for (size_t i = 0; i < node.outputs.size(); ++i)
      node.outputs[i]->bind(node.output_views[i], num_tokens, num_seqs);
    ctx.attrs = &node.node->attrs;
    node.fn(ctx, node.input_views.data(), static_cast<int>(node.input_views.size()), node.output_views.data(),
            static_cast<int>(node.output_views.size()));
  }
  return static_cast<const float*>(im.logits->data);
}

}  // namespace rtllm
