// ModelRunner: the device-independent plan (config limits, weight and activation slots with a
// liveness-based workspace, node resolution, step validation) over a RunnerBackend that owns the
// memory and runs the step (cpu_runner.cc, cuda/cuda_runner.cc). forward() allocates nothing.
#include "rtllm/model_runner.h"

#include <algorithm>
#include <mutex>
#include <unordered_map>

#include "runner_backend.h"
#include "workspace.h"

namespace rtllm {

namespace {

int64_t max_elements(const std::vector<Dim>& dims, int64_t max_num_tokens, int64_t max_num_logits) {
  int64_t n = 1;
  for (const Dim& d : dims) n *= dim_size(d, max_num_tokens, max_num_logits);
  return n;
}

}  // namespace

void StepInputs::clear() {
  input_ids.clear();
  num_new_tokens.clear();
  num_cached_tokens.clear();
  block_table.clear();
  max_blocks_per_seq = 0;
  logits_indices.clear();
}

struct ModelRunner::Impl {
  std::shared_ptr<const Engine> engine;
  RuntimeConfig config;
  std::unique_ptr<RunnerBackend> backend;
  std::mutex forward_mutex;  // one step at a time

  BackendInfo info;  // the op kinds keep a pointer to it
  std::unordered_map<std::string, TensorSlot> slots;  // weights, graph inputs and node outputs
  std::vector<PlannedNode> nodes;
  const TensorSlot* logits = nullptr;
  HostStep step;  // reused across steps

