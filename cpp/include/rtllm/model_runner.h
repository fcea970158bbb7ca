// ModelRunner executes an engine's graph for one packed step on a device, through the op registry.
// It owns the device memory planned at load: weights, the KV-cache pool and the activation workspace.
// Block ids and their lifetimes belong to KVCacheManager; the runner only stores K/V where it is told.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "rtllm/common.h"
#include "rtllm/communicator.h"
#include "rtllm/engine.h"
#include "rtllm/sampler.h"

namespace rtllm {

enum class DeviceKind { kCpu, kCuda };

struct RuntimeConfig {
  DeviceKind device = DeviceKind::kCpu;
  int32_t max_num_tokens = 0;    // 0: the engine's limit; may only lower it
  int32_t max_batch_size = 0;    // 0: the engine's limit; may only lower it
  int32_t num_kv_blocks = 0;     // blocks in the KV pool (every layer has each block)
  int32_t tokens_per_block = 32;
  int32_t num_threads = 0;       // CPU worker threads; 0: all hardware threads
  bool enable_cuda_graphs = true;  // CUDA: decode-only steps replay a graph captured per batch-size bucket
  // With num_kv_blocks 0: the pool takes this fraction of the memory left free after the weights and
  // workspace: device memory on CUDA; on the CPU the host's available memory (MemAvailable), capped
  // by max_batch_size sequences of max_seq_len. 0: room for max_batch_size sequences of max_seq_len.
  float kv_free_memory_fraction = 0.0f;
  // CUDA: forward_and_sample draws on the device and only the sampled ids (and requested logprobs)
  // reach the host; false: the logits are copied to the host and sampled by the CPU Sampler.
  bool device_sampling = true;
  // The KV pool's element type, separate from the activations'. Unset: the backend's default (float32
  // on the CPU, the compute dtype on CUDA), or F8_E4M3 for an engine built with kv_cache_quant_algo FP8
  // (which refuses any other, naming both); config() reports the resolved one. An attention op that
  // cannot read it fails at load naming both.
  std::optional<DataType> kv_cache_dtype;
  // Rows of logits a step may compute (StepInputs::logits_indices); 0: max_batch_size (one per
  // sequence). Prompt log-probabilities need more: one per scored prompt token. The logits workspace,
  // the host logits and the device sampler are sized for it.
  int32_t max_num_logits = 0;
  // The ranks running a tensor-parallel engine (Engine::tp_size() > 1) together, this process being
  // Engine::rank(); its size and rank must match the engine's. Null: one rank.
  std::shared_ptr<Communicator> communicator;
};

// True when this build has the CUDA backend and a CUDA device is present.
RTLLM_API bool cuda_available();
// True when the CPU linear runs BF16 weights on AMX tiles (built with AMX-BF16, the CPU and the OS offer
// it, RTLLM_CPU_AMX is not "0"): engines loaded now place such weights for it; F16 weights too with
// RTLLM_CPU_AMX=1.
RTLLM_API bool cpu_amx_available();

// One packed step: sequences with context (prefill) tokens first, then generation sequences.
// Sequence s contributes num_new_tokens[s] consecutive tokens to input_ids, at positions
// num_cached_tokens[s] .. num_cached_tokens[s] + num_new_tokens[s] - 1.
struct StepInputs {
  std::vector<int32_t> input_ids;          // [num_tokens]
  std::vector<int32_t> num_new_tokens;     // [num_seqs]
  std::vector<int32_t> num_cached_tokens;  // [num_seqs] tokens whose K/V are already in the cache
  // [num_seqs, max_blocks_per_seq] row-major, unused entries -1. Row s lists the blocks holding
  // sequence s's tokens in order; it must cover num_cached_tokens[s] + num_new_tokens[s] tokens.
  std::vector<int32_t> block_table;
  int32_t max_blocks_per_seq = 0;
  // [num_logits] packed token indices whose logits the step computes, row r for logits_indices[r]
  // (any order, repeats allowed). Empty: each sequence's last new token, row s for sequence s.
  std::vector<int32_t> logits_indices;

