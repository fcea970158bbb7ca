#include "cuda/linear_path_tuner.h"

#include <algorithm>
#include <cfloat>
#include <cstdlib>
#include <cstring>

#include "cuda/cuda_context.h"

namespace rtllm {
namespace {

constexpr int kReps = 5;  // timed launches per path; the fastest counts (the others met interference)

}  // namespace

LinearPathTuner::~LinearPathTuner() { set_tuning(false); }

bool LinearPathTuner::set_tuning(bool on) {
  if (on == tuning()) return true;
  if (!on) {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
    events_.clear();
    cudaFree(flush_);
    flush_ = nullptr;
    flush_bytes_ = 0;
    return true;
  }
  // RTLLM_LINEAR_TUNING=0: no timing, the defaults stand (same-build comparisons; bit-equal runs of one shape
  // in two processes or backends).
  const char* env = std::getenv("RTLLM_LINEAR_TUNING");
  if (env && std::strcmp(env, "0") == 0) return false;
  int device = 0, l2_bytes = 0;
  RTLLM_CUDA_CHECK(cudaGetDevice(&device));
  RTLLM_CUDA_CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
  const size_t bytes = 2 * std::max<size_t>(static_cast<size_t>(l2_bytes), 1u << 20);
  if (cudaMalloc(&flush_, bytes) != cudaSuccess) {
    cudaGetLastError();  // clears the allocation failure: tuning is optional
    flush_ = nullptr;
    return false;
  }
  flush_bytes_ = bytes;
  events_.resize(2 * kReps * 2);
  for (cudaEvent_t& e : events_) RTLLM_CUDA_CHECK(cudaEventCreate(&e));
  return true;
}

bool LinearPathTuner::should_time(const Shape& shape, int64_t T, cudaStream_t stream) const {
  if (!tuning()) return false;
  const auto it = choices_.find(shape);
  if (it != choices_.end() && it->second.count(T)) return false;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  RTLLM_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  return capture == cudaStreamCaptureStatusNone;
}

LinearPath LinearPathTuner::timed_choice(const Shape& shape, int64_t T, LinearPath default_path) const {
  const auto it = choices_.find(shape);
  if (it == choices_.end()) return default_path;
  const auto at_or_above = it->second.lower_bound(T);
  return at_or_above != it->second.end() ? at_or_above->second : default_path;
}

// One untimed run of each path (cuBLASLt's plan, the kernels' module loads), then kReps timed runs of each,
// alternating, each after an L2 flush. A path that refuses the shape (cuBLASLt has no algorithm for it,
// before launching anything) leaves the default, which the caller then runs as without tuning.
LinearPath LinearPathTuner::time_both(const Shape& shape, int64_t T, LinearPath default_path, cudaStream_t stream,
                                      const std::function<void()>& run_gemv, const std::function<void()>& run_gemm) {
  LinearPath& choice = choices_[shape][T];
  choice = default_path;
  try {
    run_gemv();
    run_gemm();
  } catch (const Error&) {
    return choice;
  }
  for (int rep = 0; rep < kReps; ++rep)
    for (int path = 0; path < 2; ++path) {
      cudaEvent_t* ev = &events_[(path * kReps + rep) * 2];
      RTLLM_CUDA_CHECK(cudaMemsetAsync(flush_, rep, flush_bytes_, stream));
      RTLLM_CUDA_CHECK(cudaEventRecord(ev[0], stream));
      (path == 0 ? run_gemv : run_gemm)();
      RTLLM_CUDA_CHECK(cudaEventRecord(ev[1], stream));
    }
  RTLLM_CUDA_CHECK(cudaEventSynchronize(events_.back()));
  float best[2] = {FLT_MAX, FLT_MAX};
  for (int path = 0; path < 2; ++path)
    for (int rep = 0; rep < kReps; ++rep) {
      const cudaEvent_t* ev = &events_[(path * kReps + rep) * 2];
      float ms = 0.0f;
      RTLLM_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[0], ev[1]));
      best[path] = std::min(best[path], ms);
    }
  const int fallback = default_path == LinearPath::kGemv ? 0 : 1, other = 1 - fallback;
  const bool switch_path = best[other] < best[fallback] * (1.0f - kMargin);
  choice = (switch_path ? other : fallback) == 0 ? LinearPath::kGemv : LinearPath::kGemm;
  return choice;
}

}  // namespace rtllm