  void resolve_config(const RuntimeConfig& requested);
  void check_tensor_parallel() const;
  void create_op_kinds();
  void plan_weights();
  void plan_workspace();
  void bind_nodes();
  void validate(const StepInputs& in) const;
  void expand(const StepInputs& in);
};

void ModelRunner::Impl::resolve_config(const RuntimeConfig& requested) {
  const EngineLimits& limits = engine->limits();
  config = requested;
#ifdef RTLLM_WITH_CUDA
  RTLLM_CHECK_ARG(config.device == DeviceKind::kCpu || cuda_available(), "device CUDA was requested but ",
                  "no CUDA device is present");
#else
  RTLLM_CHECK_ARG(config.device == DeviceKind::kCpu, "device ", device_name(config.device),
                  " has no ModelRunner backend in this build (available: CPU)");
#endif
  auto resolve = [](int32_t& value, int32_t limit, const char* name) {
    RTLLM_CHECK_ARG(value >= 0, name, " ", value, " must be >= 0");
    RTLLM_CHECK_ARG(value <= limit, name, " ", value, " exceeds the engine's limit ", limit);
    if (value == 0) value = limit;
  };
  resolve(config.max_num_tokens, limits.max_num_tokens, "max_num_tokens");
  resolve(config.max_batch_size, limits.max_batch_size, "max_batch_size");
  RTLLM_CHECK_ARG(config.max_num_logits >= 0, "max_num_logits ", config.max_num_logits, " must be >= 0");
  if (config.max_num_logits == 0) config.max_num_logits = config.max_batch_size;
  RTLLM_CHECK_ARG(config.max_num_logits >= config.max_batch_size, "max_num_logits ", config.max_num_logits,
                  " must be at least max_batch_size ", config.max_batch_size, " (a row per sequence)");
  RTLLM_CHECK_ARG(config.tokens_per_block > 0, "tokens_per_block ", config.tokens_per_block, " must be > 0");
  RTLLM_CHECK_ARG(config.num_kv_blocks >= 0, "num_kv_blocks ", config.num_kv_blocks, " must be >= 0");
  RTLLM_CHECK_ARG(config.kv_free_memory_fraction >= 0.0f && config.kv_free_memory_fraction <= 1.0f,
                  "kv_free_memory_fraction ", config.kv_free_memory_fraction, " outside [0, 1]");
  const bool sized_by_backend = config.kv_free_memory_fraction > 0.0f;
  if (config.num_kv_blocks == 0 && !sized_by_backend) {
    // Enough for every sequence of a full batch at the longest length.
    const int64_t per_seq = (limits.max_seq_len + config.tokens_per_block - 1) / config.tokens_per_block;
    config.num_kv_blocks = static_cast<int32_t>(per_seq * config.max_batch_size);
  }
  RTLLM_CHECK_ARG(config.num_threads >= 0, "num_threads ", config.num_threads, " must be >= 0");
  // An engine built with a quantized KV cache (kv_cache_quant_algo) fixes the pool's dtype; a request
  // for another one is refused rather than silently running a different numeric format.
  const std::string& kv_algo = engine->quant().kv_cache_quant_algo;
  if (kv_algo == "FP8" || kv_algo == "INT8") {
    const DataType stored = kv_algo == "FP8" ? DataType::kFloat8E4M3 : DataType::kInt8;
    RTLLM_CHECK_ARG(!config.kv_cache_dtype || *config.kv_cache_dtype == stored, "kv_cache_dtype ",
                    dtype_safetensors_name(*config.kv_cache_dtype), " contradicts the engine's kv_cache_quant_algo ",
                    kv_algo, ", which stores the KV cache as ", dtype_safetensors_name(stored));
    config.kv_cache_dtype = stored;
  }
  // An I8 cache rounds k / k_scale to integers: without the calibrated scales of an INT8 engine (1.0 when
  // absent) it would keep little of k and v, so it is not offered on other engines.
  RTLLM_CHECK_ARG(!config.kv_cache_dtype || *config.kv_cache_dtype != DataType::kInt8 || kv_algo == "INT8",
                  "kv_cache_dtype I8 needs an engine built with kv_cache_quant_algo INT8 (its attention nodes carry "
                  "the calibrated k_scale / v_scale); this engine's kv_cache_quant_algo is ", kv_algo);
}

// A tensor-parallel engine runs only with the ranks it was split for: this process's communicator must
// have tp_size ranks and this process the engine's rank, or the collectives would combine wrong shards
// (or wait forever for ranks that do not exist).
void ModelRunner::Impl::check_tensor_parallel() const {
  const int32_t tp_size = engine->tp_size(), rank = engine->rank();
  const Communicator* comm = config.communicator.get();
  if (tp_size == 1) {
    RTLLM_CHECK_ARG(comm == nullptr || comm->size() == 1, "the engine has tp_size 1 but the communicator has ",
                    comm ? comm->size() : 0, " ranks; run it without a communicator (or with one of size 1)");
    return;
  }
  RTLLM_CHECK_ARG(config.device == DeviceKind::kCpu, "the engine has tp_size ", tp_size, ": tensor parallelism on ",
                  device_name(config.device), " needs the NCCL communicator, which this rtllm does not have yet "
                  "(run it on the CPU)");
  RTLLM_CHECK_ARG(comm != nullptr, "the engine has tp_size ", tp_size, " (rank ", rank,
                  "): RuntimeConfig.communicator must connect its ", tp_size, " ranks (mpi_world_communicator() "
                  "under mpirun -n ", tp_size, ")");
  RTLLM_CHECK_ARG(comm->size() == tp_size, "the engine has tp_size ", tp_size, " but the communicator has ",
                  comm->size(), " ranks");
  RTLLM_CHECK_ARG(comm->rank() == rank, "the engine was loaded for rank ", rank, " but this process is rank ",
                  comm->rank(), " of the communicator");
}

// One op kind per node, created from the node and the specs of its tensors as the graph declares them
// (weights: as stored). An op or dtype the backend cannot run fails here, naming both.
void ModelRunner::Impl::create_op_kinds() {
  const Graph& g = engine->graph();
  std::unordered_map<std::string, const TensorSpec*> specs;
  for (const TensorSpec& t : g.inputs) {
    RTLLM_CHECK(t.name == "input_ids" || t.name == "positions" || t.name == "logits_indices",
                "unknown graph input \"", t.name, "\"");
    specs[t.name] = &t;
  }
  for (const TensorSpec& t : g.outputs) specs[t.name] = &t;
  for (const TensorSpec& t : g.tensors) specs[t.name] = &t;
  for (const GraphNode& node : g.nodes) {
    OpSpec spec;
    spec.node = &node;
    spec.backend = &info;
    for (const std::string& name : node.inputs) {
      const bool is_weight = engine->has_weight(name);
      TensorSpec t;
      if (is_weight) {
        const Weight& w = engine->weight(name);
        RTLLM_CHECK(w.shape.size() <= static_cast<size_t>(kMaxDims), "weight \"", name, "\" has ", w.shape.size(),
                    " dims, at most ", kMaxDims, " are supported");
        t = TensorSpec{name, w.dtype, {}};
        for (int64_t d : w.shape) t.shape.push_back(Dim{Dim::Kind::kFixed, d});
      } else {
        auto it = specs.find(name);
        RTLLM_CHECK(it != specs.end(), "op \"", node.op, "\" reads \"", name,
                    "\", which is neither a weight, a graph input nor a listed tensor");
        t = *it->second;
      }
      spec.inputs.push_back(std::move(t));
      spec.input_is_weight.push_back(is_weight);
    }
    for (const std::string& name : node.outputs) {
      auto it = specs.find(name);
      RTLLM_CHECK(it != specs.end(), "node output \"", name, "\" is not listed in graph.tensors");
      spec.outputs.push_back(*it->second);
    }
    PlannedNode planned;
    planned.kind = create_op(spec);
    nodes.push_back(std::move(planned));
  }
}

// Each weight is placed once, as its readers ask. Readers must agree on the dtype; when they ask for
// different layouts (an embedding table that is also the LM head's weight) it stays row-major, which
// every kind accepts but the CUDA weight-only GEMV's int4 codes, which are never shared.
void ModelRunner::Impl::plan_weights() {
  const Graph& g = engine->graph();
  std::unordered_map<std::string, WeightPlacement> placements;
  std::unordered_map<std::string, std::string> first_reader;
  for (size_t n = 0; n < g.nodes.size(); ++n) {
    const GraphNode& node = g.nodes[n];
    for (size_t i = 0; i < node.inputs.size(); ++i) {
      const std::string& name = node.inputs[i];
      if (!engine->has_weight(name)) continue;
      const WeightPlacement want = nodes[n].kind->weight_placement(i);
      auto [it, inserted] = placements.emplace(name, want);
      if (inserted) {
        first_reader[name] = node.op;
        continue;
      }
      RTLLM_CHECK(it->second.dtype == want.dtype, "weight \"", name, "\" is read as ",
                  dtype_safetensors_name(it->second.dtype), " by op \"", first_reader[name], "\" and as ",
                  dtype_safetensors_name(want.dtype), " by op \"", node.op, "\" on the ",
                  device_name(config.device), " backend");
      if (it->second.layout == want.layout) continue;
      RTLLM_CHECK(it->second.layout != WeightLayout::kCudaInt4Mma && want.layout != WeightLayout::kCudaInt4Mma,
                  "weight \"", name, "\" is read by op \"", first_reader[name], "\" and by op \"", node.op,
                  "\", and one of them needs its int4 codes in the CUDA GEMV's own layout");
      it->second.layout = WeightLayout::kRowMajor;
    }
  }
  for (const auto& [name, placement] : placements) slots.emplace(name, backend->place_weight(engine->weight(name), placement));
}

// Node outputs share one arena: a tensor lives from the node that writes it to the last node that
// reads it (graph outputs to the end of the step), and tensors alive at the same time never overlap.
void ModelRunner::Impl::plan_workspace() {
  const Graph& g = engine->graph();
  std::unordered_map<std::string, const TensorSpec*> specs;
  for (const TensorSpec& t : g.outputs) specs[t.name] = &t;
  for (const TensorSpec& t : g.tensors) specs[t.name] = &t;
  std::vector<const TensorSpec*> tensors;  // node outputs in order of production
  std::vector<DataType> dtypes;            // as stored on the device
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
      const bool is_output = std::any_of(g.outputs.begin(), g.outputs.end(),
                                         [&](const TensorSpec& t) { return t.name == name; });
      const DataType dtype = is_output ? spec.dtype : backend->activation_dtype(spec.dtype);
      const int64_t n = max_elements(spec.shape, config.max_num_tokens, config.max_num_logits);
      index[name] = tensors.size();
      tensors.push_back(&spec);
      dtypes.push_back(dtype);
      requests.push_back({n * dtype_size(dtype), i, i});
    }
  }
  for (const TensorSpec& t : g.outputs) requests[index.at(t.name)].last_use = g.nodes.size();
  size_t total = 0;
  const std::vector<size_t> offsets = plan_arena(requests, &total);
  auto* base = static_cast<uint8_t*>(backend->allocate_workspace(total));
  for (size_t i = 0; i < tensors.size(); ++i)
    slots[tensors[i]->name] = TensorSlot{base + offsets[i], dtypes[i], tensors[i]->shape};
  size_t op_bytes = 0;
  for (const PlannedNode& node : nodes) op_bytes = std::max(op_bytes, node.kind->workspace_bytes());
  backend->allocate_op_workspace(op_bytes);
}

