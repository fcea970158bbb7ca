// The CUDA backend of ModelRunner. All device memory is planned at load:
//   weights      uploaded once as the op kinds place them (the compute dtype, bf16 or fp16 for fp16
//                engines, for what they compute with; float32 inv_freq and scales as stored);
//   workspace    the activation arena planned by ModelRunner for max_num_tokens, and the ops' shared
//                scratch (the largest OpKind::workspace_bytes: attention's q and split-KV partials);
//   step buffer  int32 arrays (StepLayout) filled each step from one pinned staging buffer by one copy;
//   KV pool      per layer [num_kv_blocks + 1, 2, nkv, tpb, hd] of the KV-cache dtype; the extra last
//                block is scratch for the padding sequences of CUDA-graph buckets;
//   scratch      the cuBLASLt workspace and pinned host logits [max_num_logits, vocab] float32;
//   sampler      the device sampling buffers (CudaSampler) when device_sampling is on.
// Everything runs on one non-blocking stream owned by the backend; forward() allocates nothing.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "cuda/cublaslt_gemm.h"
#include "cuda/cuda_context.h"
#include "cuda/cuda_graphs.h"
#include "cuda/cuda_sampler.h"
#include "cuda/linear_path_tuner.h"
#include "rtllm/kernels/attention.cuh"
#include "rtllm/kernels/elementwise.cuh"
#include "rtllm/kernels/weight_only.cuh"
#include "runner_backend.h"
#include "workspace.h"

namespace rtllm {

namespace {

constexpr size_t kGemmWorkspaceBytes = 32u << 20;
constexpr size_t kAlign = 256;

// Offsets (in int32 elements, each a multiple of 64) of the step arrays in the device step buffer.
struct StepLayout {
  size_t input_ids, positions, token_seq, seq_token_start, num_cached, seq_len, logits_indices, block_table, total;

  StepLayout(int64_t max_tokens, int64_t max_seqs, int64_t max_logits, int64_t max_blocks_per_seq) {
    size_t at = 0;
    auto take = [&](int64_t n) {
      const size_t offset = at;
      at += round_up(static_cast<size_t>(n), 64);
      return offset;
    };
    input_ids = take(max_tokens);
    positions = take(max_tokens);
    token_seq = take(max_tokens);
    seq_token_start = take(max_seqs + 1);
    num_cached = take(max_seqs);
    seq_len = take(max_seqs);
    logits_indices = take(max_logits);
    block_table = take(max_seqs * max_blocks_per_seq);  // last: a step copies only the rows it uses
    total = at;
  }
};

// A device allocation freed on destruction.
struct DeviceBuffer {
  void* data = nullptr;
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t num_bytes) { RTLLM_CUDA_CHECK(cudaMalloc(&data, std::max<size_t>(num_bytes, 1))); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : data(o.data) { o.data = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(data, o.data);
    return *this;
  }
  ~DeviceBuffer() {
    if (data) cudaFree(data);
  }
};

struct PinnedBuffer {
  void* data = nullptr;
  PinnedBuffer() = default;
  explicit PinnedBuffer(size_t num_bytes) { RTLLM_CUDA_CHECK(cudaMallocHost(&data, std::max<size_t>(num_bytes, 1))); }
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    std::swap(data, o.data);
    return *this;
  }
  ~PinnedBuffer() {
    if (data) cudaFreeHost(data);
  }
};

class CudaBackend final : public RunnerBackend {
 public:
  CudaBackend(const Engine& engine, const RuntimeConfig& config);
  ~CudaBackend() override;

