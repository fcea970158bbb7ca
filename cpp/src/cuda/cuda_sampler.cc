#include "cuda/cuda_sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cuda/cuda_context.h"
#include "rtllm/kernels/sampling.cuh"
#include "workspace.h"

namespace rtllm {

namespace {

using kernels::kMaxTopLogprobs;
using kernels::SamplingParamsDevice;

// Offsets in bytes, each a multiple of 16, of one step's inputs in the staging buffer (and its
// device mirror): params [R], four offset arrays [R + 1] int32, then 4-byte words: the prompt,
// output, masked and bias ids (int32), the bias values (float32) and, when a sequence has a
// LogitsProcessor, the allowed-token bitmask [R, num_bitmask_words(vocab)] (uint32). Per step, so a
// step copies only what it uses.
struct InputLayout {
  size_t params = 0, prompt_offsets = 0, output_offsets = 0, masked_offsets = 0, bias_offsets = 0, words = 0;

  explicit InputLayout(int32_t num_seqs) {
    size_t at = 0;
    auto take = [&](size_t num_bytes) {
      const size_t offset = at;
      at += round_up(num_bytes, 16);
      return offset;
    };
    params = take(num_seqs * sizeof(SamplingParamsDevice));
    prompt_offsets = take((num_seqs + 1) * sizeof(int32_t));
    output_offsets = take((num_seqs + 1) * sizeof(int32_t));
    masked_offsets = take((num_seqs + 1) * sizeof(int32_t));
    bias_offsets = take((num_seqs + 1) * sizeof(int32_t));
    words = at;
  }
};

// Offsets in bytes of the results for R sequences and max_top top logprobs: ids [R] int32,
// logprobs [R, 1 + max_top] float32, top ids [R, max_top] int32; `total` is what one copy brings back.
struct ResultLayout {
  size_t ids = 0, logprobs = 0, top_ids = 0, total = 0;