void ModelRunner::Impl::bind_nodes() {
  const Graph& g = engine->graph();
  const Dim tokens{Dim::Kind::kNumTokens, 0}, logit_rows{Dim::Kind::kNumLogits, 0};
  slots["input_ids"] = TensorSlot{backend->graph_input("input_ids"), DataType::kInt32, {tokens}};
  slots["positions"] = TensorSlot{backend->graph_input("positions"), DataType::kInt32, {tokens}};
  slots["logits_indices"] = TensorSlot{backend->graph_input("logits_indices"), DataType::kInt32, {logit_rows}};
  for (size_t n = 0; n < g.nodes.size(); ++n) {
    PlannedNode& p = nodes[n];
    for (const std::string& name : g.nodes[n].inputs) p.inputs.push_back(&slots.at(name));
    for (const std::string& name : g.nodes[n].outputs) p.outputs.push_back(&slots.at(name));
    p.input_views.resize(p.inputs.size());
    p.output_views.resize(p.outputs.size());
  }
  RTLLM_CHECK(g.outputs.size() == 1, "the graph must have one output (logits), it has ", g.outputs.size());
  logits = &slots.at(g.outputs[0].name);
  const int64_t vocab = engine->model_config().vocab_size;
  RTLLM_CHECK(logits->dtype == DataType::kFloat32 && logits->dims.size() == 2 &&
                  logits->dims[0].kind == Dim::Kind::kNumLogits && logits->dims[1].value == vocab,
              "graph output \"", g.outputs[0].name, "\" must be float32 [num_logits, ", vocab, "]");
}