  BackendInfo info() const override {
    BackendInfo b;
    b.device = DeviceKind::kCuda;
    b.activation_dtype = b.kv_cache_dtype = compute_dtype_;
    b.num_sms = num_sms_;
    return b;
  }
  TensorSlot place_weight(const Weight& w, const WeightPlacement& placement) override;
  void* allocate_workspace(size_t num_bytes) override {
    workspace_ = DeviceBuffer(num_bytes);
    return workspace_.data;
  }
  void* allocate_op_workspace(size_t num_bytes) override {
    op_workspace_ = DeviceBuffer(num_bytes);
    return op_workspace_.data;
  }
  void* graph_input(const std::string& name) override;
  void allocate_kv_pool(RuntimeConfig& config) override;
  size_t kv_pool_bytes() const override { return kv_pool_bytes_; }
  const float* forward(const HostStep& step, std::vector<PlannedNode>& nodes, const TensorSlot& logits) override;
  void forward_and_sample(const HostStep& step, std::vector<PlannedNode>& nodes, const TensorSlot& logits,
                          const std::vector<SamplingInput>& inputs, std::vector<SampledToken>* out) override;
  void copy_blocks(const std::vector<std::pair<int32_t, int32_t>>& copies) override;
  void warm_up(std::vector<PlannedNode>& nodes) override;
  bool can_observe() const override { return true; }
  void kv_cache_amax(const int32_t* block_table, int32_t num_tokens, std::array<float, 2>* out) const override;

 private:
  size_t observe_slots(const std::vector<PlannedNode>& nodes);
  void read_observed(std::vector<PlannedNode>& nodes, size_t num_slots);
  int32_t* device_array(size_t offset) const { return static_cast<int32_t*>(step_buffer_.data) + offset; }
  size_t stage(const HostStep& st, int32_t num_seqs);
  void prepare_step(const HostStep& st, int32_t num_tokens, int32_t num_seqs);
  void run_nodes(std::vector<PlannedNode>& nodes, int32_t num_tokens, int32_t num_logits);
  void run_step(const HostStep& st, std::vector<PlannedNode>& nodes);
  size_t kv_block_bytes() const {  // one block of one layer
    return ModelRunner::kv_bytes_per_block(model_, config_.tokens_per_block, *config_.kv_cache_dtype) /
           model_.num_layers;
  }
  kernels::DecodePlan decode_plan(int32_t num_seqs) const {
    return kernels::attention_decode_plan(num_seqs, model_.num_kv_heads, model_.head_dim, max_seq_len_, num_sms_,
                                          kernel_dtype(*config_.kv_cache_dtype));
  }

  const Engine& engine_;
  const ModelConfig& model_;
  RuntimeConfig config_;
  int device_ = 0;
  int32_t num_sms_ = 0;
  DataType compute_dtype_ = DataType::kBFloat16;
  cudaStream_t stream_ = nullptr;
  int32_t max_seq_len_ = 0, max_blocks_per_seq_ = 0;
  StepLayout layout_;

  std::vector<DeviceBuffer> weights_;
  size_t weight_bytes_ = 0, kv_pool_bytes_ = 0;
  DeviceBuffer workspace_, op_workspace_, step_buffer_, kv_pool_;
  PinnedBuffer staging_, host_logits_;
  std::vector<void*> kv_layers_;
  int32_t scratch_block_ = 0;  // the pool's extra block
  std::unique_ptr<CublasLtGemm> gemm_;
  LinearPathTuner linear_paths_;
  std::unique_ptr<DecodeGraphs> graphs_;
  std::unique_ptr<CudaSampler> sampler_;  // null when device_sampling is off
  // Calibration (ModelRunner::observe_amax): one float32 running amax per observed output, on the
  // device during a step; allocated by the first observed step (calibration runs are never timed).
  DeviceBuffer observed_;
  size_t observed_capacity_ = 0;
  CudaStep step_;
};

CudaBackend::CudaBackend(const Engine& engine, const RuntimeConfig& config)
    : engine_(engine),
      model_(engine.model_config()),
      config_(config),
      max_seq_len_(engine.limits().max_seq_len),
      max_blocks_per_seq_((engine.limits().max_seq_len + config.tokens_per_block - 1) / config.tokens_per_block),
      layout_(config.max_num_tokens, config.max_batch_size, config.max_num_logits, max_blocks_per_seq_) {
  register_cuda_ops();
  const int32_t tpb = config.tokens_per_block;
  RTLLM_CHECK_ARG((tpb & (tpb - 1)) == 0, "tokens_per_block ", tpb, " must be a power of two on CUDA");
  RTLLM_CUDA_CHECK(cudaGetDevice(&device_));
  RTLLM_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device_));
  compute_dtype_ = model_.dtype == DataType::kFloat16 ? DataType::kFloat16 : DataType::kBFloat16;
  RTLLM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  step_buffer_ = DeviceBuffer(layout_.total * sizeof(int32_t));
  staging_ = PinnedBuffer(layout_.total * sizeof(int32_t));
}

