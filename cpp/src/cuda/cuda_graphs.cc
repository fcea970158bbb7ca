#include "cuda/cuda_graphs.h"

#include <algorithm>

#include "cuda/cuda_context.h"

namespace rtllm {

DecodeGraphs::DecodeGraphs(int32_t max_batch_size, int32_t max_num_tokens) {
  const int32_t limit = std::min(max_batch_size, max_num_tokens);
  for (int32_t b = 1; b < limit; b *= 2) buckets_.push_back(b);
  if (limit >= 1) buckets_.push_back(limit);
}

DecodeGraphs::~DecodeGraphs() {
  for (auto& [bucket, exec] : graphs_) cudaGraphExecDestroy(exec);
}

int32_t DecodeGraphs::bucket_for(int32_t num_seqs) const {
  auto it = std::lower_bound(buckets_.begin(), buckets_.end(), num_seqs);
  return it == buckets_.end() ? 0 : *it;
}

void DecodeGraphs::capture(int32_t bucket, cudaStream_t stream, const std::function<void()>& enqueue) {
  RTLLM_CHECK(!captured(bucket), "the graph of bucket ", bucket, " is already captured");
  // Thread-local mode: other threads' CUDA calls are not disturbed by (and do not break) the capture.
  RTLLM_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  try {
    enqueue();
  } catch (...) {
    cudaGraph_t partial = nullptr;
    cudaStreamEndCapture(stream, &partial);  // leave the stream usable
    if (partial) cudaGraphDestroy(partial);
    throw;
  }
  cudaGraph_t graph = nullptr;
  RTLLM_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  RTLLM_CUDA_CHECK(err);
  graphs_[bucket] = exec;
}

void DecodeGraphs::launch(int32_t bucket, cudaStream_t stream) const {
  auto it = graphs_.find(bucket);
  RTLLM_CHECK(it != graphs_.end(), "no graph captured for bucket ", bucket);
  RTLLM_CUDA_CHECK(cudaGraphLaunch(it->second, stream));
}

}  // namespace rtllm