ModelRunner::ModelRunner(std::shared_ptr<const Engine> engine, const RuntimeConfig& config)
    : impl_(std::make_unique<Impl>()) {
  RTLLM_CHECK_ARG(engine != nullptr, "engine must not be null");
  Impl& im = *impl_;
  im.engine = std::move(engine);
  im.resolve_config(config);
  im.check_tensor_parallel();
#ifdef RTLLM_WITH_CUDA
  if (im.config.device == DeviceKind::kCuda) im.backend = make_cuda_backend(*im.engine, im.config);
#endif
  if (!im.backend) im.backend = make_cpu_backend(*im.engine, im.config);
  im.info = im.backend->info();
  im.info.max_num_tokens = im.config.max_num_tokens;
  im.info.max_batch_size = im.config.max_batch_size;
  im.info.max_num_logits = im.config.max_num_logits;
  im.info.max_seq_len = im.engine->limits().max_seq_len;
  im.info.tokens_per_block = im.config.tokens_per_block;
  im.info.num_layers = im.engine->model_config().num_layers;
  im.info.tp_rank = im.engine->rank();
  im.info.tp_size = im.engine->tp_size();
  im.info.communicator = im.engine->tp_size() > 1 ? im.config.communicator.get() : nullptr;
  if (im.config.kv_cache_dtype) im.info.kv_cache_dtype = *im.config.kv_cache_dtype;
  im.config.kv_cache_dtype = im.info.kv_cache_dtype;
  im.create_op_kinds();
  im.plan_weights();
  im.plan_workspace();
  im.backend->allocate_kv_pool(im.config);
  im.bind_nodes();
  im.backend->warm_up(im.nodes);
}