CudaBackend::~CudaBackend() {
  if (stream_) {
    cudaStreamSynchronize(stream_);
    graphs_.reset();
    cudaStreamDestroy(stream_);
  }
}

// Converted on the host when the placement asks for another float dtype, then uploaded once; int4 codes
// for the GEMV's MMAs are re-laid on the device once uploaded.
TensorSlot CudaBackend::place_weight(const Weight& w, const WeightPlacement& placement) {
  const bool int4_mma = placement.layout == WeightLayout::kCudaInt4Mma;
  RTLLM_CHECK(placement.layout == WeightLayout::kRowMajor || int4_mma, "weight \"", w.name,
              "\": the CUDA backend keeps weights row-major, or int4 codes in the GEMV's MMA layout");
  RTLLM_CHECK(!int4_mma || (w.dtype == DataType::kInt4 && placement.dtype == DataType::kInt4), "weight \"", w.name,
              "\": only I4 codes take the MMA layout");
  TensorSlot slot;
  for (int64_t d : w.shape) slot.dims.push_back(Dim{Dim::Kind::kFixed, d});
  slot.dtype = placement.dtype;
  const int64_t n = w.numel();
  std::vector<uint8_t> converted;
  const void* src = w.data;
  if (w.dtype != placement.dtype) {
    converted.resize(dtype_num_bytes(placement.dtype, n));
    convert_floats(w.data, w.dtype, converted.data(), placement.dtype, n);  // throws for non-float pairs
    src = converted.data();
  }
  const size_t num_bytes = dtype_num_bytes(slot.dtype, n);
  DeviceBuffer buf(num_bytes);
  RTLLM_CUDA_CHECK(cudaMemcpy(buf.data, src, num_bytes, cudaMemcpyHostToDevice));
  if (int4_mma) {
    RTLLM_CUDA_CHECK(kernels::woq_pack_int4(buf.data, static_cast<int64_t>(num_bytes), nullptr));
    RTLLM_CUDA_CHECK(cudaDeviceSynchronize());
  }
  weight_bytes_ += round_up(num_bytes, kAlign);
  slot.data = buf.data;
  weights_.push_back(std::move(buf));
  return slot;
}

void* CudaBackend::graph_input(const std::string& name) {
  if (name == "input_ids") return device_array(layout_.input_ids);
  if (name == "positions") return device_array(layout_.positions);
  RTLLM_CHECK(name == "logits_indices", "unknown graph input \"", name, "\"");
  return device_array(layout_.logits_indices);
}

