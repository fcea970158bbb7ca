// CUDA graphs for decode-only steps: one graph per batch-size bucket (1, 2, 4, ..., max_batch_size),
// all captured at load (CudaBackend::warm_up), each after one eager warm-up run of it. A step of
// num_seqs sequences is padded up to its bucket by the runner, so the captured kernels' sizes (tokens,
// sequences, decode split count) are fixed; per-step values live in device buffers at fixed addresses.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>
#include <map>
#include <vector>

namespace rtllm {

class DecodeGraphs {
 public:
  // Buckets up to max_batch_size, none larger than max_num_tokens (a padded step must fit the workspace).
  DecodeGraphs(int32_t max_batch_size, int32_t max_num_tokens);
  ~DecodeGraphs();
  DecodeGraphs(const DecodeGraphs&) = delete;
  DecodeGraphs& operator=(const DecodeGraphs&) = delete;

  // The smallest bucket >= num_seqs, or 0 when there is none.
  int32_t bucket_for(int32_t num_seqs) const;
  const std::vector<int32_t>& buckets() const { return buckets_; }
  bool captured(int32_t bucket) const { return graphs_.count(bucket) != 0; }
  // Records the work `enqueue` puts on `stream` (without running it) as the bucket's graph.
  void capture(int32_t bucket, cudaStream_t stream, const std::function<void()>& enqueue);
  void launch(int32_t bucket, cudaStream_t stream) const;

 private:
  std::vector<int32_t> buckets_;
  std::map<int32_t, cudaGraphExec_t> graphs_;
};

}  // namespace rtllm