ModelRunner::~ModelRunner() = default;

const Engine& ModelRunner::engine() const { return *impl_->engine; }
const RuntimeConfig& ModelRunner::config() const { return impl_->config; }
int32_t ModelRunner::vocab_size() const { return impl_->engine->model_config().vocab_size; }

size_t ModelRunner::kv_bytes_per_block(const ModelConfig& model, int32_t tokens_per_block, DataType kv_cache_dtype) {
  return dtype_num_bytes(kv_cache_dtype, static_cast<int64_t>(model.num_layers) * 2 * model.num_kv_heads *
                                             tokens_per_block * model.head_dim);
}

size_t ModelRunner::kv_pool_bytes() const { return impl_->backend->kv_pool_bytes(); }

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
  const int64_t num_logits = in.logits_indices.size();
  RTLLM_CHECK_ARG(num_logits <= config.max_num_logits, "logits_indices has ", num_logits,
                  " entries, more than max_num_logits ", config.max_num_logits);
  for (int64_t r = 0; r < num_logits; ++r)
    RTLLM_CHECK_ARG(in.logits_indices[r] >= 0 && in.logits_indices[r] < num_tokens, "logits_indices[", r, "] = ",
                    in.logits_indices[r], " outside the step's tokens [0, ", num_tokens, ")");
  for (int32_t t = 0; t < num_tokens; ++t)
    RTLLM_CHECK_ARG(in.input_ids[t] >= 0 && in.input_ids[t] < vocab, "token id ", in.input_ids[t], " at index ", t,
                    " outside [0, vocab_size ", vocab, ")");
}

// The per-token and per-sequence arrays of a validated step.
void ModelRunner::Impl::expand(const StepInputs& in) {
  HostStep& st = step;
  st.inputs = &in;
  st.num_seqs = in.num_seqs();
  st.num_tokens = in.num_tokens();
  st.max_new_tokens = 0;
  st.positions.resize(st.num_tokens);
  st.token_seq.resize(st.num_tokens);
  st.seq_token_start.resize(st.num_seqs + 1);
  st.seq_len.resize(st.num_seqs);
  st.logits_indices.resize(st.num_seqs);
  int32_t start = 0;
  for (int32_t s = 0; s < st.num_seqs; ++s) {
    const int32_t num_new = in.num_new_tokens[s];
    st.seq_token_start[s] = start;
    for (int32_t i = 0; i < num_new; ++i) {
      st.positions[start + i] = in.num_cached_tokens[s] + i;
      st.token_seq[start + i] = s;
    }
    start += num_new;
    st.logits_indices[s] = start - 1;
    st.seq_len[s] = in.num_cached_tokens[s] + num_new;
    st.max_new_tokens = std::max(st.max_new_tokens, num_new);
  }
  st.seq_token_start[st.num_seqs] = start;
  st.decode_only = st.max_new_tokens == 1;
  st.one_logit_per_seq = in.logits_indices.empty() || in.logits_indices == st.logits_indices;
  if (!in.logits_indices.empty()) st.logits_indices = in.logits_indices;
  st.num_logits = static_cast<int32_t>(st.logits_indices.size());
}

const float* ModelRunner::forward(const StepInputs& inputs) {
  Impl& im = *impl_;
  std::lock_guard<std::mutex> lock(im.forward_mutex);
  im.validate(inputs);
  im.expand(inputs);
  return im.backend->forward(im.step, im.nodes, *im.logits);
}

void ModelRunner::forward_and_sample(const StepInputs& inputs, const std::vector<SamplingInput>& sampling,
                                     std::vector<SampledToken>* out) {
  Impl& im = *impl_;
  RTLLM_CHECK_ARG(out != nullptr, "forward_and_sample needs an output vector");
  std::lock_guard<std::mutex> lock(im.forward_mutex);
  im.validate(inputs);
  im.expand(inputs);
  RTLLM_CHECK_ARG(static_cast<int32_t>(sampling.size()) == im.step.num_logits, "forward_and_sample got ",
                  sampling.size(), " sampling inputs for ", im.step.num_logits, " rows of logits");
  im.backend->forward_and_sample(im.step, im.nodes, *im.logits, sampling, out);
}