void CudaBackend::allocate_kv_pool(RuntimeConfig& config) {
  gemm_ = std::make_unique<CublasLtGemm>(kGemmWorkspaceBytes);
  host_logits_ = PinnedBuffer(static_cast<size_t>(config.max_num_logits) * model_.vocab_size * sizeof(float));
  if (config.enable_cuda_graphs)
    graphs_ = std::make_unique<DecodeGraphs>(config.max_batch_size, config.max_num_tokens);
  if (config.device_sampling)
    sampler_ = std::make_unique<CudaSampler>(config.max_num_logits, model_.vocab_size, max_seq_len_);

  const size_t block_bytes = ModelRunner::kv_bytes_per_block(model_, config.tokens_per_block, *config.kv_cache_dtype);
  size_t free_bytes = 0, total_bytes = 0;
  RTLLM_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (config.num_kv_blocks == 0) {
    // The pool takes a fraction of what the weights, workspace and buffers above left free.
    const double budget = static_cast<double>(free_bytes) * config.kv_free_memory_fraction;
    const int64_t blocks = static_cast<int64_t>(budget / static_cast<double>(block_bytes)) - 1;  // minus scratch
    config.num_kv_blocks = static_cast<int32_t>(std::clamp<int64_t>(blocks, 0, INT32_MAX - 1));
    RTLLM_CHECK(config.num_kv_blocks >= max_blocks_per_seq_, "the KV pool of ", config.num_kv_blocks,
                " blocks (", static_cast<int64_t>(config.num_kv_blocks) * config.tokens_per_block,
                " tokens in ", config.kv_free_memory_fraction, " of the ", free_bytes,
                " bytes of device memory left free after ", weight_bytes_,
                " bytes of weights and the workspace) cannot hold one sequence of max_seq_len ", max_seq_len_,
                " tokens, which needs ", max_blocks_per_seq_, " blocks");
  }
  const size_t pool_bytes = block_bytes * (static_cast<size_t>(config.num_kv_blocks) + 1);
  RTLLM_CHECK(pool_bytes <= free_bytes, "the KV pool of ", config.num_kv_blocks, " blocks needs ", pool_bytes,
              " bytes of device memory, ", free_bytes, " are free after ", weight_bytes_, " bytes of weights");
  kv_pool_ = DeviceBuffer(pool_bytes);
  kv_pool_bytes_ = pool_bytes;
  const size_t layer_bytes = pool_bytes / model_.num_layers;
  for (int32_t l = 0; l < model_.num_layers; ++l) kv_layers_.push_back(static_cast<uint8_t*>(kv_pool_.data) + l * layer_bytes);
  scratch_block_ = config.num_kv_blocks;
  config_ = config;

  step_.block_table = device_array(layout_.block_table);
  step_.max_blocks_per_seq = max_blocks_per_seq_;
  step_.kv_layers = kv_layers_.data();
  step_.kv_cache_dtype = *config.kv_cache_dtype;
  step_.num_layers = model_.num_layers;
  step_.num_kv_blocks = config.num_kv_blocks + 1;
  step_.tokens_per_block = config.tokens_per_block;
  step_.gemm = gemm_.get();
  step_.linear_paths = &linear_paths_;
  step_.meta.token_seq = device_array(layout_.token_seq);
  step_.meta.positions = device_array(layout_.positions);
  step_.meta.seq_token_start = device_array(layout_.seq_token_start);
  step_.meta.num_cached = device_array(layout_.num_cached);
  step_.meta.seq_len = device_array(layout_.seq_len);
}

// Writes the step into the staging buffer, padded to num_seqs sequences (the padding sequences have
// one token, id 0 at position 0, stored in the scratch block). Returns the bytes to copy.
size_t CudaBackend::stage(const HostStep& st, int32_t num_seqs) {
  auto* h = static_cast<int32_t*>(staging_.data);
  const StepInputs& in = *st.inputs;
  const int32_t T = st.num_tokens, R = st.num_seqs, pad = num_seqs - R;
  std::copy(in.input_ids.begin(), in.input_ids.end(), h + layout_.input_ids);
  std::copy(st.positions.begin(), st.positions.end(), h + layout_.positions);
  std::copy(st.token_seq.begin(), st.token_seq.end(), h + layout_.token_seq);
  std::copy(st.seq_token_start.begin(), st.seq_token_start.end(), h + layout_.seq_token_start);
  std::copy(in.num_cached_tokens.begin(), in.num_cached_tokens.end(), h + layout_.num_cached);
  std::copy(st.seq_len.begin(), st.seq_len.end(), h + layout_.seq_len);
  std::copy(st.logits_indices.begin(), st.logits_indices.end(), h + layout_.logits_indices);
  const int32_t cols = std::min(in.max_blocks_per_seq, max_blocks_per_seq_);
  for (int32_t s = 0; s < R; ++s) {
    int32_t* row = h + layout_.block_table + static_cast<size_t>(s) * max_blocks_per_seq_;
    std::copy_n(in.block_table.begin() + static_cast<size_t>(s) * in.max_blocks_per_seq, cols, row);
    std::fill(row + cols, row + max_blocks_per_seq_, -1);
  }
  for (int32_t i = 0; i < pad; ++i) {
    const int32_t s = R + i, t = T + i;  // decode-only: one token per padding sequence
    h[layout_.input_ids + t] = 0;
    h[layout_.positions + t] = 0;
    h[layout_.token_seq + t] = s;
    h[layout_.seq_token_start + s + 1] = t + 1;
    h[layout_.num_cached + s] = 0;
    h[layout_.seq_len + s] = 1;
    h[layout_.logits_indices + s] = t;  // padding only with one row per sequence (graph buckets)
    int32_t* row = h + layout_.block_table + static_cast<size_t>(s) * max_blocks_per_seq_;
    std::fill(row, row + max_blocks_per_seq_, scratch_block_);
  }
  return (layout_.block_table + static_cast<size_t>(num_seqs) * max_blocks_per_seq_) * sizeof(int32_t);
}