  ResultLayout(int32_t num_seqs, int32_t max_top, bool with_logprobs) {
    logprobs = round_up(num_seqs * sizeof(int32_t), 16);
    top_ids = logprobs + round_up(static_cast<size_t>(num_seqs) * (1 + max_top) * sizeof(float), 16);
    total = with_logprobs ? top_ids + static_cast<size_t>(num_seqs) * max_top * sizeof(int32_t)
                          : num_seqs * sizeof(int32_t);
  }
};

bool has_repetition_penalty(const SamplingConfig& c) { return c.repetition_penalty != 1.0f; }
bool uses_output_ids(const SamplingConfig& c) {
  return has_repetition_penalty(c) || c.presence_penalty != 0.0f || c.frequency_penalty != 0.0f;
}
size_t list_size(const std::vector<int32_t>* ids) { return ids ? ids->size() : 0; }
bool has_bitmask(const SamplingInput& in) { return in.config && in.allowed_token_bitmask; }

// Greedy, no lists, no logprobs: the row of a sequence that draws nothing this step.
SamplingParamsDevice idle_params() {
  SamplingParamsDevice p{};
  p.temperature = 0.0f;
  p.top_p = 1.0f;
  p.repetition_penalty = 1.0f;
  p.num_logprobs = -1;
  return p;
}

SamplingParamsDevice device_params(const SamplingInput& in) {
  const SamplingConfig& c = *in.config;
  SamplingParamsDevice p{};
  p.temperature = c.temperature;
  p.top_p = c.top_p;
  p.min_p = c.min_p;
  p.repetition_penalty = c.repetition_penalty;
  p.presence_penalty = c.presence_penalty;
  p.frequency_penalty = c.frequency_penalty;
  p.top_k = c.top_k;
  p.num_logprobs = c.num_logprobs;
  p.seed = in.seed;
  p.step = in.step;
  return p;
}

}  // namespace

CudaSampler::CudaSampler(int32_t max_num_seqs, int32_t vocab_size, int32_t max_seq_len)
    : max_num_seqs_(max_num_seqs), vocab_size_(vocab_size) {
  RTLLM_CHECK(max_num_seqs >= 1 && vocab_size >= 1, "CudaSampler needs max_num_seqs >= 1 and vocab_size >= 1, got ",
              max_num_seqs, " and ", vocab_size);
  const ResultLayout results(max_num_seqs, kMaxTopLogprobs, true);
  RTLLM_CUDA_CHECK(cudaMallocHost(&results_host_, results.total));
  RTLLM_CUDA_CHECK(cudaMalloc(&results_, results.total));
  const size_t workspace_bytes = kernels::sample_workspace_bytes(max_num_seqs, vocab_size);
  RTLLM_CUDA_CHECK(cudaMalloc(&workspace_, std::max<size_t>(workspace_bytes, 4)));
  // Room for the prompt and output of every sequence and a bitmask row each.
  reserve_words(static_cast<size_t>(max_num_seqs) * (std::max(max_seq_len, 1) + num_bitmask_words(vocab_size)));
}

CudaSampler::~CudaSampler() {
  cudaFreeHost(staging_);
  cudaFree(inputs_);
  cudaFreeHost(results_host_);
  cudaFree(results_);
  cudaFree(workspace_);
}

bool CudaSampler::supports(const std::vector<SamplingInput>& inputs) {
  return std::all_of(inputs.begin(), inputs.end(), [](const SamplingInput& in) {
    // Scoring a given token (prompt logprobs) is the host Sampler's.
    return !in.config || (in.config->num_logprobs <= kMaxTopLogprobs && in.score_token_id < 0);
  });
}

// Called between steps only (the previous step's copies are done: sample() synchronizes).
void CudaSampler::reserve_words(size_t num_words) {
  if (num_words <= words_capacity_ && staging_) return;
  cudaFreeHost(staging_);
  cudaFree(inputs_);
  staging_ = inputs_ = nullptr;
  words_capacity_ = std::max(num_words, 2 * words_capacity_);
  const size_t num_bytes = InputLayout(max_num_seqs_).words + words_capacity_ * sizeof(uint32_t);
  RTLLM_CUDA_CHECK(cudaMallocHost(&staging_, num_bytes));
  RTLLM_CUDA_CHECK(cudaMalloc(&inputs_, num_bytes));
}

// Writes the step's params, CSR lists and bitmasks into the staging buffer; returns the bytes to
// copy. Prompt and output ids are sent only for the sequences whose penalties read them.
CudaSampler::Staged CudaSampler::stage(const std::vector<SamplingInput>& inputs) {
  const int32_t num_seqs = static_cast<int32_t>(inputs.size());
  const size_t num_words_per_mask = static_cast<size_t>(num_bitmask_words(vocab_size_));
  Staged staged;
  staged.has_bitmask = std::any_of(inputs.begin(), inputs.end(), has_bitmask);
  size_t num_words = 0;
  for (const SamplingInput& in : inputs) {
    if (!in.config) continue;
    if (has_repetition_penalty(*in.config)) num_words += list_size(in.prompt_token_ids);
    if (uses_output_ids(*in.config)) num_words += list_size(in.output_token_ids);
    num_words += list_size(in.masked_token_ids) + 2 * in.config->logit_bias.size();
  }
  if (staged.has_bitmask) num_words += num_seqs * num_words_per_mask;
  reserve_words(num_words);
  const InputLayout layout(num_seqs);
  auto* base = static_cast<uint8_t*>(staging_);
  auto* params = reinterpret_cast<SamplingParamsDevice*>(base + layout.params);
  auto* prompt_offsets = reinterpret_cast<int32_t*>(base + layout.prompt_offsets);
  auto* output_offsets = reinterpret_cast<int32_t*>(base + layout.output_offsets);
  auto* masked_offsets = reinterpret_cast<int32_t*>(base + layout.masked_offsets);
  auto* bias_offsets = reinterpret_cast<int32_t*>(base + layout.bias_offsets);
  int32_t* ids = reinterpret_cast<int32_t*>(base + layout.words);

  // One pass per list kind, each a contiguous CSR array whose offsets count from its own start.
  int32_t at = 0, start = 0;
  auto append = [&](int32_t* offsets, int32_t s, const std::vector<int32_t>* list, bool wanted) {
    offsets[s] = at - start;
    if (wanted && list) {
      std::copy(list->begin(), list->end(), ids + at);
      at += static_cast<int32_t>(list->size());
    }
  };
  auto close = [&](int32_t* offsets) {
    offsets[num_seqs] = at - start;
    start = at;
  };
  for (int32_t s = 0; s < num_seqs; ++s) {
    const SamplingInput& in = inputs[s];
    params[s] = in.config ? device_params(in) : idle_params();
    append(prompt_offsets, s, in.prompt_token_ids, in.config && has_repetition_penalty(*in.config));
  }
  close(prompt_offsets);
  for (int32_t s = 0; s < num_seqs; ++s)
    append(output_offsets, s, inputs[s].output_token_ids, inputs[s].config && uses_output_ids(*inputs[s].config));
  close(output_offsets);
  for (int32_t s = 0; s < num_seqs; ++s) append(masked_offsets, s, inputs[s].masked_token_ids, inputs[s].config);
  close(masked_offsets);
  // Bias ids here (ascending per sequence, as the kernel's binary search needs: std::map's order),
  // their values right after them (same offsets).
  for (int32_t s = 0; s < num_seqs; ++s) {
    bias_offsets[s] = at - start;
    if (!inputs[s].config) continue;
    for (const auto& [token_id, bias] : inputs[s].config->logit_bias) ids[at++] = token_id;
  }
  close(bias_offsets);
  staged.bias_values = at;
  float* bias_values = reinterpret_cast<float*>(ids + at);
  for (const SamplingInput& in : inputs)
    if (in.config)
      for (const auto& [token_id, bias] : in.config->logit_bias) *bias_values++ = bias;
  at += bias_offsets[num_seqs];
  staged.bitmask = at;
  if (staged.has_bitmask) {
    // Rows of the sequences without a processor allow every token.
    uint32_t* rows = reinterpret_cast<uint32_t*>(ids + at);
    for (int32_t s = 0; s < num_seqs; ++s) {
      uint32_t* row = rows + s * num_words_per_mask;
      if (has_bitmask(inputs[s])) {
        std::copy(inputs[s].allowed_token_bitmask, inputs[s].allowed_token_bitmask + num_words_per_mask, row);
      } else {
        std::fill(row, row + num_words_per_mask, ~0u);
      }
    }
    at += static_cast<int32_t>(num_seqs * num_words_per_mask);
  }
  staged.num_bytes = layout.words + static_cast<size_t>(at) * sizeof(uint32_t);
  return staged;
}

void CudaSampler::sample(const float* logits, const std::vector<SamplingInput>& inputs,
                         std::vector<SampledToken>* out, cudaStream_t stream) {
  const int32_t num_seqs = static_cast<int32_t>(inputs.size());
  RTLLM_CHECK(num_seqs >= 1 && num_seqs <= max_num_seqs_, "CudaSampler: ", num_seqs, " sequences outside [1, ",
              max_num_seqs_, "]");
  RTLLM_CHECK(supports(inputs), "CudaSampler: num_logprobs above ", kMaxTopLogprobs);
  int32_t max_top = 0;
  bool with_logprobs = false;
  for (const SamplingInput& in : inputs) {
    if (!in.config || in.config->num_logprobs < 0) continue;
    with_logprobs = true;
    max_top = std::max(max_top, std::min(in.config->num_logprobs, vocab_size_));
  }
  const Staged staged = stage(inputs);
  RTLLM_CUDA_CHECK(cudaMemcpyAsync(inputs_, staging_, staged.num_bytes, cudaMemcpyHostToDevice, stream));

  const InputLayout in(num_seqs);
  const ResultLayout res(num_seqs, max_top, with_logprobs);
  auto* dev_in = static_cast<const uint8_t*>(inputs_);
  auto* dev_out = static_cast<uint8_t*>(results_);
  const int32_t* words = reinterpret_cast<const int32_t*>(dev_in + in.words);
  const auto* prompt_offsets = reinterpret_cast<const int32_t*>(dev_in + in.prompt_offsets);
  const auto* output_offsets = reinterpret_cast<const int32_t*>(dev_in + in.output_offsets);
  const auto* masked_offsets = reinterpret_cast<const int32_t*>(dev_in + in.masked_offsets);
  const auto* bias_offsets = reinterpret_cast<const int32_t*>(dev_in + in.bias_offsets);
  // Each list's length is its offsets' last entry, known on the host: the lists' starts in `words`.
  const auto* host_in = static_cast<const uint8_t*>(staging_);
  auto list_length = [&](size_t offsets) { return reinterpret_cast<const int32_t*>(host_in + offsets)[num_seqs]; };
  const int32_t* prompt_ids = words;
  const int32_t* output_ids = prompt_ids + list_length(in.prompt_offsets);
  const int32_t* masked_ids = output_ids + list_length(in.output_offsets);
  const int32_t* bias_ids = masked_ids + list_length(in.masked_offsets);
  const auto* bias_values = reinterpret_cast<const float*>(words + staged.bias_values);
  const auto* bitmask = staged.has_bitmask ? reinterpret_cast<const uint32_t*>(words + staged.bitmask) : nullptr;
  float* out_logprobs = with_logprobs ? reinterpret_cast<float*>(dev_out + res.logprobs) : nullptr;
  int32_t* out_top_ids = with_logprobs ? reinterpret_cast<int32_t*>(dev_out + res.top_ids) : nullptr;
  RTLLM_CUDA_CHECK(kernels::sample(reinterpret_cast<int32_t*>(dev_out + res.ids), out_logprobs, out_top_ids, logits,
                                   reinterpret_cast<const SamplingParamsDevice*>(dev_in + in.params), prompt_ids,
                                   prompt_offsets, output_ids, output_offsets, masked_ids, masked_offsets, bias_ids,
                                   bias_values, bias_offsets, bitmask, num_seqs, vocab_size_, max_top, workspace_,
                                   stream));
  RTLLM_CUDA_CHECK(cudaMemcpyAsync(results_host_, results_, res.total, cudaMemcpyDeviceToHost, stream));
  // The staging and result buffers are reused by the next step: wait for this one.
  RTLLM_CUDA_CHECK(cudaStreamSynchronize(stream));

  const auto* host = static_cast<const uint8_t*>(results_host_);
  const auto* sampled_ids = reinterpret_cast<const int32_t*>(host + res.ids);
  const auto* logprobs = reinterpret_cast<const float*>(host + res.logprobs);
  const auto* top_ids = reinterpret_cast<const int32_t*>(host + res.top_ids);
  out->assign(num_seqs, SampledToken{});
  for (int32_t s = 0; s < num_seqs; ++s) {
    const SamplingInput& input = inputs[s];
    if (!input.config) continue;
    SampledToken& token = (*out)[s];
    token.token_id = sampled_ids[s];
    const int32_t num_logprobs = input.config->num_logprobs;
    if (token.token_id < 0 || num_logprobs < 0) continue;
    const float* row = logprobs + static_cast<size_t>(s) * (1 + max_top);
    token.logprob = row[0];
    for (int32_t j = 0; j < std::min(num_logprobs, max_top); ++j) {
      const int32_t id = top_ids[static_cast<size_t>(s) * max_top + j];
      if (id >= 0) token.top_logprobs.push_back({id, row[1 + j]});
    }
  }
}

}  // namespace rtllm