  int32_t num_seqs() const { return static_cast<int32_t>(num_new_tokens.size()); }
  int32_t num_tokens() const { return static_cast<int32_t>(input_ids.size()); }
  void clear();
};

class RTLLM_API ModelRunner {
 public:
  // Plans and allocates all memory; throws Error if the device cannot hold it (naming both sizes).
  ModelRunner(std::shared_ptr<const Engine> engine, const RuntimeConfig& config);
  ~ModelRunner();
  ModelRunner(const ModelRunner&) = delete;
  ModelRunner& operator=(const ModelRunner&) = delete;

  // Runs the graph: writes the new tokens' K/V into their blocks and returns the logits of the
  // tokens of inputs.logits_indices (by default each sequence's last new token), [num_logits,
  // vocab_size] float32 on the host. The buffer is owned by the runner and valid until the next call.
  // Throws InvalidArgument for inputs over the limits.
  const float* forward(const StepInputs& inputs);

  // forward() followed by a draw from each row of logits: out[r] for sampling[r], one input per
  // row (per sequence by default; an input with score_token_id set scores that token). The one
  // sampling entry point of a step (Sampler's stages and semantics on every backend). An input
  // without a config draws nothing; out[s].token_id is -1 then and when the draw fails (every token
  // masked or -inf). Where the draw runs is the backend's choice: the CPU backend samples with the
  // CPU Sampler; CUDA with device_sampling draws on the device (only ids and requested logprobs
  // reach the host) and samples the logits on the host only for what its kernel lacks (num_logprobs
  // above 64) or with device_sampling off.
  void forward_and_sample(const StepInputs& inputs, const std::vector<SamplingInput>& sampling,
                          std::vector<SampledToken>* out);

  // Copies whole KV blocks, source -> destination, in every layer (K and V), in order, before the
  // next forward reads them (copy-on-write of a partially reused prefix block). Throws
  // InvalidArgument for a block id outside [0, num_kv_blocks) or a pair with source == destination.
  void copy_blocks(const std::vector<std::pair<int32_t, int32_t>>& copies);

  // Calibration (the quantize pass's activation ranges). observe_amax starts recording, for each named
  // node output, the largest |value| it holds over every later step (all its rows), and drops earlier
  // observations (an empty list stops observing). observed_amax returns the running values by name (0
  // before any step). Throws InvalidArgument for a name that is no node's output and on a backend that
  // cannot observe (CUDA so far).
  void observe_amax(const std::vector<std::string>& tensor_names);
  std::vector<std::pair<std::string, float>> observed_amax() const;
  // The same per column (the last dim) of each named 2-d node output: SmoothQuant's per-input-channel
  // ranges. Separate from observe_amax (each call replaces only its own list). Throws InvalidArgument for
  // a name that is no node's output, an output that is not [rows, fixed columns], and on a backend that
  // cannot observe per channel (CUDA: calibrate on the CPU).
  void observe_channel_amax(const std::vector<std::string>& tensor_names);
  std::vector<std::pair<std::string, std::vector<float>>> observed_channel_amax() const;
  // Calibration of AWQ / GPTQ: capture_outputs starts keeping, for each named node output, a float32 copy
  // of the values it holds after each step (replaced by the next step; an empty list stops). captured
  // returns (rows, cols, values) of the latest step. Same errors as observe_amax; captured throws for a
  // name that is not captured.
  void capture_outputs(const std::vector<std::string>& tensor_names);
  std::tuple<int64_t, int64_t, std::vector<float>> captured(const std::string& tensor_name) const;
  // Per layer {amax |K|, amax |V|} of one sequence's first num_tokens tokens as the KV pool holds them
  // (K after qk_norm and RoPE), block_table listing its blocks in order. Reads a float32 pool; throws
  // InvalidArgument for another dtype, a block id outside the pool or a table too short.
  std::vector<std::array<float, 2>> kv_cache_amax(const std::vector<int32_t>& block_table, int32_t num_tokens);

  const Engine& engine() const;
  const RuntimeConfig& config() const;  // with the 0 fields resolved
  int32_t vocab_size() const;
  // Bytes one KV block takes over all layers (K and V) in kv_cache_dtype; used to size the pool.
  static size_t kv_bytes_per_block(const ModelConfig& model, int32_t tokens_per_block, DataType kv_cache_dtype);
  // Bytes of the whole KV pool as allocated (every block, every layer).
  size_t kv_pool_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace rtllm