void CudaBackend::prepare_step(const HostStep& st, int32_t num_tokens, int32_t num_seqs) {
  step_.meta.num_tokens = num_tokens;
  step_.meta.num_seqs = num_seqs;
  step_.max_new_tokens = st.max_new_tokens;
  step_.decode_only = st.decode_only;
  const kernels::DecodePlan plan = st.decode_only ? decode_plan(num_seqs) : kernels::DecodePlan{};
  step_.decode_splits = plan.num_splits;
  step_.decode_fuse_prepare = plan.fuse_prepare;
}

void CudaBackend::run_nodes(std::vector<PlannedNode>& nodes, int32_t num_tokens, int32_t num_logits) {
  OpContext ctx;
  ctx.stream = stream_;
  ctx.device_step = &step_;
  ctx.workspace = op_workspace_.data;
  float* slot = static_cast<float*>(observed_.data);
  for (PlannedNode& node : nodes) {
    node.run(ctx, num_tokens, num_logits);
    for (const auto& observed : node.observed) {
      const TensorView& t = node.output_views[observed.first];
      RTLLM_CUDA_CHECK(kernels::amax(slot++, t.data, t.numel(), kernel_dtype(t.dtype), stream_));
    }
  }
}

// The number of observed outputs; makes room for their device amax slots and zeroes them.
size_t CudaBackend::observe_slots(const std::vector<PlannedNode>& nodes) {
  size_t n = 0;
  for (const PlannedNode& node : nodes) n += node.observed.size();
  if (n == 0) return 0;
  if (n > observed_capacity_) {
    observed_ = DeviceBuffer(n * sizeof(float));
    observed_capacity_ = n;
  }
  RTLLM_CUDA_CHECK(cudaMemsetAsync(observed_.data, 0, n * sizeof(float), stream_));
  return n;
}

// After an observed step: folds the step's device amax values into PlannedNode::observed.
void CudaBackend::read_observed(std::vector<PlannedNode>& nodes, size_t num_slots) {
  std::vector<float> values(num_slots);
  RTLLM_CUDA_CHECK(cudaMemcpyAsync(values.data(), observed_.data, num_slots * sizeof(float), cudaMemcpyDeviceToHost,
                                   stream_));
  RTLLM_CUDA_CHECK(cudaStreamSynchronize(stream_));
  size_t i = 0;
  for (PlannedNode& node : nodes)
    for (auto& observed : node.observed) {
      const float v = values[i++];
      if (!(v <= observed.second)) observed.second = v;  // keeps a NaN
    }
}