void ModelRunner::copy_blocks(const std::vector<std::pair<int32_t, int32_t>>& copies) {
  Impl& im = *impl_;
  const int32_t num_blocks = im.config.num_kv_blocks;
  for (size_t i = 0; i < copies.size(); ++i) {
    const auto [src, dst] = copies[i];
    RTLLM_CHECK_ARG(src >= 0 && src < num_blocks && dst >= 0 && dst < num_blocks, "block copy ", i, ": ", src,
                    " -> ", dst, " has a block id outside [0, ", num_blocks, ")");
    RTLLM_CHECK_ARG(src != dst, "block copy ", i, " copies block ", src, " onto itself");
  }
  std::lock_guard<std::mutex> lock(im.forward_mutex);
  if (!copies.empty()) im.backend->copy_blocks(copies);
}

void ModelRunner::observe_amax(const std::vector<std::string>& tensor_names) {
  Impl& im = *impl_;
  RTLLM_CHECK_ARG(im.backend->can_observe() || tensor_names.empty(), "observe_amax is not implemented on the ",
                  device_name(im.config.device), " backend yet (available on the CPU)");
  const Graph& g = im.engine->graph();
  std::lock_guard<std::mutex> lock(im.forward_mutex);
  for (PlannedNode& node : im.nodes) node.observed.clear();
  for (const std::string& name : tensor_names) {
    bool found = false;
    for (size_t n = 0; n < g.nodes.size() && !found; ++n)
      for (size_t o = 0; o < g.nodes[n].outputs.size() && !found; ++o)
        if (g.nodes[n].outputs[o] == name) {
          auto& obs = im.nodes[n].observed;
          if (std::none_of(obs.begin(), obs.end(), [&](const auto& p) { return p.first == o; }))
            obs.emplace_back(o, 0.0f);
          found = true;
        }
    RTLLM_CHECK_ARG(found, "observe_amax: \"", name, "\" is not the output of a node of the graph");
  }
}

std::vector<std::pair<std::string, float>> ModelRunner::observed_amax() const {
  const Impl& im = *impl_;
  const Graph& g = im.engine->graph();
  std::vector<std::pair<std::string, float>> out;
  for (size_t n = 0; n < im.nodes.size(); ++n)
    for (const auto& [o, amax] : im.nodes[n].observed) out.emplace_back(g.nodes[n].outputs[o], amax);
  return out;
}

void ModelRunner::observe_channel_amax(const std::vector<std::string>& tensor_names) {
  Impl& im = *impl_;
  RTLLM_CHECK_ARG(im.backend->can_observe_channels() || tensor_names.empty(), "observe_channel_amax is not "
                  "implemented on the ", device_name(im.config.device), " backend (available on the CPU)");
  const Graph& g = im.engine->graph();
  std::lock_guard<std::mutex> lock(im.forward_mutex);
  for (PlannedNode& node : im.nodes) node.observed_channels.clear();
  for (const std::string& name : tensor_names) {
    bool found = false;
    for (size_t n = 0; n < g.nodes.size() && !found; ++n)
      for (size_t o = 0; o < g.nodes[n].outputs.size() && !found; ++o)
        if (g.nodes[n].outputs[o] == name) {
          const std::vector<Dim>& dims = im.nodes[n].outputs[o]->dims;
          RTLLM_CHECK_ARG(dims.size() == 2 && dims[1].kind == Dim::Kind::kFixed, "observe_channel_amax: \"", name,
                          "\" is not a [rows, columns] tensor");
          auto& obs = im.nodes[n].observed_channels;
          if (std::none_of(obs.begin(), obs.end(), [&](const auto& p) { return p.first == o; }))
            obs.emplace_back(o, std::vector<float>(dims[1].value, 0.0f));
          found = true;
        }
    RTLLM_CHECK_ARG(found, "observe_channel_amax: \"", name, "\" is not the output of a node of the graph");
  }
}

