// An engine directory: config.json (model, build and quant configs, the op graph) and
// rank{N}.engine (safetensors weights in kernel-ready layout). The format is described in
// docs/engine_format.md.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "rtllm/common.h"
#include "rtllm/dtype.h"
#include "rtllm/json.h"

namespace rtllm {

struct ModelConfig {
  std::string architecture;
  int32_t vocab_size = 0;
  int32_t hidden_size = 0;
  int32_t num_layers = 0;
  // Attention heads of this engine rank: under tensor parallelism its num_heads / tp_size query heads and
  // the KV heads they read (replicated when fewer than the ranks); config.json holds the model's.
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t intermediate_size = 0;
  int32_t max_position_embeddings = 0;
  DataType dtype = DataType::kFloat32;  // weight dtype
  int32_t bos_token_id = -1;
  std::vector<int32_t> eos_token_ids;
};

// Limits the engine was built for; the runtime never exceeds them.
struct EngineLimits {
  int32_t max_batch_size = 0;  // sequences per step
  int32_t max_input_len = 0;   // prompt tokens per request
  int32_t max_seq_len = 0;     // prompt + generated tokens per request
  int32_t max_num_tokens = 0;  // packed tokens per step
};

// config.json's "quantization" section (rtllm.QuantConfig); algorithms by TensorRT-LLM name. An engine
// without the section, or with null algorithms, is unquantized: both read as "NO_QUANT".
struct QuantSpec {
  std::string quant_algo = "NO_QUANT";
  std::string kv_cache_quant_algo = "NO_QUANT";
};

// A dimension of a graph tensor: a fixed size or one of the two step-dependent sizes: the tokens
// packed in the step, and the rows of logits it computes (one per index in "logits_indices").
struct Dim {
  enum class Kind { kFixed, kNumTokens, kNumLogits };
  Kind kind = Kind::kFixed;
  int64_t value = 0;  // only for kFixed
};

struct TensorSpec {
  std::string name;
  DataType dtype = DataType::kFloat32;
  std::vector<Dim> shape;
};

struct GraphNode {
  std::string op;
  std::vector<std::string> inputs;   // graph inputs, weights or outputs of earlier nodes
  std::vector<std::string> outputs;
  Json attrs;                        // an object; op-specific
};

struct Graph {
  std::vector<TensorSpec> inputs;    // fed by the runtime each step: input_ids, positions, logits_indices
  std::vector<TensorSpec> outputs;   // logits
  std::vector<TensorSpec> tensors;   // every node output, with its shape
  std::vector<GraphNode> nodes;      // in execution order
};

// A weight as stored in the engine file; `data` points into the memory-mapped file (or, for an engine
// built in memory, into the caller's buffer). An int4 weight has its logical shape [..., K]; its data
// holds K / 2 bytes per row (two values per byte, the even index in the low nibble).
struct Weight {
  std::string name;
  DataType dtype = DataType::kFloat32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t num_bytes = 0;
  int64_t numel() const;
};

class RTLLM_API Engine {
 public:
  // Version 2 names the logits' rows: the graph input "logits_indices" [num_logits] (packed token
  // indices whose logits the step computes). Version 1 engines ("last_token_ids" [num_seqs], one row
  // per sequence) read as the same graph.
  static constexpr int32_t kFormatVersion = 2;
  static constexpr int32_t kMinFormatVersion = 1;

  // Reads dir/config.json and memory-maps dir/rank{rank}.engine. Throws Error naming the file
  // for a missing, truncated or corrupt file, naming both versions for another format version, and
  // naming the algorithm for a quantization this build cannot run.
  static std::shared_ptr<const Engine> load(const std::string& dir, int32_t rank = 0);

  // An engine from memory: the config.json text and the weights, whose `data` stays owned by the
  // caller; `storage` keeps it alive and is released with the Engine (and every runner holding it).
  // Validated as load() validates a directory (config, graph, dtypes, byte counts); errors name the
  // value and say "in-memory engine" where load() names the file. rank: the shard the weights are,
  // of a tensor-parallel config (as load()'s).
  static std::shared_ptr<const Engine> from_memory(const std::string& config_json, std::vector<Weight> weights,
                                                   std::shared_ptr<const void> storage, int32_t rank = 0);

  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const std::string& dir() const;  // empty for an engine built in memory
  const Json& config() const;  // the whole config.json
  const ModelConfig& model_config() const;
  const EngineLimits& limits() const;
  const QuantSpec& quant() const;
  // Tensor parallelism: the ranks the weights are split over (config.json "mapping": {"tp_size": N};
  // 1 without it) and the rank whose shard this Engine holds (rank{rank}.engine; 0 in memory).
  int32_t tp_size() const;
  int32_t rank() const;
  const Graph& graph() const;
  bool has_weight(const std::string& name) const;
  const Weight& weight(const std::string& name) const;  // throws Error naming the missing weight
  std::vector<std::string> weight_names() const;

 private:
  Engine();
  // Shared by load() and from_memory(): parses the config (`origin` names it in errors), then indexes
  // the weights and checks that the graph reads only what exists.
  void parse_config(const std::string& text, const std::string& origin);
  void set_weights(std::vector<Weight> weights, std::shared_ptr<const void> storage, const std::string& origin);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace rtllm