// Token t of the sequence is in block block_table[t / tpb], slot t % tpb: K then V of every kv head. The
// blocks are copied to the host one at a time (calibration only).
void CudaBackend::kv_cache_amax(const int32_t* block_table, int32_t num_tokens, std::array<float, 2>* out) const {
  const DataType dtype = *config_.kv_cache_dtype;
  RTLLM_CHECK(dtype == DataType::kBFloat16 || dtype == DataType::kFloat16 || dtype == DataType::kFloat32,
              "kv_cache_amax reads an unquantized KV cache, this one is ", dtype_safetensors_name(dtype));
  RTLLM_CUDA_CHECK(cudaSetDevice(device_));
  RTLLM_CUDA_CHECK(cudaStreamSynchronize(stream_));
  const int64_t tpb = config_.tokens_per_block, nkv = model_.num_kv_heads, hd = model_.head_dim;
  const size_t block_bytes = kv_block_bytes();
  std::vector<uint8_t> raw(block_bytes);
  std::vector<float> values(block_bytes / dtype_num_bytes(dtype, 1));
  for (int32_t l = 0; l < model_.num_layers; ++l)
    for (int64_t b = 0; b * tpb < num_tokens; ++b) {
      RTLLM_CUDA_CHECK(cudaMemcpy(raw.data(), static_cast<const uint8_t*>(kv_layers_[l]) + block_table[b] * block_bytes,
                                  block_bytes, cudaMemcpyDeviceToHost));
      convert_floats(raw.data(), dtype, values.data(), DataType::kFloat32, static_cast<int64_t>(values.size()));
      const int64_t used = std::min<int64_t>(tpb, num_tokens - b * tpb);
      for (int64_t which = 0; which < 2; ++which)
        for (int64_t kh = 0; kh < nkv; ++kh)
          for (int64_t t = 0; t < used; ++t) {
            const float* row = values.data() + ((which * nkv + kh) * tpb + t) * hd;
            for (int64_t d = 0; d < hd; ++d) {
              const float a = std::fabs(row[d]);
              if (!(a <= out[l][which])) out[l][which] = a;
            }
          }
    }
}

// Stages the step and runs it on the stream (a captured graph for decode-only buckets with a row of
// logits per sequence); no host wait.
void CudaBackend::run_step(const HostStep& st, std::vector<PlannedNode>& nodes) {
  RTLLM_CUDA_CHECK(cudaSetDevice(device_));  // the caller's thread may not have selected it
  const size_t num_observed = observe_slots(nodes);  // observed steps run eagerly
  const bool graphable = graphs_ && st.decode_only && st.one_logit_per_seq && num_observed == 0;
  const int32_t bucket = graphable ? graphs_->bucket_for(st.num_seqs) : 0;
  const int32_t num_seqs = bucket ? bucket : st.num_seqs;
  const int32_t num_tokens = bucket ? bucket : st.num_tokens;
  const int32_t num_logits = bucket ? bucket : st.num_logits;
  const size_t num_bytes = stage(st, num_seqs);
  RTLLM_CUDA_CHECK(cudaMemcpyAsync(step_buffer_.data, staging_.data, num_bytes, cudaMemcpyHostToDevice, stream_));
  prepare_step(st, num_tokens, num_seqs);
  if (bucket && graphs_->captured(bucket)) {
    graphs_->launch(bucket, stream_);
  } else {
    run_nodes(nodes, num_tokens, num_logits);  // also the warm-up run of a bucket before its capture
    if (bucket) graphs_->capture(bucket, stream_, [&] { run_nodes(nodes, num_tokens, num_logits); });
  }
  if (num_observed) read_observed(nodes, num_observed);
}