std::vector<std::pair<std::string, std::vector<float>>> ModelRunner::observed_channel_amax() const {
  const Impl& im = *impl_;
  const Graph& g = im.engine->graph();
  std::vector<std::pair<std::string, std::vector<float>>> out;
  for (size_t n = 0; n < im.nodes.size(); ++n)
    for (const auto& [o, amax] : im.nodes[n].observed_channels) out.emplace_back(g.nodes[n].outputs[o], amax);
  return out;
}

void ModelRunner::capture_outputs(const std::vector<std::string>& tensor_names) {
  Impl& im = *impl_;
  RTLLM_CHECK_ARG(im.backend->can_observe() || tensor_names.empty(), "capture_outputs is not implemented on the ",
                  device_name(im.config.device), " backend yet (available on the CPU: RTLLM_CALIB_DEVICE=cpu)");
  const Graph& g = im.engine->graph();
  std::lock_guard<std::mutex> lock(im.forward_mutex);
  for (PlannedNode& node : im.nodes) node.captured.clear();
  for (const std::string& name : tensor_names) {
    bool found = false;
    for (size_t n = 0; n < g.nodes.size() && !found; ++n)
      for (size_t o = 0; o < g.nodes[n].outputs.size() && !found; ++o)
        if (g.nodes[n].outputs[o] == name) {
          auto& cap = im.nodes[n].captured;
          if (std::none_of(cap.begin(), cap.end(), [&](const auto& c) { return c.output == o; }))
            cap.push_back(PlannedNode::Captured{o, 0, {}});
          found = true;
        }
    RTLLM_CHECK_ARG(found, "capture_outputs: \"", name, "\" is not the output of a node of the graph");
  }
}

std::tuple<int64_t, int64_t, std::vector<float>> ModelRunner::captured(const std::string& tensor_name) const {
  const Impl& im = *impl_;
  const Graph& g = im.engine->graph();
  for (size_t n = 0; n < im.nodes.size(); ++n)
    for (const auto& c : im.nodes[n].captured)
      if (g.nodes[n].outputs[c.output] == tensor_name) {
        const int64_t rows = c.cols > 0 ? static_cast<int64_t>(c.values.size()) / c.cols : 0;
        return {rows, c.cols, c.values};
      }
  RTLLM_CHECK_ARG(false, "captured: \"", tensor_name, "\" is not captured (capture_outputs)");
  return {};
}

std::vector<std::array<float, 2>> ModelRunner::kv_cache_amax(const std::vector<int32_t>& block_table,
                                                             int32_t num_tokens) {
  Impl& im = *impl_;
  const int32_t tpb = im.config.tokens_per_block;
  RTLLM_CHECK_ARG(*im.config.kv_cache_dtype == DataType::kFloat32 || *im.config.kv_cache_dtype == DataType::kBFloat16 ||
                      *im.config.kv_cache_dtype == DataType::kFloat16,
                  "kv_cache_amax reads an unquantized KV cache (F32, BF16 or F16); this runner's is ",
                  dtype_safetensors_name(*im.config.kv_cache_dtype));
  RTLLM_CHECK_ARG(num_tokens >= 0, "kv_cache_amax: num_tokens ", num_tokens, " must be >= 0");
  const int64_t num_blocks = (static_cast<int64_t>(num_tokens) + tpb - 1) / tpb;
  RTLLM_CHECK_ARG(static_cast<int64_t>(block_table.size()) >= num_blocks, "kv_cache_amax: ", num_tokens,
                  " tokens need ", num_blocks, " blocks, the block table has ", block_table.size());
  for (int64_t b = 0; b < num_blocks; ++b)
    RTLLM_CHECK_ARG(block_table[b] >= 0 && block_table[b] < im.config.num_kv_blocks, "kv_cache_amax: block id ",
                    block_table[b], " outside [0, ", im.config.num_kv_blocks, ")");
  std::vector<std::array<float, 2>> out(im.engine->model_config().num_layers, {0.0f, 0.0f});
  std::lock_guard<std::mutex> lock(im.forward_mutex);
  im.backend->kv_cache_amax(block_table.data(), num_tokens, out.data());
  return out;
}

#ifndef RTLLM_WITH_CUDA
bool cuda_available() { return false; }
#endif

}  // namespace rtllm
