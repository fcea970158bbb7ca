// Which of a linear op's two paths runs a decode-sized linear: the GEMV kernel (bound by reading the weight
// once) or cuBLASLt. Where one overtakes the other depends on the shape and on the GPU (on an H100, cuBLASLt
// beats the GEMV at an LM head of 8 and 16 tokens and loses at the other linears), so the choice is timed on
// the device once per shape and token count, while tuning is on: in the backend's warm-up, whose eager run of
// each decode-graph bucket comes before that bucket's capture. Outside tuning the choice of the nearest timed
// token count at or above the step's stands, and for shapes never timed the caller's default.
//
// The two paths round differently, so two processes whose timings chose differently may produce logits that
// differ in the last bits (as a different batch size already does); within a process the choice is fixed.
// So may a backend without CUDA graphs, whose warm-up times nothing, against one with them.
// RTLLM_LINEAR_TUNING=0 turns the timing off: the defaults stand everywhere.
//
// Each launch is timed after the L2 is flushed: in a decode step the next use of a layer's weight is a whole
// step away, so the op reads its weight from device memory, and a weight that fits in the L2 (an 8B model's
// attention projections do) would otherwise be timed at L2 speed. The other path must win by kMargin to
// replace the default, so that timing noise does not flip a choice that makes no difference.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>
#include <map>
#include <tuple>
#include <vector>

namespace rtllm {

enum class LinearPath { kGemv, kGemm };
// The op whose paths are timed (its kernels differ per op and, for FP8, per scaling).
enum class LinearOp { kDense, kFp8PerToken, kFp8Static };

class LinearPathTuner {
 public:
  // The shape of a linear, with the dtypes and bias that select its kernels: (op, N, K, x dtype, y dtype, bias).
  // Plain values: a step's lookup allocates nothing.
  using Shape = std::tuple<LinearOp, int64_t, int64_t, int, int, bool>;
  static constexpr float kMargin = 0.02f;

  LinearPathTuner() = default;
  ~LinearPathTuner();
  LinearPathTuner(const LinearPathTuner&) = delete;
  LinearPathTuner& operator=(const LinearPathTuner&) = delete;

  // Turns timing on (allocating an L2-flush buffer and events) or off (freeing them). Returns false, and
  // stays off, where the flush buffer does not fit in device memory: the defaults then stand.
  bool set_tuning(bool on);
  bool tuning() const { return flush_ != nullptr; }

  // The path for `shape` at T tokens. While tuning, a (shape, T) never timed is timed now, both paths on
  // `stream` (each runs several times; the caller then runs the chosen one), unless the stream is being
  // captured. run_gemv and run_gemm launch one run of each path. A template so that a step's lookup wraps
  // nothing in a std::function (whose captures would be allocated); only the timing does.
  template <typename RunGemv, typename RunGemm>
  LinearPath choose(const Shape& shape, int64_t T, LinearPath default_path, cudaStream_t stream,
                    const RunGemv& run_gemv, const RunGemm& run_gemm) {
    if (should_time(shape, T, stream)) return time_both(shape, T, default_path, stream, run_gemv, run_gemm);
    return timed_choice(shape, T, default_path);
  }

 private:
  bool should_time(const Shape& shape, int64_t T, cudaStream_t stream) const;
  // The choice timed at T, else at the nearest timed token count above T, else default_path.
  LinearPath timed_choice(const Shape& shape, int64_t T, LinearPath default_path) const;
  // Times both paths, records the choice for (shape, T) and returns it.
  LinearPath time_both(const Shape& shape, int64_t T, LinearPath default_path, cudaStream_t stream,
                       const std::function<void()>& run_gemv, const std::function<void()>& run_gemm);

  std::map<Shape, std::map<int64_t, LinearPath>> choices_;
  void* flush_ = nullptr;  // twice the L2, written before each timed launch
  size_t flush_bytes_ = 0;
  std::vector<cudaEvent_t> events_;  // [path][rep][start, stop]
};

}  // namespace rtllm