// Captures every decode bucket's graph now, so that no step of the first workload pays for a capture
// (an eager run, stream capture and instantiation per bucket, and the cuBLASLt plans of its shapes).
// Each bucket runs on padding sequences only: one token at position 0 in the scratch block.
void CudaBackend::warm_up(std::vector<PlannedNode>& nodes) {
  if (!graphs_) return;
  RTLLM_CUDA_CHECK(cudaSetDevice(device_));
  const StepInputs no_inputs;
  HostStep padding;
  padding.inputs = &no_inputs;
  padding.decode_only = true;
  padding.max_new_tokens = 1;
  padding.seq_token_start = {0};
  // The eager run of each bucket times the linears' paths at its token count (LinearPathTuner), so that
  // its capture records the faster one.
  linear_paths_.set_tuning(true);
  struct TuningOff {  // also when a bucket throws: no later step may stop to time a linear
    LinearPathTuner& tuner;
    ~TuningOff() { tuner.set_tuning(false); }
  } tuning_off{linear_paths_};
  for (int32_t bucket : graphs_->buckets()) {
    if (graphs_->captured(bucket)) continue;
    const size_t num_bytes = stage(padding, bucket);
    RTLLM_CUDA_CHECK(cudaMemcpyAsync(step_buffer_.data, staging_.data, num_bytes, cudaMemcpyHostToDevice, stream_));
    prepare_step(padding, bucket, bucket);
    run_nodes(nodes, bucket, bucket);  // the warm-up run a capture needs (plans, lazy module loads)
    graphs_->capture(bucket, stream_, [&] { run_nodes(nodes, bucket, bucket); });
    RTLLM_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the staging buffer is reused by the next bucket
  }
  // The buckets ran every GEMM shape of the model (the LM head's too): with bucketed cuBLASLt plans, ask
  // for the prompt steps' row counts now as well.
  gemm_->warm_buckets(config_.max_num_tokens);
}

const float* CudaBackend::forward(const HostStep& st, std::vector<PlannedNode>& nodes, const TensorSlot& logits) {
  run_step(st, nodes);
  const size_t logits_bytes = static_cast<size_t>(st.num_logits) * model_.vocab_size * sizeof(float);
  RTLLM_CUDA_CHECK(cudaMemcpyAsync(host_logits_.data, logits.data, logits_bytes, cudaMemcpyDeviceToHost, stream_));
  // The staging buffer and host logits are reused by the next step: wait for this one.
  RTLLM_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return static_cast<const float*>(host_logits_.data);
}

// The sampling kernel reads the first num_logits rows of the logits (a graph bucket's padding rows
// follow them) on the same stream, after the step; it is not part of the captured graph. With
// device_sampling off, or inputs the kernel lacks a feature for, the host samples the logits instead.
void CudaBackend::forward_and_sample(const HostStep& st, std::vector<PlannedNode>& nodes, const TensorSlot& logits,
                                     const std::vector<SamplingInput>& inputs, std::vector<SampledToken>* out) {
  if (!sampler_ || !CudaSampler::supports(inputs)) {
    RunnerBackend::forward_and_sample(st, nodes, logits, inputs, out);
    return;
  }
  RTLLM_CHECK(static_cast<int32_t>(inputs.size()) == st.num_logits, "sampling inputs for ", inputs.size(),
              " rows, the step has ", st.num_logits);
  run_step(st, nodes);
  // Also waits for the step, so its staging buffer may be reused.
  sampler_->sample(static_cast<const float*>(logits.data), inputs, out, stream_);
}

// A block is [2, nkv, tpb, hd] of the KV-cache dtype, contiguous in each layer's [num_kv_blocks + 1, ...].
// Device-to-device copies on the backend's stream, so the next forward sees them without a host wait.
void CudaBackend::copy_blocks(const std::vector<std::pair<int32_t, int32_t>>& copies) {
  RTLLM_CUDA_CHECK(cudaSetDevice(device_));
  const size_t block_bytes = kv_block_bytes();
  for (void* layer : kv_layers_)
    for (const auto& [src, dst] : copies)
      RTLLM_CUDA_CHECK(cudaMemcpyAsync(static_cast<uint8_t*>(layer) + dst * block_bytes,
                                       static_cast<uint8_t*>(layer) + src * block_bytes, block_bytes,
                                       cudaMemcpyDeviceToDevice, stream_));
}

}  // namespace

std::unique_ptr<RunnerBackend> make_cuda_backend(const Engine& engine, const RuntimeConfig& config) {
  return std::make_unique<CudaBackend>(engine, config);
}

bool cuda_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

}  // namespace rtllm
